"""Where values live in a row and whether they are usable: :class:`OfflineColumns`, :func:`lookup`
(dotted names, "did you mean" suggestions) and the prompt / completion / reward value checks."""

from __future__ import annotations

import difflib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import FieldProblem

@dataclass(frozen=True)
class OfflineColumns:
    """Where each value lives in a row. A dotted name (``"meta.score"``) reaches into nested objects.

    Grouped rows use ``prompt``, ``completions`` and ``rewards``; flat rows use ``prompt``,
    ``completion`` and ``reward``.
    """

    prompt: str = "prompt"
    completions: str = "completions"
    rewards: str = "rewards"
    completion: str = "completion"
    reward: str = "reward"

    def used(self, layout: str) -> tuple[str, ...]:
        """The column names read for ``layout`` (``"grouped"`` or ``"flat"``)."""
        if layout == "grouped":
            return (self.prompt, self.completions, self.rewards)
        return (self.prompt, self.completion, self.reward)


_MISSING = object()


def _suggest(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, [c for c in candidates if isinstance(c, str)], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _get(row: Any, name: str) -> Any:
    """``row[name]``, else a walk along the dotted ``name``; ``_MISSING`` when absent."""
    if isinstance(row, dict) and name in row:
        return row[name]
    if "." not in name:
        return _MISSING
    value = row
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _missing_message(row: Any, name: str) -> str:
    """``"missing field 'x' (did you mean 'y'?)"``, suggesting at the level where the walk stopped."""
    prefix, value = "", row
    if not (isinstance(row, dict) and name in row) and "." in name:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if isinstance(value, dict) and part in value and i < len(parts) - 1:
                value, prefix = value[part], prefix + part + "."
                continue
            break
    keys = [prefix + k for k in value] if isinstance(value, dict) else []
    return f"missing field '{name}'{_suggest(name, keys)}"


def lookup(row: dict, name: str) -> Any:
    """``row``'s value at ``name`` (dotted names walk nested dicts and list indices).

    Raises :class:`FieldProblem` with a close-match suggestion when it is absent.

    >>> lookup({"a": {"b": [5, 6]}}, "a.b.1")
    6
    >>> lookup({"reward": 1}, "rewards")
    Traceback (most recent call last):
    ...
    gvpo.data.FieldProblem: missing field 'rewards' (did you mean 'reward'?)
    """
    value = _get(row, name)
    if value is _MISSING:
        raise FieldProblem(name, _missing_message(row, name), missing=True)
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_text(value: Any, label: str, problems: list[str]) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"field '{label}' is not valid UTF-8 (byte 0x{value[err.start]:02x} at offset {err.start})")
            return None
    if not isinstance(value, str):
        problems.append(f"field '{label}' must be a string, got {_type_name(value)}")
        return None
    if not value.strip():
        problems.append(f"field '{label}' is empty")
        return None
    return value


def _check_prompt(value: Any, label: str, problems: list[str]) -> str | list[dict] | None:
    """A non-empty string, or a non-empty list of ``{"role": str, "content": str | list}`` messages."""
    if isinstance(value, (list, tuple)):
        if not value:
            problems.append(f"field '{label}' is empty (no messages)")
            return None
        n_before, messages, has_text = len(problems), [], False
        for i, msg in enumerate(value):
            where = f"{label}[{i}]"
            if not isinstance(msg, dict):
                problems.append(f"field '{where}' must be a chat message object, got {_type_name(msg)}")
                continue
            for key in ("role", "content"):
                if key not in msg:
                    problems.append(f"missing field '{where}.{key}'{_suggest(key, msg)}")
            role, content = msg.get("role"), msg.get("content")
            if "role" in msg and not (isinstance(role, str) and role.strip()):
                problems.append(f"field '{where}.role' must be a non-empty string, got {role!r}")
            if "content" in msg and not isinstance(content, (str, list)):
                problems.append(f"field '{where}.content' must be a string or a list of parts, "
                                f"got {_type_name(content)}")
            has_text = has_text or bool(content.strip() if isinstance(content, str) else content)
            messages.append(dict(msg))
        if len(problems) > n_before:
            return None
        if not has_text:
            problems.append(f"field '{label}' is empty (every message has empty content)")
            return None
        return messages
    return _check_text(value, label, problems)


def _check_reward(value: Any, label: str, problems: list[str]) -> float | None:
    """A finite real number; ``True``/``False`` read as 1.0/0.0 (verifier outcomes)."""
    if value is None:
        problems.append(f"field '{label}' is null (rewards are required)")
        return None
    if not isinstance(value, numbers.Real):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        problems.append(f"field '{label}' must be a number, got {_type_name(value)} {shown}")
        return None
    number = float(value)
    if math.isnan(number):
        problems.append(f"field '{label}' is NaN")
        return None
    if math.isinf(number):
        problems.append(f"field '{label}' is infinite ({number})")
        return None
    return number


def _prompt_key(prompt: str | list[dict]) -> str:
    """Grouping key: the string itself, or the canonical JSON of a message list."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
