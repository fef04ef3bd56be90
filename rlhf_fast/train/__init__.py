"""Shared infrastructure for the lean trainers: configs, logging, checkpoints, models and data.

The trainers themselves (``rlhf_fast.train.sft``, ``.reward``, ``.ppo``, ``.dpo``, ``.best_of_n``) are
imported on demand, by name (``rlhf-fast train NAME`` does it); nothing here imports them, nor
``transformers`` or ``datasets``, so ``import rlhf_fast.train`` stays cheap.

- ``config``: dataclass configs from YAML plus ``key=value`` overrides, type-checked; ``validation``: the
  checks every trainer's options share.
- ``loop``: what every trainer's run shares (its config base ``RunConfig``, start and finish, the optimizer
  with its warmup and a clipped step) and the supervised trainers' epochs and evaluation.
- ``runtime``: seeds, device, autocast and attention choice, peak memory; ``metrics``: metrics
  JSONL/TensorBoard, plots, progress bars; ``runs``: a run's output directory; ``errors``: ``UserError``.
- ``checkpoint``: safetensors weights plus trainer state (optimizers, RNG), written atomically; exact resume.
- ``models``: small ``transformers`` models from a config, loading, reward scores, the critic, hidden states.
- ``data`` (and ``records``, which loads and recognizes a dataset): ``datasets`` loading of
  prompt/completion, preference and chat data; tokenization; collators.
- ``ops``: the ``ops="fused" | "reference"`` switch (the losses on rlhf_fast's ops or on plain PyTorch);
  ``rollout``: sampling and scoring (PPO, best-of-n); ``distributed``: data parallelism.
"""
