"""Episodes as the trainer's records: groups from episodes, the keywords rewards get, the environment's own
reward, and the per-step counts of what went wrong."""

from __future__ import annotations

from collections import Counter

from ..batch import Group
from ..rewards import is_conversational
from .environments import EnvironmentSpec


def episode_groups(engine, rows: list[tuple[int, dict]], k: int, seeds: list[int], params, *, step: int,
                   source: str) -> list[Group]:
    """``k`` episodes per ``(position, row)`` (``seeds`` one per episode, row-major) as groups: a prompt's k
    episodes are its group, each with its packed ids, ``action_mask``, prompt ids and :class:`Episode`."""
    episodes = engine.rollout([row for _, row in rows for _ in range(k)], seeds, params)
    groups = []
    for g, (pos, row) in enumerate(rows):
        mine = episodes[g * k : (g + 1) * k]
        groups.append(Group(pos, row, [e.completion_ids for e in mine], [e.text for e in mine], [source] * k,
                            born_step=[step] * k, prompt_ids=[e.prompt_ids for e in mine], episode=mine,
                            action_mask=[None if all(e.action_mask) else e.action_mask for e in mine]))
    return groups


def reward_keywords(todo: list[tuple[Group, int]]) -> dict:
    """TRL's reward keywords for completions ``(group, index)``: ``prompts`` (an episode's: with ``reset()``'s
    text), ``completions`` (an episode of a conversational prompt: its messages, tool messages included),
    ``completion_ids``, every other column of the rows, and ``environments`` when the completions are episodes
    with an environment."""
    episodes = [g.episode[i] for g, i in todo]
    prompts = [e.prompt if e is not None else g.row["prompt"] for e, (g, _) in zip(episodes, todo)]
    completions = [e.messages if e is not None and is_conversational(p) else g.texts[i]
                   for e, p, (g, i) in zip(episodes, prompts, todo)]
    columns = {key: [g.row.get(key) for g, _ in todo] for key in (todo[0][0].row if todo else {}) if key != "prompt"}
    out = {"prompts": prompts, "completions": completions, "completion_ids": [g.completion_ids[i] for g, i in todo],
           **columns}
    if any(e is not None and e.environment is not None for e in episodes):
        out["environments"] = [e.environment if e is not None else None for e in episodes]
    return out


def environment_reward(spec: EnvironmentSpec):
    """The reward ``get_reward()`` of each completion's environment (TRL: an extra reward of weight 1 named after
    the class); ``None`` for a completion without one of this class."""
    cls = spec.environment

    def reward(environments=None, **_) -> list:
        return [e.get_reward() if type(e) is cls else None for e in environments or []]

    reward.__name__ = spec.name
    return reward


def episode_counts(groups: list[Group]) -> Counter:
    """This process's counts over the fresh episodes of ``groups``: ``episodes``, ``turns``, ``tool_calls`` and one
    ``<kind>/<name>`` per thing that went wrong (see :class:`gvpo.episodes.Episode`)."""
    counts: Counter = Counter()
    for group in groups:
        for episode in group.episode:
            if episode is None:
                continue
            counts["episodes"] += 1
            counts["turns"] += episode.turns
            counts["tool_calls"] += episode.tool_calls
            counts.update(f"{kind}/{name}" for kind, name in episode.events)
    return counts


def episode_metrics(engine, groups: list[Group], accelerator) -> dict:
    """The step's ``episodes/...`` metrics over all processes: mean turns and tool calls per episode, and the
    count of each thing that went wrong, by kind and tool or environment name; ``{}`` without episodes (the
    engine runs none), so a single-turn run logs exactly what it did before."""
    if not hasattr(engine, "rollout"):
        return {}
    from accelerate.utils import gather_object

    mine = [episode_counts(groups)]
    total: Counter = Counter()
    for counts in gather_object(mine) if accelerator.num_processes > 1 else mine:
        total.update(counts)
    n = max(total.pop("episodes", 0), 1)
    out = {"episodes/turns": total.pop("turns", 0) / n, "episodes/tool_calls": total.pop("tool_calls", 0) / n}
    out.update({f"episodes/{key}": value for key, value in sorted(total.items())})
    return out
