"""A fixed GVPO batch for testing ``gvpo.trl`` (tests/test_trl.py), and its independent reference.

``FixedGVPOTrainer`` replaces TRL's sampling with a table of completions, so one training step sees a
known batch: 3 prompts of the same length (no left padding), k=4 completions each of 1-5 tokens
(right padding, so the completion mask matters), rewards that are exact in float32 (TRL keeps rewards
in float32). ``reference_params`` recomputes the same steps with plain PyTorch and ``gvpo.gvpo_loss``:
one unpadded forward per completion, SGD by hand.

Run as a script under ``torch.distributed.run`` it trains with ``gvpo.trl`` on every process and
rank 0 saves the parameters: ``python -m torch.distributed.run --nproc_per_node 2 tests/trl_fixed.py
MODEL_DIR OUT_DIR NAME:KEY=VALUE,KEY=VALUE ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

PROMPTS = ["Q: 1+2= A:", "Q: 3+4= A:", "Q: 5+6= A:"]
K = 4
LENGTHS = [[3, 1, 5, 2], [4, 4, 2, 5], [1, 3, 5, 2]]
REWARDS = [[1.0, 0.0, 0.5, 0.25], [0.0, 0.0, 1.0, 2.0], [0.75, -1.0, 0.5, 0.0]]
BETA = 0.1
LR = 1.0


def completion_table(tokenizer) -> dict[str, list[list[int]]]:
    """Distinct completions per prompt: characters of digits and spaces, lengths from ``LENGTHS``."""
    g = torch.Generator().manual_seed(1)
    chars = list("0123456789 ")
    table = {}
    for prompt, lengths in zip(PROMPTS, LENGTHS):
        rows = []
        for n in lengths:
            while True:
                text = "".join(chars[int(i)] for i in torch.randint(len(chars), (n,), generator=g))
                ids = tokenizer(text=text, add_special_tokens=False)["input_ids"]
                if ids not in rows and all(ids not in r for r in table.values()):
                    rows.append(ids)
                    break
        table[prompt] = rows
    return table


def with_eos(table: dict[str, list[list[int]]], ends: list[list[bool]], eos: int = 2) -> dict[str, list[list[int]]]:
    """``table`` with EOS appended to completion ``j`` of prompt ``i`` where ``ends[i][j]``; the others stay
    without one, so TRL's ``mask_truncated_completions`` takes them for truncated (their last token is not EOS)."""
    return {p: [ids + [eos] * end for ids, end in zip(table[p], row)] for p, row in zip(PROMPTS, ends)}


def reward_lookup(table: dict[str, list[list[int]]]):
    """A TRL reward function: the table's reward of each completion, found by its token ids."""
    by_ids = {tuple(ids): r for p, rs in zip(PROMPTS, REWARDS) for ids, r in zip(table[p], rs)}

    def table_reward(prompts, completions, completion_ids, **_):
        return [by_ids[tuple(ids)] for ids in completion_ids]

    return table_reward


def make_trainer(model_dir: str | Path, out_dir: str | Path, batches: int = 1, *, table=None, grpo: bool = False,
                 **options):
    """A ``GVPOTrainer`` on ``batches`` copies of the fixed batch (each generated in its turn);
    ``options`` override the ``GVPOConfig`` fields below; ``table`` replaces :func:`completion_table`;
    ``grpo``: TRL's own ``GRPOTrainer`` / ``GRPOConfig`` instead, on the same batch."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from gvpo.trl import GVPOConfig, GVPOTrainer

    class FixedGVPOTrainer(GRPOTrainer if grpo else GVPOTrainer):
        def _generate(self, prompts):  # TRL 1.16's return tuple, without sampling
            prompt_ids = self._tokenize_prompts(prompts)[0]
            start = self.accelerator.process_index * len(prompts)  # the completion's position in the group
            completion_ids = [self._table[p][(start + j) % K] for j, p in enumerate(prompts)]
            completions = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            return prompt_ids, completion_ids, None, completions, None, {}, None, []

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = {
        "output_dir": str(out_dir), "use_cpu": True, "bf16": False, "fp16": False, "seed": 0,
        "per_device_train_batch_size": len(PROMPTS) * K, "gradient_accumulation_steps": 1, "num_generations": K,
        "max_completion_length": max(map(max, LENGTHS)), "beta": BETA, "learning_rate": LR, "max_steps": 1,
        "optim": "sgd", "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 0.0,
        "shuffle_dataset": False, "gradient_checkpointing": False, "report_to": "none", "save_strategy": "no",
        "logging_strategy": "no", "eval_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
        "model_init_kwargs": {"dtype": torch.float64},
    }
    config.update(options)
    table = table or completion_table(tokenizer)
    trainer = FixedGVPOTrainer(model=str(model_dir), reward_funcs=reward_lookup(table),
                               args=(GRPOConfig if grpo else GVPOConfig)(**config),
                               train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS * batches]),
                               processing_class=tokenizer)
    trainer._table = table
    return trainer


def sequence_logps(model, tokenizer, table) -> torch.Tensor:
    """Sum of completion-token log-probs, one unpadded forward per completion, group by group."""
    out = []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        for ids in table[prompt]:
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1:-1]
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).sum())
    return torch.stack(out)


def reference_params(model_dir: str | Path, steps: list[str], beta: float = BETA, lr: float = LR) -> dict:
    """Parameters after one SGD step on the fixed batch per entry of ``steps``, from ``gvpo.gvpo_loss``.

    Each entry names that step's reference: ``"fixed"`` = the starting model; ``"new"`` = the current
    parameters (a rollout reference on a freshly generated batch), kept for the following ``"same"``
    steps (later iterations on that batch)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gvpo import gvpo_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = completion_table(tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    rewards = torch.tensor(REWARDS, dtype=torch.float64).flatten()
    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(K)
    params = list(policy.parameters())
    rollout_ref = None
    for which in steps:
        logps = sequence_logps(policy, tokenizer, table)
        with torch.no_grad():
            if which == "fixed":
                ref = sequence_logps(initial, tokenizer, table)
            else:
                rollout_ref = logps.detach() if which == "new" else rollout_ref
                ref = rollout_ref
        grads = torch.autograd.grad(gvpo_loss(logps, ref, rewards, group_ids, beta=beta), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def padded_batch(tokenizer, table: dict[str, list[list[int]]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every completion of ``table`` after its prompt, right-padded as TRL batches them: ``(ids, attention_mask)``,
    one row per completion in group order (the prompts all have the same length, so none is left-padded)."""
    rows = [tokenizer(text=p)["input_ids"] + ids for p in PROMPTS for ids in table[p]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])


def sgd_step(model_dir: str | Path, loss_fn, *, table=None, lr: float = LR, **load) -> dict:
    """Parameters after one SGD step on ``loss_fn(logps, ref_logps, policy, table)``, where ``logps`` (with
    grad) and ``ref_logps`` are the float64 sequence log-probs of ``table``'s completions (default
    :func:`completion_table`) in group order under the policy and the initial model; ``load`` goes to
    ``from_pretrained`` (e.g. ``experts_implementation``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = table or completion_table(tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **load)
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, **load).eval()
    with torch.no_grad():
        ref = sequence_logps(initial, tokenizer, table)
    params = list(policy.parameters())
    grads = torch.autograd.grad(loss_fn(sequence_logps(policy, tokenizer, table), ref, policy, table), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= lr * g
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def trained_params(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}


def parse_run(spec: str) -> tuple[str, dict]:
    """``"name:key=value,key=value"`` -> ``(name, options)``; values are ints except ``reference``."""
    name, _, rest = spec.partition(":")
    options = {}
    for pair in filter(None, rest.split(",")):
        key, value = pair.split("=", 1)
        options[key] = value if key == "reference" else int(value)
    return name, options


def main(argv: list[str]) -> None:
    """``MODEL_DIR OUT_DIR RUN...``: train each run in turn; rank 0 saves ``OUT_DIR/NAME.safetensors``."""
    from safetensors.torch import save_file

    model_dir, out_dir, *runs = argv
    torch.set_num_threads(1)
    for spec in runs:
        name, options = parse_run(spec)
        trainer = make_trainer(model_dir, Path(out_dir) / name, **options)
        trainer.train()
        if trainer.accelerator.is_main_process:
            save_file({k: v.contiguous() for k, v in trained_params(trainer).items()},
                      str(Path(out_dir) / f"{name}.safetensors"))
            (Path(out_dir) / f"{name}.processes").write_text(str(trainer.accelerator.num_processes))


if __name__ == "__main__":
    main(sys.argv[1:])
