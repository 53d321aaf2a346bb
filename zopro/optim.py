"""ZOOptimizer: two-point SPSA on the fused kernels of zokernels, with replayable, kilobyte-sized logs.

One ``step(closure)`` (two-sided, q = 1) costs three weight passes:
``+eps z`` -> L+, ``-2 eps z`` -> L-, then restore and update fused: ``w = m*w + (m*eps - lr*g) z`` with
``g = (L+ - L-) / (2 eps)`` and ``m = 1 - lr*weight_decay`` on decayed tensors (decoupled weight decay in the same
pass). ``step_many(closures)`` runs steps back to back and also fuses each restore-and-update with the next step's
``+eps z'``: two passes per step; it returns only once the weights are clean.

Seeds are derived from (seed, step, direction), so a run is a pure function of its starting weights, its
configuration and the losses its closures returned. The optimiser records those losses (any change of lr or eps,
and where a closure's exception interrupted a step); :meth:`ZOOptimizer.replay` feeds them back through the same
code path and reproduces the final weights bit for bit on the same device, without a single forward pass. That log
is also the cheapest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from zopro import dtensor
from zopro.samplers import Isotropic
from zopro.seeds import derive_seed

FITNESS = ("raw", "zscore", "ranks")

# The kernels take every coefficient as a float32 scalar and compute in float32, whatever the weights' type.
_FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass
class StepResult:
    """What one step did: mean of the evaluated losses, mean projected gradient, whether the update was skipped."""

    loss: float
    grad: float
    skipped: bool


def _named(params) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(params, dict):
        items = list(params.items())
    else:
        items = list(params)
        if items and not isinstance(items[0], tuple):
            items = [(f"param{i}", p) for i, p in enumerate(items)]
    if not items:
        raise ValueError("params is empty: nothing to optimise")
    names, tensors = [n for n, _ in items], [p for _, p in items]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    for n, p in zip(names, tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {n!r} is a {type(p).__name__}, not a tensor")
    _check_disjoint(names, [dtensor.local(t) for t in tensors])  # a DTensor's memory is its local shard's
    return names, tensors


def _check_disjoint(names: list[str], tensors: list[torch.Tensor]) -> None:
    """No two parameters may share memory (each would be perturbed and updated twice), compared by the byte ranges
    they span in memory, not by start pointers: ``b[0:4]`` and ``b[2:6]`` start apart and overlap."""
    spans = []
    for n, t in zip(names, tensors):
        if t.numel():
            size = t.element_size()
            start = t.untyped_storage().data_ptr() + t.storage_offset() * size
            extent = 1 + sum((dim - 1) * abs(step) for dim, step in zip(t.shape, t.stride()))
            spans.append((start, start + extent * size, n))
    spans.sort()
    # sorted by start, any overlap shows between neighbours: if X overlaps a later Y, X's successor starts inside X
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"parameters {first!r} and {second!r} share memory: each would be updated twice")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_real(value) -> bool:
    """A real number, NaN and inf included."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_list(value, field: str) -> list:
    """A log's sequence (a list, a tuple or a 1-D tensor) as a plain list; ValueError naming ``field`` otherwise."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{field} must be one-dimensional, got a tensor of shape {tuple(value.shape)}")
        return value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{field} must be a list or a 1-D tensor, got {type(value).__name__}")
    return list(value)


def _checked_changes(entries, key: str, limit: float) -> list[tuple[int, float]]:
    """A log's ``lr`` or ``eps`` changes as ``(step, value)`` pairs in step order: finite, lr >= 0, eps > 0, and at
    most ``limit``."""
    changes = []
    for i, entry in enumerate(_as_list(entries, f"log['{key}']")):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and _is_count(entry[0])
                and _is_real(entry[1])):
            raise ValueError(f"log['{key}'] entry {i} is {entry!r}: not a (step, value) pair")
        step, value = entry
        if not math.isfinite(value) or value < 0 or (key == "eps" and value == 0) or value > limit:
            raise ValueError(f"log has {key}={value!r} at step {step}: not a valid setting (finite, "
                             f"{'positive' if key == 'eps' else 'non-negative'}, at most {limit:g})")
        changes.append((step, float(value)))
    if any(a[0] > b[0] for a, b in zip(changes, changes[1:])):
        raise ValueError(f"log['{key}'] changes are not in step order: {changes[:5]}")
    return changes


def _valid_interruption(entry, groups: list[int], per_step: int, last: tuple[int, int], limit: float) -> bool:
    """Whether ``entry`` is a ``(call, completed, losses, lr, eps)`` that can follow ``last`` (the previous entry's
    call and completed steps): a call that completed steps is its group, and it is the last of that call's entries
    (the calls that completed none came before it)."""
    if not (isinstance(entry, (list, tuple)) and len(entry) == 5):
        return False
    call, completed, losses, lr, eps = entry
    if not (all(_is_count(v) for v in (call, completed, losses)) and all(_is_number(v) for v in (lr, eps))):
        return False
    in_log = call < len(groups) and groups[call] == completed if completed else call <= len(groups)
    in_order = call > last[0] or (call == last[0] and last[1] == 0)
    return in_log and in_order and losses < per_step and 0 <= lr <= limit and 0 < eps <= limit


class ZOOptimizer:
    """Zeroth-order optimiser shaped like ``torch.optim``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or a ``{name: parameter}`` dict (names let samplers map
            guides); each parameter's noise stream is its position in this list. DTensors on a 1-D mesh (sharded or
            replicated) are updated shard by shard with the single-process z (:mod:`zopro.dtensor`).
        lr, eps: learning rate and perturbation size; ``eps`` may be changed between steps (it is logged).
        weight_decay: decoupled, applied to tensors with two or more dimensions only (biases and norm weights are
            vectors): decided by shape, not by names. ``no_decay`` names further exclusions.
        sampler: :class:`~zopro.samplers.Isotropic` (default), ``Targeted`` or ``RankGuided``.
        seed: run seed; step ``t`` direction ``j`` uses ``derive_seed(seed, t, j)``.
        q: directions per step (n-SPSA; a population of ``q`` antithetic pairs), all scored by the same closure.
        fitness: how a step's ``2q`` losses become each direction's coefficient ``g_j``. ``"raw"``: the two-point
            estimate ``(L+_j - L-_j) / (2 eps)``. ``"zscore"``: the losses standardised within the step,
            ``(L+_j - L-_j) / (2 std)`` (std over all ``2q``; 0 when they are all equal). ``"ranks"``: centred ranks
            within the step, ``(c(L+_j) - c(L-_j)) / 2`` with ``c`` in ``[-0.5, 0.5]`` (ties share their mean rank).
            Shaped coefficients are scale-free, so ``lr`` becomes a step length in units of ``z`` (ES: Salimans et
            al. 2017, Qiu et al. 2025). The update is ``-lr / q * sum_j g_j z_j`` in every case; the log keeps the
            losses, from which replay recomputes the same coefficients. Two-sided only.
        one_sided: ``g = (L(w + eps z) - L(w)) / eps``; one forward for ``L(w)`` shared by the q directions.
        lr_schedule: ``f(step) -> multiplier`` of ``lr``. Every step's lr and eps are checked (finite, in range,
            within the weights' float type) before its first weight pass, all of a ``step_many``'s before any.

    ``state_dict()`` records the parameters' names, shapes and dtypes; ``load_state_dict`` and ``replay`` refuse a
    state or log of another parameter set, or with invalid values, before changing anything.
    """

    def __init__(self, params, *, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, sampler=None,
                 seed: int = 0, q: int = 1, one_sided: bool = False, fitness: str = "raw",
                 lr_schedule: Callable[[int], float] | None = None, no_decay: Iterable[str] = ()):
        self.names, self.params = _named(params)
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if eps == 0:
            raise ValueError("eps must be positive")
        if not isinstance(q, int) or q < 1:
            raise ValueError(f"q must be a positive integer, got {q!r}")
        if fitness not in FITNESS:
            raise ValueError(f"fitness must be one of {', '.join(FITNESS)}, got {fitness!r}")
        if fitness != "raw" and one_sided:
            raise ValueError(f"fitness {fitness!r} shapes two-sided pairs: it needs one_sided=False")
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        no_decay = set(no_decay)
        unknown = no_decay - set(self.names)
        if unknown:
            raise ValueError(f"no_decay names unknown parameters: {sorted(unknown)[:5]}")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.seed, self.q, self.one_sided, self.lr_schedule = seed, q, one_sided, lr_schedule
        self.fitness = fitness
        self.decays = torch.tensor([p.dim() >= 2 and n not in no_decay for n, p in zip(self.names, self.params)])
        # the largest finite value each parameter can store (codes: the kernels' float32 coefficient)
        self._limits = torch.tensor([min(torch.finfo(p.dtype).max, _FLOAT32_MAX) if p.dtype.is_floating_point
                                     else _FLOAT32_MAX for p in self.params], dtype=torch.float64)
        self.streams = list(range(len(self.params)))
        self.sampler = sampler if sampler is not None else Isotropic()
        if weight_decay and not getattr(self.sampler, "supports_weight_decay", True):
            raise ValueError(f"weight_decay must be 0 with sampler {self.sampler.name!r}: it has no meaning in "
                             "its parameter space (quantised codes)")
        # DTensor parameters (zopro.dtensor): each rank perturbs its local shards at their global offsets
        self.shards = dtensor.layout(self.names, self.params, self.sampler)
        self.sampler.bind(self.names, self.params)
        if self.shards is not None:
            self.shards.bind(self.sampler)
        self.step_count = 0
        self.skipped = 0
        self.log = {"losses": [], "groups": [], "lr": [], "eps": [], "interrupted": [], "members": []}

    # ---- the passes -------------------------------------------------------------------------------------------
    def current_lr(self) -> float:
        return self._scheduled(self.step_count)[0]

    def _scheduled(self, step: int) -> tuple[float, float]:
        """``(lr, eps)`` of ``step`` in a live run: the schedule's lr and the current eps."""
        return self.lr * (self.lr_schedule(step) if self.lr_schedule else 1.0), self.eps

    def _settings(self, n_steps: int, setting: Callable[[int], tuple[float, float]]) -> list[tuple[float, float]]:
        """``(lr, eps)`` of the next ``n_steps`` steps from ``setting(step)``, each checked before the first pass:
        finite, lr >= 0, eps > 0, and no larger than the weights' float type can hold (a schedule giving 1e300 would
        make the weights inf)."""
        limit = self._setting_limit()
        settings = [setting(self.step_count + i) for i in range(n_steps)]
        for i, (lr, eps) in enumerate(settings):
            for name, value, low_ok in (("lr", lr, True), ("eps", eps, False)):
                if not (isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if low_ok else
                                                                                      value > 0) and value <= limit):
                    raise ValueError(f"{name} of step {self.step_count + i} is {value!r}: it must be finite, "
                                     f"{'non-negative' if low_ok else 'positive'} and at most {limit:g} (the weights' "
                                     "largest value); nothing was changed")
        return [(float(lr), float(eps)) for lr, eps in settings]

    def _setting_limit(self) -> float:
        """The largest lr or eps a step may have: the weights' largest value (float parameters only)."""
        return min((torch.finfo(p.dtype).max for p in self.params if p.dtype.is_floating_point), default=math.inf)

    def _decay(self, lr: float) -> torch.Tensor:
        ones = torch.ones(len(self.params), dtype=torch.float64)
        return torch.where(self.decays, ones * (1.0 - lr * self.weight_decay), ones)

    def _pass(self, terms, decay=None) -> None:
        """``w = decay*w + sum coef*z(seed)``; ``terms``: ``[(seed, coef)]``, coef a scalar or per-tensor vector."""
        n = len(self.params)
        terms = [(s, c if isinstance(c, torch.Tensor) else torch.full((n,), float(c), dtype=torch.float64))
                 for s, c in terms]
        decay = decay if decay is not None else torch.ones(n)
        if self.shards is not None:
            self.sampler.apply(self.shards.locals, self.streams, terms, decay, offsets=self.shards.offsets)
        else:
            self.sampler.apply(self.params, self.streams, terms, decay)

    def _log_settings(self, lr: float, eps: float) -> None:
        for key, value in (("lr", lr), ("eps", eps)):
            if not self.log[key] or self.log[key][-1][1] != value:
                self.log[key].append((self.step_count, value))

    def _estimate(self, closure, losses_from, eps, pending=None):
        """Evaluate the q directions of this step, each loss from ``losses_from(closure)`` (:class:`_Live` or
        :class:`_Tape`). Returns (seeds, grads, losses); weights are left at
        ``w - eps z_last`` (two-sided) or ``w + eps z_last`` (one-sided), the last restore not yet applied.

        ``pending``: a ``(terms, decay)`` pass of the previous step, fused here with this step's first ``+eps z``.
        If a closure raises, the current direction is taken back out before the exception propagates.
        """
        seeds = [derive_seed(self.seed, self.step_count, j) for j in range(self.q)]
        grads, losses, base = [], [], None
        seed, net = None, 0.0  # the direction currently added to the weights, and its coefficient
        try:
            if self.one_sided:
                if pending is not None:
                    self._pass(*pending)
                    pending = None
                base = losses_from(closure)
                losses.append(base)
            for j, seed in enumerate(seeds):
                self.sampler.prepare(seed)
                if pending is not None:
                    self._pass(pending[0] + [(seed, eps)], pending[1])
                    pending = None
                else:
                    self._pass([(seed, eps)])
                net = eps
                plus = losses_from(closure)
                if self.one_sided:
                    grads.append((plus - base) / eps)
                    losses.append(plus)
                else:
                    self._pass([(seed, -2 * eps)])
                    net = -eps
                    minus = losses_from(closure)
                    grads.append((plus - minus) / (2 * eps))
                    losses += [plus, minus]
                if j < self.q - 1:
                    self._pass([(seed, -net)])
                    net = 0.0
        except BaseException:
            if pending is not None:
                self._pass(*pending)
            if net:
                self._pass([(seed, -net)])
            raise
        return seeds, grads, losses

    def _coefficients(self, grads: list[float], losses: list[float]) -> list[float]:
        """Each direction's ``g_j`` in the update (see ``fitness``): the raw two-point estimates, or the step's
        losses shaped within the step. Host floats only, in a fixed order, so replay recomputes them bit for bit; a
        non-finite loss makes every coefficient NaN (the update is skipped, as for a raw NaN)."""
        if self.fitness == "raw":
            return grads
        if not all(math.isfinite(v) for v in losses):
            return [math.nan] * len(grads)
        n = len(losses)
        if self.fitness == "zscore":
            mean = sum(losses) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in losses) / n)
            shaped = [(v - mean) / std if std > 0 else 0.0 for v in losses]
        else:
            order = sorted(range(n), key=losses.__getitem__)
            ranks = [0.0] * n
            i = 0
            while i < n:  # ties share their mean rank
                j = i
                while j + 1 < n and losses[order[j + 1]] == losses[order[i]]:
                    j += 1
                for k in range(i, j + 1):
                    ranks[order[k]] = (i + j) / 2
                i = j + 1
            shaped = [r / (n - 1) - 0.5 for r in ranks]
        return [(shaped[2 * j] - shaped[2 * j + 1]) / 2 for j in range(len(grads))]

    def _finish(self, seeds, grads, lr, eps):
        """The pass that restores the last direction and applies the update, as ``(terms, decay)``, and whether
        the update happened; other directions' updates (q > 1) are applied here, one pass each. The update is
        skipped (only the restore is returned, the same passes as for a NaN loss) where a g is NaN or beyond
        float32's range, or :meth:`_fits` finds that it would overflow the weights.

        A g of 3e41 (losses of +-3e38) is garbage whatever lr would make of it: float32 is the type the kernels
        compute in, and bf16 has its range. g is not compared with fp16's 65504: it is never stored in a weight,
        and a g of 1e5 is a plausible one (a loss difference of 200 at eps = 1e-3); lr * g * z is what _fits checks.
        """
        restore = -eps if self.one_sided else eps
        decay = self._decay(lr)
        # w is at theta -+ eps z_last: m*w + (m*restore - lr*g/q) z_last = m*theta - (lr*g/q) z_last
        updates = [(s, -lr * g / self.q) for s, g in zip(seeds[:-1], grads[:-1])]
        last = (seeds[-1], decay * restore - lr * grads[-1] / self.q)
        if not all(abs(g) <= _FLOAT32_MAX for g in grads) or not self._fits(updates + [last]):  # False for NaN
            return ([(seeds[-1], restore)], None), False
        for s, c in updates:
            self._pass([(s, c)])
        return ([last], decay), True

    def _fits(self, passes) -> bool:
        """Whether every ``(seed, coef)`` pass keeps each tensor's ``coef * z`` finite in its type: ``|coef|`` within
        float32 (the kernels' scalar) and ``|coef| * max|z| <= `` the type's largest value, ``max|z|`` the sampler's
        bound (the spec's largest Gaussian for Isotropic). False for a NaN coefficient.

        The check is on the coefficients, before the pass, because an overflow cannot be undone afterwards (w + inf
        has lost w) and the weights are never copied; a g that is finite in float64, even in float32, can still
        overflow a bf16 or fp16 weight through ``lr * g * z`` (fp16 stores at most 65504). It costs a few host
        float operations per step, no pass and no sync. Not covered: weights already within ``|coef| * max|z|`` of
        their type's largest value, which only a reduction over the weights (a pass and a sync per step) would see;
        the bound is an upper bound, so an update a little below the limit may be skipped where it would just fit.
        """
        for seed, coef in passes:
            coef = torch.as_tensor(coef, dtype=torch.float64).abs()
            bound = torch.as_tensor(self.sampler.z_bound(seed), dtype=torch.float64)
            if not bool(((coef <= _FLOAT32_MAX) & (coef * bound <= self._limits)).all()):
                return False
        return True

    def _close_step(self, grads, losses, ok, losses_from) -> StepResult:
        if not ok:
            self.skipped += 1
        self.sampler.advance()
        self.step_count += 1
        losses_from.close_step()
        return StepResult(loss=sum(losses) / len(losses), grad=sum(grads) / len(grads), skipped=not ok)

    def _step(self, closure, losses_from, setting) -> StepResult:
        [(lr, eps)] = self._settings(1, setting)
        self._log_settings(lr, eps)
        call = len(self.log["groups"])
        try:
            seeds, grads, losses = self._estimate(closure, losses_from, eps)
        except BaseException:
            self._record_interruption(call, 0, losses_from, lr, eps)
            raise
        final, ok = self._finish(seeds, self._coefficients(grads, losses), lr, eps)
        self._pass(*final)
        result = self._close_step(grads, losses, ok, losses_from)
        self._record(0, losses_from)
        return result

    def _step_many(self, closures: list, losses_from, setting) -> list[StepResult]:
        settings = self._settings(len(closures), setting)  # all checked before the first pass
        results, pending, call = [], None, len(self.log["groups"])
        try:
            for closure, (lr, eps) in zip(closures, settings):
                self._log_settings(lr, eps)
                previous, pending = pending, None  # _estimate applies it, also when a closure raises
                try:
                    seeds, grads, losses = self._estimate(closure, losses_from, eps, previous)
                except BaseException:
                    self._record_interruption(call, len(results), losses_from, lr, eps)
                    raise
                pending, ok = self._finish(seeds, self._coefficients(grads, losses), lr, eps)
                results.append(self._close_step(grads, losses, ok, losses_from))
        finally:
            if pending is not None:
                self._pass(*pending)
            if results:
                self._record(len(results), losses_from)
        return results

    def _record(self, group: int, losses_from) -> None:
        """Log the completed steps' losses; ``group`` is 0 for :meth:`step`, n for an n-step :meth:`step_many`."""
        self.log["losses"].extend(losses_from.take_done())
        self.log["groups"].append(group)

    def _record_interruption(self, call: int, completed: int, losses_from, lr: float, eps: float) -> None:
        """Log a step that a closure's exception interrupted, so that :meth:`replay` repeats its passes.

        Restoring the weights after an interruption takes the probe back out (``-eps z`` after ``+eps z``, or
        ``+eps z`` after ``+eps z, -2 eps z``), which float rounding makes exact only within an ulp; restoring them
        bit for bit would need a copy of the weights, which ZO exists to avoid. The passes an interrupted step
        applied are a function of where it stopped, so the log records that instead: ``(call, completed, losses,
        lr, eps)``, the interrupted call's index among the logged calls (``groups``; a call that completed no step
        logs no group), the steps it completed before, the losses its interrupted step had obtained, and that
        step's lr and eps (a retry may change them). Replay runs the same code up to the same loss and stops there,
        so it lands on the live weights' bits. Only a closure's exception is recorded: one raised by the passes
        themselves leaves weights that no log describes."""
        if losses_from.raised:
            self.log["interrupted"].append((call, completed, len(losses_from.current), lr, eps))

    # ---- public -----------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor | float]) -> StepResult:
        """One SPSA step; ``closure()`` returns the loss at the current weights (run under inference mode).

        Returns when the weights are the updated, unperturbed ones. A non-finite projected gradient, or an update
        ``lr * g * z`` that would not be finite in a weight's type, skips the update (weights restored within the
        rounding of the round trip, replayed bit for bit) and is counted in ``skipped``. If ``closure`` raises, the
        weights are restored within the same rounding, the step is not counted, and the interruption is logged, so
        that :meth:`replay` reproduces these weights bit for bit.
        """
        return self._step(closure, _Live(), self._scheduled)

    def step_many(self, closures: Iterable[Callable]) -> list[StepResult]:
        """Steps back to back, one per closure, fusing each restore-and-update with the next ``+eps z'``.

        Two weight passes per two-sided step (q = 1). Control returns only after the last update, with clean
        weights; if a closure raises, the weights are those after the last completed step (within rounding; the
        interruption is logged and replayed bit for bit, as in :meth:`step`).
        """
        return self._step_many(list(closures), _Live(), self._scheduled)

    def step_members(self, evaluate: Callable[[list[int], float], Sequence[float]]) -> StepResult:
        """One step whose ``2q`` members are scored by the caller, without any weight pass: ``evaluate(seeds, eps)``
        returns the losses at ``w + eps z_j`` and ``w - eps z_j`` for each direction ``seeds[j]``, in the order
        ``L+_0, L-_0, L+_1, ...`` (for example from one batched forward in which each member's rows see their own
        low-rank delta). Then ``ceil(q / 2)`` passes apply ``w = m*w - lr/q * sum_j g_j z_j``.

        The weights are never perturbed, so the step costs ``q / 2`` weight passes instead of ``3q``, and an
        exception in ``evaluate`` leaves them untouched (nothing to log). Two-sided only. Replay re-applies the same
        update pass from the logged losses; the weights differ from :meth:`step`'s on the same losses by the
        rounding of the probe passes that this step does not make."""
        if self.one_sided:
            raise ValueError("step_members scores two-sided pairs: it needs one_sided=False")
        return self._step_members(evaluate, _Live(), self._scheduled)

    def _step_members(self, evaluate, losses_from, setting) -> StepResult:
        [(lr, eps)] = self._settings(1, setting)
        seeds = [derive_seed(self.seed, self.step_count, j) for j in range(self.q)]
        for seed in seeds:
            self.sampler.prepare(seed)
        losses = losses_from.members(evaluate, seeds, eps, 2 * self.q)
        self._log_settings(lr, eps)
        grads = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(self.q)]
        coefficients = self._coefficients(grads, losses)
        terms = [(s, -lr * g / self.q) for s, g in zip(seeds, coefficients)]
        ok = all(abs(g) <= _FLOAT32_MAX for g in coefficients) and self._fits(terms)  # False for NaN
        if ok:  # the samplers' passes take at most two directions each: ceil(q / 2) passes, the decay in the first
            for i in range(0, len(terms), 2):
                self._pass(terms[i:i + 2], self._decay(lr) if i == 0 else None)
        result = self._close_step(grads, losses, ok, losses_from)
        self.log["members"].append(len(self.log["groups"]))
        self._record(0, losses_from)
        return result

    def state_dict(self) -> dict:
        """Everything but the weights: resuming needs this plus the weights, or the starting weights and the log."""
        return {"step_count": self.step_count, "skipped": self.skipped, "seed": self.seed, "lr": self.lr,
                "eps": self.eps, "weight_decay": self.weight_decay, "q": self.q, "one_sided": self.one_sided,
                "fitness": self.fitness, "sampler": self.sampler.state_dict(),
                "log": {"losses": torch.tensor(self.log["losses"], dtype=torch.float64),
                        "groups": torch.tensor(self.log["groups"], dtype=torch.int32),
                        "lr": list(self.log["lr"]), "eps": list(self.log["eps"]),
                        "interrupted": list(self.log["interrupted"]), "members": list(self.log["members"]),
                        "params": self._signature()}}

    def _signature(self) -> dict:
        """What a state or log belongs to: the parameters' names, shapes and dtypes, in order."""
        return {"names": list(self.names), "shapes": [list(p.shape) for p in self.params],
                "dtypes": [str(p.dtype) for p in self.params]}

    def _checked_log(self, log, step_count: int | None = None) -> dict:
        """A state's ``log`` as plain lists, after checking that it belongs to this parameter set and optimiser and
        that its values are valid; raises ValueError naming the field that is wrong (``log['lr']``, ...), whatever
        the damage (a wrong type, a missing key, a wrong length, a non-finite setting). ``step_count``: the steps
        it must hold."""
        if not isinstance(log, dict):
            raise ValueError(f"log must be a dict from state_dict()['log'], got {type(log).__name__}")
        missing = {"losses", "groups", "lr", "eps", "params"} - set(log)
        if missing:
            raise ValueError(f"log is missing {sorted(missing)}")
        self._check_signature(log["params"])
        losses = _as_list(log["losses"], "log['losses']")
        bad = next((i for i, v in enumerate(losses) if not _is_real(v)), None)
        if bad is not None:  # NaN and inf are losses a closure returned (the step was skipped): they replay
            raise ValueError(f"log['losses'] entry {bad} is {losses[bad]!r}: not a number")
        groups = _as_list(log["groups"], "log['groups']")
        if not all(_is_count(g) for g in groups):
            raise ValueError(f"log['groups'] must hold step counts >= 0, got {groups[:5]}")
        # every setting within the check each step makes before its first pass (_settings): a replay must not stop
        # half way
        limit = self._setting_limit()
        changes = {key: _checked_changes(log[key], key, limit) for key in ("lr", "eps")}
        steps = sum(max(g, 1) for g in groups)
        per_step = self.q + 1 if self.one_sided else 2 * self.q
        if len(losses) != steps * per_step or (step_count is not None and steps != step_count):
            raise ValueError(f"log holds {len(losses)} losses for {steps} steps ({per_step} a step)"
                             + (f" but the state has {step_count} steps" if step_count is not None else ""))
        interrupted = self._checked_interruptions(log.get("interrupted", []), groups, per_step, limit)
        members = _as_list(log.get("members", []), "log['members']")  # a log from before step_members has none
        if not all(_is_count(c) and c < len(groups) and groups[c] == 0 for c in members) or \
                any(a >= b for a, b in zip(members, members[1:])) or (members and self.one_sided):
            raise ValueError(f"log['members'] must list, in order, calls of one step each, got {members[:5]}")
        return {"losses": losses, "groups": groups, "lr": changes["lr"], "eps": changes["eps"],
                "interrupted": interrupted, "members": members}

    def _check_signature(self, params) -> None:
        """A log's ``params`` must be this optimiser's :meth:`_signature`; ValueError naming the field otherwise."""
        if not isinstance(params, dict):
            raise ValueError(f"log['params'] must be a dict of names, shapes and dtypes, got {type(params).__name__}")
        mine = self._signature()
        for key in ("names", "shapes", "dtypes"):
            if not isinstance(params.get(key), (list, tuple)):
                raise ValueError(f"log['params']['{key}'] must be a list, got {params.get(key)!r}")
            theirs = [list(x) if isinstance(x, (list, tuple)) else x for x in params[key]]
            if theirs != mine[key]:
                diff = next((f"{a!r} != {b!r}" for a, b in zip(theirs, mine[key]) if a != b),
                            f"{len(theirs)} != {len(mine[key])} entries")
                raise ValueError(f"log belongs to another parameter set: its parameter {key} differ ({diff})")

    @staticmethod
    def _checked_interruptions(entries, groups: list[int], per_step: int, limit: float) -> list[tuple]:
        """A log's ``interrupted`` entries (:meth:`_record_interruption`) as tuples, checked against its calls: in
        call order, a call's entries with completed steps last and matching its group; ValueError otherwise. A
        log from before interruptions were logged has none."""
        if not isinstance(entries, (list, tuple)):
            raise ValueError(f"log['interrupted'] must be a list of (call, completed, losses, lr, eps), got "
                             f"{type(entries).__name__}")
        checked, last = [], (-1, 0)
        for entry in entries:
            if not _valid_interruption(entry, groups, per_step, last, limit):
                raise ValueError(f"log['interrupted'] has an invalid entry {entry!r}: not (call, completed, losses, "
                                 f"lr, eps) of a call in the log's groups, in order, with fewer than {per_step} losses")
            call, completed, losses, lr, eps = entry
            last = (call, completed)
            checked.append((call, completed, losses, float(lr), float(eps)))
        return checked

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()``; everything is checked before anything is changed (ValueError)."""
        required = {"step_count", "skipped", "seed", "lr", "eps", "weight_decay", "q", "one_sided", "sampler", "log"}
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        if not required <= set(state):
            raise ValueError(f"state is missing {sorted(required - set(state))}")
        for key in ("seed", "q", "one_sided", "fitness"):
            theirs = state.get(key, "raw")  # a state from before fitness shaping existed is raw
            if theirs != getattr(self, key):
                raise ValueError(f"state has {key}={theirs!r} but this optimiser has {getattr(self, key)!r}")
        step_count, skipped = state["step_count"], state["skipped"]
        if not (_is_count(step_count) and _is_count(skipped) and skipped <= step_count):
            raise ValueError(f"state has step_count={step_count!r}, skipped={skipped!r}: not valid counts")
        for key in ("lr", "eps", "weight_decay"):
            value = state[key]
            if not _is_number(value) or value < 0 or (key == "eps" and value == 0):
                raise ValueError(f"state has {key}={value!r}: it must be a finite non-negative number")
        log = self._checked_log(state["log"], step_count)
        self.sampler.load_state_dict(state["sampler"])  # checks its own state before changing it
        self.step_count, self.skipped = step_count, skipped
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.log = {"losses": log["losses"], "groups": log["groups"], "lr": [tuple(x) for x in log["lr"]],
                    "eps": [tuple(x) for x in log["eps"]], "interrupted": log["interrupted"],
                    "members": log["members"]}

    def replay(self, log: dict) -> None:
        """Re-run a recorded log from this optimiser's current (starting) weights; no closure is evaluated.

        Build the optimiser as the recorded one was built (same parameters in the same order, sampler and guides,
        seed, q, one_sided, fitness, weight decay). The final weights equal the recorded run's bit for bit on the same
        device and implementation: every pass is re-applied in the same order with the same coefficients.
        """
        checked = self._checked_log(log)  # before the first pass: another parameter set's log changes nothing
        tape = _Tape(checked["losses"])

        def recorded(key, at_step):
            # the last change logged at or before the step, in log order: a retry of an interrupted step runs at
            # the same step count, and a change of eps made for it is logged after the interrupted call's
            value = None
            for step, v in checked[key]:
                if step > at_step:
                    break
                value = v
            return value

        def setting(step):
            return recorded("lr", step), recorded("eps", step)

        members = set(checked["members"])
        for call, (group, cut) in self._numbered(self._calls(checked["groups"], checked["interrupted"])):
            if cut is not None:
                self._replay_interrupted(tape, cut, setting)
            elif call in members:
                self._step_members(_unused, tape, setting)
            elif group == 0:
                self._step(_unused, tape, setting)
            else:
                self._step_many([_unused] * group, tape, setting)
        if tape.remaining:
            raise ValueError(f"log has {tape.remaining} unused loss values: it does not match this optimiser")

    @staticmethod
    def _numbered(calls: list[tuple]) -> list[tuple]:
        """``(call index among the logged groups, (group, cut))``: interrupted calls that logged no group get -1."""
        out, index = [], 0
        for group, cut in calls:
            logged = cut is None or cut[0] > 0
            out.append((index if logged else -1, (group, cut)))
            index += logged
        return out

    @staticmethod
    def _calls(groups: list[int], interrupted: list[tuple]) -> list[tuple]:
        """A checked log's calls in the order they ran, as ``(group, cut)``: ``cut`` is ``(completed, losses, lr,
        eps)`` of a call a closure interrupted (None otherwise); calls interrupted before completing a step logged
        no group and ran before the group of their index."""
        by_call: dict = {}
        for call, *cut in interrupted:
            by_call.setdefault(call, []).append(tuple(cut))
        calls = []
        for call in range(len(groups) + 1):
            cuts = by_call.get(call, [])
            calls += [(0, cut) for cut in cuts if cut[0] == 0]
            if call < len(groups):
                calls.append((groups[call], next((cut for cut in cuts if cut[0]), None)))
        return calls

    def _replay_interrupted(self, tape, cut, setting) -> None:
        """Replay a call that a closure interrupted: ``completed`` steps, then the interrupted step up to its
        ``losses``-th loss, where the tape raises as the closure did; the same passes as the live call."""
        completed, losses, lr, eps = cut
        stopped_at = self.step_count + completed
        tape.interrupt(completed, losses)
        try:
            self._step_many([_unused] * (completed + 1), tape,
                            lambda step: (lr, eps) if step == stopped_at else setting(step))
        except _Interrupted:
            pass
        else:
            raise AssertionError("the tape interrupts every step that evaluates its losses")
        finally:
            tape.resume()


def _unused():
    raise AssertionError("replay evaluates no closure")


# ---------------------------------------------------------------------------------------------------------------------
# Loss sources: where a step's losses come from, handed to the step explicitly (never through the optimiser's state)
class _Live:
    """The losses of :meth:`ZOOptimizer.step` / ``step_many``: ``closure()`` under inference mode, kept per step
    so that only completed steps reach the log."""

    def __init__(self):
        self.current, self.done = [], []
        self.raised = False  # whether a closure raised: the step it interrupted is logged

    def __call__(self, closure) -> float:
        try:
            with torch.inference_mode():
                loss = closure()
            loss = dtensor.as_float(loss)  # a CPU-GPU sync point: SPSA needs the number on the host to form g
        except BaseException:
            self.raised = True
            raise
        self.current.append(loss)
        return loss

    def members(self, evaluate, seeds, eps, n: int) -> list[float]:
        """The ``n`` member losses of a :meth:`ZOOptimizer.step_members` step, from ``evaluate(seeds, eps)``."""
        with torch.inference_mode():
            losses = [dtensor.as_float(v) for v in evaluate(list(seeds), eps)]
        if len(losses) != n:
            raise ValueError(f"step_members: evaluate returned {len(losses)} losses for {n} members")
        self.current += losses
        return losses

    def close_step(self) -> None:
        self.done += self.current
        self.current = []

    def take_done(self) -> list[float]:
        done, self.done = self.done, []
        return done


class _Tape(_Live):
    """The losses of :meth:`ZOOptimizer.replay`: a recorded log's, in order; no closure is called. The replayed steps
    log them again, so the replaying optimiser's log equals the recorded one."""

    def __init__(self, losses: list[float]):
        super().__init__()
        self.losses, self.position = losses, 0
        self.cut = None  # (steps, losses): after ``steps`` more steps, raise at that step's ``losses``-th loss

    def interrupt(self, steps: int, losses: int) -> None:
        self.cut = (steps, losses)

    def resume(self) -> None:
        """After an interrupted call: the interrupted step's losses are dropped, as the live run dropped them."""
        self.cut, self.raised, self.current = None, False, []

    def __call__(self, closure) -> float:
        if self.cut is not None and self.cut[0] == 0:
            if len(self.current) == self.cut[1]:
                self.raised = True
                raise _Interrupted
            self.current.append(math.nan)  # the interrupted step's losses were not logged; they form no pass
            return math.nan
        loss = self.losses[self.position]
        self.position += 1
        self.current.append(loss)
        return loss

    def members(self, evaluate, seeds, eps, n: int) -> list[float]:
        losses = self.losses[self.position:self.position + n]
        self.position += n
        self.current += losses
        return losses

    def close_step(self) -> None:
        super().close_step()
        if self.cut is not None:
            self.cut = (self.cut[0] - 1, self.cut[1])

    @property
    def remaining(self) -> int:
        return len(self.losses) - self.position


class _Interrupted(Exception):
    """Raised by :class:`_Tape` where the recorded run's closure raised."""
