"""The chat template's part in an episode, token in and token out: the prompt rendered with its tools, a model
turn parsed into a message with tool calls (transformers 5's ``parse_response`` and the tokenizer's
``response_template``), and the tokens of tool results, TRL's "suffix" of the tool messages only.

Nothing is re-tokenised: a model turn stays the ids the engine produced, and an observation is appended as
the ids the template renders after an assistant turn that ends in EOS (TRL's ``_get_tool_suffix_ids``), so the
trained row is exactly the token stream the engine consumed (re-rendering the whole conversation can produce
different tokens, which is the drift TRL #5144 and verl's agent-loop notes describe).
"""

from __future__ import annotations

from ..config import ConfigError
from ..rollout.hf import render_prompt

TOOL_CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>tool\n{{ m.content }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A minimal ChatML with tools, for small tokenizers built from scratch (the tests' and
``bench/episodes_calculator.py``'s): the tool names in a system line, ``<tool_call>{json}</tool_call>`` in
assistant turns, tool results as ``tool`` turns; prefix-preserving, as TRL's training templates are."""

TOOL_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}
"""transformers' response parsing for :data:`TOOL_CHAT_TEMPLATE` (TRL's ``qwen3_template`` without reasoning)."""


def prompt_ids(tokenizer, prompt, tools: list | None) -> list[int]:
    """A prompt's token ids as the engine gets them: the chat template with ``tools`` for a conversation (the
    same BOS rule as :func:`gvpo.rollout.hf.encode_prompts`), a string tokenised as it is."""
    text = render_prompt(tokenizer, prompt, tools=tools or None)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def with_reset_text(prompt, text: str):
    """The prompt with ``reset()``'s text appended to its last message's content (TRL's rule); a string prompt
    gets it appended. The row's own prompt is left as it was.

    >>> with_reset_text([{"role": "user", "content": "2+2?"}], " Go.")
    [{'role': 'user', 'content': '2+2? Go.'}]
    """
    if isinstance(prompt, str):
        return prompt + text
    return list(prompt[:-1]) + [{**prompt[-1], "content": prompt[-1]["content"] + text}]


def check_tool_template(tokenizer) -> None:
    """ConfigError unless the tokenizer can parse tool calls (a ``response_template``, set from TRL's known
    templates when TRL is installed) and its chat template renders a tool message."""
    if getattr(tokenizer, "response_template", None) is None:
        try:
            from trl.chat_template_utils import add_response_schema

            add_response_schema(tokenizer)
        except Exception:  # TRL missing, or a template it does not know
            pass
    if getattr(tokenizer, "response_template", None) is None:
        raise ConfigError("task.tools/task.environment: the tokenizer has no response_template to parse tool calls "
                          "with (transformers' response parsing); set tokenizer.response_template in the model's "
                          "tokenizer_config.json or use a chat template TRL knows")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("task.tools/task.environment: the tokenizer has no chat template to render tool messages")


def parse_turn(tokenizer, turn_ids: list[int], prefix_ids: list[int], tools: list) -> tuple[dict, str | None]:
    """A model turn as an assistant message (``tool_calls`` when it calls tools) and ``None``, or as plain text
    and the reason its tool-call payload could not be parsed (TRL falls back to plain text the same way).

    Each tool call comes out as ``{"type": "function", "function": {"name": str, "arguments": dict}}``.
    """
    try:
        parsed = tokenizer.parse_response(turn_ids, prefix=prefix_ids, tools=tools or None)
        if not isinstance(parsed, dict):
            raise ValueError(f"parse_response returned {type(parsed).__name__}")
        calls = parsed.get("tool_calls")
        if calls is not None:
            parsed["tool_calls"] = [_checked_call(c) for c in (calls if isinstance(calls, list) else [calls])]
    except Exception as err:  # a malformed payload: the parser's errors are not one type
        text = tokenizer.decode(turn_ids, skip_special_tokens=True)
        return {"role": "assistant", "content": text}, f"{type(err).__name__}: {err}"
    content = parsed.get("content")
    if isinstance(content, str) and tokenizer.eos_token:
        content = content.removesuffix(tokenizer.eos_token)
    parsed["content"] = content or ""
    parsed.setdefault("role", "assistant")
    return parsed, None


def _checked_call(call) -> dict:
    """``{"type": "function", "function": {"name", "arguments"}}`` or ValueError (a malformed call)."""
    if not isinstance(call, dict):
        raise ValueError(f"a tool call is a {type(call).__name__}, not an object")
    function = call.get("function", call)
    if call.get("type", "function") != "function" or not isinstance(function, dict):
        raise ValueError(f"unsupported tool call type {call.get('type')!r}")
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str):
        raise ValueError("a tool call without a name")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool {name}: arguments are a {type(arguments).__name__}, not an object")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool_suffix_ids(tokenizer, tool_messages: list[dict]) -> list[int]:
    """The ids the chat template puts after an assistant turn that ends in EOS, for ``tool_messages`` and the
    next generation prompt: TRL 1.16's ``_get_tool_suffix_ids`` (a dummy conversation rendered with and
    without the tool messages; the prefix cut at its last EOS)."""
    calls = [{"type": "function", "function": {"name": tool_messages[0]["name"], "arguments": {}}}]
    dummy = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    prefix = tokenizer.apply_chat_template(dummy, add_generation_prompt=False, tokenize=True, return_dict=False)
    full = tokenizer.apply_chat_template(dummy + tool_messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)
    eos = [i for i, t in enumerate(prefix) if t == tokenizer.eos_token_id]
    if eos:
        prefix = prefix[: eos[-1] + 1]
    if full[: len(prefix)] != prefix:
        raise ValueError("the chat template is not prefix-preserving: tool messages change the tokens before them")
    return list(full[len(prefix):])


def truncate_content(tokenizer, content: str, max_tokens: int) -> tuple[str, bool]:
    """``content`` cut to ``max_tokens`` tokens with a visible ``[truncated]`` mark, and whether it was cut
    (``rollout.max_observation_tokens``; 0 = no limit)."""
    ids = tokenizer(content, add_special_tokens=False)["input_ids"]
    if not max_tokens or len(ids) <= max_tokens:
        return content, False
    return tokenizer.decode(ids[:max_tokens]) + " [truncated]", True
