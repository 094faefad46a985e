"""gvpo: Group Variance Policy Optimization for post-training language models.

The objective (``gvpo_loss``, ``gvpo_weights``) is a set of pure tensor functions; see
``gvpo.objectives`` for the equations of the paper they implement.
"""

from .model.logprobs import completion_token_logps, sequence_logps, token_logps_from_logits
from .objectives import WEIGHT_SCHEMES, gvpo_grad_coefficients, gvpo_loss, gvpo_weights, weighted_nll
from .registry import Registry

__version__ = "0.1.0"


def __getattr__(name):  # the trainer pulls in transformers/accelerate: import it only when asked
    if name == "train":
        from .trainer import train

        return train
    if name in ("RunConfig", "load_config"):
        from . import config

        return getattr(config, name)
    raise AttributeError(f"module 'gvpo' has no attribute {name!r}")

__all__ = [
    "RunConfig",
    "load_config",
    "train",
    "WEIGHT_SCHEMES",
    "Registry",
    "completion_token_logps",
    "gvpo_grad_coefficients",
    "gvpo_loss",
    "gvpo_weights",
    "sequence_logps",
    "token_logps_from_logits",
    "weighted_nll",
]
