"""The run's state as a checkpoint holds it, described once: :meth:`RunState.to_checkpoint` writes it and
:meth:`RunState.from_checkpoint` reads it back through the same table of files.

A checkpoint (:mod:`zopro.train.checkpoint`) is ``meta.json`` plus named tensor files and object files. Here:

* ``meta.json``: :class:`Progress`, where the run stands (phase, iteration, step, the held-out
  :class:`Evaluation`, ...);
* ``iter_start``, ``guides_prev``, ``guides_delta``: tensors the run owns (:class:`RunState`);
* ``trainable``, ``value`` and the updater's optimiser state (``fo_optimizer.pt`` or ``zo_optimizer.pt``): the
  state of live models and optimisers at the moment of the save (:class:`LiveState`), which the program takes from
  them before a save and gives back to them after a load.

File names and meta keys (and their order, so ``meta.json`` is byte for byte what earlier runs wrote) are those of
every earlier run directory, which therefore still resumes.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

Tensors = dict[str, torch.Tensor]


class HeldOut(NamedTuple):
    """One held-out evaluation: per-prompt values (``values``: the judge's mean score of the prompt's answers, or
    their win rate), the answers (``texts[prompt][sample]``), and per prompt the mean KL(policy || reference) of its
    answers, in nats summed over the answer's tokens (``kl``), and their mean length in tokens (``tokens``); both
    ``None`` where no generation was returned (tests' stand-ins, ranks other than 0)."""

    metric: str | None
    values: list[float] | None
    texts: list[list[str]]
    kl: list[float] | None = None
    tokens: list[float] | None = None


def mean_or_none(values: list[float] | None) -> float | None:
    """The mean, or None for no values (a run without KL or without an evaluation)."""
    return statistics.fmean(values) if values else None


@dataclass
class Evaluation:
    """The run's held-out evaluation: the base policy's (``before``, before iteration 0) and, at the end, the trained
    policy's (``after``) on the same ``n`` prompts, ``samples`` answers each, from the same sampling seeds; the mean
    per-prompt change with its paired standard error (``change``, ``change_se``) and the headline numbers of
    :func:`zopro.train.heldout.summarise` (``held_out``). In ``meta.json`` under the keys earlier runs wrote."""

    metric: str | None
    n: int
    samples: int
    before: HeldOut
    after: HeldOut | None = None
    change: float | None = None
    change_se: float | None = None
    held_out: dict = field(default_factory=dict)

    def to_meta(self) -> dict:
        b = self.before
        meta = {"metric": self.metric, "before": mean_or_none(b.values), "n": self.n, "samples": self.samples,
                "before_per_prompt": b.values, "before_texts": b.texts, "before_kl": b.kl, "before_tokens": b.tokens}
        if self.after is not None:
            a = self.after
            meta |= {"after": mean_or_none(a.values), "change": self.change, "change_se": self.change_se,
                     "after_per_prompt": a.values, "after_texts": a.texts, "after_kl": a.kl, "after_tokens": a.tokens,
                     "held_out": self.held_out}
        return meta

    def summary(self) -> dict:
        """What ``summary.json`` and ``summary.md`` report: the numbers of :meth:`to_meta`, not the answers."""
        return {k: v for k, v in self.to_meta().items() if not k.startswith(("before_", "after_"))}

    @classmethod
    def from_meta(cls, meta: dict) -> Evaluation | None:
        """The inverse of :meth:`to_meta` (None for the empty mapping of a run that has not evaluated yet; a run
        saved before the KL and lengths were kept reads them as None)."""
        if not meta:
            return None
        try:
            before = HeldOut(meta["metric"], meta["before_per_prompt"], meta["before_texts"], meta.get("before_kl"),
                             meta.get("before_tokens"))
            after = None if "after_per_prompt" not in meta else HeldOut(
                meta["metric"], meta["after_per_prompt"], meta["after_texts"], meta.get("after_kl"),
                meta.get("after_tokens"))
            return cls(meta["metric"], meta["n"], meta["samples"], before, after, meta.get("change"),
                       meta.get("change_se"), meta.get("held_out") or {})
        except KeyError as err:
            raise ValueError(f"meta.json: the held-out evaluation has no {err.args[0]!r}") from None


@dataclass
class Progress:
    """Where the run stands: ``meta.json``, its keys in this field order."""

    phase: str = "reward_init"  # reward_init -> train (per iteration) -> evaluate -> done
    iteration: int = 0
    step: int = 0  # within the iteration
    global_step: int = 0
    evaluation: Evaluation | None = None  # the held-out evaluation: 'before' at iteration 0, then 'after'
    metrics_bytes: int = 0  # the metrics lines this checkpoint vouches for ...
    reward_losses: list = field(default_factory=list)
    skipped: int = 0
    metrics_sha256: str | None = None  # ... and their SHA-256, checked before a resume cuts the file back to them
    curve: list = field(default_factory=list)  # the in-run evaluations (--eval-every), one dict each
    token_passes: int = 0  # token positions the policy's training passed forward (evaluations not counted)

    def to_meta(self) -> dict:
        meta = dataclasses.asdict(dataclasses.replace(self, evaluation=None))
        meta["evaluation"] = self.evaluation.to_meta() if self.evaluation is not None else {}
        return meta

    @classmethod
    def from_meta(cls, meta: dict) -> Progress:
        unknown = set(meta) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"meta.json: unknown keys {sorted(unknown)} (written by another version of zopro?)")
        return cls(**{**meta, "evaluation": Evaluation.from_meta(meta.get("evaluation") or {})})


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
