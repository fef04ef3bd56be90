"""Models for the trainers, all plain ``transformers`` models: a small causal LM built from a config (no
downloads), loading by name or local path, a char-level tokenizer for tests and demos, the reward model
and its scores, the critic (a backbone plus a value head), and the last hidden states plus lm_head weight
that ``rf.linear_logprobs`` / ``rf.linear_dpo_loss`` take instead of the ``[B, T, V]`` logits.

Positions: every forward here takes ``position_ids`` from the attention mask exactly as
``generate`` does (``cumsum(mask) - 1``, 0 on padding), so a left-padded prompt gets the same
log-probs in training as when it was sampled.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .errors import UserError
from .runtime import pick_attn_implementation

__all__ = [
    "CriticModel",
    "build_causal_lm",
    "build_char_tokenizer",
    "build_reward_model",
    "enable_gradient_checkpointing",
    "load_causal_lm",
    "load_tokenizer",
    "lm_hidden_states",
    "position_ids_from_mask",
    "reward_scores",
    "to_torch_dtype",
]

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextlib.contextmanager
def _loading(name_or_path, what: str, files: Sequence[str] = ()):
    """Check a model or tokenizer source before ``from_pretrained`` reads it, and turn what a bad one raises
    into a ``UserError`` naming it: a local path must exist and hold ``config.json`` and one of ``files``
    (a hub id is left to the hub); an ``OSError`` from loading (a hub id that does not exist, no network,
    a file it needs missing) says which source failed."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what} {name!r} is a file; give the directory a model was saved to (or a hub id)")
        present = {p.name for p in path.iterdir()}
        tokenizer = files == _TOKENIZER_FILES
        if not tokenizer and "config.json" not in present:
            raise UserError(f"{what} {name!r} holds no model (no config.json); it has {sorted(present)[:8]}")
        if files and not present.intersection(files):
            kind = "tokenizer" if tokenizer else "weights"
            raise UserError(f"{what} {name!r} holds no {kind} (none of {', '.join(files)}); it has "
                            f"{sorted(present)[:8]}")  # fmt: skip
    elif name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or not name.strip():
        raise UserError(f"{what} {name!r} does not exist (no such directory, and it is not a hub id "
                        "'name' or 'namespace/name')")  # fmt: skip
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot load {what} {name!r}: {e}") from e


# A chat template for tokenizers built here: every turn is <|role|>content</s>, and the conversation
# starts with <s>. Rendering a prefix of a conversation gives a prefix of the text, which is what
# tokenize_sft needs to find the assistant tokens.
CHAR_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def to_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/``"fp16"``/``"fp32"``... or a ``torch.dtype`` → ``torch.dtype``; None and
    ``"auto"`` → None (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return _DTYPES[dtype]


@contextlib.contextmanager
def _quiet_transformers():
    """Silence the load report of a load whose missing/unused weights are expected (a new score or value
    head, a dropped lm_head)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _dtype_kwarg(dtype: torch.dtype | None) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    if dtype is None:
        return {}
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def build_causal_lm(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 256,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """A randomly initialised ``LlamaForCausalLM`` from a config (nothing downloaded), float32. The
    initialisation draws from its own generator seeded with ``seed``; the global RNG is left untouched."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads or (hidden_size // num_heads) % 2:
        raise ValueError(f"hidden_size ({hidden_size}) must split into num_heads ({num_heads}) heads of even "
                         "size (rotary embeddings rotate pairs)")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    if model.generation_config is not None:  # generate() warns when these are unset
        model.generation_config.pad_token_id = pad_token_id
        model.generation_config.bos_token_id = bos_token_id
        model.generation_config.eos_token_id = eos_token_id
    return model


def load_causal_lm(
    name_or_path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """``AutoModelForCausalLM.from_pretrained`` (a local directory works offline). ``attn_implementation``
    None picks one for ``device`` (``pick_attn_implementation``)."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else None
    attn = attn_implementation or pick_attn_implementation(device or "cpu")
    with _loading(name_or_path, "model", _WEIGHT_FILES):
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), attn_implementation=attn,
                                                     **_dtype_kwarg(to_torch_dtype(dtype)))
    return model.to(device) if device is not None else model


def load_tokenizer(name_or_path: str | Path, *, padding_side: str = "right"):
    """``AutoTokenizer.from_pretrained``; a tokenizer without a pad token pads with its eos token."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    with _loading(name_or_path, "model", _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {str(name_or_path)!r} has neither a pad nor an eos token; "
                             "set tokenizer.pad_token before training")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def build_char_tokenizer(
    chars: str | Sequence[str],
    *,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    unk_token: str = "<unk>",
    roles: Sequence[str] = ("system", "user", "assistant"),
    chat_template: str | None = CHAR_CHAT_TEMPLATE,
):
    """A character-level ``PreTrainedTokenizerFast`` built here (no download): one token per character
    of ``chars``, special tokens ``pad, bos, eos, unk`` first (ids 0-3), one ``<|role|>`` token per chat
    role, a BOS prepended by ``tokenizer(text)``, and a chat template (``CHAR_CHAT_TEMPLATE``)."""
    from tokenizers import Regex, decoders, pre_tokenizers

    specials = [pad_token, bos_token, eos_token, unk_token] + [f"<|{r}|>" for r in roles]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in chars:
        if len(ch) != 1:
            raise ValueError(f"chars must be single characters, got {ch!r}")
        vocab.setdefault(ch, len(vocab))
    return word_level_tokenizer(vocab, pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"), decoders.Fuse(),
                                bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
                                additional_special_tokens=specials[4:], chat_template=chat_template)  # fmt: skip


def word_level_tokenizer(vocab: dict[str, int], pre_tokenizer, decoder, *, bos_token: str, eos_token: str,
                         pad_token: str, unk_token: str, additional_special_tokens: Sequence[str] = (),
                         chat_template: str | None = None, **kwargs):  # fmt: skip
    """A ``PreTrainedTokenizerFast`` over the token -> id map ``vocab`` (one token per piece that
    ``pre_tokenizer`` cuts; unknown pieces are ``unk_token``), ``bos_token`` prepended by
    ``tokenizer(text)``, ``decoder`` joining tokens back, and ``chat_template``; ``kwargs`` go to the
    tokenizer (e.g. ``padding_side``). The tokenizers built here (``build_char_tokenizer``, the demo's) are
    this with their own vocab and splitting."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos_token} $A", pair=f"{bos_token} $A $B", special_tokens=[(bos_token, vocab[bos_token])]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos_token, eos_token=eos_token,
                                        pad_token=pad_token, unk_token=unk_token,
                                        additional_special_tokens=list(additional_special_tokens), **kwargs)  # fmt: skip
    tokenizer.chat_template = chat_template
    return tokenizer


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as ``generate`` computes them: ``cumsum(mask) - 1``, 0 on padding (left or right)."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def _base_forward(base: nn.Module, input_ids, attention_mask, position_ids) -> torch.Tensor:
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state


def _check_plain_lm_head(config) -> None:
    """The hidden-state path computes ``hidden @ weight.T (+ bias)``; models that scale or cap their logits
    on top (Gemma 2's soft-capping, Cohere's logit_scale, Granite's logits_scaling) need the full logits."""
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    granite = getattr(config, "logits_scaling", None)
    if cap or (scale not in (None, 1, 1.0)) or (granite not in (None, 1, 1.0)):
        raise ValueError(f"{type(config).__name__} transforms its logits beyond the lm_head (softcapping or "
                         "scaling); use the model's logits with rf.logprobs instead of lm_hidden_states")


def lm_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(hidden [B, T, H], weight [V, H], bias [V] | None)`` of a causal LM, so that
    ``hidden @ weight.T + bias`` are its logits — without building them. Feed them to
    ``rf.linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], bias=bias)``.

    A plain model runs only its base model (``model.get_decoder()`` / ``model.model``). A model wrapped in
    ``DistributedDataParallel`` (or another wrapper with ``.module``), or sharded by FSDP2, must run its own
    forward, for the gradients to be synchronised (DDP) and the root parameters gathered (FSDP): it is called
    with ``logits_to_keep=1`` (one position's logits) and ``output_hidden_states=True``, whose last entry is
    the same final hidden state, and the lm_head's parameters are read after it. Tied lm_heads are fine:
    ``weight`` is the shared parameter and its gradient reaches the embedding."""
    inner = _unwrapped(model)
    _check_plain_lm_head(inner.config)
    head = inner.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no lm_head (get_output_embeddings() is None)")
    if inner is model and not distributed.is_sharded(model):
        base = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.base_model
        hidden = _base_forward(base, input_ids, attention_mask, position_ids)
    else:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        with warnings.catch_warnings():  # FSDP2 warns that the one-position logits are a view: unused here
            warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1]
    return hidden, head.weight, getattr(head, "bias", None)


def _unwrapped(model: nn.Module) -> nn.Module:
    """The model inside DDP (or any wrapper with ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def enable_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Activation checkpointing of every transformer block (``transformers``' non-reentrant one, which DDP
    and FSDP2 take), active in training mode only (not while sampling); ``model`` itself."""
    if not enabled:
        return model
    target = model.backbone if isinstance(model, CriticModel) else model
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name is deprecated
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_reward_model(
    name_or_path: str | Path,
    *,
    tokenizer=None,
    pad_token_id: int | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
):
    """``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` (a causal LM checkpoint
    gets a new ``score`` head) with ``config.pad_token_id`` set — from ``tokenizer``, ``pad_token_id``, the
    tokenizer saved at ``path``, or the config's eos — so that the model's own last-non-pad pooling works.
    ``reward_scores`` does not need it: it pools at the last position of the attention mask."""
    from transformers import AutoModelForSequenceClassification

    device = torch.device(device) if device is not None else None
    attn = attn_implementation or pick_attn_implementation(device or "cpu")
    with _loading(name_or_path, "reward model", _WEIGHT_FILES), _quiet_transformers():  # new score head: expected
        model = AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path), num_labels=1, attn_implementation=attn, **_dtype_kwarg(to_torch_dtype(dtype))
        )
    if tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        try:
            pad_token_id = load_tokenizer(name_or_path).pad_token_id
        except Exception:  # no tokenizer saved there: fall back on the config
            pad_token_id = model.config.pad_token_id
            if pad_token_id is None:
                eos = model.config.eos_token_id
                pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.config.pad_token_id = pad_token_id
    return model.to(device) if device is not None else model


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` float32 scores of a sequence-classification model with one label: its ``score`` head on
    the hidden state of the last attended position of each row (left or right padding, pad == eos is
    fine). Differentiable. A DDP-wrapped or FSDP2-sharded model runs its own forward (the final hidden
    state is the last of ``output_hidden_states``) and the same pooling follows. Models without a ``score``
    head fall back on their own pooling of the logits."""
    inner = _unwrapped(model)
    position_ids = position_ids_from_mask(attention_mask)
    if getattr(inner, "score", None) is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits  # fmt: skip
        return logits.squeeze(-1).float()
    if inner is model and not distributed.is_sharded(model):
        hidden = _base_forward(inner.base_model, input_ids, attention_mask, position_ids)
    else:
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, output_hidden_states=True).hidden_states[-1]  # fmt: skip
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)  # the rightmost attended position
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return inner.score(pooled).squeeze(-1).float()  # the head read after the forward (FSDP gathers it there)


class CriticModel(nn.Module):
    """A value model: a causal LM's base model (``AutoModel``) and a float32 ``nn.Linear(H, 1)`` value
    head, giving per-token values ``[B, T]`` in float32.

        critic = CriticModel.from_pretrained("out/sft")       # a causal LM dir: new, zero value head
        critic.save_pretrained("out/critic")                  # config.json + model.safetensors + value_head
        critic = CriticModel.from_pretrained("out/critic")    # both back
    """

    VALUE_HEAD_FILE = "value_head.safetensors"

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=torch.float32)
        # zero init: the first values are 0 and the first value-loss gradients train the head alone,
        # so the backbone (often the SFT policy's) is not pushed around by a random head
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = _base_forward(self.backbone, input_ids, attention_mask, position_ids)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    @classmethod
    def from_causal_lm(cls, model: nn.Module) -> CriticModel:
        """A critic whose backbone is a copy of an in-memory causal LM's base model."""
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        return cls(copy.deepcopy(base))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
    ) -> CriticModel:
        """From a directory written by ``save_pretrained``, or from any causal LM (its lm_head dropped,
        a zero value head added)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        device = torch.device(device) if device is not None else None
        attn = attn_implementation or pick_attn_implementation(device or "cpu")
        with _loading(path, "critic", _WEIGHT_FILES), _quiet_transformers():  # dropped lm_head: expected
            backbone = AutoModel.from_pretrained(str(path), attn_implementation=attn,
                                                 **_dtype_kwarg(to_torch_dtype(dtype)))
        critic = cls(backbone)
        head_file = Path(path) / cls.VALUE_HEAD_FILE
        if head_file.is_file():
            critic.value_head.load_state_dict(load_file(str(head_file)))
        return critic.to(device) if device is not None else critic

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None) -> Path:
        """The backbone as a ``transformers`` model directory and the value head beside it; ``state_dict``
        (the whole critic's, e.g. gathered from FSDP shards) instead of the module's own tensors."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            self.backbone.save_pretrained(str(path))
            state = self.value_head.state_dict()
        else:
            backbone = {k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")}
            self.backbone.save_pretrained(str(path), state_dict=backbone)
            state = {k[len("value_head.") :]: v for k, v in state_dict.items() if k.startswith("value_head.")}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(path / self.VALUE_HEAD_FILE))
        (path / "critic.json").write_text(json.dumps({"value_head": self.VALUE_HEAD_FILE, "hidden_size":
                                                      self.value_head.in_features}, indent=2) + "\n")
        return path
