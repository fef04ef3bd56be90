"""The fused LM head of ``rlhf_fast.integrations.trl``: TRL 1.16's ``fused_lm_head=True`` calling convention
(``trl.trainer.utils.add_fused_lm_head``) on ``rf.linear_logprobs``, put on model *instances*.

TRL's trainers score completions with ``model(..., labels=..., fused_lm_head=True)``, which returns a
``FusedCausalLMOutput``; ``install_fused_head`` gives a model instance a forward that answers that call
from the backbone's last hidden states through ``rf.linear_logprobs`` (the logits never built, float32
under bf16 autocast) and passes every other call to the model's previous forward. The model class is not
touched. ``is_top1`` (TRL's ``mean_token_accuracy``) needs the argmax over the vocabulary, which
``rf.linear_logprobs`` does not compute: it costs one more matmul through the head, without gradient, in
chunks of at most 2^24 logits.
"""

import contextlib
import contextvars
import functools
import types
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from packaging.version import Version
from trl.trainer.utils import FusedCausalLMOutput

import rlhf_fast as rf

HEAD_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
_TOP1_CHUNK_LOGITS = 1 << 24  # logits held at once by the is_top1 pass (64 MiB in float32)


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def _head_unsupported(model) -> str | None:
    """Why our fused head cannot serve ``model`` (``None`` when it can)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    cfg = model.config.get_text_config()
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits (final_logit_softcapping), which rf.linear_logprobs does not do"
    if getattr(cfg, "output_router_logits", False):
        return "the model returns router logits (MoE aux loss)"
    if is_deepspeed_zero3_enabled():
        return "DeepSpeed ZeRO-3 shards the lm_head, which rf.linear_logprobs' backward cannot gather"
    if _logit_scale(cfg) <= 0:
        return "the model's logit scale is not positive"
    return None


def _logit_scale(cfg) -> float:
    """The factor the model multiplies its logits by, read as TRL 1.16's ``add_fused_lm_head`` reads it."""
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return 1.0 if scale is None else float(scale)


def install_fused_head(model, *, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                       outputs: tuple[str, ...] = ("log_probs",), truncation: dict | None = None) -> None:  # fmt: skip
    """Give the model *instance* a fused LM head on ``rf.linear_logprobs`` with TRL 1.16's calling convention.

    ``model(..., labels=labels, fused_lm_head=True)`` returns a ``trl.trainer.utils.FusedCausalLMOutput``
    whose ``log_probs`` (and ``entropy``, ``mean_logits``, ``is_top1`` when in ``outputs``) score the next-token
    labels (``-100`` = not scored, 0 there) under ``softmax(logit_scale * logits / temperature)``; a call without
    ``fused_lm_head`` goes to the model's previous forward (generation is unchanged). The instance's
    ``forward`` attribute is replaced, as TRL's own ``add_fused_lm_head`` does; the class is not touched.
    ``truncation`` (``rf.linear_logprobs``' ``top_k`` / ``top_p`` / ``min_p`` / ``sampler`` keywords): the
    log-probs and entropy are those of that truncated distribution (a label outside its kept set: ``-inf``),
    except inside ``reference_pass()``, where the model scores as the reference (the full softmax).
    """
    unknown = set(outputs) - set(HEAD_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs: this head computes {', '.join(HEAD_OUTPUTS)}, not {sorted(unknown)}")
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    # temperature / logit_scale: softmax(scale * z / T) = softmax(z / (T / scale))
    effective_temperature = temperature / _logit_scale(text_config)
    from transformers import __version__ as transformers_version

    backbone_attr = "base_model"
    if text_config is not model.config and Version(transformers_version) < Version("5.0.0"):
        backbone_attr = "model"

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous_forward(*args, **{k: v for k, v in extra.items() if v is not None}, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, backbone_attr)(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        h, y = hidden[mask], labels[mask]  # only the scored positions go through the head
        ctx = nullcontext()
        if cast_lm_head_to_fp32:
            h, weight, bias = h.float(), weight.float(), None if bias is None else bias.float()
            ctx = torch.autocast(h.device.type, enabled=False)
        elif not torch.is_autocast_enabled(h.device.type) and weight.dtype != h.dtype:
            # as TRL's chunked head: the projection runs in the hidden states' dtype
            weight, bias = weight.to(h.dtype), None if bias is None else bias.to(h.dtype)
        with ctx:
            trunc = None if _REFERENCE_PASS.get() else truncation  # the reference: the full softmax
            out = rf.linear_logprobs(h, weight, y, bias=bias, temperature=effective_temperature,
                                     return_entropy="entropy" in outputs, **(trunc or {}))  # fmt: skip
            is_top1 = _is_top1(h, weight, bias, y) if "is_top1" in outputs else None
        logp, entropy = out if "entropy" in outputs else (out, None)
        mean_logits = None
        if "mean_logits" in outputs:
            with torch.no_grad():  # mean_v(h . W_v + b_v) = h . mean_v(W_v) + mean(b): one matrix-vector product
                z = h.detach().float() @ weight.detach().float().mean(0)
                if bias is not None:
                    z = z + bias.detach().float().mean()
                mean_logits = z / effective_temperature

        def scatter(x):  # masked_scatter keeps an all-masked batch connected to the graph, as TRL does
            return None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)

        log_probs = scatter(logp)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=scatter(entropy),
                                   mean_logits=scatter(mean_logits), is_top1=scatter(is_top1), label_mask=mask)  # fmt: skip

    model.forward = types.MethodType(forward, model)


@torch.no_grad()
def _is_top1(h: torch.Tensor, weight: torch.Tensor, bias, labels: torch.Tensor) -> torch.Tensor:
    """Whether each label is the first argmax of its row's logits ``h @ weight.T + bias`` (TRL's ``is_top1``;
    temperature and logit scale, both positive, do not move it), in the matmul dtype autocast gives, in chunks."""
    rows = max(1, _TOP1_CHUNK_LOGITS // weight.shape[0])
    hits = [F.linear(hc, weight, bias).argmax(-1) == yc for hc, yc in zip(h.split(rows), labels.split(rows))]
    return torch.cat(hits) if hits else labels.new_zeros(0, dtype=torch.bool)


def heads_unsupported(trainer, name: str) -> str | None:
    """Why our head cannot serve the trainer's policy or reference model (warned once; ``None`` when it can)."""
    for model in _policy_and_reference(trainer):
        why = _head_unsupported(model)
        if why is not None:
            warn_once(f"rlhf_fast.integrations.trl.{name}: {why}; the log-probs come from TRL's own fused head.")
            return why
    return None


def _policy_and_reference(trainer) -> list:
    from accelerate.utils import is_peft_model

    policy = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    ref = getattr(trainer, "ref_model", None)
    return [policy] if ref is None else [policy, trainer.accelerator.unwrap_model(ref)]


def install_heads(trainer, name: str, policy_outputs: tuple[str, ...], temperature: float, cast_fp32: bool,
                  truncation: dict | None = None) -> bool:  # fmt: skip
    """Our fused head on the trainer's policy and reference models; ``False`` (with a warning) if one cannot take it.
    ``truncation`` applies to the policy's head only (the reference keeps the full softmax)."""
    if heads_unsupported(trainer, name) is not None:
        return False
    for i, model in enumerate(_policy_and_reference(trainer)):
        install_fused_head(model, temperature=temperature, cast_lm_head_to_fp32=cast_fp32,
                           outputs=policy_outputs if i == 0 else ("log_probs",),
                           truncation=truncation if i == 0 else None)  # fmt: skip
    return True


# Set while TRL scores the reference through the policy model itself (a PEFT policy without a reference model
# of its own, its adapter off or set to "ref"): a truncated head answers with the full softmax there, as the
# head of a separate reference model does.
_REFERENCE_PASS: contextvars.ContextVar = contextvars.ContextVar("rlhf_fast_reference_pass", default=False)


@contextlib.contextmanager
def reference_pass():
    token = _REFERENCE_PASS.set(True)
    try:
        yield
    finally:
        _REFERENCE_PASS.reset(token)


def score_reference_untruncated(trl_module) -> None:
    """Make ``trl_module``'s ``use_adapter`` (TRL's context for scoring the reference through a PEFT policy, the
    only use GRPO makes of it) also enter ``reference_pass()``. Idempotent; outside our truncated heads it
    changes nothing (the flag is read by them only)."""
    trl_use_adapter = trl_module.use_adapter
    if getattr(trl_use_adapter, "_rf_hooked", False):
        return

    @contextlib.contextmanager
    @functools.wraps(trl_use_adapter)
    def use_adapter(*args, **kwargs):
        with trl_use_adapter(*args, **kwargs), reference_pass():
            yield

    use_adapter._rf_hooked = True
    trl_module.use_adapter = use_adapter


# Set while one of our trainers' constructors runs: what to do with each model TRL has just put its head on
_AFTER_TRL_HEAD: contextvars.ContextVar = contextvars.ContextVar("rlhf_fast_after_trl_head", default=None)


@contextlib.contextmanager
def after_trl_heads(trl_module, callback):
    """While the block runs (in this context only), each ``add_fused_lm_head(model, ...)`` call made by TRL's
    trainer module ``trl_module`` is followed by ``callback(model)``: our head goes on a model exactly where TRL's
    constructor puts its own, before TRL hashes the model, precomputes with it or lets accelerate wrap its forward
    (the mixed-precision autocast of the reference model). Outside such a block (stock TRL's trainers, other
    threads) TRL's function runs alone, unchanged."""
    trl_add = trl_module.add_fused_lm_head
    if not getattr(trl_add, "_rf_hooked", False):

        @functools.wraps(trl_add)
        def add_fused_lm_head(model, *args, **kwargs):
            trl_add(model, *args, **kwargs)
            after = _AFTER_TRL_HEAD.get()
            if after is not None:
                after(model)

        add_fused_lm_head._rf_hooked = True
        trl_module.add_fused_lm_head = add_fused_lm_head
    token = _AFTER_TRL_HEAD.set(callback)
    try:
        yield
    finally:
        _AFTER_TRL_HEAD.reset(token)
