"""Drop-ins that put rlhf_fast's ops inside the trainers people already run.

- ``rlhf_fast.integrations.trl`` (extra ``trl``): ``GRPOTrainer``, ``DPOTrainer``, ``RewardTrainer``,
  subclasses of TRL's with the same constructor: change the import line, nothing else.
- ``rlhf_fast.integrations.verl`` (extra ``verl``): the policy loss ``rlhf_fast_vanilla`` for verl's
  registry, ``FusedLinearForPPO`` and ``kl_penalty`` (with ``"full"``) with verl's interfaces.
- ``rlhf_fast.integrations.openrlhf`` (extra ``openrlhf``): ``PolicyLoss``, ``log_probs_from_logits``
  (entropy from the same pass) and ``compute_approx_kl`` with OpenRLHF's interfaces.

Each submodule imports its framework when it is imported, never from here, so ``import rlhf_fast``
needs none of them.
"""
