"""Put on ``PYTHONPATH`` by ``tests/test_sharded.py``: every Python process started with it (torchrun's
workers included) writes checkpoints in files of at most 4 KiB of tensors, so a tiny model's checkpoint
spans many files per process (``gvpo.run.checkpoint.FILE_BYTES``)."""

import gvpo.run.checkpoint

gvpo.run.checkpoint.FILE_BYTES = 4096
