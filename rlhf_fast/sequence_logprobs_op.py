"""``rf.sequence_logprobs``: the log-prob of each whole sequence, summed (or averaged) over its tokens.

Built on ``rf.logprobs``: its kernel (or chunked PyTorch implementation) reads the logits once and
returns per-token log-probs, 0 at ignored positions; the sum over ``T`` is a ``[..., T]`` reduction.
Gradients flow to the logits through ``rf.logprobs``' backward.
"""

import torch

from . import _amp, _checks
from .logprobs_op import logprobs


def sum_over_tokens(token_logp: torch.Tensor, valid: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum of ``token_logp [..., T]`` (already 0 where not ``valid``) over ``T``, or its mean over the valid
    tokens. A row without a valid token gives 0 either way (its token count is clamped to 1), not NaN."""
    total = token_logp.sum(-1)
    if not average:
        return total
    return total / valid.sum(-1).clamp(min=1).to(total.dtype)


@_amp.float32_op
def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    average: bool = False,
    impl: str = "auto",
    process_group: "torch.distributed.ProcessGroup | None" = None,
    top_k: "int | torch.Tensor | None" = None,
    top_p: "float | torch.Tensor | None" = None,
    min_p: "float | torch.Tensor | None" = None,
    sampler: str = "vllm",
) -> torch.Tensor:
    """Per-sequence log-prob: ``sum_t log_softmax(logits / T)[t, labels[t]]`` over tokens not ignored.

    Args:
        logits: ``[..., T, V]`` float32, bfloat16 or float16, any strides (e.g. ``logits[:, :-1]``).
        labels: ``[..., T]`` integer token ids in ``[0, V)``, or ``ignore_index`` (prompt and padding).
        temperature, ignore_index, impl: as in :func:`rlhf_fast.logprobs`.
        average: the mean over the valid tokens instead of the sum (DPO's ``average_log_prob``, IPO's
            length normalisation).
        process_group: tensor parallelism, as in :func:`rlhf_fast.logprobs` (``logits`` the rank's slice of
            the vocabulary): the composed route, ``rf.logprobs``' vocabulary-parallel log-probs summed over
            ``T``, exact in its gradient.
        top_k, top_p, min_p, sampler: truncated sampling, as in :func:`rlhf_fast.logprobs` (a per-row tensor
            is ``[..., T]`` or ``[...]``, one value per sequence): each token's log-prob under the truncated,
            renormalised distribution; a sequence with a token outside its kept set has log-prob ``-inf``.

    Returns:
        float32 ``[...]``, differentiable with respect to ``logits`` (the gradient in their dtype). A
        sequence whose labels are all ``ignore_index`` has log-prob 0 (sum of nothing), also with
        ``average=True`` (0 rather than 0 / 0), and gets no gradient. Computed in float32 whatever
        autocast says. Batch invariant (both impls; PyTorch on CPU): a sequence's log-prob is bitwise the
        same whatever the other sequences of the batch (README "Batch invariance").
    """
    if isinstance(logits, torch.Tensor) and logits.dim() < 2:
        raise ValueError(f"logits must have shape [..., T, V], got {tuple(logits.shape)}")
    token_logp = logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index, impl=impl,
                          process_group=process_group, top_k=top_k, top_p=top_p, min_p=min_p,
                          sampler=sampler)  # fmt: skip
    return sum_over_tokens(token_logp, _checks.as_labels(labels) != ignore_index, bool(average))
