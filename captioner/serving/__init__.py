"""Serving the captioner to many callers: a batching worker behind an async interface."""
