"""Benchmarks, each run as ``python -m gd.bench.<name>``: model (the model alone, per attention backend),
train (a training step), step_cost (host syncs, operators and bytes per step phase), memory (peak memory per
engine), loader (data loading), sampler (samplers per method), sample (end-to-end gd.sample and FID-50K
GPU-hours), gpu_check (the prepared GPU check: most of the above in one command under a time budget)."""
