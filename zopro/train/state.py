"""The run's state as a checkpoint holds it, described once: :meth:`RunState.to_checkpoint` writes it and
:meth:`RunState.from_checkpoint` reads it back through the same table of files.

A checkpoint (:mod:`zopro.train.checkpoint`) is ``meta.json`` plus named tensor files and object files. Here:

* ``meta.json``: :class:`Progress`, where the run stands (phase, iteration, step, the held-out evaluation, ...);
* ``iter_start``, ``guides_prev``, ``guides_delta``: tensors the run owns (:class:`RunState`);
* ``trainable``, ``value`` and the updater's optimiser state (``fo_optimizer.pt`` or ``zo_optimizer.pt``): the
  state of live models and optimisers at the moment of the save (:class:`LiveState`), which the program takes from
  them before a save and gives back to them after a load.

File names and meta keys (and their order, so ``meta.json`` is byte for byte what earlier runs wrote) are those of
every earlier run directory, which therefore still resumes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Tensors = dict[str, torch.Tensor]


@dataclass
class Progress:
    """Where the run stands: ``meta.json``, its keys in this field order."""

    phase: str = "reward_init"  # reward_init -> train (per iteration) -> evaluate -> done
    iteration: int = 0
    step: int = 0  # within the iteration
    global_step: int = 0
    evaluation: dict = field(default_factory=dict)  # the held-out evaluation: 'before' at iteration 0, then 'after'
    metrics_bytes: int = 0  # the metrics lines this checkpoint vouches for ...
    reward_losses: list = field(default_factory=list)
    skipped: int = 0
    metrics_sha256: str | None = None  # ... and their SHA-256, checked before a resume cuts the file back to them
    curve: list = field(default_factory=list)  # the in-run evaluations (--eval-every), one dict each
    token_passes: int = 0  # token positions the policy's training passed forward (evaluations not counted)

    def to_meta(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        unknown = set(meta) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"meta.json: unknown keys {sorted(unknown)} (written by another version of zopro?)")
        return cls(**meta)


@dataclass
class LiveState:
    """The state of the live models and optimiser at a save: the trainable adapters (``trainable``), the PPO critic
    (``value``; None without one) and the iteration's updater's optimiser (``objects``, keyed by the updater's
    ``checkpoint_key``; empty outside phase 'train')."""

    trainable: Tensors
    value: Tensors | None = None
    objects: dict[str, object] = field(default_factory=dict)


# every tensor file of a checkpoint: (file stem, whose field: the run's own state or the live models')
_TENSOR_FILES = (("trainable", LiveState), ("iter_start", "run"), ("guides_prev", "run"), ("guides_delta", "run"),
                 ("value", LiveState))


class Guides(NamedTuple):
    """The directions a ZO iteration targets, by canonical parameter name: ``prev`` the policy's (``--guide``: by
    default its update over the previous iteration) and ``delta`` the reward adapter's update over it (empty without
    a shared reward adapter)."""

    prev: Tensors
    delta: Tensors


@dataclass
class RunState:
    """What a run owns besides its live models: :class:`Progress`, the policy (and reward) weights at the start of
    the iteration (``iter_start``: ``policy.*`` and ``reward.*``) and the guides of the next ZO iteration
    (``guides_prev``, ``guides_delta``; None before the first iteration ends)."""

    progress: Progress = field(default_factory=Progress)
    iter_start: Tensors | None = None
    guides_prev: Tensors | None = None
    guides_delta: Tensors | None = None

    @property
    def guides(self) -> Guides | None:
        """The next ZO iteration's :class:`Guides`, or None before the first iteration ends."""
        return None if self.guides_prev is None else Guides(self.guides_prev, self.guides_delta)

    @guides.setter
    def guides(self, guides: Guides) -> None:
        self.guides_prev, self.guides_delta = guides.prev, guides.delta

    def to_checkpoint(self, live: LiveState) -> dict:
        """The keyword arguments ``tensors``, ``objects`` and ``meta`` of :func:`zopro.train.checkpoint.save`."""
        tensors = {}
        for name, owner in _TENSOR_FILES:
            value = getattr(live if owner is LiveState else self, name)
            if value is not None:
                tensors[name] = value
        return {"tensors": tensors, "objects": dict(live.objects), "meta": self.progress.to_meta()}

    @classmethod
    def from_checkpoint(cls, loaded) -> tuple[RunState, LiveState]:
        """The inverse of :meth:`to_checkpoint`, from a :class:`zopro.train.checkpoint.Loaded`."""
        state, live = cls(progress=Progress.from_meta(loaded.meta)), LiveState(trainable={}, objects=loaded.objects)
        for name, owner in _TENSOR_FILES:
            setattr(live if owner is LiveState else state, name, loaded.tensors.get(name))
        return state, live
