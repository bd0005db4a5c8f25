"""Admission queue, micro-batching and the worker that owns the pipeline."""
