"""Shared infrastructure for the lean trainers: configs, logging, checkpoints, models and data.

The trainers themselves (``rlhf_fast.train.sft``, ``.reward``, ``.ppo``, ``.dpo``, ``.best_of_n``) are
imported on demand, by name (``rlhf-fast train NAME`` does it); nothing here imports them, nor
``transformers`` or ``datasets``, so ``import rlhf_fast.train`` stays cheap.

- ``config``: every trainer option and its check (the shared ``RunConfig`` and ``SupervisedConfig``, each
  trainer's ``check_<trainer>``, the ranges all share); ``config_io`` reads and writes them (YAML files plus
  ``key=value`` overrides, type-checked; re-exported by ``config``).
- ``loop``: the start and end of a run, the data order, the optimizer and its step, shared by the trainers.
- ``runtime``: seeds, device, autocast and attention choice, peak memory; ``metrics``: metrics
  JSONL/TensorBoard, plots, progress bars; ``runs``: a run's output directory; ``errors``: ``UserError``.
- ``checkpoint``: safetensors weights plus trainer state (optimizers, RNG), written atomically; exact resume.
- ``models``: small ``transformers`` models from a config, loading, reward scores, the critic, hidden states.
- ``data`` (and ``records``, which loads and recognizes a dataset): ``datasets`` loading of
  prompt/completion, preference and chat data; tokenization; collators.
- ``ops``: the ``ops="fused" | "reference"`` switch (the losses on rlhf_fast's ops or on plain PyTorch);
  ``rollout``: sampling and scoring (PPO, best-of-n); ``distributed``: data parallelism.
"""
