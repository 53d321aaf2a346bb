"""Every seed zopro uses, derived from one run seed in one place.

:func:`derive_seed` is the optimiser's (step ``t``, direction ``j`` of a :class:`~zopro.optim.ZOOptimizer` with seed
``s`` draws ``z`` from ``derive_seed(s, t, j)``); :class:`RunSeeds` is the training program's: one domain per use, so
rollouts, pair sampling, evaluation, ZO directions, reward training, prompt batches and the placebo guide never share
a seed. A domain's seed is ``derive_seed(run_seed, domain)``, then one ``derive_seed(seed, part, position)`` per
further part (iteration, step, ...).

Five uses take the run seed itself (the held-out split, the tiny base, the adapters' and the critic's
initialisation, the rank-guided SVD): they predate the domains, and deriving them now would change every recorded
run. They are named here (:attr:`RunSeeds.split` and the rest) so that no other module reads the raw run seed.
"""

from __future__ import annotations

from dataclasses import dataclass

MASK64 = (1 << 64) - 1


def derive_seed(seed: int, step: int, direction: int = 0) -> int:
    """A 64-bit seed for (run seed, step, direction): SplitMix64's finaliser over a Weyl sequence."""
    x = (seed + 0x9E3779B97F4A7C15 * ((step << 16) + direction + 1)) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


# The training program's seed domains (their values are part of every recorded run: never renumber them).
ROLLOUT, PAIRS, EVAL, ZO, REWARD, BATCH, PLACEBO = range(7)


@dataclass(frozen=True)
class RunSeeds:
    """The seeds of one training run, all functions of ``run_seed`` (``--seed``)."""

    run_seed: int

    @classmethod
    def of(cls, cfg) -> RunSeeds:
        """The seeds of a run with config ``cfg`` (a :class:`~zopro.train.config.TrainConfig`: its ``seed``)."""
        return cls(cfg.seed)

    def domain(self, domain: int, *parts: int) -> int:
        """``derive_seed(run_seed, domain)`` followed by ``derive_seed(seed, part, i + 1)`` for each part."""
        seed = derive_seed(self.run_seed, domain)
        for i, p in enumerate(parts):
            seed = derive_seed(seed, p, i + 1)
        return seed

    def rollout(self, iteration: int, step: int) -> int:
        """Sampling of a training step's rollout."""
        return self.domain(ROLLOUT, iteration, step)

    def pairs(self, *parts: int) -> int:
        """Choice and sampling of the reward model's judged pairs: ``(0,)`` and ``(1,)`` before iteration 0,
        ``(it, 2)`` and ``(it, 3)`` after iteration ``it``."""
        return self.domain(PAIRS, *parts)

    def evaluation(self, call: int) -> int:
        """Generate call ``call`` of a held-out evaluation (the same for "before" and "after")."""
        return self.domain(EVAL, call)

    def zo(self, iteration: int) -> int:
        """The ZO optimiser's seed in ``iteration``."""
        return self.domain(ZO, iteration)

    def reward(self, training: int) -> int:
        """Minibatch order of the reward model's ``training``-th training (0: before iteration 0)."""
        return self.domain(REWARD, training)

    def batch(self, iteration: int, step: int, *more: int) -> int:
        """A step's prompts; ``(it, step, 1)``: PPO's minibatch order in that step."""
        return self.domain(BATCH, iteration, step, *more)

    def placebo(self, iteration: int) -> int:
        """The placebo guide computed after ``iteration``."""
        return self.domain(PLACEBO, iteration)

    # The run seed itself, for the uses that predate the domains (see the module docstring).
    @property
    def split(self) -> int:
        """Train / held-out split of the prompts."""
        return self.run_seed

    @property
    def tiny_base(self) -> int:
        """Initialisation of the smoke preset's random tiny base."""
        return self.run_seed

    @property
    def adapters(self) -> int:
        """Initialisation of the policy and reward adapters and the score head."""
        return self.run_seed

    @property
    def critic(self) -> int:
        """Initialisation of PPO's value adapter and head (and PPOConfig.seed)."""
        return self.run_seed

    @property
    def svd(self) -> int:
        """``torch.svd_lowrank``'s seed in the rank-guided sampler."""
        return self.run_seed
