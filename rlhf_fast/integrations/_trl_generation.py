"""What TRL's GRPO generation samples from, read from its config without importing TRL: the truncation
(``top_k`` / ``top_p`` / ``min_p`` as ``rf`` keywords) and the settings that change the sampled distribution
in ways the truncated log-probs do not reproduce (rlhf_fast.integrations.trl, ``truncated_logprobs=True``)."""

from rlhf_fast.truncation import keys_on


def generation_truncation(args) -> dict | None:
    """The truncation TRL's generation samples with, as ``rf.linear_logprobs`` keywords (those of ``top_k``,
    ``top_p``, ``min_p`` that are on, and ``sampler``), or ``None`` when it samples from the full softmax.
    ``GRPOConfig``'s ``top_k`` / ``top_p`` / ``min_p``, each overridden by ``generation_kwargs`` (TRL passes
    those last, to ``GenerationConfig`` or vLLM's ``SamplingParams``); ``sampler="vllm"`` with ``use_vllm``,
    else ``"hf"``."""
    extra = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    on = keys_on(*(extra.get(name, getattr(args, name)) for name in ("top_k", "top_p", "min_p")))
    return on | {"sampler": "vllm" if args.use_vllm else "hf"} if on else None


# Generation settings that change the distribution sampled from, beyond temperature and the truncation, with
# their neutral values (transformers' GenerationConfig and vLLM's SamplingParams, as TRL passes them): the
# truncated log-probs cannot reproduce them, so truncated_logprobs=True refuses a non-neutral one.
_UNMATCHED_GENERATION = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "bad_words": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "logit_bias": None, "allowed_token_ids": None,
    "min_length": 0, "min_new_tokens": None, "min_tokens": 0, "exponential_decay_length_penalty": None,
    "guidance_scale": None, "watermarking_config": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "logits_processors": None, "do_sample": True, "num_beams": 1, "use_beam_search": False,
}  # fmt: skip


def generation_unmatched(args) -> str | None:
    """The first generation setting of ``args`` (a ``GRPOConfig``) that changes the sampled distribution in a
    way the truncated log-probs do not reproduce (``GRPOConfig.repetition_penalty``, or a non-neutral key of
    ``_UNMATCHED_GENERATION`` in ``generation_kwargs``, which override it as in TRL; ``None`` and empty
    containers are neutral), as ``"key=value"``; ``None`` when there is none."""
    extra = args.generation_kwargs if isinstance(args.generation_kwargs, dict) else {}
    settings = {"repetition_penalty": args.repetition_penalty, **extra}
    for key, neutral in _UNMATCHED_GENERATION.items():
        value = settings.get(key)
        if value is not None and value != neutral and not (isinstance(value, (list, tuple, dict)) and not value):
            return f"{key}={value!r}"
    return None
