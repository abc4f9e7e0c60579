"""Benchmarks: ``python -m gd.bench.model`` (the model alone), ``python -m gd.bench.train`` (a training step)."""
