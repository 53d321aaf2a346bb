"""The training program: preference-tune a causal LM with ZOPrO (``python -m zopro.train``), on the optimiser of
:mod:`zopro`. Nothing in :mod:`zopro`'s top level imports this package.

Modules, in the order a run uses them: ``config`` (the settings: fields, checks, flags and files), ``preflight``
(what the machine must hold), ``rundir`` (opening the run directory), ``loading`` and ``data`` (prompts, base
models, judge), ``models`` (the shared-base bundle, with ``token_batch`` and ``quiet``), ``external_reward`` (a
sequence classifier as reward model), ``judges`` and ``model_judges``, ``rollout``, ``losses``, ``reward_adapter``
(its pairs and Bradley–Terry training), ``updaters`` (the first-order and ZO steps; ``members``: population members
batched in one forward), ``quant_target`` (ZO on quantised storage), ``distributed`` (data-parallel ranks), ``ppo``
(the PPO baseline), ``next_guide`` (what the next ZO iteration targets), ``heldout`` (the held-out evaluation),
``state`` (the run's checkpointed state), ``checkpoint`` and ``files`` (safe writes and reads), ``snapshots``,
``report``, ``memory``, ``phases`` (the run's phases) and ``program`` (the run itself). After a run: ``evaluate``
(scoring it again), ``analysis`` and ``visualize`` (the visual report), ``peft_folders`` and ``export`` (using a run
outside zopro).
Commands: ``python -m zopro.train``, ``python -m zopro.train.evaluate``, ``python -m zopro.train.export``.
"""

from zopro.train.program import main, run

__all__ = ["main", "run"]
