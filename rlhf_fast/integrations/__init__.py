"""Drop-ins that put rlhf_fast's ops inside the trainers people already run.

- ``rlhf_fast.integrations.trl`` (extra ``trl``): ``GRPOTrainer``, ``DPOTrainer``, ``RewardTrainer``,
  subclasses of TRL's with the same constructor: change the import line, nothing else.
- ``rlhf_fast.integrations.verl`` (extra ``verl``): the policy losses ``rlhf_fast_vanilla``, ``_gspo``,
  ``_cispo``, ``_sapo`` and ``_geo_mean`` for verl's registry, ``FusedLinearForPPO`` and ``kl_penalty`` (with ``"full"``) with verl's interfaces.
- ``rlhf_fast.integrations.openrlhf`` (extra ``openrlhf``): ``PolicyLoss``, ``log_probs_from_logits``
  (entropy from the same pass) and ``compute_approx_kl`` with OpenRLHF's interfaces.

Each submodule imports its framework when it is imported, never from here, so ``import rlhf_fast``
needs none of them. ``count_op_calls`` (below) checks that a drop-in really calls rlhf_fast's ops.
"""

from contextlib import contextmanager


@contextmanager
def count_op_calls(*names: str):
    """Count the calls of the ops ``rlhf_fast.<name>`` made inside the block: a check that a drop-in runs on
    rlhf_fast (the integrations call each op as ``rf.<name>``, looked up at call time).

    Yields a dict ``name -> number of calls``, updated as the calls happen; the ops are restored on exit::

        with count_op_calls("linear_logprobs", "ppo_policy_loss") as calls:
            trainer.train()
        assert calls["ppo_policy_loss"] > 0

    An unknown name raises ``ValueError``. Not thread-safe (it swaps module attributes).
    """
    import rlhf_fast

    unknown = [n for n in names if not callable(getattr(rlhf_fast, n, None))]
    if unknown:
        raise ValueError(f"names: rlhf_fast has no op {unknown}")
    calls = dict.fromkeys(names, 0)
    originals = {name: getattr(rlhf_fast, name) for name in calls}

    def counted(name, op):
        def call(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)

        return call

    try:
        for name, op in originals.items():
            setattr(rlhf_fast, name, counted(name, op))
        yield calls
    finally:
        for name, op in originals.items():
            setattr(rlhf_fast, name, op)
