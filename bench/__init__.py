"""Benchmarks of captionbot; each writes a result with its run's context to bench/results/."""
