"""verl on rlhf_fast: policy losses, a fused log-prob + entropy head and the full KL, as verl calls them.

Tested against verl 0.9.1 (``pip install --no-deps verl``: its package imports Ray, so the tests run the
functions of the installed verl files, not ``import verl``; see tests/test_integrations_verl.py).

- ``policy_loss_vanilla``, ``policy_loss_gspo``, ``policy_loss_cispo``, ``policy_loss_sapo``,
  ``policy_loss_geo_mean``: verl's registered policy losses of those names (``verl/trainer/ppo/core_algos.py``:
  signature ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)
  -> (loss, metrics)``, the same config keys, defaults and metrics) on ``rf.ppo_policy_loss`` with its
  ``loss_mode`` of the same name, and verl's global-batch normalisation (``agg_loss`` with
  ``config.global_batch_info``: ``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
  ``loss_scale_factor``; see ``agg_scale``). Per mode, as verl: ``vanilla`` clips at ``clip_ratio_low`` /
  ``clip_ratio_high`` (``clip_ratio`` when unset) with the dual clip at ``clip_ratio_c`` (default 3);
  ``gspo`` and ``cispo`` clip the same way without a dual clip; ``sapo`` reads ``tau_pos`` / ``tau_neg``
  (defaults 1.0 / 1.05) and always aggregates by ``seq-mean-token-mean``; ``geo_mean`` ignores
  ``loss_agg_mode`` and the global figures (the plain mean of the row losses over every row, empty ones
  included), takes a row's rollout weight as the geometric mean of its tokens' weights, and splits its clip
  fraction by the advantage's sign. ``rollout_is_weights`` multiply the per-token loss: verl computes them
  (and its rejection sampling, ``rollout_rs``, which edits ``response_mask``) on the driver
  (``verl/trainer/ppo/rollout_corr_helper.py``) and hands them to the loss, so they pass through as given.
  ``register()`` puts them in verl's registry as ``rlhf_fast_vanilla``, ``rlhf_fast_gspo``,
  ``rlhf_fast_cispo``, ``rlhf_fast_sapo``, ``rlhf_fast_geo_mean`` (``LOSS_NAMES``; done on import when verl
  imports). Differences: verl clamps the log-ratio to [-20, 20] before ``exp`` (vanilla, cispo, sapo, and
  in their ``actor/ppo_kl``) and GSPO's log-ratio at 10; we do not (a ratio beyond e^10 is clipped by the
  trust region either way; only its unclipped side differs).
- ``FusedLinearForPPO``: the module interface of ``verl.utils.experimental.torch_functional.FusedLinearForPPO``
  (``forward(hidden_states, vocab_weights, input_ids, temperature=1.0) -> (log_probs, entropy)``), one
  pass through ``rf.linear_logprobs`` (Triton on CUDA); entropy comes back float32 (verl's torch backend
  rounds it to the hidden states' dtype).
  With ``truncation=rollout_truncation(config.actor_rollout_ref.rollout)``: the log-probs of the truncated
  distribution the rollout sampled from (verl's ``top_k`` / ``top_p``), for old and new log-probs alike.
- ``kl_penalty``: verl's ``kl_penalty(logprob, ref_logprob, kl_penalty)`` (k1/kl, abs, k2/mse, k3/low_var_kl
  and the straight-through ``+`` variants, verl's clamps kept) plus ``"full"``, which verl leaves
  unimplemented: the exact ``KL(pi || pi_ref)`` over the vocabulary from ``logits`` / ``ref_logits`` by
  ``rf.full_kl``.

Where they plug in: the losses through verl's registry (below; ``verl/workers/utils/losses.py`` calls it with
a bool ``response_mask`` and fills ``config.global_batch_info``). verl has no switch for the other two:
verl builds its own ``FusedLinearForPPO`` inside its patched model forwards
(``verl/models/transformers/dense_common.py``, ``impl_backend`` torch | liger), and calls ``kl_penalty``
with per-token log-probs only, so ``"full"`` needs a caller that has both models' logits (or hidden states).

A verl user adds (PPO/GRPO trainer, Hydra overrides)::

    VERL_USE_EXTERNAL_MODULES=rlhf_fast.integrations.verl  # every verl process imports it: registers the losses
    actor_rollout_ref.actor.policy_loss.loss_mode=rlhf_fast_vanilla  # or rlhf_fast_gspo / _cispo / _sapo / _geo_mean
"""

import torch

import rlhf_fast as rf
from rlhf_fast.rl_losses import masked_mean
from rlhf_fast.truncation import keys_on

VERL_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm", "seq-mean-token-mean")


def agg_scale(loss_mask: torch.Tensor, loss_agg_mode: str, *, dp_size: int = 1, batch_num_tokens=None,
              global_batch_size=None, loss_scale_factor=None) -> tuple[str, torch.Tensor]:  # fmt: skip
    """``(agg, factor)`` with ``factor * rf.aggregate(L, loss_mask, agg=agg)`` equal to verl's
    ``agg_loss(L, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)``.

    With ``m`` the mask, ``S = sum(m L)``, ``R`` the rows with a token, and verl's defaults
    (``batch_num_tokens = sum m``, ``global_batch_size = R`` when not given, only allowed at ``dp_size == 1``):

    - token-mean: ``S / batch_num_tokens * dp`` = rf token-mean (``S / sum m``) ``* sum m * dp / batch_num_tokens``
    - token-sum: ``S * dp`` = rf token-mean ``* sum m * dp``
    - seq-mean-token-sum: ``sum_rows(...) / global_batch_size * dp`` = rf seq-mean-token-sum ``* R * dp / gbs``
    - seq-mean-token-sum-norm: the same ``/ loss_scale_factor`` (default: the response length T)
    - seq-mean-token-mean: rf seq-mean-token-mean ``* R * dp / gbs`` (verl divides each row by
      ``count + 1e-8``, we by ``count``: 1e-8 / count relative)
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {VERL_AGG_MODES}, got {loss_agg_mode!r}")
    m = loss_mask.to(torch.float32)
    if loss_agg_mode in ("token-mean", "token-sum"):
        if batch_num_tokens is None and dp_size > 1 and loss_agg_mode == "token-mean":
            raise ValueError("batch_num_tokens (the global token count) is required when dp_size > 1")
        tokens = m.sum()
        denom = 1.0 if loss_agg_mode == "token-sum" else (tokens if batch_num_tokens is None else batch_num_tokens)
        return "token-mean", tokens * dp_size / denom
    if global_batch_size is None and dp_size > 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    rows = (m.sum(-1) > 0).sum().to(torch.float32)
    factor = rows * dp_size / (rows.clamp(min=1.0) if global_batch_size is None else global_batch_size)
    if loss_agg_mode == "seq-mean-token-mean":
        return "seq-mean-token-mean", factor
    if loss_agg_mode == "seq-mean-token-sum-norm":
        factor = factor / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return "seq-mean-token-sum", factor


def _get(config, name, default=None):
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


# verl's loss_agg_mode default per loss_mode (the functions' own defaults in core_algos.py)
_DEFAULT_AGG = {"vanilla": "token-mean", "gspo": "seq-mean-token-mean", "cispo": "token-mean",
                "sapo": "seq-mean-token-mean", "geo_mean": "token-mean"}  # fmt: skip


@torch.no_grad()
def _geo_mean_extras(old_log_prob, log_prob, advantages, m, lo, hi, rollout_is_weights):
    """What verl's ``geo_mean`` computes outside the GMPO loss itself: its two clip fractions (tokens whose
    log-ratio lies outside ``[-lo, hi]``, split by the advantage's sign) and the rollout weight of each row,
    the geometric mean of its tokens' weights, ``exp(sum_t(m log(w + 1e-10)) / (sum_t m + 1e-8))``
    (``compute_policy_loss_geo_mean`` in verl 0.9.1's ``verl/trainer/ppo/core_algos.py``)."""
    on = m != 0
    lr = torch.where(on, log_prob.float() - old_log_prob.float(), 0.0)
    adv = torch.where(on, advantages.float(), 0.0)
    outside = ((lr < -lo) | (lr > hi)).float()
    fracs = masked_mean(outside * (adv > 0), m).item(), masked_mean(outside * (adv < 0), m).item()
    if rollout_is_weights is None:
        return fracs, None
    log_w = torch.where(on, torch.log(rollout_is_weights.float() + 1e-10), 0.0)
    row_w = torch.exp((m * log_w).sum(-1, keepdim=True) / (m.sum(-1, keepdim=True) + 1e-8))
    return fracs, row_w.expand_as(m)


def _policy_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """verl's policy loss ``mode`` on ``rf.ppo_policy_loss`` (see ``policy_loss``'s docstring)."""
    if config is None:
        raise ValueError("config (verl's ActorConfig: clip_ratio, clip_ratio_low/high, clip_ratio_c, tau_pos/neg) "
                         "is required")  # fmt: skip
    options = {"loss_mode": mode}
    if mode == "sapo":  # verl's SAPO reads its temperatures only
        options.update(sapo_tau_pos=_get(config, "tau_pos", 1.0), sapo_tau_neg=_get(config, "tau_neg", 1.05))
    else:
        clip = _get(config, "clip_ratio")
        options.update(clip_low=_get(config, "clip_ratio_low", clip), clip_high=_get(config, "clip_ratio_high", clip))
    if mode == "vanilla":
        options["dual_clip"] = _get(config, "clip_ratio_c", 3.0)
    is_weights = rollout_is_weights
    if mode == "geo_mean":
        # verl ignores loss_agg_mode and the global figures here: the plain mean of the row losses over all B
        # rows (empty ones add 0); ours is their mean over the R rows with a token, times R / B
        m = response_mask.to(torch.float32)
        clipfracs, is_weights = _geo_mean_extras(old_log_prob, log_prob, advantages, m, options["clip_low"],
                                                 options["clip_high"], rollout_is_weights)  # fmt: skip
        agg, factor = "seq-mean-token-mean", (m.sum(-1) > 0).sum() / m.shape[0]
    else:  # verl's SAPO always aggregates by seq-mean-token-mean (with the global figures)
        info = _get(config, "global_batch_info", {}) or {}
        agg, factor = agg_scale(response_mask, "seq-mean-token-mean" if mode == "sapo" else loss_agg_mode, **info)
    loss, metrics = rf.ppo_policy_loss(log_prob, old_log_prob, advantages, response_mask, agg=agg,
                                       is_weights=is_weights, **options)  # fmt: skip
    if mode != "geo_mean":  # verl reports 0 for what a mode has not got (sapo: no clip; only vanilla: dual clip)
        clipfracs = metrics["clipfrac"].item(), metrics["dual_clipfrac"].item() if mode == "vanilla" else 0.0
    return loss * factor, {"actor/pg_clipfrac": clipfracs[0], "actor/ppo_kl": metrics["approx_kl"].item(),
                           "actor/pg_clipfrac_lower": clipfracs[1]}  # fmt: skip


def _verl_policy_loss(mode: str):
    """The function verl's registry holds for ``rlhf_fast_<mode>``: verl's signature and defaults."""

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=_DEFAULT_AGG[mode], config=None,
                    rollout_is_weights=None):  # fmt: skip
        return _policy_loss(mode, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
                            rollout_is_weights)  # fmt: skip

    policy_loss.__name__ = policy_loss.__qualname__ = f"policy_loss_{mode}"
    policy_loss.__doc__ = (f"verl's ``{mode}`` policy loss on ``rf.ppo_policy_loss`` (module docstring): ``(loss, "
                           "metrics)`` with verl's metric names ``actor/pg_clipfrac``, ``actor/ppo_kl``, "
                           "``actor/pg_clipfrac_lower`` (floats).")  # fmt: skip
    return policy_loss


POLICY_LOSSES = {f"rlhf_fast_{mode}": _verl_policy_loss(mode) for mode in _DEFAULT_AGG}
(policy_loss_vanilla, policy_loss_gspo, policy_loss_cispo, policy_loss_sapo,
 policy_loss_geo_mean) = POLICY_LOSSES.values()  # fmt: skip
LOSS_NAMES = tuple(POLICY_LOSSES)


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's ``FusedLinearForPPO``: per-token log-probs and entropy of
    ``softmax(hidden_states @ vocab_weights.T / temperature)`` in one ``rf.linear_logprobs`` pass.

    ``truncation`` (keywords ``top_k`` / ``top_p`` / ``min_p`` / ``sampler``, e.g. ``rollout_truncation(
    config.actor_rollout_ref.rollout)``): the log-probs and entropy of the truncated distribution the rollout
    sampled from instead (``rf.linear_logprobs``' truncation; ``-inf`` for a token outside the kept set, which
    rf's verl losses do not take: mask it out of ``response_mask`` first). Default: the full softmax, as verl."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "rlhf_fast", truncation: dict | None = None):
        super().__init__()
        self.chunk_size = chunk_size  # accepted for the interface: rf picks its own chunks (rf.chunk_budget)
        self.impl_backend = impl_backend
        unknown = set(truncation or {}) - {"top_k", "top_p", "min_p", "sampler"}
        if unknown:
            raise ValueError(f"truncation takes top_k, top_p, min_p and sampler, got {sorted(unknown)}")
        self.truncation = dict(truncation or {})

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return rf.linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64), temperature=temperature,
                                  return_entropy=True, **self.truncation)  # fmt: skip


def rollout_truncation(rollout) -> dict:
    """The truncation verl's rollout samples with, as ``rf`` keywords (``FusedLinearForPPO(truncation=...)``,
    ``rf.linear_logprobs``, ``rf.logprobs``); ``{}`` when it samples from the full softmax. ``rollout``: verl's
    ``actor_rollout_ref.rollout`` config (``RolloutConfig`` or its Hydra node): ``top_k`` (-1 or 0: off),
    ``top_p`` (1: off), ``min_p`` where it has one (0: off). ``sampler="vllm"`` for ``name="vllm"``, ``"hf"``
    for ``"hf"``; ``ValueError`` for another engine (its sampler's ties and boundaries are not checked
    against ours), greedy decoding (``do_sample=False``) or a ``repetition_penalty`` != 1 (the distribution
    sampled from is then not the truncated softmax)."""
    on = keys_on(*(getattr(rollout, key, None) for key in ("top_k", "top_p", "min_p")))
    if not on:
        return {}
    name = getattr(rollout, "name", None)
    if name not in ("vllm", "hf"):
        raise ValueError(f"rollout_truncation: rollout name={name!r}: truncated log-probs match vLLM's sampler "
                         "(name='vllm') and transformers' generate (name='hf') only")  # fmt: skip
    if getattr(rollout, "do_sample", True) is False:
        raise ValueError("rollout_truncation: do_sample=False decodes greedily; there is no sampled distribution")
    penalty = getattr(rollout, "repetition_penalty", 1.0)
    if penalty not in (None, 1.0):
        raise ValueError(f"rollout_truncation: repetition_penalty={penalty} changes the sampled distribution, "
                         "which the truncated log-probs would not be")  # fmt: skip
    return on | {"sampler": name}


def kl_penalty(logprob, ref_logprob, kl_penalty: str, *, logits=None, ref_logits=None, temperature: float = 1.0):
    """verl's ``kl_penalty`` per token, plus ``"full"`` (``rf.full_kl(logits, ref_logits)``: pass both)."""
    if kl_penalty == "full":
        if logits is None or ref_logits is None:
            raise ValueError("kl_penalty='full' needs logits and ref_logits (the whole vocabulary), not log-probs")
        return rf.full_kl(logits, ref_logits, temperature=temperature)
    base = kl_penalty[:-1] if kl_penalty.endswith("+") else kl_penalty
    names = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
    if base not in names:
        raise ValueError(f"kl_penalty must be one of {sorted(names)} (optionally with '+'), or 'full'; got {kl_penalty!r}")
    if names[base] == "k3":
        # verl: the log-ratio clamped to [-20, 20] and the estimate to [-10, 10] (kept, for equal numbers)
        lr = torch.clamp(logprob.float() - ref_logprob.float(), -20.0, 20.0)
        forward = torch.clamp(rf.kl_penalty(lr, torch.zeros_like(lr), estimator="k3"), max=10.0)
    else:
        forward = rf.kl_penalty(logprob, ref_logprob, estimator=names[base])
    if not kl_penalty.endswith("+") or names[base] == "k2":
        return forward
    k2 = rf.kl_penalty(logprob, ref_logprob, estimator="k2")  # straight-through: k2's gradient, the estimate's value
    return k2 - k2.detach() + forward.detach()


def register(register_policy_loss=None) -> None:
    """Put the losses into verl's policy-loss registry under ``LOSS_NAMES`` (``rlhf_fast_vanilla``, ...)
    (``register_policy_loss``: verl's decorator factory; default: imported from verl)."""
    if register_policy_loss is None:
        from verl.trainer.ppo.core_algos import register_policy_loss
    for name, fn in POLICY_LOSSES.items():
        register_policy_loss(name)(fn)


try:  # inside a verl process (VERL_USE_EXTERNAL_MODULES), registering is what importing this module is for
    from verl.trainer.ppo import core_algos as _core_algos
except ImportError:  # verl, or one of its heavy dependencies (Ray), is not installed: call register() later
    _core_algos = None
if _core_algos is not None:
    register(_core_algos.register_policy_loss)
