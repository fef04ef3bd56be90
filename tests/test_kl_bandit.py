"""Where a KL penalty goes decides what PPO optimises: a K-armed bandit with a closed-form answer.

The objective ``E_pi[r] - beta * KL(pi || pi_ref)`` is maximised by ``pi* = pi_ref * exp(r / beta) / Z``.

- k1 in the reward (``r - beta * kl_penalty(logp, ref_logp, "k1")``, then advantages and the PPO loss)
  follows that objective's gradient: PPO ends at ``pi*``.
- k3 in the loss (``ppo_loss + beta * mean(k3)``) has the expected gradient
  ``E_pi[(1 - pi_ref/pi) grad log pi] = grad KL(pi_ref || pi)``: the *forward* KL. PPO then ends at the
  maximiser of ``E_pi[r] - beta * KL(pi_ref || pi)``, ``pi(a) = beta * pi_ref(a) / (c - r(a))`` with ``c``
  such that it sums to 1, which is far from ``pi*``.

Every variant runs through :func:`train_ppo` (sampling, advantages with a batch-mean baseline, epochs
of minibatches of ``rf.ppo_policy_loss``); a variant is a choice of shaped reward and of an extra loss
term, so a new one (say ``rf.full_kl`` in the loss) is a few lines.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import rlhf_fast as rf

SEEDS = [0, 3]  # checked locally on seeds 0-4: k1 TV(pi*) ~1e-3, k3 TV(forward optimum) < 1e-3


@dataclass(frozen=True)
class Bandit:
    ref_logp: torch.Tensor  # [K] log pi_ref
    rewards: torch.Tensor  # [K]
    beta: float

    def reverse_kl_optimum(self) -> torch.Tensor:
        """``argmax E_pi[r] - beta KL(pi || pi_ref) = softmax(log pi_ref + r / beta)``."""
        return torch.softmax(self.ref_logp.double() + self.rewards.double() / self.beta, -1)

    def forward_kl_optimum(self) -> torch.Tensor:
        """``argmax E_pi[r] - beta KL(pi_ref || pi)``: ``pi = beta pi_ref / (c - r)``, ``c`` by bisection."""
        p_ref, r = self.ref_logp.double().exp(), self.rewards.double()
        lo, hi = r.max().item(), r.max().item() + self.beta + 1.0  # the sum falls from +inf to < 1
        for _ in range(200):
            c = 0.5 * (lo + hi)
            lo, hi = (c, hi) if (self.beta * p_ref / (c - r)).sum() > 1 else (lo, c)
        return self.beta * p_ref / (c - r)


def make_bandit(seed: int, K: int = 6, beta: float = 0.5, reward_span: float = 2.0) -> Bandit:
    """A random reference; rewards evenly spaced in ``[0, reward_span]``, the best on the rarest arm.

    Rewarding what the reference rarely does makes ``pi*`` move far from ``pi_ref`` (TV > 0.4 on seeds
    0-49) and the two optima far apart (TV > 0.2 on seeds 0-49), so "different" is clear-cut.
    """
    g = torch.Generator().manual_seed(seed)
    ref_logp = torch.randn(K, generator=g).log_softmax(-1)
    rewards = torch.empty(K)
    rewards[ref_logp.argsort(descending=True)] = torch.linspace(0.0, reward_span, K)
    return Bandit(ref_logp, rewards, beta)


@dataclass(frozen=True)
class PPOConfig:
    iters: int = 60  # batches of sampled actions
    batch: int = 1024
    epochs: int = 4
    minibatches: int = 4
    lr: float = 0.1  # Adam on the K logits, decayed linearly to 0 (averages out the sampling noise)


# shaped_reward(bandit, actions, old_logp, ref_logp) -> per-sample reward, the advantage before the baseline
RewardFn = Callable[[Bandit, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# loss_term(bandit, logits [n, K], logp [n], ref_logp [n]) -> scalar added to the PPO loss of a minibatch
LossFn = Callable[[Bandit, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def plain_reward(bandit, actions, old_logp, ref_logp):
    return bandit.rewards[actions]


def k1_in_reward(bandit, actions, old_logp, ref_logp):
    return bandit.rewards[actions] - bandit.beta * rf.kl_penalty(old_logp, ref_logp, estimator="k1")


def k3_in_loss(bandit, logits, logp, ref_logp):
    return bandit.beta * rf.kl_penalty(logp, ref_logp, estimator="k3").mean()


def full_kl_in_loss(impl):
    def term(bandit, logits, logp, ref_logp):
        ref_logits = bandit.ref_logp.expand_as(logits)
        return bandit.beta * rf.full_kl(logits, ref_logits, impl=impl).mean()

    return term


def train_ppo(bandit: Bandit, *, seed: int, shaped_reward: RewardFn, loss_term: LossFn | None = None,
              fused_impl: str | None = None, cfg: PPOConfig = PPOConfig()) -> torch.Tensor:  # fmt: skip
    """PPO on the bandit from ``pi = pi_ref``; returns the final policy's probabilities (float64 ``[K]``).

    ``fused_impl`` set: the policy loss comes from ``rf.ppo_loss_from_logits`` on ``[n, 1, K]`` logits
    (B = n sequences of one token) with that impl, instead of log_softmax + ``rf.ppo_policy_loss``.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    theta = bandit.ref_logp.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=cfg.lr)
    steps = cfg.iters * cfg.epochs * cfg.minibatches
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)
    for _ in range(cfg.iters):
        with torch.no_grad():
            old_all = theta.log_softmax(-1)
            actions = torch.multinomial(old_all.exp(), cfg.batch, replacement=True, generator=g)
            old_logp, ref_logp = old_all[actions], bandit.ref_logp[actions]
            reward = shaped_reward(bandit, actions, old_logp, ref_logp)
            advantages = reward - reward.mean()
        for _ in range(cfg.epochs):
            for mb in torch.randperm(cfg.batch, generator=g).chunk(cfg.minibatches):
                logits = theta.expand(len(mb), -1)
                logp = logits.log_softmax(-1).gather(1, actions[mb, None])  # [n, 1]: B = n, T = 1
                if fused_impl is None:
                    loss, _ = rf.ppo_policy_loss(logp, old_logp[mb, None], advantages[mb, None])
                else:
                    loss, _ = rf.ppo_loss_from_logits(logits[:, None, :], actions[mb, None], old_logp[mb, None],
                                                      advantages[mb, None], impl=fused_impl)  # fmt: skip
                if loss_term is not None:
                    loss = loss + loss_term(bandit, logits, logp[:, 0], ref_logp[mb])
                opt.zero_grad()
                loss.backward()
                opt.step()
                schedule.step()
    return theta.detach().double().softmax(-1)


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p.double() - q.double()).abs().sum().item()


@pytest.mark.parametrize("seed", SEEDS)
def test_k1_in_reward_reaches_the_reverse_kl_optimum(seed):
    bandit = make_bandit(seed)
    target = bandit.reverse_kl_optimum()
    assert tv(bandit.ref_logp.exp(), target) > 0.3  # the policy has far to go
    pi = train_ppo(bandit, seed=seed, shaped_reward=k1_in_reward)
    assert tv(pi, target) < 0.02, (pi, target)


@pytest.mark.parametrize("seed", SEEDS)
def test_k3_in_loss_reaches_a_different_policy(seed):
    """k3 in the loss ends at the forward-KL optimum, clearly away from pi* (the kl_penalty docstring's claim)."""
    bandit = make_bandit(seed)
    target, forward = bandit.reverse_kl_optimum(), bandit.forward_kl_optimum()
    assert tv(target, forward) > 0.2
    pi = train_ppo(bandit, seed=seed, shaped_reward=plain_reward, loss_term=k3_in_loss)
    assert tv(pi, forward) < 0.02, (pi, forward)
    assert tv(pi, target) > 0.15, (pi, target)


# The bandit lives on the CPU and makes ~4000 op calls: the PyTorch impls (the interpreter would take
# minutes; tests/test_full_kl.py and tests/test_ppo_from_logits.py hold Triton to the same numbers).
@pytest.mark.parametrize("impl", ["torch"])
def test_full_kl_in_loss_reaches_the_reverse_kl_optimum(impl):
    """The exact KL in the loss, with the fused policy loss: PPO ends at pi* too."""
    seed = SEEDS[0]
    bandit = make_bandit(seed)
    target = bandit.reverse_kl_optimum()
    pi = train_ppo(bandit, seed=seed, shaped_reward=plain_reward, loss_term=full_kl_in_loss(impl), fused_impl=impl)
    assert tv(pi, target) < 0.02, (pi, target)
    assert tv(pi, bandit.forward_kl_optimum()) > 0.15
