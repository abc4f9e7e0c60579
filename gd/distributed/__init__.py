"""Where a process runs and how ranks share a group: the ground floor the trainer, sampling, the shard builder and
launch validation all read (:mod:`gd.distributed.env`, :mod:`gd.distributed.layout`)."""
