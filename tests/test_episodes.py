"""Multi-turn episodes (gvpo.episodes) against TRL 1.16's own tool loop, token in and token out, and every kind
of bad input counted without a crash. The "model" is a scripted engine here (it answers what each test needs,
with non-canonical tokenisations where that matters); the trainer-level tests are in test_episodes_train.py."""

from __future__ import annotations

import copy
import types

import pytest
import torch

import tiny_chat as tc
from gvpo.batch import build_batch
from gvpo.config import ConfigError, RolloutConfig
from gvpo.episodes import EpisodeEngine, episode_groups, episode_metrics, load_environment_spec, reward_keywords
from gvpo.episodes.chat import tool_suffix_ids
from gvpo.rewards import combine
from gvpo.rollout import SamplingParams

TOK = tc.chat_tokenizer()
QUESTIONS = ["What is 12+34?", "Say hi.", "What is 3*4+1?"]


def rows() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in zip(QUESTIONS, ["46", "hi", "13"])]


def call(name: str, **arguments) -> str:
    import json

    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(arguments)}}}</tool_call>'


def turn_script(tokenizer):
    """Scripted turns by question and turn index (the number of assistant headers in the context, minus one).
    Some turns are tokenised one character at a time: what a sampler may emit, not what re-tokenising gives."""
    plan = {
        (0, 0): ("piece", call("add", a=12, b=34) + "<|im_end|>"),
        (0, 1): ("piece", "the answer is 46<|im_end|>"),
        (1, 0): ("canon", "hi<|im_end|>"),
        (2, 0): ("canon", "let me see" + call("multiply", a=3, b=4) + call("add", a=12, b=1) + "<|im_end|>"),
        (2, 1): ("piece", call("add", a=12, b=1) + "<|im_end|>"),
        (2, 2): ("canon", "13<|im_end|>"),
    }

    def script(context: list[int], seed=None) -> list[int]:
        text = tokenizer.decode(context)
        question = next(i for i, q in enumerate(QUESTIONS) if q in text)
        kind, out = plan[(question, text.count("<|im_start|>assistant") - 1)]
        body, eos = out[: -len("<|im_end|>")], [tokenizer.eos_token_id]
        return (tc.piecewise(tokenizer, body) if kind == "piece" else tc.encode(tokenizer, body)) + eos

    return script


def episode_engine(script, environment="", tools=(), max_turns=0, max_observation_tokens=0, timeout=5.0):
    spec = load_environment_spec(environment, list(tools), timeout)
    return EpisodeEngine(tc.ScriptedEngine(TOK, script), spec, max_turns=max_turns,
                         max_observation_tokens=max_observation_tokens)


def trl_tool_loop(script, tools, budget):
    """TRL 1.16's ``GRPOTrainer._tool_call_loop`` itself, on the same prompts and scripted turns."""
    from trl import GRPOTrainer
    from trl.chat_template_utils import parse_response

    prompts = [r["prompt"] for r in rows()]
    prompt_ids = [TOK.apply_chat_template(p, tools=tools, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for p in prompts]
    completion_ids = [script(ids)[:budget] for ids in prompt_ids]  # generation stops at max_completion_length
    completions = [[parse_response(TOK, ids, prefix=p, tools=tools)] for ids, p in zip(completion_ids, prompt_ids)]
    fake = types.SimpleNamespace(
        max_tool_calling_iterations=10**9, _sync_tool_dicts=[{t.__name__: t for t in tools}] * len(prompts),
        _async_tool_dicts=[{}] * len(prompts), processing_class=TOK, _tokenizer=TOK, chat_template=None,
        chat_template_kwargs={}, _is_vlm=False, use_vllm=False, tools=tools, environment_factories=None,
        max_completion_length=budget, model=types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=10**6)),
        _generate_single_turn=lambda ids, *a, **k: ([script(x) for x in ids], None))
    fake._get_tool_suffix_ids = lambda messages: GRPOTrainer._get_tool_suffix_ids(fake, messages)
    mask, completions, completion_ids, *_ = GRPOTrainer._tool_call_loop(fake, copy.deepcopy(prompts), prompt_ids,
                                                                         completion_ids, completions, None, None, {})
    return prompt_ids, completion_ids, mask, completions


def test_tool_suffix_is_trls():
    """The observation's ids are exactly TRL's ``_get_tool_suffix_ids`` for one and for two tool messages."""
    from trl import GRPOTrainer

    fake = types.SimpleNamespace(processing_class=TOK, _tokenizer=TOK, chat_template=None, chat_template_kwargs={},
                                 _is_vlm=False)
    for messages in ([{"role": "tool", "name": "add", "content": "46"}],
                     [{"role": "tool", "name": "add", "content": "46"}, {"role": "tool", "name": "mul", "content": "x"}]):
        assert tool_suffix_ids(TOK, messages) == GRPOTrainer._get_tool_suffix_ids(fake, messages)


@pytest.mark.parametrize("budget, turns", [(200, [2, 1, 3]), (120, [2, 1, 2]), (80, [1, 1, 1])])
def test_episodes_equal_trls_tool_loop_ids_masks_and_messages(budget, turns):
    """Same prompts, same scripted turns, the same tools: gvpo's episodes have TRL's prompt ids, packed completion
    ids, tool mask (our action_mask) and conversational completions, including a turn with two tool calls and a
    turn with no call; at budget 120 a last turn is cut by max_completion_length, at 80 tool results are dropped
    because they would pass it (TRL's rule, counted here as budget_mid_observation)."""
    script = turn_script(TOK)
    tools = [tc.multiply, tc.CalculatorEnv().add.__func__.__get__(tc.CalculatorEnv())]
    trl_prompts, trl_ids, trl_mask, trl_messages = trl_tool_loop(script, tools, budget)
    engine = episode_engine(script, "tiny_chat.CalculatorEnv", ["tiny_chat.multiply"])
    episodes = engine.rollout(rows(), [1, 2, 3], SamplingParams(max_new_tokens=budget))
    assert [e.prompt_ids for e in episodes] == trl_prompts
    assert [e.completion_ids for e in episodes] == trl_ids
    assert [e.action_mask for e in episodes] == trl_mask
    assert [e.messages for e in episodes] == trl_messages
    assert [e.turns for e in episodes] == turns
    assert max(len(e.completion_ids) for e in episodes) <= budget
    dropped = [("budget_mid_observation", "CalculatorEnv")] if budget == 80 else []
    assert [e.events for e in episodes] == [dropped, [], dropped]
    if budget > 80:
        assert 0 in trl_mask[0] and 0 in trl_mask[2]  # the scenario has observations


def test_trained_row_is_the_token_stream_the_engine_consumed():
    """Token in, token out: a packed row (prompt + completion under the attention mask) is the last turn's engine
    input followed by that turn's output, id for id, although the turns were tokenised piece by piece so that
    decoding and re-tokenising the conversation (what re-rendering the chat template does) gives other ids."""
    script = turn_script(TOK)
    engine = episode_engine(script, "tiny_chat.CalculatorEnv", ["tiny_chat.multiply"])
    groups = episode_groups(engine, list(enumerate(rows())), 1, [1, 2, 3], SamplingParams(200), step=0,
                            source="policy")
    batch = build_batch([g.with_rewards([1.0]) for g in groups], TOK, "cpu")
    last_call = {}
    for c in engine.engine.calls:
        for context, out in zip(c["prompts"], c["outputs"]):
            last_call[next(i for i, q in enumerate(QUESTIONS) if q in TOK.decode(context))] = context + out
    retokenised = 0
    for i, group in enumerate(groups):
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert row == last_call[i]
        text = TOK.decode(row)
        retokenised += tc.encode(TOK, text) != row
        mask = batch.action_mask[i][: len(group.completion_ids[0])].tolist()
        assert mask == (group.action_mask[0] or [1] * len(group.completion_ids[0]))
    assert retokenised >= 2  # the test would catch a re-tokenising implementation


def test_rewards_get_trls_keywords_environments_and_get_reward():
    """Rewards are called as TRL calls them with an environment: the prompt (with reset's text), conversational
    completions with the tool messages, ``environments=``, and the environment's ``get_reward()`` added."""
    seen = {}

    def reward(prompts, completions, environments, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, environments=environments)
        return [float(c[-1]["content"].endswith(a)) for c, a in zip(completions, answer)]

    script = turn_script(TOK)
    engine = episode_engine(script, "tiny_chat.GreetingEnv", ["tiny_chat.multiply"])
    groups = episode_groups(engine, list(enumerate(rows())), 1, [1, 2, 3], SamplingParams(200), step=0,
                            source="policy")
    from gvpo.episodes import environment_reward

    total = combine([reward, environment_reward(engine.spec)])(**reward_keywords([(g, 0) for g in groups]))
    assert total == [2.0, 1.0, 2.0]  # row 1's "hi" is right but made no sum; the others are right and summed
    assert seen["prompts"][0] == [{"role": "user", "content": "What is 12+34? Use the tools."}]
    assert [m["role"] for m in seen["completions"][2]] == ["assistant", "tool", "tool", "assistant", "tool",
                                                           "assistant"]
    assert all(type(e) is tc.GreetingEnv for e in seen["environments"])
    assert seen["environments"][0].sums == [46]


def test_bad_input_is_counted_with_its_name_and_never_crashes():
    """A tool that raises, one that hangs (timeout), an unknown tool, a malformed payload, a non-string reset,
    an observation cut to rollout.max_observation_tokens and the budget hit mid-observation: each is counted
    with the tool or environment name, the model gets TRL's error message, and the step goes on."""
    turns = {"raising": call("raising", a=1), "hanging": call("hanging", a=1), "nowhere": call("nowhere"),
             "malformed": '<tool_call>{"name": "raising", "argu</tool_call>', "shouting": call("shouting", a=60)}
    qs = list(turns)

    def script(context, seed=None):
        text = TOK.decode(context)
        q = next(q for q in qs if f"user\n{q}" in text)
        first = text.count("<|im_start|>assistant") == 1
        return tc.encode(TOK, (turns[q] if first else "done") + "<|im_end|>")

    engine = episode_engine(script, "tiny_chat.BadResetEnv", ["tiny_chat.raising", "tiny_chat.hanging",
                            "tiny_chat.shouting"], max_observation_tokens=30, timeout=0.3)
    data = [{"prompt": [{"role": "user", "content": q}], "answer": "0"} for q in qs]
    episodes = engine.rollout(data, list(range(5)), SamplingParams(max_new_tokens=100))
    events = [set(e.events) for e in episodes]
    reset = ("non_string", "BadResetEnv.reset")
    assert all(reset in ev for ev in events)
    assert ("tool_error", "raising") in events[0] and ("tool_timeout", "hanging") in events[1]
    assert ("unknown_tool", "nowhere") in events[2] and ("malformed_tool_call", "BadResetEnv") in events[3]
    assert ("observation_truncated", "shouting") in events[4]
    assert episodes[0].messages[1]["content"] == "{'error': 'tool broke'}"  # TRL's error result
    assert episodes[2].messages[1]["content"] == "{'error': 'Tool nowhere not found.'}"
    assert episodes[4].messages[1]["content"].endswith(" [truncated]")
    assert [e.turns for e in episodes] == [2, 2, 2, 1, 2]
    tight = engine.rollout(data[4:], [0], SamplingParams(max_new_tokens=40))[0]
    assert ("budget_mid_observation", "BadResetEnv") in tight.events and 0 not in tight.action_mask

    groups = episode_groups(engine, list(enumerate(data)), 1, list(range(5)), SamplingParams(100), step=0,
                            source="policy")
    metrics = episode_metrics(engine, groups, types.SimpleNamespace(num_processes=1))
    assert metrics["episodes/non_string/BadResetEnv.reset"] == 5 and metrics["episodes/tool_timeout/hanging"] == 1
    assert metrics["episodes/turns"] == pytest.approx(9 / 5) and metrics["episodes/tool_calls"] == pytest.approx(4 / 5)


def test_max_turns_stops_before_running_the_last_turns_tools():
    script = turn_script(TOK)
    episodes = episode_engine(script, "tiny_chat.CalculatorEnv", ["tiny_chat.multiply"], max_turns=1).rollout(
        rows(), [1, 2, 3], SamplingParams(200))
    assert [e.turns for e in episodes] == [1, 1, 1] and all(all(e.action_mask) for e in episodes)
    assert "tool_calls" in episodes[0].messages[0]


@pytest.mark.parametrize("environment, tools, words", [
    ("tiny_chat.NoReset", [], "has no reset method"),
    ("tiny_chat.BrokenInit", [], "BrokenInit() raised RuntimeError: no sandbox here"),
    ("tiny_chat.multiply", [], "is a function, not a class"),
    ("tiny_chat.Missing", [], "cannot import"),
    ("tiny_chat.BadToolEnv", [], "tool BadToolEnv.lookup cannot be described"),
    ("", ["tiny_chat.undocumented"], "tool undocumented cannot be described"),
    ("tiny_chat.CalculatorEnv", ["tiny_chat.add"], "two tools share a name"),
])
def test_a_bad_environment_or_tool_fails_at_set_up_naming_it(environment, tools, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_environment_spec(environment, tools, 1.0)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_a_bad_environment_in_one_line(tmp_path, capsys):
    from gvpo import cli

    assert cli.main(["train", "task.environment=tiny_chat.NoReset", f"output.dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "gvpo: config error: task.environment=tiny_chat.NoReset: class NoReset has no reset method (TRL's "
        "environments define reset(**row) -> str | None)"]


def test_a_tokenizer_that_cannot_parse_tool_calls_is_refused():
    from gvpo.episodes import with_episodes

    plain = tc.chat_tokenizer()
    plain.response_template = None
    spec = load_environment_spec("", ["tiny_chat.multiply"], 1.0)
    with pytest.raises(ConfigError, match="no response_template"):
        with_episodes(tc.ScriptedEngine(plain, None), plain, spec, RolloutConfig())


def test_per_turn_seeds_do_not_depend_on_batching():
    """Turn 0 of an episode uses its single-turn seed, turn t > 0 ``hash_seed(seed, t)``: the same episode run
    alone or with others consumes the same seeds."""
    script = turn_script(TOK)
    together = episode_engine(script, "tiny_chat.CalculatorEnv", ["tiny_chat.multiply"])
    together.rollout(rows(), [7, 8, 9], SamplingParams(200))
    alone = episode_engine(script, "tiny_chat.CalculatorEnv", ["tiny_chat.multiply"])
    alone.rollout(rows()[2:], [9], SamplingParams(200))
    from gvpo.rollout import hash_seed

    seeds_together = [s for c in together.engine.calls for s, p in zip(c["seeds"], c["prompts"])
                      if QUESTIONS[2] in TOK.decode(p)]
    assert seeds_together == [s for c in alone.engine.calls for s in c["seeds"]] == [9, hash_seed(9, 1),
                                                                                      hash_seed(9, 2)]


def test_the_readme_environment_runs_as_written(tmp_path, monkeypatch):
    """The README's example class, imported from the README's own text, runs an episode: its tool is called and
    its get_reward scores it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.split("cat > my_env.py <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    (tmp_path / "my_env.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))

    def script(context, seed=None):
        first = TOK.decode(context).count("<|im_start|>assistant") == 1
        return tc.encode(TOK, (call("add", a=12, b=34) if first else "46") + "<|im_end|>")

    engine = episode_engine(script, "my_env.Calculator")
    episode = engine.rollout(rows()[:1], [0], SamplingParams(100))[0]
    assert episode.messages[1] == {"role": "tool", "name": "add", "content": "46"}
    from gvpo.episodes import environment_reward

    assert environment_reward(engine.spec)(environments=[episode.environment]) == [0.1]


def test_hf_engine_takes_token_ids_and_stops_at_stop_strings():
    """Token in, token out on the HF engine (the embedded model): prompts given as the ids ``encode_prompts``
    makes generate the same tokens as the text prompts; a stop string ends a row right after the token that
    completes it (kept), the other rows run on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo.rollout.hf import HFEngine, encode_prompts
    from gvpo.tasks.arithmetic import default_model_path

    path = default_model_path()
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    prompts = ["Q: 12+34= A:", "Q: 1+2= A:", "Q: 40+40= A:"]
    enc = encode_prompts(engine.tokenizer, prompts)
    ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])]
    text_in = engine.generate(prompts, [1, 2, 3], SamplingParams(8))
    ids_in = engine.generate(ids, [1, 2, 3], SamplingParams(8))
    assert torch.equal(text_in.completion_ids, ids_in.completion_ids) and text_in.texts == ids_in.texts
    stop = text_in.texts[0][:2]  # the first row's first two characters
    stopped = engine.generate(prompts, [1, 2, 3], SamplingParams(8, stop=(stop,)))
    assert stopped.texts[0] == stop and any(stop not in t for t in text_in.texts[1:])
    for i in (1, 2):
        if stop not in text_in.texts[i]:
            assert stopped.texts[i] == text_in.texts[i]
