"""Stopping a run on SIGTERM (schedulers) or Ctrl-C (people) without losing its steps.

The first signal only sets a flag: the trainer finishes the current step, writes a checkpoint and raises
:class:`Interrupted`, which names the checkpoint and the resume command. A second signal does not wait:
it raises ``KeyboardInterrupt`` at once (the atomic checkpoint write means nothing half-written is kept).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of ending the process; a second
    one raises ``KeyboardInterrupt``. Outside the main thread it installs nothing (Python allows handlers only
    there) and :attr:`signum` stays ``None``."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping at once")
        self.signum = signum
        print(f"\ngvpo: {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self, accelerator=None) -> bool:
        """Whether any process got a signal (all processes agree, so they stop at the same step)."""
        if accelerator is None or accelerator.num_processes == 1:
            return self.signum is not None
        import torch

        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=accelerator.device)
        if float(accelerator.reduce(flag, "sum")[0]) and self.signum is None:
            self.signum = signal.SIGTERM  # another process got it
        return self.signum is not None


def resume_hint(run_dir: Path, checkpoint: Path | None) -> str:
    """Where the run's work is and the command that continues it."""
    where = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint was written yet"
    return f"{where}; resume with: gvpo train --resume {run_dir}"
