"""Which data rows a step takes: a seeded shuffle per epoch over a stream of positions.

Position ``p`` of the stream is row ``order(epoch)[offset]`` with ``epoch, offset = divmod(p, n)``;
each epoch's permutation is drawn once from ``hash_seed(seed, epoch)`` and cached, so choosing a
step's rows costs O(batch) after the first step of an epoch (``bench/step_rows.py`` measures it).
"""

from __future__ import annotations

import torch

from ..rollout import hash_seed


class EpochOrder:
    """Seeded permutation of ``range(n)`` per epoch, one epoch cached at a time."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no data rows to draw from (the training split is empty)")
        self.n, self.seed = n, seed
        self._epoch, self._order = None, None

    def __getitem__(self, position: int) -> int:
        """The row index at stream ``position``."""
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(hash_seed(self.seed, epoch))
            self._order = torch.randperm(self.n, generator=generator).tolist()
            self._epoch = epoch
        return self._order[offset]


_ORDERS: dict = {}


def step_rows(rows: list[dict], step: int, batch_size: int, seed: int) -> list[tuple[int, dict]]:
    """The ``batch_size`` rows of ``step`` as ``(stream position, row)``; each epoch is a seeded shuffle.

    >>> rows = [{"prompt": str(i)} for i in range(5)]
    >>> [pos for pos, _ in step_rows(rows, 1, 3, seed=0)]
    [3, 4, 5]
    >>> sorted(r["prompt"] for _, r in step_rows(rows, 0, 5, seed=0))
    ['0', '1', '2', '3', '4']
    """
    key = (len(rows), seed)  # the order depends on these two only
    order = _ORDERS.get(key)
    if order is None:
        _ORDERS.clear()  # one data size at a time: nothing grows across runs in one process
        order = _ORDERS[key] = EpochOrder(len(rows), seed)
    return [(pos, rows[order[pos]]) for pos in range(step * batch_size, (step + 1) * batch_size)]


def process_rows(rows: list, rank: int, world: int, mini_batches: int) -> list:
    """This process's rows of a step, in mini-batch order: of mini-batch ``j``'s contiguous share of the
    step's rows, the ``rank``-th part, so a mini-batch holds the same groups for any number of processes.

    >>> process_rows(list("abcdefgh"), rank=1, world=2, mini_batches=2)
    ['c', 'd', 'g', 'h']
    """
    per_batch = len(rows) // mini_batches
    share = per_batch // world
    return [row for j in range(mini_batches)
            for row in rows[j * per_batch + rank * share : j * per_batch + (rank + 1) * share]]


def train_rows(rows: list[dict], step: int, train, rank: int = 0, world: int = 1) -> list[tuple[int, dict]]:
    """This process's ``(position, row)`` pairs of rollout step ``step`` (``train``: a
    :class:`gvpo.config.TrainConfig`): the step's prompts (:func:`step_rows`) in this process's mini-batch
    shares (:func:`process_rows`). The trainer and a lagged generator (:mod:`gvpo.generation`) both ask here."""
    return process_rows(step_rows(rows, step, train.prompts_per_step, train.seed), rank, world, train.mini_batches)
