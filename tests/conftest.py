"""Shared test set-up: no network for Hugging Face, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

collect_ignore = ["small_checkpoint_files"]  # its sitecustomize.py changes gvpo.run.checkpoint when imported


@pytest.fixture
def one_thread():
    """Run a test of many tiny tensor ops on one thread (much faster on a busy 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
