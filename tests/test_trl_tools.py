"""``gvpo.trl.GVPOTrainer`` with TRL's own multi-turn tools: ``tools=[fn]`` and ``environment_factory=Cls``.

An episode is the model's turns with tool results between them. The environment's factor is the same under
pi_theta and pi_ref, so ``log pi_theta(tau) - log pi_ref(tau)`` is the sum over the tokens the model generated,
and the GVPO sequence log-prob is that sum: TRL's ``tool_mask`` (0 on tool-result tokens) must enter both the
policy's and the reference's sums.

TRL runs its real tool loop here (chat template, response parsing, the tool call, the tool message's suffix
tokens, ``tool_mask``); only the model's sampling is replaced by scripted turns, because a random tiny model
does not write tool calls. The reference scores each model turn as its own row (its whole context before it,
the turn's tokens after it) with a float64 forward and adds the turns: it never sees ``tool_mask``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from gvpo import gvpo_loss  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
            "</tool_response>", "<think>", "</think>"]
PROMPTS = ["What is 1+2?", "What is 3+4?"]
K = 4
BETA, LR = 0.1, 1.0


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


class Calculator:
    """A TRL environment: ``reset`` before each episode, its public methods are the tools."""

    def reset(self, **kwargs):
        return None

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Characters (printable ASCII and newline) plus Qwen3's special tokens, with TRL's Qwen3 chat template,
    which TRL knows how to parse tool calls from."""
    from trl.chat_template_utils import qwen3_chat_template

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [chr(c) for c in range(32, 127)] + ["\n"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        additional_special_tokens=SPECIALS[1:])
    tokenizer.chat_template = qwen3_chat_template
    return tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trl-tools") / "model"
    tokenizer = chat_tokenizer()
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=4096,
                         pad_token_id=0, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def script(row: int) -> tuple[str, str | None]:
    """Row ``row``'s model turns: even rows call ``add`` and then answer, odd rows answer at once."""
    if row % 2:
        return f"It is {row}.<|im_end|>", None
    call = json.dumps({"name": "add", "arguments": {"a": row, "b": 1}})
    return f"<tool_call>\n{call}\n</tool_call><|im_end|>", f"So {row + 1}.<|im_end|>"


def make_trainer(model_dir: Path, out_dir: Path, how: str):
    from datasets import Dataset

    from gvpo.trl import GVPOConfig, GVPOTrainer

    tokenizer = chat_tokenizer()
    encode = lambda text: tokenizer(text=text, add_special_tokens=False)["input_ids"]  # noqa: E731

    class ScriptedGVPOTrainer(GVPOTrainer):
        """TRL's whole generation path but the sampling: each call gets the scripted turn of each row."""

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            if [list(ids) for ids in prompt_ids] == self.prompts:  # the first turn of every row, in row order
                return [self.turns[row][0] for row in range(len(prompt_ids))], None
            out = []
            for ids in prompt_ids:  # after a tool result: prompt + the row's (unique) first turn + the tool's suffix
                row = next(r for r, p in enumerate(self.prompts) if ids[:len(p) + len(self.turns[r][0])]
                           == p + self.turns[r][0])
                self.contexts[row] = list(ids)
                out.append(self.turns[row][1])
            return out, None

        def _tokenize_prompts(self, prompts):
            prompt_ids, images, fields = super()._tokenize_prompts(prompts)
            self.prompts = [list(p) for p in prompt_ids]  # one per row, in row order
            return prompt_ids, images, fields

    rewards: list[float] = []

    def length_reward(completions, **kwargs):
        """Conversational completions (with the tool messages): their character count, modulo 7."""
        scores = [float(sum(len(str(m.get("content", ""))) for m in c) % 7) for c in completions]
        rewards.extend(scores)
        return scores

    episodes = {"tools": {"tools": [add]}, "environment_factory": {"environment_factory": Calculator}}[how]
    args = GVPOConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, seed=0, per_device_train_batch_size=len(PROMPTS) * K,
                      num_generations=K, max_completion_length=200, beta=BETA, learning_rate=LR, max_steps=1,
                      optim="sgd", lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
                      shuffle_dataset=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_strategy="no", disable_tqdm=True, model_init_kwargs={"dtype": torch.float64})
    trainer = ScriptedGVPOTrainer(model=str(model_dir), reward_funcs=length_reward, args=args, processing_class=tokenizer,
                                  train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": p}]}
                                                                   for p in PROMPTS]), **episodes)
    trainer.turns = {r: tuple(encode(t) if t else None for t in script(r)) for r in range(len(PROMPTS) * K)}
    trainer.contexts, trainer.rewards = {}, rewards
    return trainer


def turn_logps(model, context: list[int], turn: list[int]) -> torch.Tensor:
    """``log pi(turn | context)``: one unpadded float64 forward of the turn after its context."""
    ids = torch.tensor([context + turn])
    logits = model(ids).logits[0, len(context) - 1:-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(turn)[:, None]).sum()


def episode_logps(model, trainer, rows: int, with_tool_tokens: bool = False) -> torch.Tensor:
    """Sequence log-probs of every row's episode: the sum of its model turns, each scored as its own row
    (``with_tool_tokens``: also the tool message's tokens, what a trainer ignoring ``tool_mask`` would sum)."""
    out = []
    for r in range(rows):
        first, second = trainer.turns[r]
        total = turn_logps(model, trainer.prompts[r], first)
        if second is not None:
            context = trainer.contexts[r]
            suffix_start = len(trainer.prompts[r]) + len(first)
            total = total + turn_logps(model, context, second)
            if with_tool_tokens:
                total = total + turn_logps(model, context[:suffix_start], context[suffix_start:])
        out.append(total)
    return torch.stack(out)


def sgd_reference(model_dir: Path, trainer, with_tool_tokens: bool = False) -> dict:
    from transformers import AutoModelForCausalLM

    rows = len(PROMPTS) * K
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    with torch.no_grad():
        ref = episode_logps(initial, trainer, rows, with_tool_tokens)
    logps = episode_logps(policy, trainer, rows, with_tool_tokens)
    rewards = torch.tensor(trainer.rewards[:rows], dtype=torch.float64)
    loss = gvpo_loss(logps, ref, rewards, torch.arange(len(PROMPTS)).repeat_interleave(K), beta=BETA)
    params = list(policy.parameters())
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= LR * g
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("how", ["tools", "environment_factory"])
def test_tool_results_stay_out_of_the_gvpo_sequence_sums(model_dir, tmp_path, how, one_thread):
    """One SGD step of GVPOTrainer with TRL's tool loop equals SGD on ``gvpo_loss`` whose sequence log-probs
    sum the model's turns only; summing the tool results too would give another step. The step moves weights
    by up to 1.7 and the tool results' tokens change it by about 1; the trainer (padded batch) and the
    reference (one row per turn) agree to 3e-9, the float32 rounding Qwen3's RMSNorm does in a float64 model."""
    trainer = make_trainer(model_dir, tmp_path, how)
    trainer.train()
    called = [r for r in range(len(PROMPTS) * K) if trainer.turns[r][1] is not None]
    assert sorted(trainer.contexts) == called  # every even row called the tool and went on
    for r in called:  # the tool's result (row + 1) is in the context the second turn was generated after
        tail = trainer.processing_class.decode(trainer.contexts[r][len(trainer.prompts[r]):])
        assert f"<tool_response>\n{r + 1}\n</tool_response>" in tail
    expected = sgd_reference(model_dir, trainer)
    trained = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert max_diff(trained, expected) < 1e-8
    assert max_diff(expected, sgd_reference(model_dir, trainer, with_tool_tokens=True)) > 1e-2
