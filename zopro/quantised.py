"""ZO on the quantised weights themselves: the codes of bitsandbytes NF4 / int8 layers as the parameter space of a
:class:`~zopro.optim.ZOOptimizer`, driven by any sampler (Isotropic, Targeted, RankGuided).

:class:`CodeSpace` gathers a model's bitsandbytes layers; ``space.parameters()`` are their code tensors (what the
optimiser logs and checkpoints) and ``space.sampler(direction)`` wraps a direction sampler so that its passes land in
code space. A direction ``z = a*prev + c*xi + e*delta`` is the direction sampler's, per weight (the guides have the
dequantised weight's shape: dense, or :class:`~zokernels.guided.LowRank` such as a LoRA adapter's ``B @ A``).

How the optimiser's passes (``+eps z``, ``-2 eps z``, then restore and update fused) reach the codes:

* **int8** — every pass is a code move ``codes += times * SR(eps z * 127 / SCB)`` (:func:`int8_code_perturb_`).
  The probes of a direction use one rounding draw and integer ``times`` (+1, -2, +1), so they cancel bit for bit
  at every code they did not saturate; the fused restore-and-update is split back into that exact undo and an
  update ``-lr g z`` rounded with a draw of its own.
* **NF4** — a code update is a stochastic requantisation (:func:`nf4_code_update_`), which cannot be undone. So the
  probes never touch the codes: while a direction is out, the layer's forward adds ``x @ (eps z)^T`` to its
  output, ``eps z`` built in float32 by :func:`zokernels.guided_perturb_` (added to a bf16 weight, a step of ~1e-5
  would round away); only the update requantises the codes. The only dense temporary is one layer's ``eps z``
  during a probe (and, on the CPU without grad, its dequantised weight, in place of bitsandbytes' forward).

Which pass is a probe and which an update is read from the coefficients the optimiser passes, per seed: after
``prepare(seed)`` the first coefficient opens the direction with ``eps``; ``-2 eps`` right after it moves the probe
to ``-eps`` (a two-sided step's second loss); any other one closes it: the exact undo, then an update of
``coef + outstanding * eps`` (even one that happens to be a whole multiple of ``eps``). A replay runs the
same passes, so the codes it reaches equal the recorded run's bit for bit. Weight decay means nothing on codes and
is refused (``supports_weight_decay = False``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from zokernels.guided import LowRank, guided_perturb_
from zokernels.quant import Int8Weight, NF4Weight, int8_code_perturb_, nf4_code_update_
from zokernels.quant.guides import shadow
from zopro.seeds import derive_seed

# rounding-seed domains of a direction's seed: its probes and its update draw different words
_PROBE, _UPDATE = 1 << 40, (1 << 40) + 1


def quantised_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """``{name: module}`` of every bitsandbytes ``Linear4bit`` (NF4) and ``Linear8bitLt`` (int8) in ``model``."""
    import bitsandbytes as bnb

    return {name: m for name, m in model.named_modules()
            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


class CodeSpace:
    """The codes of bitsandbytes layers as a ZO parameter space.

    Args:
        layers: ``{name: bnb.nn.Linear4bit | bnb.nn.Linear8bitLt}`` (:func:`quantised_layers` of a model), already
            quantised (moved to their device). NF4 layers get a forward of their own (dequantise, add any probe,
            ``F.linear``): it also keeps bitsandbytes' eval-mode CPU path from repacking the codes.
        impl: the kernels' ``"auto" | "triton" | "torch"``.

    ``parameters()`` gives ``{name: codes}``; ``weights[name]`` the :class:`NF4Weight` / :class:`Int8Weight`;
    ``saturated`` counts codes pushed past the code book's ends (``"probe"``: int8 probes, whose undo is then inexact
    at those codes; ``"update"``: updates), cumulative.
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module], *, impl: str = "auto"):
        import bitsandbytes as bnb

        if not layers:
            raise ValueError("layers is empty: the model has no bitsandbytes Linear4bit or Linear8bitLt layer")
        self.impl = impl
        self.weights: dict[str, NF4Weight | Int8Weight] = {}
        self.modules = dict(layers)
        for name, m in self.modules.items():
            if isinstance(m, bnb.nn.Linear4bit):
                self.weights[name] = NF4Weight.from_bnb(m)
            elif isinstance(m, bnb.nn.Linear8bitLt):
                self.weights[name] = Int8Weight.from_bnb(m)
            else:
                raise TypeError(f"layers[{name!r}] is a {type(m).__name__}, not a bitsandbytes Linear4bit or "
                                "Linear8bitLt")
        self.names = list(self.weights)
        self.saturated = {"probe": 0, "update": 0}
        self._probe_terms: dict[int, list] = {}  # NF4 stream -> [(seed, scale)] of the directions now out
        self._sampler = None
        for t, name in enumerate(self.names):
            if isinstance(self.weights[name], NF4Weight):
                self._install_forward(self.modules[name], self.weights[name], t)

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs) -> CodeSpace:
        return cls(quantised_layers(model), **kwargs)

    def parameters(self) -> dict[str, torch.Tensor]:
        """``{name: code tensor}`` in a fixed order (each weight's noise stream is its position)."""
        return {n: self.weights[n].codes for n in self.names}

    def shapes(self) -> dict[str, tuple]:
        """The dequantised weights' shapes: what guides must have."""
        return {n: tuple(self.weights[n].shape) for n in self.names}

    def sampler(self, direction) -> CodeSampler:
        """A sampler for ``ZOOptimizer(space.parameters(), sampler=...)`` whose passes move these codes along
        ``direction``'s directions (Isotropic, Targeted or RankGuided, guides named as the layers). A new sampler
        replaces the previous one (one optimiser at a time: a training program builds one per iteration)."""
        self._probe_terms.clear()
        self._sampler = CodeSampler(self, direction)
        return self._sampler

    def scale_parameters(self) -> dict[str, torch.Tensor]:
        """``{name: fp32 scales}`` (:func:`zokernels.quant.scale_params`): a float space any sampler moves directly."""
        from zokernels.quant import scale_params

        return {n: scale_params(self.weights[n])[0] for n in self.names}

    def state(self) -> dict[str, torch.Tensor]:
        """Copies of what ZO may move (codes and the scale tensors), for checkpoints: the base is loaded anew on a
        resume, so these are what carries the run's changes to it."""
        out = {f"codes.{n}": c.detach().clone() for n, c in self.parameters().items()}
        return out | {f"scales.{n}": c.detach().clone() for n, c in self.scale_parameters().items()}

    def load_state_(self, state: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`state` back into the storage, after checking every entry's name, shape and dtype."""
        mine = {f"codes.{n}": c for n, c in self.parameters().items()} | {
            f"scales.{n}": c for n, c in self.scale_parameters().items()}
        if set(state) != set(mine):
            raise ValueError("CodeSpace state belongs to another model: its entries differ")
        for k, t in state.items():
            if t.shape != mine[k].shape or t.dtype != mine[k].dtype:
                raise ValueError(f"CodeSpace state {k!r} is {t.dtype} {tuple(t.shape)}, the model's "
                                 f"{mine[k].dtype} {tuple(mine[k].shape)}")
        with torch.no_grad():
            for k, t in state.items():
                mine[k].copy_(t)

    def resident_bytes(self) -> int:
        """Bytes of the quantised storage (codes and scales) of the space's weights."""
        total = 0
        for w in self.weights.values():
            parts = [w.codes, w.scb] if isinstance(w, Int8Weight) else [w.codes, w.absmax] + (
                [w.nested_absmax] if w.nested else [])
            total += sum(p.numel() * p.element_size() for p in parts)
        return total

    # ---- NF4: probes in the dequantised compute path -------------------------------------------------------------
    def _install_forward(self, module, weight: NF4Weight, stream: int) -> None:
        space = self
        bnb_forward = module.forward

        def forward(x, *args, **kwargs):
            probes = space._probe_terms.get(stream, ())
            if torch.is_grad_enabled() or x.device.type == "cuda":
                # bitsandbytes' own path: in backprop it dequantises again in backward instead of keeping the dense
                # weight, on CUDA it has fast kernels; neither repacks the codes (the CPU does in no-grad eval mode)
                y = bnb_forward(x, *args, **kwargs)
            else:
                bias = module.bias.to(x.dtype) if module.bias is not None else None
                y = F.linear(x, weight.dequantize(torch.float32).to(x.dtype), bias)
            if probes:
                # the probe as a term of its own in float32: added to a bf16 weight, a step of ~1e-5 would round away
                p = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
                for seed, scale in probes:
                    space._sampler._perturb_dense(p, stream, seed, scale)
                y = y + F.linear(x.float(), p).to(y.dtype)
            return y

        module.forward = forward


class CodeSampler:
    """The sampler a :class:`CodeSpace` hands to :class:`~zopro.optim.ZOOptimizer` (see the module docstring).

    ``direction``'s guides are mapped by layer name and have the dequantised weights' shapes; it is bound to
    zero-stride stand-ins of those shapes (its reduction pass reads only their shapes)."""

    supports_weight_decay = False

    def __init__(self, space: CodeSpace, direction):
        self.space, self.direction = space, direction
        self.name = "codes-" + direction.name
        self._fresh: set[int] = set()
        self._open: dict[int, tuple[float, int]] = {}  # seed -> (eps, outstanding multiple of eps)

    def bind(self, names, params) -> None:
        if list(names) != self.space.names:
            raise ValueError("CodeSampler: the optimiser's parameters must be space.parameters(), in order")
        shadows = [shadow(self.space.weights[n].shape, params[0].device) for n in names]
        self.direction.bind(list(names), shadows)
        self.dist = self.direction.dist
        for t, name in enumerate(names):  # the code ops take one kind of guide per call: refuse here, not mid-pass
            kinds = {isinstance(g, LowRank) for g in self._guides(t) if g is not None}
            if len(kinds) > 1:
                raise ValueError(f"CodeSampler: layer {name!r} has a dense and a LowRank guide; give both guides "
                                 "of a layer as one kind")

    def prepare(self, seed: int) -> None:
        self.direction.prepare(seed)
        self._fresh.add(seed)

    def advance(self) -> None:
        self.direction.advance()

    def z_bound(self, seed: int):
        """The direction's bound on ``|z|`` (the optimiser keeps an update's float32 coefficients finite with it)."""
        return self.direction.z_bound(seed)

    def guide_share(self, t: int) -> float:
        return self.direction.guide_share(t)

    def mixing(self, t: int | None = None) -> float:
        """The direction's mixing weight of guide and noise (0 for isotropic directions)."""
        return self.direction.mixing(t) if hasattr(self.direction, "mixing") else 0.0

    def state_dict(self) -> dict:
        return {**self.direction.state_dict(), "space": "codes"}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("space") != "codes":
            raise ValueError("the sampler state is not a code-space sampler's (state_dict() of a CodeSampler has "
                             f"space='codes'), got {state!r:.80}")
        self.direction.load_state_dict({k: v for k, v in state.items() if k != "space"})

    # ---- the direction of one seed, per weight -----------------------------------------------------------------------
    def _coefficients(self, seed: int, t: int) -> tuple[float, float, float]:
        """``(a, c, e)`` of weight ``t``: ``z = a*prev + c*xi + e*delta``."""
        coef = self.direction.coefficients(seed)
        if coef is None:
            return 0.0, 1.0, 0.0
        a, c, e = coef
        return float(a[t]), float(c[t]), float(e[t])

    def _guides(self, t: int):
        prev = getattr(self.direction, "prev", None)
        delta = getattr(self.direction, "delta", None)
        return (prev[t] if prev is not None else None), (delta[t] if delta is not None else None)

    def _terms(self, seed: int, t: int, scale: float):
        """(noise coefficient, guide terms) of ``scale * z(seed)`` on weight ``t``, as the code ops take them."""
        a, c, e = self._coefficients(seed, t)
        prev, delta = self._guides(t)
        guides = [([g], torch.tensor([scale * k], dtype=torch.float64))
                  for g, k in ((prev, a), (delta, e)) if g is not None and k != 0.0]
        return scale * c, guides

    def _perturb_dense(self, w: torch.Tensor, t: int, seed: int, scale: float) -> None:
        """``w += scale * z(seed)`` on a dequantised float32 weight (an NF4 probe in the compute path)."""
        c, guides = self._terms(seed, t, scale)
        guided_perturb_([w], noise=[(seed, torch.tensor([c]))], guides=[(gs, k.float()) for gs, k in guides],
                        dist=self.dist, streams=[t], impl=self.space.impl)

    # ---- the passes -----------------------------------------------------------------------------------------------
    def apply(self, params, streams, terms, decay) -> None:
        """Each ``(seed, coef)`` term in order: open, move or close a probe, or update (module docstring)."""
        if bool((decay != 1).any()):
            raise ValueError("CodeSampler: weight decay means nothing on codes")
        for seed, coef in terms:
            values = set(coef.tolist())
            assert len(values) == 1, "one coefficient for every weight: no per-tensor decay in code space"
            self._term(seed, values.pop())

    def _term(self, seed: int, c: float) -> None:
        if seed in self._open:
            eps, n = self._open[seed]
            # the optimiser's one probe move is +eps -> -eps (a two-sided step's second loss); any other term closes
            # the probe: an update that happens to be a whole multiple of eps is still an update, not a probe
            if n == 1 and c == -2 * eps:
                self._probe(seed, eps, -2, -1)
                return
            self._probe(seed, eps, -n, 0)  # the exact undo
            update = c + n * eps
            if update != 0.0:
                self._update(seed, update)
        elif seed in self._fresh:
            self._fresh.discard(seed)
            self._probe(seed, c, 1, 1)
        elif c != 0.0:
            self._update(seed, c)

    def _probe(self, seed: int, eps: float, times: int, outstanding: int) -> None:
        """Move the probe of ``seed`` by ``times * eps * z``; ``outstanding`` multiples of eps are then out."""
        if outstanding:
            self._open[seed] = (eps, outstanding)
        else:
            self._open.pop(seed, None)
        for t, name in enumerate(self.space.names):
            w = self.space.weights[name]
            if isinstance(w, Int8Weight):
                c, guides = self._terms(seed, t, eps)
                self.space.saturated["probe"] += int8_code_perturb_(
                    w, seed, torch.tensor([c]), rounding_seed=derive_seed(seed, _PROBE), times=times,
                    dist=self.dist, streams=[t], guides=[(gs, k.float()) for gs, k in guides], impl=self.space.impl)
            else:
                terms = [(s, sc) for s, sc in self.space._probe_terms.get(t, []) if s != seed]
                if outstanding:
                    terms.append((seed, outstanding * eps))
                self.space._probe_terms[t] = terms

    def _update(self, seed: int, scale: float) -> None:
        """``w += scale * z(seed)`` as a rounded code update, with a rounding draw of its own."""
        assert math.isfinite(scale)
        for w in self.space.weights.values():  # every check before the first layer moves (a scale-space step may
            if isinstance(w, NF4Weight):       # have left a block's absmax NaN or negative)
                w.check_absmax()
        rounding = derive_seed(seed, _UPDATE)
        for t, name in enumerate(self.space.names):
            w = self.space.weights[name]
            c, guides = self._terms(seed, t, scale)
            guides = [(gs, k.float()) for gs, k in guides]
            if isinstance(w, Int8Weight):
                sat = int8_code_perturb_(w, seed, torch.tensor([c]), rounding_seed=rounding, dist=self.dist,
                                         streams=[t], guides=guides, impl=self.space.impl)
            else:
                sat = nf4_code_update_(w, seed, c, rounding_seed=rounding, stream=t, dist=self.dist, guides=guides,
                                       impl=self.space.impl)
            self.space.saturated["update"] += sat
