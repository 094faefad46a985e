"""GVPO inside TRL: ``GVPOTrainer`` / ``GVPOConfig``, drop-in for ``trl.GRPOTrainer`` / ``trl.GRPOConfig``.

    from gvpo.trl import GVPOConfig, GVPOTrainer
    trainer = GVPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward,
                          args=GVPOConfig(output_dir="out", beta=0.1, num_generations=8), train_dataset=ds)
    trainer.train()

TRL samples, scores and batches exactly as for GRPO; only the loss is GVPO's (Eq. 13 with the
unbiased ``1/(k-1)`` of Corollary 3.4, computed by :func:`gvpo.gvpo_loss`): sequence-sum log-probs,
centred rewards without std scaling, no clipping, no importance ratio. Supported TRL: the range in
:data:`SUPPORTED_TRL` (the ``trl`` extra), checked at import, because this overrides TRL internals.

What it replaces in ``GRPOTrainer`` and why (nothing else is overridden):

- ``_get_per_token_logps_and_entropies``, for float64 models only: TRL 1.16 computes log-probs with
  its fused LM-head kernel in float32 whatever the model's dtype; a float64 model gets float64
  log-probs (plain logits, :func:`gvpo.token_logps_from_logits`) so exactness checks stay exact, and
  asks an MoE model for its router loss as TRL does. All other dtypes use TRL's kernel unchanged.
- ``__init__``: with ``reference="rollout"`` it builds TRL with ``beta=0`` (no reference model is
  loaded, no reference log-probs computed); GVPO's beta lives in ``self.gvpo_beta``.
- ``_generate_and_score_completions``: calls TRL's, then adds one column, ``gvpo_index``: each
  completion's position in the global generation batch (all processes), in TRL's own layout where
  group ``g`` is positions ``g*k .. g*k+k-1``. It survives TRL's shuffle and split into micro-batches
  and tells the loss which completions form a group. TRL's ``advantages`` are kept as the rewards:
  with ``scale_rewards="none"`` (forced here) they are ``R_i - mean_g R`` over the whole group,
  computed by TRL from rewards gathered across processes, and centring them again changes nothing.
- ``_compute_loss``: the GVPO loss. GVPO's weights (Eq. 12) need the group means of the implicit
  reward ``beta * (log pi_theta - log pi_ref)`` under the *current* parameters over all ``k``
  completions, while TRL spreads a group over processes and gradient-accumulation steps. So the loss
  of a micro-batch is ``gvpo_loss`` over the whole generation batch, with the current, detached
  sequence log-probs of every completion and this micro-batch's own log-probs (with gradient) put in
  their places: its gradient is exactly this micro-batch's share of the whole-batch gradient, and the
  shares of all micro-batches of an optimizer step add up to the whole gradient. The current log-probs
  of the other completions come from this micro-batch's forward when it holds the whole local
  generation batch (``steps_per_generation == 1``, and in evaluation), gathered across processes; else
  from one no-grad forward over the buffered generation batch at the first micro-batch of every
  optimizer step (parameters only change between optimizer steps), which is what makes
  ``num_iterations > 1`` and ``steps_per_generation > 1`` use the current parameters.
  The reference log-probs are TRL's ``ref_per_token_logps`` (``reference="fixed"``: the initial model,
  or the base model with adapters off under PEFT) or the training model's own log-probs at the first
  use of a generation batch, i.e. under the parameters that generated it (``reference="rollout"``,
  the authors' recipe). vLLM's sampling log-probs are never used (TRL's vLLM modes are not tested
  here: no GPU).

  Sequence log-probs sum the tokens the model generated: TRL's ``completion_mask`` times its
  ``tool_mask`` (0 on tool results of ``tools=`` / ``environment_factory`` episodes), for the policy and
  the reference alike; the environment's factor cancels in ``log pi_theta - log pi_ref``. With
  ``mask_truncated_completions`` a truncated completion (all-zero ``completion_mask``) leaves its group:
  ``gvpo_loss`` runs over the kept completions, so each group's ``1/(k-1)`` uses its remaining ``k``
  and a group left with one completion, like every group of a ``num_generations_eval=1`` evaluation,
  contributes 0 (no group at all: loss 0, never an error). An MoE model's router loss is added as TRL
  adds it, ``router_aux_loss_coef * aux_loss / accumulation steps`` of this micro-batch's forward.
  ``docs/trl.md`` goes through TRL's options one by one.

Scaling: the returned loss's gradient is ``num_processes * steps_per_generation /
gradient_accumulation_steps`` times the micro-batch's share (DDP averages gradients over processes;
with the default ``steps_per_generation == gradient_accumulation_steps`` one optimizer step is then
exactly the gradient of ``gvpo_loss`` on the generation batch). Its value is the GVPO loss of the
generation batch divided by the number of accumulation steps, so that TRL's logged ``loss`` is the
GVPO loss. A completion every reward function returned ``None`` for gets its group's mean reward
(TRL gives it advantage 0).
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass, field

import torch
from packaging.version import Version

from gvpo import gvpo_loss, token_logps_from_logits
from gvpo.groups import dense_index, group_sizes

SUPPORTED_TRL = (">=1.16", "<1.17")
"""TRL versions this module is written and tested against (same range as the ``trl`` extra)."""


def _check_trl_version() -> None:
    try:
        found = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "gvpo.trl needs TRL: pip install 'gvpo[trl]' (TRL " + ",".join(SUPPORTED_TRL) + ")"
        ) from None
    low, high = (Version(s.lstrip("<>=")) for s in SUPPORTED_TRL)
    if not low <= Version(found) < high:
        raise ImportError(
            f"gvpo.trl overrides TRL internals and supports TRL {','.join(SUPPORTED_TRL)}, but TRL {found} is "
            f"installed: pip install 'gvpo[trl]' (or 'trl{','.join(SUPPORTED_TRL)}')"
        )


_check_trl_version()

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402

__all__ = ["SUPPORTED_TRL", "GVPOConfig", "GVPOTrainer"]

_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                    "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


@dataclass
class GVPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` for GVPO. GRPO's loss options (``loss_type``, ``epsilon``, ``delta``,
    ``importance_sampling_level``, ``use_bias_correction_kl``) are unused: GVPO has no clipping and no
    importance ratio. Options that would change GVPO's loss are rejected."""

    beta: float = field(
        default=0.1,
        metadata={"help": "GVPO's beta (Eq. 5): implicit reward = beta * log(pi_theta / pi_ref). Must be > 0."},
    )
    reference: str = field(
        default="fixed",
        metadata={"help": "pi_ref: 'fixed' = the initial model (the paper's theory); 'rollout' = the policy that "
                          "generated each batch (the authors' released recipe; no reference model is loaded)."},
    )
    scale_rewards: str = field(
        default="none",
        metadata={"help": "Must be 'none': GVPO centres rewards within a group and does not divide by their std."},
    )
    vllm_importance_sampling_correction: bool = field(
        default=False,
        metadata={"help": "Must be False: GVPO uses no importance ratio (Corollary 3.2), so vLLM's sampling "
                          "log-probs play no part in its loss."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"GVPOConfig.beta must be a finite number > 0, got {self.beta!r}")
        if self.reference not in ("fixed", "rollout"):
            raise ValueError(f"GVPOConfig.reference must be 'fixed' or 'rollout', got {self.reference!r}")
        wrong = {
            "scale_rewards": (self.scale_rewards != "none", "'none' (Eq. 12 has no std scaling)"),
            "multi_objective_aggregation": (self.multi_objective_aggregation != "sum_then_normalize",
                                            "'sum_then_normalize' (GVPO needs the raw weighted reward sum)"),
            "vllm_importance_sampling_correction": (bool(self.vllm_importance_sampling_correction),
                                                    "False (GVPO has no importance ratio)"),
            "top_entropy_quantile": (self.top_entropy_quantile != 1.0, "1.0 (no token masking in GVPO)"),
            "off_policy_mask_threshold": (self.off_policy_mask_threshold is not None, "None"),
            "entropy_coef": (self.entropy_coef != 0.0 or self.use_adaptive_entropy,
                             "0.0 with use_adaptive_entropy=False (no entropy bonus in GVPO)"),
            "sync_ref_model": (self.sync_ref_model and self.reference == "rollout",
                               "False with reference='rollout' (there is no reference model to sync)"),
        }
        for name, (bad, expected) in wrong.items():
            if bad:
                raise ValueError(f"GVPOConfig.{name} must be {expected}, got {getattr(self, name)!r}")


@dataclass
class _Whole:
    """Detached per-completion vectors of the whole generation batch, in global position order."""

    logps: torch.Tensor
    ref_logps: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    kept: torch.Tensor
    """Bool: the completion stays in its group (False: truncated, with ``mask_truncated_completions``)."""


class GVPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with GVPO's loss; same constructor, ``args`` a :class:`GVPOConfig`."""

    _name = "GVPO"

    def __init__(self, model, reward_funcs=None, args: GVPOConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = GVPOConfig(f"{name.split('/')[-1]}-GVPO")
        if not isinstance(args, GVPOConfig):
            raise TypeError(f"GVPOTrainer: args must be a gvpo.trl.GVPOConfig, got {type(args).__name__}")
        self.gvpo_beta = float(args.beta)
        self.gvpo_reference = args.reference
        self._gvpo_cache: tuple[tuple[int, int], _Whole] | None = None
        self._gvpo_generation = 0
        self._gvpo_rollout_ref: tuple[int, torch.Tensor] | None = None
        if args.reference == "rollout":  # TRL loads no reference model and computes no reference log-probs
            args.beta = 0.0
            try:
                super().__init__(model, reward_funcs, args, *pargs, **kwargs)
            finally:
                args.beta = self.gvpo_beta
        else:
            super().__init__(model, reward_funcs, args, *pargs, **kwargs)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if next(model.parameters()).dtype != torch.float64 or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies, all_aux = [], [], []
        router = {"output_router_logits": True} if compute_aux_loss else {}  # as TRL asks MoE models for it
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, **router)  # TRL's inputs, plain head
            logits = out.logits[:, -logits_to_keep - 1:-1] / self.temperature
            all_logps.append(token_logps_from_logits(logits, ids[:, -logits_to_keep:]))
            if compute_entropy:
                logp = torch.log_softmax(logits, -1)
                all_entropies.append(-(logp.exp() * logp).sum(-1))
            if compute_aux_loss:
                all_aux.append(out.aux_loss)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        aux_loss = torch.stack(all_aux).mean() if compute_aux_loss else None
        return torch.cat(all_logps), entropies, aux_loss

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        n = output["completion_ids"].shape[0]
        start = self.accelerator.process_index * n
        output["gvpo_index"] = torch.arange(start, start + n, device=output["completion_ids"].device)
        if self.model.training:
            self._gvpo_generation += 1
        return output

    def _sequence_logps(self, model, inputs, aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sum of the model-generated completion tokens' log-probs under ``model``, shape ``(B,)``, and with
        ``aux`` the MoE router's load-balancing loss of the same forward (else ``None``)."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        per_token_logps, _, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
            torch.cat([inputs["prompt_mask"], completion_mask], dim=1),
            completion_ids.size(1),
            compute_aux_loss=aux,
            **{key: inputs.get(key) for key in _MULTIMODAL_KEYS},
        )
        return (per_token_logps * _loss_mask(inputs)).sum(-1), aux_loss

    def _whole_batch(self, model, inputs, logps: torch.Tensor, mode: str) -> _Whole:
        """Current log-probs, reference log-probs, centred rewards and group ids of all completions."""
        if mode == "eval" or self.args.steps_per_generation == 1:  # this micro-batch is the local generation batch
            parts = [(inputs, logps.detach())]
        else:
            key = (self.state.global_step, self._gvpo_generation)
            if self._gvpo_cache is not None and self._gvpo_cache[0] == key:
                return self._gvpo_cache[1]
            with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
                parts = [(chunk, self._sequence_logps(model, chunk)[0]) for chunk in self._buffered_inputs]
        local = {name: torch.cat([fn(chunk, lp) for chunk, lp in parts]) for name, fn in {
            "index": lambda chunk, lp: chunk["gvpo_index"],
            "logps": lambda chunk, lp: lp,
            "rewards": lambda chunk, lp: chunk["advantages"],
            "ref_logps": lambda chunk, lp: (
                (chunk["ref_per_token_logps"] * _loss_mask(chunk)).sum(-1) if self.gvpo_reference == "fixed" else lp),
            "kept": lambda chunk, lp: (chunk["completion_mask"].any(-1) if self.mask_truncated_completions
                                       else torch.ones_like(lp, dtype=torch.bool)).long(),
        }.items()}
        gathered = {name: self.accelerator.gather(t) for name, t in local.items()}
        order = torch.argsort(gathered["index"])
        ordered = {name: t[order] for name, t in gathered.items()}
        if not torch.equal(ordered["index"], torch.arange(len(order), device=order.device)):
            raise RuntimeError("GVPOTrainer: the generation batch's completions are not all present once; "
                               "this TRL version batches differently from the one gvpo.trl supports")
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        ref_logps = ordered["ref_logps"]
        if self.gvpo_reference == "rollout" and mode == "train":
            if self._gvpo_rollout_ref is None or self._gvpo_rollout_ref[0] != self._gvpo_generation:
                self._gvpo_rollout_ref = (self._gvpo_generation, ordered["logps"])  # first use: generating params
            ref_logps = self._gvpo_rollout_ref[1]
        whole = _Whole(ordered["logps"], ref_logps, ordered["rewards"], ordered["index"] // num_generations,
                       ordered["kept"].bool())
        if mode == "train" and self.args.steps_per_generation > 1:
            self._gvpo_cache = (key, whole)
        return whole

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        logps, aux_loss = self._sequence_logps(model, inputs, aux=self.aux_loss_enabled)
        whole = self._whole_batch(model, inputs, logps, mode)
        current = whole.logps.index_put((inputs["gvpo_index"],), logps)  # gradient flows to this micro-batch only
        loss, groups = _kept_gvpo_loss(current, whole, self.gvpo_beta)
        steps = self.current_gradient_accumulation_steps if mode == "train" else 1
        if mode == "train":
            scale = self.accelerator.num_processes * self.args.steps_per_generation
            surrogate = loss * (scale / steps)
            value = loss.detach() / steps
        else:
            surrogate, value = loss, loss.detach()
        self._metrics[mode]["gvpo/loss"].append(loss.item())
        self._metrics[mode]["gvpo/groups"].append(float(groups))
        self._metrics[mode]["gvpo/log_ratio_mean"].append((whole.logps - whole.ref_logps)[whole.kept].mean().item()
                                                          if whole.kept.any() else 0.0)
        loss = surrogate - surrogate.detach() + value
        if self.aux_loss_enabled:  # TRL's term and scaling: per micro-batch, over the accumulation steps
            loss = loss + self.router_aux_loss_coef * aux_loss / steps
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss


def _loss_mask(inputs) -> torch.Tensor:
    """``(B, C)`` 1 on the completion tokens the model generated: TRL's ``completion_mask`` times its
    ``tool_mask`` (0 on tool results and environment observations) when the batch has one."""
    mask = inputs["completion_mask"]
    return mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]


def _kept_gvpo_loss(logps: torch.Tensor, whole: _Whole, beta: float) -> tuple[torch.Tensor, int]:
    """``gvpo_loss`` over the kept completions (Corollary 3.4's ``1/(k-1)`` with each group's remaining
    ``k``; ``G`` = groups with at least 2 left) and that ``G``; ``(0, 0)`` when no group has 2."""
    keep = whole.kept
    index, num_groups = dense_index(whole.group_ids[keep])
    groups = int((group_sizes(index, num_groups) >= 2).sum())
    if groups == 0:  # k = 1 evaluation, or every group masked down to one completion: no variance to fit
        return logps.sum() * 0.0, 0
    return gvpo_loss(logps[keep], whole.ref_logps[keep], whole.rewards[keep].to(logps.dtype), whole.group_ids[keep],
                     beta=beta), groups
