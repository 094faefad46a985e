"""What a reward function must return, checked where it is called, with errors that name the reward.

A reward returns one value per completion: a real number, or ``None`` (the completion cannot be scored and is
dropped). Anything else, or an exception raised inside the reward, becomes a :class:`RewardError` naming
the reward (the trainer adds the step).
"""

from __future__ import annotations

import numbers


class RewardError(RuntimeError):
    """A reward function raised or returned something unusable; the message names the reward."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_values(name: str, values, n: int) -> list:
    """``values`` as floats (``None`` kept) if it is a sequence of ``n`` numbers or ``None``; else RewardError.

    >>> check_values("r", [1, None, 0.5], 3)
    [1.0, None, 0.5]
    >>> check_values("r", ["1"], 1)
    Traceback (most recent call last):
    ...
    gvpo.reward_checks.RewardError: reward 'r' returned '1' (a str) for completion 0; expected a number or None
    """
    if not isinstance(values, (str, bytes, dict)) and hasattr(values, "__iter__") and not hasattr(values, "__len__"):
        values = list(values)  # a generator
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"reward {name!r} returned {_show(values)} ({type(values).__name__}); expected a list "
                          f"of {n} numbers or None, one per completion")
    if len(values) != n:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions; expected one per "
                          "completion")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
        elif isinstance(v, numbers.Real):  # bools count as 1 and 0
            out.append(float(v))
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
            out.append(float(v.item()))
        else:
            raise RewardError(f"reward {name!r} returned {_show(v)} (a {type(v).__name__}) for completion {i}; "
                              "expected a number or None")
    return out


def call_checked(fn, name: str, *args, **kwargs) -> list:
    """Call a reward; an exception inside it becomes a RewardError naming it (the original is chained)."""
    try:
        return fn(*args, **kwargs)
    except (RewardError, TimeoutError, KeyboardInterrupt):
        raise
    except Exception as err:
        raise RewardError(f"reward {name!r} raised {type(err).__name__}: {err}") from err
