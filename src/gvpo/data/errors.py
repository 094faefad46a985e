"""What goes wrong in a data file: :class:`DataError` (every problem, one message), :class:`FieldProblem`
(one bad raw field, raised by preset converters), and ``_Problems``, which collects, orders and renders them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

MAX_LISTED_PROBLEMS = 20
"""How many problems a :class:`DataError` message lists before "... and N more"."""
_MAX_KEPT_PROBLEMS = 1000  # kept in DataError.problems; the rest are only counted


class DataError(ValueError):
    """A data file cannot be used; ``problems`` lists every problem found (up to 1000).

    ``str(err)`` is ``"<N> problems in <source>:"`` followed by up to :data:`MAX_LISTED_PROBLEMS`
    indented lines and ``"... and <M> more"``.
    """

    __module__ = "gvpo.data"  # its public home, as before the split: tracebacks and pickles name gvpo.data

    def __init__(self, problems: Sequence[str], source: str = "data", total: int | None = None, hint: str = ""):
        self.problems = list(problems)
        self.source = source
        self.total = len(self.problems) if total is None else total
        self.hint = hint
        n = self.total
        lines = [f"{n} problem{'s' if n != 1 else ''} in {source}:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
        if n > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {n - MAX_LISTED_PROBLEMS} more")
        if hint:
            lines.append(f"hint: {hint}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across processes (e.g. dataloader workers)
        return (DataError, (self.problems, self.source, self.total, self.hint))


class FieldProblem(Exception):
    """Raised by a preset's converter for a bad or missing raw field; reported with its line."""

    __module__ = "gvpo.data"  # its public home, as before the split: tracebacks and pickles name gvpo.data

    def __init__(self, field: str, problem: str, missing: bool = False):
        super().__init__(problem if missing else f"field '{field}' {problem}")
        self.field = field
        self.missing = missing


@dataclass
class _Problems:
    """Problems in source order; missing fields are tracked so one missing everywhere is said once."""

    items: list[tuple[str, str]] = field(default_factory=list)  # (where, text)
    missing: dict[str, list[int]] = field(default_factory=dict)  # field -> indices into items

    def add(self, where: str, text: str, missing_field: str | None = None) -> None:
        if missing_field is not None:
            self.missing.setdefault(missing_field, []).append(len(self.items))
        self.items.append((where, text))

    def __len__(self) -> int:
        return len(self.items)

    def render(self, n_rows: int, hints: dict[str, str]) -> list[str]:
        drop: set[int] = set()
        head: list[str] = []
        for name, idx in self.missing.items():
            if n_rows >= 2 and len(idx) == n_rows:
                drop.update(idx)
                hint = hints.get(name, "")
                head.append(f"all {n_rows} rows: {self.items[idx[0]][1]}{hint}")
        rest = [(w, t) for i, (w, t) in enumerate(self.items) if i not in drop]
        rest.sort(key=lambda wt: _first_number(wt[0]))  # stable: reading and checking problems interleave
        return head + [f"{w}: {t}" for w, t in rest]


def _first_number(where: str) -> int:
    match = re.search(r"\d+", where)
    return int(match.group()) if match else -1
