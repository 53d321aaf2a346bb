"""ZOOptimizer: two-point SPSA on the fused kernels of zokernels, with replayable, kilobyte-sized logs.

One ``step(closure)`` (two-sided, q = 1) costs three weight passes:
``+eps z`` -> L+, ``-2 eps z`` -> L-, then restore and update fused: ``w = m*w + (m*eps - lr*g) z`` with
``g = (L+ - L-) / (2 eps)`` and ``m = 1 - lr*weight_decay`` on decayed tensors (decoupled weight decay in the same
pass). ``step_many(closures)`` runs steps back to back and also fuses each restore-and-update with the next step's
``+eps z'``: two passes per step; it returns only once the weights are clean.

Seeds are derived from (seed, step, direction), so a run is a pure function of its starting weights, its
configuration and the losses its closures returned. The optimiser records those losses (and any change of lr or
eps); :meth:`ZOOptimizer.replay` feeds them back through the same code path and reproduces the final weights bit
for bit on the same device, without a single forward pass. That log is also the cheapest checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from zopro.samplers import Isotropic

MASK64 = (1 << 64) - 1


def derive_seed(seed: int, step: int, direction: int = 0) -> int:
    """A 64-bit seed for (run seed, step, direction): SplitMix64's finaliser over a Weyl sequence."""
    x = (seed + 0x9E3779B97F4A7C15 * ((step << 16) + direction + 1)) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


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
    return names, tensors


class ZOOptimizer:
    """Zeroth-order optimiser shaped like ``torch.optim``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or a ``{name: parameter}`` dict (names let samplers map
            guides); each parameter's noise stream is its position in this list.
        lr, eps: learning rate and perturbation size; ``eps`` may be changed between steps (it is logged).
        weight_decay: decoupled, applied to tensors with two or more dimensions only (biases and norm weights are
            vectors): decided by shape, not by names. ``no_decay`` names further exclusions.
        sampler: :class:`~zopro.samplers.Isotropic` (default), ``Targeted`` or ``RankGuided``.
        seed: run seed; step ``t`` direction ``j`` uses ``derive_seed(seed, t, j)``.
        q: directions averaged per step (n-SPSA).
        one_sided: ``g = (L(w + eps z) - L(w)) / eps``; one forward for ``L(w)`` shared by the q directions.
        lr_schedule: ``f(step) -> multiplier`` of ``lr``.
    """

    def __init__(self, params, *, lr: float, eps: float = 1e-3, weight_decay: float = 0.0, sampler=None,
                 seed: int = 0, q: int = 1, one_sided: bool = False,
                 lr_schedule: Callable[[int], float] | None = None, no_decay: Iterable[str] = ()):
        self.names, self.params = _named(params)
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
        if eps == 0:
            raise ValueError("eps must be positive")
        if not isinstance(q, int) or q < 1:
            raise ValueError(f"q must be a positive integer, got {q!r}")
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
        no_decay = set(no_decay)
        unknown = no_decay - set(self.names)
        if unknown:
            raise ValueError(f"no_decay names unknown parameters: {sorted(unknown)[:5]}")
        self.lr, self.eps, self.weight_decay = float(lr), float(eps), float(weight_decay)
        self.seed, self.q, self.one_sided, self.lr_schedule = seed, q, one_sided, lr_schedule
        self.decays = torch.tensor([p.dim() >= 2 and n not in no_decay for n, p in zip(self.names, self.params)])
        self.streams = list(range(len(self.params)))
        self.sampler = sampler if sampler is not None else Isotropic()
        self.sampler.bind(self.names, self.params)
        self.step_count = 0
        self.skipped = 0
        self.log = {"losses": [], "groups": [], "lr": [], "eps": []}
        self._step_losses, self._done_losses, self._replaying = [], [], None

    # ---- the passes -------------------------------------------------------------------------------------------
    def current_lr(self) -> float:
        if self._replaying is not None:
            return self._replaying("lr")
        return self.lr * (self.lr_schedule(self.step_count) if self.lr_schedule else 1.0)

    def _current_eps(self) -> float:
        return self._replaying("eps") if self._replaying is not None else self.eps

    def _decay(self, lr: float) -> torch.Tensor:
        ones = torch.ones(len(self.params), dtype=torch.float64)
        return torch.where(self.decays, ones * (1.0 - lr * self.weight_decay), ones)

    def _pass(self, terms, decay=None) -> None:
        """``w = decay*w + sum coef*z(seed)``; ``terms``: ``[(seed, coef)]``, coef a scalar or per-tensor vector."""
        n = len(self.params)
        terms = [(s, c if isinstance(c, torch.Tensor) else torch.full((n,), float(c), dtype=torch.float64))
                 for s, c in terms]
        self.sampler.apply(self.params, self.streams, terms, decay if decay is not None else torch.ones(n))

    def _eval(self, closure, recorded) -> float:
        if recorded is not None:
            return recorded.pop(0)
        with torch.inference_mode():
            loss = closure()
        loss = float(loss)  # a CPU-GPU sync point: SPSA needs the number on the host to form g
        self._step_losses.append(loss)
        return loss

    def _log_settings(self, lr: float, eps: float) -> None:
        for key, value in (("lr", lr), ("eps", eps)):
            if not self.log[key] or self.log[key][-1][1] != value:
                self.log[key].append((self.step_count, value))

    def _estimate(self, closure, recorded, eps, pending=None):
        """Evaluate the q directions of this step. Returns (seeds, grads, losses); weights are left at
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
                base = self._eval(closure, recorded)
                losses.append(base)
            for j, seed in enumerate(seeds):
                self.sampler.prepare(seed)
                if pending is not None:
                    self._pass(pending[0] + [(seed, eps)], pending[1])
                    pending = None
                else:
                    self._pass([(seed, eps)])
                net = eps
                plus = self._eval(closure, recorded)
                if self.one_sided:
                    grads.append((plus - base) / eps)
                    losses.append(plus)
                else:
                    self._pass([(seed, -2 * eps)])
                    net = -eps
                    minus = self._eval(closure, recorded)
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

    def _finish(self, seeds, grads, lr, eps):
        """The pass that restores the last direction and applies the update, as ``(terms, decay)``, and whether
        the update happened; other directions' updates (q > 1) are applied here, one pass each."""
        restore = -eps if self.one_sided else eps
        if not all(math.isfinite(g) for g in grads):
            return ([(seeds[-1], restore)], None), False
        for s, g in zip(seeds[:-1], grads[:-1]):
            self._pass([(s, -lr * g / self.q)])
        decay = self._decay(lr)
        # w is at theta -+ eps z_last: m*w + (m*restore - lr*g/q) z_last = m*theta - (lr*g/q) z_last
        return ([(seeds[-1], decay * restore - lr * grads[-1] / self.q)], decay), True

    def _close_step(self, grads, losses, ok) -> StepResult:
        if not ok:
            self.skipped += 1
        self.sampler.advance()
        self.step_count += 1
        self._done_losses += self._step_losses
        self._step_losses = []
        return StepResult(loss=sum(losses) / len(losses), grad=sum(grads) / len(grads), skipped=not ok)

    # ---- public -----------------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor | float], _recorded: list | None = None) -> StepResult:
        """One SPSA step; ``closure()`` returns the loss at the current weights (run under inference mode).

        Returns when the weights are the updated, unperturbed ones. A non-finite projected gradient skips the
        update (weights restored within the rounding of the round trip) and is counted in ``skipped``.
        """
        lr, eps = self.current_lr(), self._current_eps()
        self._log_settings(lr, eps)
        self._step_losses, self._done_losses = [], []
        seeds, grads, losses = self._estimate(closure, _recorded, eps)
        final, ok = self._finish(seeds, grads, lr, eps)
        self._pass(*final)
        result = self._close_step(grads, losses, ok)
        self._record(0)
        return result

    def step_many(self, closures: Iterable[Callable], _recorded: list | None = None) -> list[StepResult]:
        """Steps back to back, one per closure, fusing each restore-and-update with the next ``+eps z'``.

        Two weight passes per two-sided step (q = 1). Control returns only after the last update, with clean
        weights; if a closure raises, the weights are those after the last completed step (within rounding).
        """
        results, pending = [], None
        self._step_losses, self._done_losses = [], []
        try:
            for closure in closures:
                lr, eps = self.current_lr(), self._current_eps()
                self._log_settings(lr, eps)
                previous, pending = pending, None  # _estimate applies it, also when a closure raises
                seeds, grads, losses = self._estimate(closure, _recorded, eps, previous)
                pending, ok = self._finish(seeds, grads, lr, eps)
                results.append(self._close_step(grads, losses, ok))
        finally:
            if pending is not None:
                self._pass(*pending)
            if results:
                self._record(len(results))
        return results

    def _record(self, group: int) -> None:
        """Log the completed steps' losses; ``group`` is 0 for :meth:`step`, n for an n-step :meth:`step_many`."""
        self.log["losses"].extend(self._done_losses)
        self.log["groups"].append(group)
        self._done_losses = []

    def state_dict(self) -> dict:
        """Everything but the weights: resuming needs this plus the weights, or the starting weights and the log."""
        return {"step_count": self.step_count, "skipped": self.skipped, "seed": self.seed, "lr": self.lr,
                "eps": self.eps, "weight_decay": self.weight_decay, "q": self.q, "one_sided": self.one_sided,
                "sampler": self.sampler.state_dict(),
                "log": {"losses": torch.tensor(self.log["losses"], dtype=torch.float64),
                        "groups": torch.tensor(self.log["groups"], dtype=torch.int32),
                        "lr": list(self.log["lr"]), "eps": list(self.log["eps"])}}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "q", "one_sided"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this optimiser has {getattr(self, key)!r}")
        self.step_count, self.skipped = int(state["step_count"]), int(state["skipped"])
        self.lr, self.eps, self.weight_decay = state["lr"], state["eps"], state["weight_decay"]
        self.sampler.load_state_dict(state["sampler"])
        log = state["log"]
        self.log = {"losses": log["losses"].tolist(), "groups": log["groups"].tolist(),
                    "lr": [tuple(x) for x in log["lr"]], "eps": [tuple(x) for x in log["eps"]]}

    def replay(self, log: dict) -> None:
        """Re-run a recorded log from this optimiser's current (starting) weights; no closure is evaluated.

        Build the optimiser as the recorded one was built (same parameters in the same order, sampler and guides,
        seed, q, one_sided, weight decay). The final weights equal the recorded run's bit for bit on the same
        device and implementation: every pass is re-applied in the same order with the same coefficients.
        """
        losses = log["losses"].tolist() if isinstance(log["losses"], torch.Tensor) else list(log["losses"])
        groups = log["groups"].tolist() if isinstance(log["groups"], torch.Tensor) else list(log["groups"])
        changes = {key: sorted((int(s), float(v)) for s, v in log[key]) for key in ("lr", "eps")}

        def setting(key):
            value = None
            for step, v in changes[key]:
                if step > self.step_count:
                    break
                value = v
            return value

        def unused():
            raise AssertionError("replay evaluates no closure")

        self._replaying = setting
        try:
            for group in groups:
                if group == 0:
                    self.step(unused, _recorded=losses)
                else:
                    self.step_many([unused] * group, _recorded=losses)
        finally:
            self._replaying = None
        if losses:
            raise ValueError(f"log has {len(losses)} unused loss values: it does not match this optimiser")
