"""Multi-turn episodes on any generation engine, token in and token out.

An episode of a prompt row: one environment instance (``reset(**row)``), then turns. Each turn, the engine
continues the episode's token stream (the prompt's ids, then every earlier turn's and observation's ids, as
they are) with the turn's seed; the new ids are the model's action. If the action calls tools (parsed through
the chat template, :func:`gvpo.episodes.chat.parse_turn`), each call runs, and the tool messages' suffix ids are
appended as the observation; the episode ends when a turn calls no tool, after ``rollout.max_turns`` model turns,
or when the next observation or turn would pass ``rollout.max_new_tokens`` (the whole episode after the prompt,
model and environment tokens together, TRL's ``max_completion_length``).

Seeds: turn 0 of completion ``j`` of the prompt at stream position ``p`` uses the single-turn seed
``hash_seed(seed, p, j)``, and turn ``t > 0`` uses ``hash_seed(that, t)``, so an episode depends only on
(seed, prompt, completion, turn), never on batching, and an episode that ends after its first turn is the
single-turn completion, token for token. Rows of a turn are generated together, each with the episode's own
remaining budget (a longer row is cut to it: the engine's rows are independent, so this is the sample a
shorter limit would have given).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..rollout import SamplingParams, hash_seed
from ..rollout.hf import eos_ids
from . import chat
from .environments import EnvironmentSpec, ToolFailure, call_limited


@dataclass
class Episode:
    """One completed episode: what the trainer trains on and what rewards read."""

    prompt: Any
    """The prompt the episode saw: the row's, with ``reset()``'s text appended (TRL's rule)."""
    prompt_ids: list
    """The prompt's token ids as the engine consumed them (chat template with the tools)."""
    completion_ids: list = field(default_factory=list)
    """Every token after the prompt, in order: model turns and observations (token in, token out)."""
    action_mask: list = field(default_factory=list)
    """1 on the model's tokens, 0 on observations; one per ``completion_ids`` entry."""
    messages: list = field(default_factory=list)
    """The episode as TRL's conversational completion: assistant messages (with ``tool_calls``) and tool messages."""
    environment: Any = None
    """The episode's environment instance (``None`` with tools only)."""
    turns: int = 0
    """Model turns taken."""
    tool_calls: int = 0
    """Tool calls made."""
    events: list = field(default_factory=list)
    """``(kind, name)`` for each thing that went wrong (a tool that raised or timed out, an unknown tool, a
    malformed call, a non-string ``reset``, a truncated observation, the budget hit mid-observation)."""
    text: str = ""
    """The completion decoded without special tokens (string prompts' ``completions``)."""


class EpisodeEngine:
    """An engine that runs episodes (:meth:`rollout`) and otherwise is the engine it wraps."""

    def __init__(self, engine, spec: EnvironmentSpec, *, max_turns: int = 0, max_observation_tokens: int = 0):
        self.engine, self.spec = engine, spec
        self.max_turns, self.max_observation_tokens = max_turns, max_observation_tokens

    @property
    def model(self):
        return self.engine.model

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def sync_weights(self, model) -> None:
        self.engine.sync_weights(model)

    def generate(self, prompts: list, seeds: list[int], params: SamplingParams):
        """One turn, no environment (the wrapped engine's ``generate``)."""
        return self.engine.generate(prompts, seeds, params)

    def for_model(self, model) -> EpisodeEngine:
        """The same episodes on another model (the fixed reference's own engine)."""
        return EpisodeEngine(type(self.engine)(model, self.tokenizer), self.spec, max_turns=self.max_turns,
                             max_observation_tokens=self.max_observation_tokens)

    # --------------------------------------------------------------------------------------------
    def start(self, row: dict) -> Episode:
        """A fresh environment, ``reset(**row)``, and the episode's prompt ids."""
        spec, events = self.spec, []
        environment, prompt = None, row["prompt"]
        if spec.environment is not None:
            try:
                environment = call_limited(spec.make, {}, spec.timeout_s, f"{spec.name}()")
                text = call_limited(environment.reset, dict(row), spec.timeout_s, f"{spec.name}.reset")
            except ToolFailure as failure:
                events.append((f"reset_{failure.kind}", spec.name))
                text = None
            if text is not None and not isinstance(text, str):
                events.append(("non_string", f"{spec.name}.reset"))
            elif text:
                prompt = chat.with_reset_text(prompt, text)
        tools = spec.tools_of(environment)
        return Episode(prompt, chat.prompt_ids(self.tokenizer, prompt, tools), environment=environment,
                       events=events)

    def rollout(self, rows: list[dict], seeds: list[int], params: SamplingParams) -> list[Episode]:
        """One episode per row, ``seeds[i]`` deciding row ``i``'s randomness (see the module docstring)."""
        episodes = [self.start(row) for row in rows]
        eos = eos_ids(self.tokenizer, self.model)
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        active, turn = list(range(len(rows))), 0
        while active:
            room = {i: params.max_new_tokens - len(episodes[i].completion_ids) for i in active}
            active = [i for i in active if room[i] > 0]
            if not active:
                break
            turn_params = dataclasses.replace(params, max_new_tokens=max(room.values()))
            turn_seeds = [seeds[i] if turn == 0 else hash_seed(seeds[i], turn) for i in active]
            gen = self.engine.generate([episodes[i].prompt_ids + episodes[i].completion_ids for i in active],
                                       turn_seeds, turn_params)
            going = []
            for r, i in enumerate(active):
                ids = gen.completion_ids[r][gen.completion_mask[r].bool()].tolist()[: room[i]]
                if self.act(episodes[i], ids, eos, params, limit):
                    going.append(i)
            active, turn = going, turn + 1
        for episode in episodes:
            episode.text = self.tokenizer.decode(episode.completion_ids, skip_special_tokens=True)
        return episodes

    def act(self, episode: Episode, ids: list[int], eos: list[int], params: SamplingParams, limit: int | None) -> bool:
        """Append a model turn and, if it calls tools, their observation; whether the episode goes on."""
        context = episode.prompt_ids + episode.completion_ids
        episode.completion_ids += ids
        episode.action_mask += [1] * len(ids)
        episode.turns += 1
        if not self.spec.has_tools:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            episode.messages.append({"role": "assistant", "content": text})
            return False
        tools = self.spec.tools_of(episode.environment)
        message, malformed = chat.parse_turn(self.tokenizer, ids, context, tools)
        episode.messages.append(message)
        finished = bool(ids) and (ids[-1] in eos or _ends_with_stop(self.tokenizer, ids, params.stop))
        if malformed is not None and finished:  # a turn cut by the budget is not the model's malformed call
            episode.events.append(("malformed_tool_call", self.spec.name))
        calls = message.get("tool_calls")
        last_turn = bool(self.max_turns) and episode.turns >= self.max_turns
        if malformed is not None or not calls or not finished or last_turn:
            return False
        observation = [self.call(call, tools, episode) for call in calls]
        suffix = chat.tool_suffix_ids(self.tokenizer, observation)
        total = len(episode.prompt_ids) + len(episode.completion_ids) + len(suffix)
        if len(episode.completion_ids) + len(suffix) > params.max_new_tokens or (limit and total >= limit):
            episode.events.append(("budget_mid_observation", self.spec.name))  # TRL's rule: the result is dropped
            return False
        episode.completion_ids += suffix
        episode.action_mask += [0] * len(suffix)
        episode.messages += observation
        return True

    def call(self, call: dict, tools: list, episode: Episode) -> dict:
        """Run one tool call; its tool message (TRL's ``{"error": ...}`` content when it failed)."""
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        episode.tool_calls += 1
        fn = next((t for t in tools if getattr(t, "__name__", None) == name), None)
        if fn is None:
            episode.events.append(("unknown_tool", name))
            result = {"error": f"Tool {name} not found."}
        else:
            try:
                result = call_limited(fn, arguments, self.spec.timeout_s, name)
            except ToolFailure as failure:
                episode.events.append((f"tool_{failure.kind}", name))
                result = {"error": str(failure.__cause__ or failure)}
        content = result if isinstance(result, list) else str(result)  # TRL: str() of anything but content blocks
        if isinstance(content, str) and self.max_observation_tokens:
            content, cut = chat.truncate_content(self.tokenizer, content, self.max_observation_tokens)
            if cut:
                episode.events.append(("observation_truncated", name))
        return {"role": "tool", "name": name, "content": content}


def _ends_with_stop(tokenizer, ids: list[int], stops) -> bool:
    return bool(stops) and any(tokenizer.decode(ids).endswith(s) for s in stops)
