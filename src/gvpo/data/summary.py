"""What a load kept and skipped: :class:`Summary`, and :func:`format_summary` for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

@dataclass
class Summary:
    """What a load kept and skipped; :func:`format_summary` renders it for people."""

    source: str
    file_format: str | None
    layout: str
    preset: str | None
    rows: int
    prompts: int
    completions: int
    k_histogram: dict[int, int]
    reward_min: float | None
    reward_max: float | None
    reward_mean: float | None
    constant_reward_groups: int = 0
    """Kept groups whose rewards are all equal: valid, but they give GVPO no gradient."""
    duplicate_prompts: int = 0
    """Grouped rows whose prompt also appears in an earlier row (kept as separate groups)."""
    skipped_groups: dict[str, int] = field(default_factory=dict)
    """Reason -> count: ``"k=1"``, ``"prompt_too_long"``, ``"k<2_after_length_filter"``."""
    skipped_completions: dict[str, int] = field(default_factory=dict)
    """Reason -> count: ``"completion_too_long"``."""

    def to_dict(self) -> dict:
        return asdict(self)


_REASONS = {
    "k=1": "groups with k=1 (no group baseline)",
    "prompt_too_long": "groups whose prompt is over max_prompt_tokens",
    "k<2_after_length_filter": "groups left with k<2 after dropping too-long completions",
    "completion_too_long": "completions over max_completion_tokens",
}


def format_summary(summary: Summary) -> str:
    """A few aligned lines for people: counts, k histogram, reward range, what was skipped."""
    s = summary
    what = ", ".join(x for x in (s.file_format, s.layout, f"preset {s.preset}" if s.preset else None) if x)
    hist = "  ".join(f"k={k}: {n}" for k, n in sorted(s.k_histogram.items()))
    lines = [
        f"{s.source} ({what})",
        f"  rows read:    {s.rows}",
        f"  prompts:      {s.prompts}",
        f"  completions:  {s.completions}",
        f"  k histogram:  {hist}",
        f"  rewards:      min {s.reward_min:.4g}  max {s.reward_max:.4g}  mean {s.reward_mean:.4g}",
        f"  constant-reward groups: {s.constant_reward_groups} (all rewards equal: no GVPO gradient)",
    ]
    if s.duplicate_prompts:
        lines.append(f"  duplicate prompts: {s.duplicate_prompts} (rows repeating an earlier prompt; "
                     "kept as separate groups)")
    skipped = {**s.skipped_groups, **s.skipped_completions}
    if not skipped:
        lines.append("  skipped:      none")
    else:
        lines.append("  skipped:")
        lines += [f"    {n:>6}  {_REASONS.get(r, r)}" for r, n in sorted(skipped.items())]
    return "\n".join(lines)
