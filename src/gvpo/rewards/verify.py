"""math-verify with a hard per-check timeout, from any thread: :class:`MathVerifier` and its worker pool.

The ``math`` reward (:mod:`gvpo.rewards.math`) extracts the answers; this module only decides whether
two extracted answers (gold, prediction) are equal (``math_verify.parse`` + ``math_verify.verify``)
without ever hanging. It imports nothing from ``gvpo``.

Timeouts
--------
Every check runs in a small pool of **worker processes** (``python -c`` children that import only
math-verify, never torch). A check that has not answered ``timeout`` seconds after it was handed to
its worker scores 0.0: the parent kills that worker (SIGKILL) and starts a fresh one, so it works
whoever calls the reward: the main thread, a trainer's thread, or a thread pool. (A worker's start,
mostly importing math-verify, is not part of any check's time; it is measured in bench/README.md,
section "math-verify workers".) Inside the worker,
a SIGALRM at ~0.9 x ``timeout`` first tries to stop a check that is stuck in Python code, which
saves the respawn; a check stuck inside one long C call (e.g. sympy on ``9^{9^{9^{9}}}``, which holds
the GIL) is what the kill is for. math-verify's own signal timeouts are switched off in the worker
(they would cancel the outer alarm). Timed-out checks are logged (warning on logger
``gvpo.rewards.math``) and counted in ``MathVerifier.stats["timeouts"]``; a worker that dies (e.g.
out of memory under its address-space cap) scores 0.0 and counts in ``stats["errors"]``. Results,
timeouts included, are cached per (gold, answer) pair, so a group of identical pathological answers
costs one timeout, not eight.

``workers=0`` checks in-process instead (no subprocesses): bounded by SIGALRM in the main thread
only (and never inside a long C call); off the main thread there is no timeout at all, and a
warning says so once. Use it only where subprocesses are not allowed.

This file is what a worker runs: it loads it by path, not as ``gvpo.rewards.verify``, so everything
at its top level must need only the standard library (math-verify is imported inside the check).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence

logger = logging.getLogger("gvpo.rewards.math")  # the math reward's warnings, under the name users know

# ----------------------------------------------------------------------------------------------
# The check itself: runs inside a worker process (or in-process with workers=0).
# Only stdlib + math_verify here, so a worker never imports torch or the gvpo package.
# ----------------------------------------------------------------------------------------------


class _CheckTimeout(BaseException):
    """Raised by the SIGALRM handler; a BaseException so math-verify's ``except Exception`` passes it."""


def _raise_timeout(signum, frame):  # pragma: no cover - runs on the signal
    raise _CheckTimeout()


def _verify_pair(gold: str, pred: str) -> bool:
    """math-verify on two extracted answers, with its own (signal-based) timeouts switched off."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse("$" + gold + "$", extraction_config=configs, parsing_timeout=None)
    p = parse("$" + pred + "$", extraction_config=configs, parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _check_with_alarm(gold: str, pred: str, seconds: float | None) -> str:
    """``"1"``/``"0"``, ``"timeout"`` when SIGALRM interrupted it, or ``"error"``. Main thread only."""
    use_alarm = bool(seconds) and threading.current_thread() is threading.main_thread()
    if use_alarm:
        old_handler = signal.signal(signal.SIGALRM, _raise_timeout)
        old_timer = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        return "1" if _verify_pair(gold, pred) else "0"
    except _CheckTimeout:
        return "timeout"
    except Exception:  # any failure of the checker scores 0.0: it must not stop training
        logger.debug("math-verify failed on %r vs %r", pred[:200], gold[:200], exc_info=True)
        return "error"
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_timer[0] > 0:  # put back someone else's alarm (e.g. pytest-timeout), minus our time
                signal.setitimer(signal.ITIMER_REAL, max(old_timer[0] - (time.monotonic() - start), 1e-3), old_timer[1])


def _serve(memory_limit_mb: int = 0) -> None:
    """Worker main loop: JSON lines ``[id, gold, pred, alarm_seconds]`` in, ``[id, status]`` out."""
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    if memory_limit_mb > 0:
        try:
            import resource

            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass
    out, sys.stdout = sys.stdout, sys.stderr  # stray prints must not reach the protocol pipe
    _check_with_alarm("1", "1", None)  # warm up imports before saying ready
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        item_id, gold, pred, seconds = json.loads(line)
        try:
            status = _check_with_alarm(gold, pred, seconds)
        except _CheckTimeout:  # the alarm fired just as the check finished
            status = "timeout"
        out.write(json.dumps([item_id, status]) + "\n")
        out.flush()


# Loads this file by path (not as gvpo.rewards.verify), so the worker skips gvpo/__init__ and torch.
_WORKER_CODE = (
    "import importlib.util as u, sys\n"
    "s = u.spec_from_file_location('_gvpo_math_worker', sys.argv[1])\n"
    "m = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m._serve(int(sys.argv[2]))\n"
)


class _Worker:
    def __init__(self, memory_limit_mb: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE, os.path.abspath(__file__), str(memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            close_fds=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = 0.0

    def send(self, item_id: int, gold: str, pred: str, alarm: float | None, deadline: float) -> None:
        self.proc.stdin.write((json.dumps([item_id, gold, pred, alarm]) + "\n").encode())
        self.proc.stdin.flush()
        self.item, self.deadline = item_id, deadline

    def read_lines(self) -> list[str] | None:
        """Complete lines now available, or ``None`` at EOF (the worker died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [ln.decode() for ln in lines]

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass


_ALL_VERIFIERS: weakref.WeakSet[MathVerifier] = weakref.WeakSet()


class MathVerifier:
    """math-verify with a hard per-check timeout, usable from any thread; see the module docstring.

    ``timeout``: seconds one check may take before it scores 0.0. ``workers``: worker processes
    (``None``: ``min(4, cpus)``; ``0``: check in-process, see the module docstring).
    ``memory_limit_mb``: address-space cap per worker (0: none). ``cache_size``: remembered pairs.
    ``worker_alarm``: let the worker interrupt Python-level work itself before the hard kill.
    ``startup_timeout``: seconds a new worker may take to import math-verify before it is an error.
    """

    def __init__(
        self,
        timeout: float = 5.0,
        workers: int | None = None,
        memory_limit_mb: int = 4096,
        cache_size: int = 65536,
        worker_alarm: bool = True,
        startup_timeout: float = 120.0,
    ):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.timeout = float(timeout)
        self.workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
        self.memory_limit_mb = int(memory_limit_mb)
        self.cache_size = int(cache_size)
        self.worker_alarm = worker_alarm
        self.startup_timeout = startup_timeout
        self.stats = {"checks": 0, "cache_hits": 0, "timeouts": 0, "errors": 0, "worker_restarts": 0}
        self._cache: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: list[_Worker] = []
        self._pool_pid = os.getpid()
        self._warned_no_timeout = False
        _ALL_VERIFIERS.add(self)

    # -- public ------------------------------------------------------------------------------

    def check(self, golds: Sequence[str], preds: Sequence[str]) -> list[float]:
        """1.0/0.0 per (gold, pred) pair of extracted answers; a timed-out or failed check is 0.0."""
        if len(golds) != len(preds):
            raise ValueError(f"{len(golds)} golds for {len(preds)} predictions")
        with self._lock:
            results: list[float | None] = [None] * len(golds)
            todo: dict[tuple[str, str], list[int]] = {}
            for i, key in enumerate(zip(golds, preds)):
                if key in self._cache:
                    self._cache.move_to_end(key)
                    results[i] = self._cache[key]
                    self.stats["cache_hits"] += 1
                else:
                    todo.setdefault(key, []).append(i)
            keys = list(todo)
            statuses = self._run_inline(keys) if self.workers == 0 else self._run_pool(keys)
            for key, status in zip(keys, statuses):
                self.stats["checks"] += 1
                if status in ("timeout", "error"):
                    self.stats["timeouts" if status == "timeout" else "errors"] += 1
                    logger.warning(
                        "math-verify %s (%.1fs limit), scored 0.0: answer %r vs gold %r",
                        "timed out" if status == "timeout" else "failed",
                        self.timeout,
                        key[1][:200],
                        key[0][:200],
                    )
                value = 1.0 if status == "1" else 0.0
                for i in todo[key]:
                    results[i] = value
                if self.cache_size > 0:
                    self._cache[key] = value
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
            return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker processes (a later call starts new ones)."""
        with self._lock:
            self._close_pool()

    def __del__(self):
        try:
            self._close_pool()
        except Exception:  # noqa: BLE001,S110 - interpreter shutdown: nothing left to tell
            pass

    # -- in-process --------------------------------------------------------------------------

    def _run_inline(self, keys: list[tuple[str, str]]) -> list[str]:
        in_main = threading.current_thread() is threading.main_thread()
        if not in_main and not self._warned_no_timeout:
            logger.warning("MathVerifier(workers=0) off the main thread: checks run with NO timeout")
            self._warned_no_timeout = True
        out = []
        for g, p in keys:
            try:
                out.append(_check_with_alarm(g, p, self.timeout if in_main else None))
            except _CheckTimeout:  # the alarm fired just as the check finished
                out.append("timeout")
        return out

    # -- worker pool -------------------------------------------------------------------------

    def _close_pool(self) -> None:
        if self._pool_pid == os.getpid():
            for w in self._pool:
                w.kill()
        self._pool = []

    def _run_pool(self, keys: list[tuple[str, str]]) -> list[str]:
        if not keys:
            return []
        if self._pool_pid != os.getpid():  # we were forked: the pipes belong to the parent
            self._pool, self._pool_pid = [], os.getpid()
        want = min(self.workers, len(keys))
        self._pool = [w for w in self._pool if w.proc.poll() is None]
        while len(self._pool) < want:
            self._pool.append(_Worker(self.memory_limit_mb))
        statuses: list[str | None] = [None] * len(keys)
        next_item = 0
        alarm = 0.9 * self.timeout if self.worker_alarm else None
        sel = selectors.DefaultSelector()
        for w in self._pool:
            sel.register(w.fd, selectors.EVENT_READ, w)
        remaining = len(keys)
        try:
            while remaining:
                now = time.monotonic()
                for w in list(self._pool):  # hand out work to idle, ready workers
                    if w.ready and w.item is None and next_item < len(keys):
                        gold, pred = keys[next_item]
                        try:
                            w.send(next_item, gold, pred, alarm, now + self.timeout)
                        except OSError:  # broken pipe: the worker died between items
                            w.item = next_item
                            remaining -= self._replace(sel, w, statuses, "error")
                        next_item += 1
                waits = [w.deadline - now for w in self._pool if w.item is not None]
                waits += [w.started + self.startup_timeout - now for w in self._pool if not w.ready]
                for key, _ in sel.select(timeout=max(0.0, min(waits, default=1.0))):
                    w = key.data
                    if w not in self._pool:
                        continue
                    lines = w.read_lines()
                    if lines is None:  # EOF: the worker died (crash, memory cap)
                        remaining -= self._replace(sel, w, statuses, "error")
                        continue
                    for line in lines:
                        if line == "ready":
                            w.ready = True
                            continue
                        try:
                            item_id, status = json.loads(line)
                        except ValueError:  # not ours (a library writing to fd 1): ignore it
                            logger.debug("math-verify worker wrote %r", line[:200])
                            continue
                        if item_id == w.item and statuses[item_id] is None:
                            statuses[item_id] = status
                            remaining -= 1
                        w.item = None
                now = time.monotonic()
                for w in list(self._pool):
                    if w.item is not None and now >= w.deadline:
                        remaining -= self._replace(sel, w, statuses, "timeout")
                    elif not w.ready and now >= w.started + self.startup_timeout:
                        raise RuntimeError(
                            f"math-verify worker did not start within {self.startup_timeout:.0f}s "
                            f"(python: {sys.executable}); is math-verify installed?"
                        )
        except BaseException:
            self._close_pool()  # leave no half-read pipes behind
            raise
        finally:
            sel.close()
        return statuses  # type: ignore[return-value]

    def _replace(self, sel, w: _Worker, statuses: list, status: str) -> int:
        """Kill ``w`` (its in-flight item gets ``status``), start a fresh worker in its place;
        returns how many items this finished (0 or 1)."""
        finished = 0
        if w.item is not None and statuses[w.item] is None:
            statuses[w.item] = status
            finished = 1
        sel.unregister(w.fd)
        w.kill()
        fresh = _Worker(self.memory_limit_mb)
        self._pool[self._pool.index(w)] = fresh
        sel.register(fresh.fd, selectors.EVENT_READ, fresh)
        self.stats["worker_restarts"] += 1
        if w.proc.returncode not in (None, -signal.SIGKILL) and status == "error":
            logger.warning("math-verify worker exited with code %s", w.proc.returncode)
        return finished


@atexit.register
def _close_all() -> None:
    for v in list(_ALL_VERIFIERS):
        try:
            v._close_pool()
        except Exception:  # noqa: BLE001,S110 - best effort at interpreter exit, nothing left to tell
            pass
