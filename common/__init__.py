"""Leaf helpers shared by every package: process settings and crash-safe file writes.

Depends on nothing of ours, so ``captioner``, ``storage``, ``bot`` and ``train`` may all import it.
"""
