"""The run folder's guards: never reuse one silently, one writer at a time, resume only with a compatible config.

- :func:`check_new_run`: a new run refuses a folder that already holds a run (``--resume`` continues it,
  a new ``output.name`` starts elsewhere, ``--overwrite`` replaces it).
- :class:`RunLock`: an exclusive ``flock`` on ``<run>/.lock``; the kernel drops it when the process ends, however
  it ends, so a lock left by a killed run is stale by construction and the next run takes it.
- :func:`resume_changes`: the keys a resumed run may change (:data:`RESUMABLE`) and the refusal of the others;
  the saved ``config.yaml`` is never rewritten, each resume's changes are appended to ``resumes.jsonl`` and
  replayed by :func:`saved_config`.
- :func:`share_like_umask`: files written with mode 0600 (safetensors does) get the mode the umask gives.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, see RunLock
    fcntl = None

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final")
"""What makes a folder a run folder."""

RESUMABLE = frozenset({
    "train.max_steps", "train.eval_every", "train.eval_n", "train.checkpoint_every", "train.keep_checkpoints",
    "train.micro_batch_size", "train.share_prompts", "train.fsdp", "model.gradient_checkpointing", "task.eval_tasks",
    "train.async_backend", "train.async_threads",
    "task.reward_timeout_s", "rollout.vllm_gpu_memory_utilization", "output.dir", "output.name",
    "output.report_to", "output.plots", "output.progress",
})
"""Keys that may differ from the saved config on ``--resume``: how long, how often to evaluate and save, how the
update is split into micro-batches or shards (the same update; checkpoints reshard), which generator backend makes
the lagged groups (the same groups), and where and how results are shown. Everything else
(model, task, rewards, sampling, objective, optimizer, seed, batch shape) defines the run and is refused."""


class RunFolderError(RuntimeError):
    """A run folder cannot be used as asked; the message names the folder and the ways on."""


def is_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_FILES)


def check_new_run(run_dir: Path, overwrite: bool = False) -> None:
    """Refuse to start a new run in a folder that holds one, unless ``overwrite``; refuse a file in the way."""
    check_no_file_in_the_way(run_dir)
    if is_run(run_dir) and not overwrite:
        raise RunFolderError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir}, start a new one with another "
            "output.name (or --output-dir), or replace it with --overwrite")


def check_no_file_in_the_way(run_dir: Path) -> None:
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise RunFolderError(f"cannot create the run folder {run_dir}: {parent} is a file, not a folder")


def check_resumable(run_dir: Path) -> None:
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"--resume {run_dir}: no config.yaml there (is it a run folder?)")


def clear_run(run_dir: Path) -> None:
    """``--overwrite``: remove the old run's files (the lock stays: it is held)."""
    for name in [*RUN_FILES, "plots.png", "resumes.jsonl", "metrics.tmp"]:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunLock:
    """One writer per run folder: an exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``.

    The lock file holds the holder's host and pid for the refusal message. The kernel releases the lock when
    the holder's file is closed, including when the process is killed, so a leftover ``.lock`` is never
    mistaken for a live run. (On file systems where ``flock`` is not shared between hosts, two hosts are not
    kept apart; without ``fcntl`` (Windows) there is no lock.)
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise RunFolderError(f"{self.path.parent} is in use by another run ({holder}); wait for it to "
                                     "end, or use another output.name") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def saved_changes(run_dir: Path) -> dict:
    """``key -> value`` changed by earlier resumes (``resumes.jsonl``), in order, later ones winning."""
    path = Path(run_dir) / "resumes.jsonl"
    changes: dict = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                changes.update({k: new for k, (_, new) in json.loads(line)["changed"].items()})
    return changes


def saved_config(run_dir: Path):
    """The run's config as it stands: ``config.yaml`` with the changes of earlier resumes applied."""
    from ..config import load_config

    return load_config(Path(run_dir) / "config.yaml", saved_changes(run_dir))


def resume_changes(run_dir: Path, config, allowed=()) -> dict:
    """``key -> (saved, new)`` for every key where ``config`` differs from the run's saved config; raises
    ``RunFolderError`` naming the keys that may not change (see :data:`RESUMABLE`; ``allowed`` adds more)."""
    from ..config import flat_dict

    old, new = flat_dict(saved_config(run_dir)), flat_dict(config)
    changed = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
    refused = {k: "" for k in sorted(changed) if k not in RESUMABLE and k not in allowed}
    if "train.max_steps" in changed and config.optim.scheduler != "constant" and "train.max_steps" not in allowed:
        refused["train.max_steps"] = f" (optim.scheduler={config.optim.scheduler} is laid over it)"
    if refused:
        listed = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}{why}" for k, why in refused.items())
        raise RunFolderError(
            f"--resume {run_dir}: these settings define the run and cannot change on resume: {listed}. Drop "
            f"them to continue the run, or start a new run. Keys that may change: {', '.join(sorted(RESUMABLE))}")
    return changed


def record_resume(run_dir: Path, step: int, changed: dict) -> None:
    """Append this resume (its step and changed keys) to ``resumes.jsonl``; ``config.yaml`` stays as written."""
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "from_step": step,
           "changed": {k: list(v) for k, v in changed.items()}}
    with open(Path(run_dir) / "resumes.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_like_umask(path: Path) -> None:
    """Give every file under ``path`` the mode a plain ``open()`` would (0666 less the umask): safetensors
    writes 0600, which keeps a shared group from reading trained weights."""
    mode = 0o666 & ~_umask()
    for f in [Path(path)] if Path(path).is_file() else Path(path).rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def check(run_dir: Path, config, *, resume: bool, overwrite: bool = False, allowed=()) -> dict:
    """Before anything is loaded: a resumed run's folder and config changes (returned), or a new run's folder."""
    if resume:
        check_resumable(run_dir)
        return resume_changes(run_dir, config, allowed)
    check_new_run(run_dir, overwrite)
    return {}


def open_locked(run_dir: Path, *, resume: bool, overwrite: bool = False) -> RunLock:
    """Create and lock the run folder; checks again under the lock (a run may have ended in between), and
    clears the old run's files for ``overwrite``. Raises RunFolderError (or the OSError, with its path)."""
    check_no_file_in_the_way(run_dir)
    try:
        lock = RunLock(run_dir).acquire()
    except OSError as err:
        raise RunFolderError(f"cannot create the run folder {run_dir}: {err.strerror or err}") from err
    with released_on_error(lock):
        if not resume:
            check_new_run(run_dir, overwrite)
            if overwrite:
                clear_run(run_dir)
    return lock


@contextlib.contextmanager
def released_on_error(lock: RunLock | None):
    """Release ``lock`` if the block raises (anything, Ctrl-C included); keep it otherwise."""
    try:
        yield lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise


@contextlib.contextmanager
def held(lock: RunLock | None):
    """Release ``lock`` when the block ends, however it ends."""
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def resume_point(run_dir: Path, say=None) -> Path | None:
    """The checkpoint to resume from: the newest intact one (damaged newer ones are reported through ``say``),
    or ``None`` to restart from step 0 (said, since the metrics logged so far are then dropped)."""
    from .checkpoint_manifest import newest_intact

    last, damaged = newest_intact(Path(run_dir) / "checkpoints")
    for path, why in damaged if say else []:
        say(f"warning: checkpoint {path} is damaged ({why}); "
            + (f"resuming from {last.name}" if last else "passing over it"))
    if last is None and say:
        say(f"no intact checkpoint in {Path(run_dir) / 'checkpoints'} yet: the run restarts from step 0 and its "
            "metrics.jsonl starts again")
    return last
