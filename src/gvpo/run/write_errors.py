"""A write that fails while a run works (disk full, quota, read-only or vanished folder) ends the run with one
line instead of a traceback: what could not be written and where, why, the last intact checkpoint and the
resume command. Half-written files are removed first, so nothing is left that looks complete.

The run's writes and what a failure leaves:

- a checkpoint (:func:`gvpo.run.checkpoint.save_checkpoint`): its ``.tmp-step-N`` folder goes, earlier checkpoints stay;
- ``final/`` (:func:`gvpo.run.checkpoint.save_final`): written as ``.tmp-final`` and renamed, so it is whole or absent;
- ``metrics.jsonl`` and the trackers of ``output.report_to`` (:class:`gvpo.run.metrics.MetricsLog`): a partly
  appended row is cut off again, so a resume reads whole rows only;
- ``plots.png`` (:func:`gvpo.run.metrics.write_plots`): the run is complete by then, so a failure is a warning.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .checkpoint_manifest import newest_intact
from .interrupt import resume_hint

WRITE_ERRORS = (OSError, SafetensorError)
"""What a failed write raises: ``OSError`` (``ENOSPC``, ``EDQUOT``, ``EROFS``...), and safetensors' own error,
which wraps the ``OSError`` of its Rust writer."""


class RunWriteError(RuntimeError):
    """Part of a run could not be written; the message names it, why, what is kept and how to resume."""


def reason(err: BaseException) -> str:
    """The cause in a few words: ``strerror (file)`` for an ``OSError``, else the first line of the message.

    >>> import errno
    >>> reason(OSError(errno.ENOSPC, "No space left on device", "run/state.pt"))
    'No space left on device (run/state.pt)'
    """
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def kept(run_dir: Path) -> str:
    """The newest intact checkpoint of ``run_dir`` and the command that resumes from it."""
    last, _ = newest_intact(Path(run_dir) / "checkpoints", hashes=False)
    return resume_hint(run_dir, last)


def remove(path: Path) -> None:
    """Delete a half-written file or folder (nothing if it is absent)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(what: str, run_dir: Path, partial: Path | None = None):
    """Inside, a failed write raises :class:`RunWriteError` ``could not write <what>: <why>; <kept>``, after
    removing ``partial`` (what was being written) when given."""
    try:
        yield
    except WRITE_ERRORS as err:
        if partial is not None:
            remove(partial)
        raise RunWriteError(f"could not write {what}: {reason(err)}; {kept(run_dir)}") from err
