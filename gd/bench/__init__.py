"""Benchmarks, each run as ``python -m gd.bench.<name>``: model (the model alone, per attention backend),
train (a training step), loader (data loading), sampler (samplers per method), sample (end-to-end gd.sample
and FID-50K GPU-hours)."""
