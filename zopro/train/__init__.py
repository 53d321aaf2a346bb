"""The training program: preference-tune a causal LM with ZOPrO (``python -m zopro.train``), on the optimiser of
:mod:`zopro`. Nothing in :mod:`zopro`'s top level imports this package.

Modules, in the order a run uses them: ``config`` (the flags), ``rundir`` (opening the run directory), ``loading``
(data, base models, judge), ``models`` (the shared-base bundle), ``external_reward`` (a sequence classifier as reward
model), ``judges``, ``rollout``, ``losses``, ``reward_adapter`` (its pairs and Bradley–Terry training), ``updaters``
(the first-order and ZO steps), ``ppo`` (the PPO baseline), ``next_guide`` (what the next ZO iteration targets),
``heldout`` (the held-out evaluation), ``state`` (the run's checkpointed state), ``checkpoint``, ``report``,
``memory``, and ``program`` (the run itself).
Commands: ``python -m zopro.train``, ``python -m zopro.train.evaluate``, ``python -m zopro.train.export``.
"""

from zopro.train.program import main, run

__all__ = ["main", "run"]
