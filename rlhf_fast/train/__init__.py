"""Shared infrastructure for the lean trainers: configs, logging, checkpoints, models and data.

The trainers themselves (``rlhf_fast.train.sft``, ``.reward``, ``.ppo``, ``.dpo``, ``.best_of_n``) are
imported on demand, by name (``rlhf-fast train NAME`` does it); nothing here imports them, nor
``transformers`` or ``datasets``, so ``import rlhf_fast.train`` stays cheap.

- ``config``: dataclass configs from YAML plus ``key=value`` overrides, type-checked.
- ``common``: seeds, device, autocast and attention choice, metrics JSONL/TensorBoard, plots, progress bars.
- ``checkpoint``: safetensors weights plus trainer state (optimizers, RNG), written atomically; exact resume.
- ``models``: small ``transformers`` models from a config, loading, reward scores, the critic, hidden states.
- ``data``: ``datasets`` loading of prompt/completion, preference and chat data; tokenization; collators.
"""
