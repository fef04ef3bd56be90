"""``rf.linear_dpo_loss``: DPO from the last hidden states and the lm_head weight, without the logits.

    seq_logp = sequence log-probs of hidden @ weight.T (+ bias)      ([2B]: B chosen rows, then B rejected)
    loss     = dpo_loss(seq_logp[:B], seq_logp[B:], ref_chosen_logp, ref_rejected_logp)

The per-token log-probs come from ``rf.linear_logprobs`` (Triton tiles or chunked PyTorch, never the
``[2B * T, V]`` logits, forward or backward); the sum over tokens and the DPO loss are ``[2B, T]`` and
``[B]`` work on top, so the gradients reach ``hidden``, ``weight`` and ``bias`` through its backward.
"""

import torch

from . import _amp, _checks, _vocab_parallel
from .linear_logprobs_op import linear_logprobs
from .preference import check_dpo_options, dpo_loss
from .sequence_logprobs_op import sum_over_tokens


def _check_batch(hidden, labels, ref_chosen_logp, ref_rejected_logp) -> int:
    """``B``, after checking ``hidden [2B, T, H]``, ``labels [2B, T]`` and the ``[B]`` reference log-probs."""
    _checks.check_float_tensor(hidden, "hidden")
    if hidden.dim() != 3 or hidden.shape[0] == 0 or hidden.shape[0] % 2:
        raise ValueError(
            "hidden must have shape [2B, T, H] with B >= 1 (B chosen rows, then B rejected rows), "
            f"got {tuple(hidden.shape)}"
        )
    _checks.check_shape("labels", labels, hidden.shape[:2], "[2B, T], the leading dimensions of hidden")
    B = hidden.shape[0] // 2
    for name, ref in (("ref_chosen_logp", ref_chosen_logp), ("ref_rejected_logp", ref_rejected_logp)):
        _checks.check_float_tensor(ref, name)
        _checks.check_shape(name, ref, (B,), "one log-prob per pair: half the rows of hidden")
        _checks.check_same_device(name, ref, "hidden", hidden)
    return B


def linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    bias: torch.Tensor | None = None,
    impl: str = "auto",
    reduction: str = "mean",
    skip_ignored: bool = False,
    process_group: "torch.distributed.ProcessGroup | None" = None,
    matmul_dtype: "torch.dtype | None" = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``dpo_loss`` on the sequence log-probs of ``hidden @ weight.T + bias``, never building the logits.

    Args:
        hidden: ``[2B, T, H]`` last hidden states: rows ``0..B-1`` the chosen sequences, rows ``B..2B-1``
            the rejected ones of the same pairs (float32, bfloat16 or float16).
        weight: ``[V, H]`` lm_head weight, ``hidden``'s dtype. ``bias``: optional ``[V]``.
        labels: ``[2B, T]`` next-token ids, ``ignore_index`` on prompt and padding positions.
        ref_chosen_logp, ref_rejected_logp: ``[B]`` sequence log-probs under the reference model
            (constants).
        beta, loss_type, label_smoothing: as in :func:`rlhf_fast.dpo_loss`.
        ignore_index: label value that does not count.
        average_log_prob: average the token log-probs of each sequence instead of summing them (a
            sequence without valid tokens has log-prob 0, see :func:`rlhf_fast.sequence_logprobs`).
        impl: ``"auto"`` (Triton on CUDA, PyTorch on CPU), ``"triton"`` or ``"torch"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` over the pairs, as in ``dpo_loss``.
        skip_ignored: ``True``: the prompt and padding rows (label ``ignore_index``) are dropped before the
            matmul (as in :func:`rlhf_fast.linear_logprobs`); they count for nothing in the sequence
            log-probs either way, so the loss is the same, for the labeled rows' work only.
        process_group: tensor parallelism, as in :func:`rlhf_fast.linear_logprobs` (``weight``/``bias`` the
            rank's slice of the vocabulary's rows, ``hidden`` replicated, its gradient all-reduced): the
            composed route, vocabulary-parallel token log-probs then the DPO loss, exact in its gradients.
            ``ref_chosen_logp``, ``ref_rejected_logp`` and the DPO options must be the same on every rank
            (``ValueError`` naming the one that is not, checked in one small all-reduce of their own).
        matmul_dtype: ``None`` (follow autocast) or ``torch.float32`` (the lm_head matmul in float32 under
            any autocast), as in :func:`rlhf_fast.linear_logprobs`.

    Under ``torch.autocast`` the matmul follows ``rf.linear_logprobs``' policy (operands in the autocast
    dtype, float32 logits); everything after the token log-probs is float32.

    Returns:
        ``(loss, metrics)``: the float32 loss (gradients to ``hidden``, ``weight`` and ``bias`` in their
        dtypes) and ``dpo_loss``' metrics plus ``policy_chosen_logp`` and ``policy_rejected_logp``, the
        mean sequence log-probs of the policy (detached).
    """
    labels = _checks.as_labels(labels)
    B = _check_batch(hidden, labels, ref_chosen_logp, ref_rejected_logp)
    check_dpo_options(beta, loss_type, label_smoothing, reduction)  # before the expensive part
    if process_group is not None:  # another rank's reference log-probs or beta: its own loss, silently
        _vocab_parallel.same_on_every_rank(process_group, hidden.device, dict(
            ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp, beta=beta, loss_type=loss_type,
            label_smoothing=label_smoothing, reduction=reduction, average_log_prob=bool(average_log_prob)))  # fmt: skip
    # weight, bias, ignore_index and impl are checked by linear_logprobs
    # linear_logprobs follows autocast for the matmul (rlhf_fast/_amp.py); the rest is float32 [2B, T] work.
    token_logp = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, impl=impl,
                                 skip_ignored=skip_ignored, process_group=process_group,
                                 matmul_dtype=matmul_dtype)  # fmt: skip
    with _amp.no_autocast():
        seq_logp = sum_over_tokens(token_logp, labels != ignore_index, bool(average_log_prob))
        chosen, rejected = seq_logp[:B], seq_logp[B:]
        loss, metrics = dpo_loss(
            chosen, rejected, ref_chosen_logp, ref_rejected_logp,
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reduction=reduction,
        )  # fmt: skip
        metrics["policy_chosen_logp"] = chosen.detach().mean()
        metrics["policy_rejected_logp"] = rejected.detach().mean()
    return loss, metrics
