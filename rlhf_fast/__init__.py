"""rlhf_fast: fused Triton kernels for the hot spots of RLHF training.

Every public op is importable from here: ``import rlhf_fast as rf; rf.logprobs(logits, labels)``.
The contract of each op (names, defaults, semantics) is fixed in docs/API.md (in the repository, not installed).
"""

from ._dispatch import IMPLS
from ._fused_chunk import chunk_budget
from ._policy import PolicyLossOptions
from .full_kl_op import full_kl
from .gae_op import gae
from .linear_dpo import linear_dpo_loss
from .linear_full_kl_op import linear_full_kl
from .linear_logprobs_op import linear_logprobs
from .linear_ppo import linear_ppo_loss
from .logprobs_op import logprobs
from .rl_losses import aggregate, group_advantages, kl_penalty, masked_whiten, ppo_policy_loss, value_loss
from .ppo_from_logits import ppo_loss_from_logits
from .preference import dpo_loss, pairwise_sigmoid_loss
from .sampling import sample_tokens
from .sequence_logprobs_op import sequence_logprobs

__version__ = "0.1.0"

__all__ = [
    "IMPLS",
    "PolicyLossOptions",
    "aggregate",
    "chunk_budget",
    "dpo_loss",
    "full_kl",
    "gae",
    "group_advantages",
    "kl_penalty",
    "linear_dpo_loss",
    "linear_full_kl",
    "linear_logprobs",
    "linear_ppo_loss",
    "logprobs",
    "masked_whiten",
    "pairwise_sigmoid_loss",
    "ppo_loss_from_logits",
    "ppo_policy_loss",
    "sample_tokens",
    "sequence_logprobs",
    "value_loss",
    "__version__",
]
