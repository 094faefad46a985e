"""A full disk at each of a run's writes ends ``gvpo train`` with one line (what, where, why, the last intact
checkpoint, the resume command), removes what was half-written and keeps the previous checkpoint.

Each test makes one writer fail with ``ENOSPC`` from step 2 on, at the call the real writer makes (the file
stream of ``torch.distributed.checkpoint``, ``torch.save``, safetensors' ``save_file``, the append to
``metrics.jsonl``, TensorBoard's writer, matplotlib's ``savefig``), after a checkpoint of step 1 was written.
On a real 20 MB tmpfs (by hand: ``mount -t tmpfs -o size=20m``, files filling it to various levels) the
checkpoint, ``final/``, ``metrics.jsonl`` and tracker cases gave these same lines."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from safetensors import SafetensorError

from gvpo import cli
from gvpo.run.checkpoint_manifest import problem

import tiny

FULL = "No space left on device"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny.make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def run_gvpo(model_dir: Path, out: Path, capsys, *extra: str) -> tuple[int, list[str], Path]:
    """``gvpo train`` of 2 steps with a checkpoint after each, in this process: exit status, stderr lines, run folder."""
    args = [f"model.name_or_path={model_dir}", "task.name=tiny.tiny_add", "task.rewards=[tiny.digit_reward]",
            "train.max_steps=2", "train.prompts_per_step=2", "rollout.k=2", f"output.dir={out}", "output.name=r",
            "train.eval_every=0", "train.eval_n=2", "train.checkpoint_every=1", "output.progress=false",
            "output.report_to=[]", "output.plots=false", *extra]
    code = cli.main(["train", *args])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()], out / "r"


def no_space(path: str = "") -> OSError:
    return OSError(errno.ENOSPC, FULL, path or None)


def check_one_line_and_nothing_lost(code: int, err: list[str], run_dir: Path, what: str, last: int = 1) -> None:
    """One line naming ``what``, the cause and the newest intact checkpoint (step ``last``, checked against its
    manifest), no ``.tmp*`` left behind, and a ``metrics.jsonl`` of whole rows."""
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    assert err[0].startswith(f"gvpo: error: could not write {what}") and FULL in err[0], err
    assert f"resume with: gvpo train --resume {run_dir}" in err[0], err
    assert not [p for p in run_dir.rglob(".tmp*")], "a half-written file or folder was left"
    kept = run_dir / "checkpoints" / f"step-{last:06d}"
    assert problem(kept) is None and f"{kept}" in err[0], err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # whole rows only
    assert rows[0]["step"] == 0


def test_full_disk_while_writing_checkpoint_shards(model_dir, tmp_path, monkeypatch, capsys):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    create = dcp_fs.FileSystem.create_stream

    def full(self, path, mode):
        if ".tmp-step-000002" in str(path):
            raise no_space()
        return create(self, path, mode)

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", full)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys)
    check_one_line_and_nothing_lost(code, err, run_dir, f"checkpoint {run_dir / 'checkpoints' / '.tmp-step-000002'}")


def test_full_disk_while_writing_the_checkpoint_state(model_dir, tmp_path, monkeypatch, capsys):
    from gvpo.run import checkpoint

    save = checkpoint.torch.save

    def full(obj, path, *args, **kwargs):
        if ".tmp-step-000002" in str(path):
            Path(path).write_bytes(b"half")
            raise no_space(str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys)
    check_one_line_and_nothing_lost(code, err, run_dir, "checkpoint")


def test_full_disk_while_writing_final_weights(model_dir, tmp_path, monkeypatch, capsys):
    """safetensors' Rust writer reports a full disk as a ``SafetensorError`` (seen on a real tmpfs)."""
    import transformers.modeling_utils as modeling_utils

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys)
    check_one_line_and_nothing_lost(code, err, run_dir, f"the final weights {run_dir / 'final'}", last=2)
    assert not (run_dir / "final").exists()


def test_full_disk_while_appending_metrics_cuts_the_half_row_and_the_run_resumes(model_dir, tmp_path, monkeypatch,
                                                                                  capsys):
    from gvpo.run import metrics

    class HalfWrite:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            if '"step": 2' in text:
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                raise no_space()
            return self.f.write(text)

    monkeypatch.setattr(metrics, "open", lambda *a, **k: HalfWrite(open(*a, **k)), raising=False)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys)
    check_one_line_and_nothing_lost(code, err, run_dir, f"{run_dir / 'metrics.jsonl'}")
    monkeypatch.undo()
    code = cli.main(["train", "--resume", str(run_dir)])
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_full_disk_in_the_tracker_is_one_line(model_dir, tmp_path, monkeypatch, capsys):
    """TensorBoard's writer raises its thread's error at the next call in the main thread (``log`` here)."""
    from accelerate.tracking import TensorBoardTracker

    log = TensorBoardTracker.log

    def full(self, values, step=None, **kwargs):
        if step == 2:
            raise no_space()
        return log(self, values, step=step, **kwargs)

    monkeypatch.setattr(TensorBoardTracker, "log", full)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys, "output.report_to=[tensorboard]")
    check_one_line_and_nothing_lost(code, err, run_dir, "the tracker logs (output.report_to)")


def test_the_tensorboard_writer_threads_own_traceback_is_not_printed(monkeypatch):
    """Under ``gvpo``, a write error in TensorBoard's writer thread (``_AsyncWriterThread``) skips the thread
    traceback (the main thread reports it); any other thread error still reaches the usual hook."""
    import threading

    seen = []

    def recorder(args):
        seen.append((args.thread.name, args.exc_type))

    monkeypatch.setattr(threading, "excepthook", recorder)

    class _AsyncWriterThread(threading.Thread):
        pass

    def fail(error):
        raise error

    with cli._one_line_reports():
        for kind, error in [(_AsyncWriterThread, no_space()), (threading.Thread, no_space()),
                            (_AsyncWriterThread, ValueError("a bug"))]:
            thread = kind(target=fail, args=(error,), name=kind.__name__)
            thread.start()
            thread.join()
    assert seen == [("Thread", OSError), ("_AsyncWriterThread", ValueError)]
    assert threading.excepthook is recorder  # put back when the command ends


def test_full_disk_while_drawing_plots_warns_and_the_run_is_complete(model_dir, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def full(self, path, *args, **kwargs):
        Path(path).write_bytes(b"half")
        raise no_space(str(path))

    monkeypatch.setattr(Figure, "savefig", full)
    code, err, run_dir = run_gvpo(model_dir, tmp_path, capsys, "output.plots=true")
    assert code == 0 and len(err) == 1 and err[0].startswith(f"gvpo: warning: could not write {run_dir / 'plots.png'}")
    assert FULL in err[0] and not (run_dir / "plots.png").exists() and (run_dir / "final").is_dir()
