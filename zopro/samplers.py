"""Direction samplers for :class:`zopro.optim.ZOOptimizer`: every direction is generated inside the kernels.

A sampler turns a seed into a direction ``z`` per tensor and applies ``w = decay*w + sum_k coef_k * z(seed_k)`` with
per-tensor coefficients, in one pass over the weights. ``prepare(seed)`` runs before a seed's first use (Targeted
needs one reduction pass then); ``advance()`` moves schedules on after each update.

* :class:`Isotropic` — MeZO: ``z = xi`` (Gaussian or Rademacher). No extra pass, no buffer.
* :class:`Targeted` — ZOPrO: ``z = d*prev + c*(xi - (vhat . xi) vhat)`` per tensor, ``c = sqrt(1-d^2)|prev|/|xi_perp|``,
  ``prev`` the policy's previous-iteration update and ``vhat`` the unit reward-model update. A step costs the
  optimiser's weight passes plus one reduction pass per direction that regenerates ``xi`` and reads ``vhat``
  (no weight traffic); each weight pass also reads both guides.
* :class:`RankGuided` — Targeted with both guides held as rank-k factors (``LowRank``): k*(m+n) numbers per matrix
  instead of m*n; at full rank it equals Targeted.
* :class:`Core` — a small search space: a tensor ``B [m, n]`` moves only as ``B + U xi`` with a fixed orthonormal
  ``U [m, k]`` and a Gaussian ``xi [k, n]`` (for a LoRA pair, the ``k x r`` core between frozen factors, as
  LoRA-XS); k*n numbers a tensor instead of m*n, applied by a small matmul rather than inside the kernels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from zokernels import perturb2_, perturb_, rng
from zokernels.guided import LowRank, guide_dot, guided_perturb_
from zopro.seeds import derive_seed

SCHEDULES = ("exp", "linear", "constant")
SCALES = ("paper", "unit", "numel")
BLOCKS = ("whole", "layer", "tensor")
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
BLOCK_WEIGHTS = 0xB10C  # derive_seed(seed, BLOCK_WEIGHTS): the per-block weights of direction ``seed``


def block_keys(names: list[str], blocks: str) -> list[str]:
    """The block of each named tensor: ``whole`` one block; ``layer`` one per transformer layer (the name up to its
    ``layers.N.`` / ``layer.N.`` / ``h.N.`` / ``blocks.N.``, so two stacks' layer 3 are two blocks; a tensor outside
    every layer is a block of its own; no layer in any name is refused); ``tensor`` one each."""
    if blocks == "whole":
        return [""] * len(names)
    if blocks == "tensor":
        return list(names)
    matches = [_LAYER.search(name) for name in names]
    if names and not any(matches):
        raise ValueError(f"blocks='layer': no tensor name has a layer index (layers.N., layer.N., h.N. or blocks.N.), "
                         f"e.g. {names[0]!r}: use blocks='tensor'")
    return [name[:m.end()] if m else name for name, m in zip(names, matches)]


class Isotropic:
    """MeZO's isotropic direction ``z = xi``; ``dist`` is ``"gaussian"`` or ``"rademacher"``."""

    name = "isotropic"
    # ZOOptimizer refuses weight_decay with a sampler that says False (zopro.quantised.CodeSampler: codes)
    supports_weight_decay = True

    def __init__(self, dist: str = "gaussian", impl: str = "auto"):
        if dist not in ("gaussian", "rademacher"):
            raise ValueError(f"dist must be 'gaussian' or 'rademacher', got {dist!r}")
        self.dist, self.impl = dist, impl

    def bind(self, names: list[str], params: list[torch.Tensor]) -> None:
        """Called once by the optimiser with its parameter names and tensors."""

    def prepare(self, seed: int) -> None:
        """Nothing to precompute for isotropic noise."""

    def advance(self) -> None:
        """No schedule."""

    def guide_share(self, t: int) -> float:
        """Share of a direction's squared norm that comes from a guide: none, isotropic noise is all noise."""
        return 0.0

    def z_bound(self, seed: int) -> float:
        """An upper bound on ``|z|`` of every element of direction ``seed`` (after ``prepare(seed)``): the spec's
        largest Gaussian (:data:`zokernels.rng.GAUSSIAN_MAX`), or 1 for Rademacher signs."""
        return rng.GAUSSIAN_MAX if self.dist == "gaussian" else 1.0

    def coefficients(self, seed: int):
        """Per-tensor ``(a, c, e)`` of ``z(seed) = a*prev + c*xi + e*delta`` after ``prepare(seed)`` (float64 CPU
        tensors), for samplers that apply directions themselves (zopro.quantised); None: ``z = xi``."""
        return None

    def apply(self, params, streams, terms, decay: torch.Tensor, offsets=None) -> None:
        """``terms``: ``[(seed, coef)]`` (1 or 2), ``coef`` a CPU float64 tensor with one entry per parameter;
        ``offsets``: each tensor's global first element where it is a shard (:mod:`zopro.dtensor`), default 0.

        Parameters sharing the same (decay, coefficients) go in one launch; with weight decay there are two groups.
        """
        groups: dict = {}
        for i in range(len(params)):
            key = (float(decay[i]),) + tuple(float(c[i]) for _, c in terms)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            ts, ss = [params[i] for i in idx], [streams[i] for i in idx]
            os_ = [offsets[i] for i in idx] if offsets is not None else None
            if len(terms) == 1:
                perturb_(ts, terms[0][0], key[1], dist=self.dist, streams=ss, decay=key[0], impl=self.impl,
                         offsets=os_)
            else:
                perturb2_(ts, terms[0][0], key[1], terms[1][0], key[2], dist=self.dist, streams=ss, decay=key[0],
                          impl=self.impl, offsets=os_)

    def state_dict(self) -> dict:
        return {"name": self.name, "dist": self.dist}

    def load_state_dict(self, state: dict) -> None:
        _check_name(self, state)
        _check_same(self, {"dist": state.get("dist", self.dist)})


def _whole_sums(dots: torch.Tensor) -> torch.Tensor:
    """The per-tensor sums of an unsharded run: the tensors are whole, so their own."""
    return dots


def _check_name(sampler, state):
    if not isinstance(state, dict):
        raise ValueError(f"the sampler state must be a dict from state_dict(), got {type(state).__name__}")
    if state.get("name") != sampler.name:
        raise ValueError(f"state is for sampler {state.get('name')!r}, not {sampler.name!r}")


def _check_same(sampler, saved: dict) -> None:
    """The settings ``saved`` in a sampler state must be ``sampler``'s: a state of another sampler is refused."""
    differ = [f"{k} {v!r} (this sampler: {getattr(sampler, k)!r})"
              for k, v in saved.items() if v != getattr(sampler, k)]
    if differ:
        raise ValueError(f"the saved {sampler.name} sampler state is of another sampler: {', '.join(differ)}")


class Targeted(Isotropic):
    """ZOPrO's targeted direction (see the module docstring), per tensor, from two guides mapped by name.

    Args:
        prev: ``{name: previous-iteration update of that parameter}`` (new - old weights): a tensor, or a
            :class:`~zokernels.guided.LowRank` kept as factors (no dense copy).
        reward_delta: ``{name: reward model's update over the previous iteration}``, same names; normalised here.
        d0: starting mixing weight (paper: 1 - 1e-3).
        schedule: ``"constant"`` (default: ``d = d0``), ``"linear"`` (``d = d0 - t / total_steps``, floored at 0;
            the authors' command-line default) or ``"exp"`` (``d = d0 * exp(-t / tau)``, the paper's with tau = 1);
            ``t`` counts updates. Measured on a known quadratic (``benchmarks/controlled.py``, RESULTS.md): with the
            noise of a real rollout, constant d = 1 keeps 75-100 % of what the guide offers, linear 64-97 %, exp
            with tau = 1 5-27 %; mixing in noise pays only when the guide's cosine is below ~sqrt(steps / D).
        scale: how long z is. ``"unit"`` (default): the whole
            direction is divided by the global ``|prev|`` (all tensors together), so z has norm ~1 and eps and a
            step ``lr * g`` are distances in weight space whatever the guide's length; unguided tensors then get
            ``xi / sqrt(D)`` (D: all elements), an isotropic direction of norm ~1. ``"numel"``: each tensor's z is
            scaled by ``sqrt(numel) / |prev|`` to an isotropic Gaussian's norm (eps and lr as for
            :class:`Isotropic`). ``"paper"``: each tensor's z has the norm of its ``prev`` (the paper's; a step
            then moves ``lr * g * |prev|^2``, so lr means something else for every guide).
        guide_dtype: storage of the guides (bf16 halves what every weight pass reads).
        blocks: ``"whole"`` (default): the guide part of z is ``d * prev`` (scaled), one line through the weights.
            ``"layer"`` / ``"tensor"``: each block of tensors (a transformer layer, or a tensor; :func:`block_keys`)
            gets its own Gaussian weight ``s_b`` per direction (from the direction's seed), so the guide part is
            ``d * sum_b s_b prev_b``: directions span the subspace of the blocks' parts of the guide (one dimension
            per block) instead of its line, and SPSA can rescale each block's part of the previous update on its own
            (grow one layer's, shrink another's). ``E[s_b^2] = 1``, so the direction's expected squared norm and
            :meth:`guide_share` (an expectation then) are those of ``"whole"``.
    Tensors without a ``prev`` guide, or whose ``prev`` is all zeros, use isotropic noise; a tensor with ``prev``
    but no ``reward_delta`` skips the projection.
    """

    name = "targeted"

    def __init__(self, prev: Mapping[str, torch.Tensor], reward_delta: Mapping[str, torch.Tensor] | None = None, *,
                 d0: float = 1 - 1e-3, schedule: str = "constant", tau: float = 1.0, total_steps: int | None = None,
                 scale: str = "unit", guide_dtype: torch.dtype | None = None, blocks: str = "whole",
                 dist: str = "gaussian", impl: str = "auto"):
        super().__init__(dist, impl)
        if not 0.0 <= d0 <= 1.0:
            raise ValueError(f"d0 must be in [0, 1], got {d0}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "linear" and not total_steps:
            raise ValueError("schedule='linear' needs total_steps")
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}")
        self.blocks = blocks
        self.prev_src, self.delta_src = dict(prev), dict(reward_delta or {})
        self.d0, self.schedule, self.tau, self.total_steps = d0, schedule, tau, total_steps
        self.scale, self.guide_dtype = scale, guide_dtype
        self.t = 0
        self._cache: dict = {}

    # ---- guides -------------------------------------------------------------------------------------------------
    def _make_guide(self, tensor: torch.Tensor, param: torch.Tensor):
        if isinstance(tensor, LowRank):  # already factored (e.g. a LoRA adapter's B @ A): kept as factors
            dtype = self.guide_dtype or param.dtype
            return LowRank(tensor.u.detach().to(param.device, dtype).contiguous(),
                           tensor.v.detach().to(param.device, dtype).contiguous())
        return tensor.detach().to(device=param.device, dtype=self.guide_dtype or param.dtype).contiguous()

    def _sq_norm(self, guide) -> float:
        if isinstance(guide, LowRank):
            return float(guide.sq_norm())
        total = guide.double().pow(2).sum()
        # a sharded DTensor guide's sum is Partial: float() of it reads this rank's share only (zopro.dtensor)
        return float(total.full_tensor() if hasattr(total, "full_tensor") else total)

    def bind(self, names, params):
        unknown = sorted((set(self.prev_src) | set(self.delta_src)) - set(names))
        if unknown:
            raise ValueError(f"guides name parameters the optimiser does not have: {unknown[:5]}")
        self.names = list(names)
        self.prev, self.delta, self.prev_norm, self.delta_sq = [], [], [], []
        for name, p in zip(names, params):
            prev, delta = self.prev_src.get(name), self.delta_src.get(name)
            for what, g in (("prev", prev), ("reward_delta", delta)):
                if g is not None and tuple(g.shape) != tuple(p.shape):
                    raise ValueError(f"{what}[{name!r}] has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")
            prev = self._make_guide(prev, p) if prev is not None else None
            pn = math.sqrt(self._sq_norm(prev)) if prev is not None else 0.0
            if pn == 0.0:  # no usable guide: isotropic for this tensor
                prev, delta = None, None
            delta = self._make_guide(delta, p) if delta is not None else None
            dsq = self._sq_norm(delta) if delta is not None else 0.0
            if dsq == 0.0:
                delta = None
            self.prev.append(prev)
            self.delta.append(delta)
            self.prev_norm.append(pn)
            self.delta_sq.append(dsq)
        self.numel = torch.tensor([float(p.numel()) for p in params], dtype=torch.float64)
        self.guided = [g is not None for g in self.prev]
        keys = block_keys(self.names, self.blocks)
        order = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        self.block_index = torch.tensor([order[k] for k in keys], dtype=torch.long)
        self.n_blocks = len(order)
        self._params = params
        self._offsets, self._sum_shards = [0] * len(params), _whole_sums  # unsharded: see use_shards
        self._group_cache = None
        del self.prev_src, self.delta_src  # the caller's full-size tensors need not stay alive through us

    def use_shards(self, params, offsets, local_guide, sum_shards) -> None:
        """Work on this rank's shards (:mod:`zopro.dtensor`, after :meth:`bind`): ``params`` the local tensors,
        ``offsets`` their global first elements, ``local_guide(i, guide)`` the part of a guide matching ``params[i]``,
        ``sum_shards(dots)`` the per-tensor sums over every rank's parts. Norms, sizes and which tensors are guided
        were computed by ``bind`` from whole guides, so they are the same on every rank."""
        self._params, self._offsets, self._sum_shards = list(params), list(offsets), sum_shards
        self.prev = [g if g is None else local_guide(i, g) for i, g in enumerate(self.prev)]
        self.delta = [g if g is None else local_guide(i, g) for i, g in enumerate(self.delta)]

    def guide_numbers(self) -> int:
        """How many numbers the guides hold (memory accounting for benchmarks and tests)."""
        def count(g):
            return 0 if g is None else (g.u.numel() + g.v.numel() if isinstance(g, LowRank) else g.numel())
        return sum(count(g) for g in self.prev) + sum(count(g) for g in self.delta)

    # ---- schedule -----------------------------------------------------------------------------------------------
    def mixing(self, t: int | None = None) -> float:
        t = self.t if t is None else t
        if self.schedule == "exp":
            return self.d0 * math.exp(-t / self.tau)
        if self.schedule == "linear":
            return max(0.0, self.d0 - t / self.total_steps)
        return self.d0

    def advance(self) -> None:
        """The next step: its schedule; of the cached coefficients only the last direction's stay, which the
        optimiser's fused pass restores at the next step's first ``+eps z``."""
        self.t += 1
        if len(self._cache) > 1:
            last = next(reversed(self._cache))
            self._cache = {last: self._cache[last]}

    # ---- per-seed coefficients --------------------------------------------------------------------------------
    def prepare(self, seed: int) -> None:
        """One reduction pass: per tensor ``delta . xi`` and ``|xi|^2``; caches this seed's coefficients."""
        dots = torch.zeros(len(self._params), 2, dtype=torch.float64)
        for idx, _, _ in self._groups():  # one kind of guide per call
            dots[idx] = guide_dot([self._params[i] for i in idx], [self.delta[i] for i in idx], seed,
                                  dist=self.dist, streams=idx.tolist(), impl=self.impl,
                                  offsets=[self._offsets[i] for i in idx])
        dots = self._sum_shards(dots)
        d = self.mixing()
        dot, xi_sq = dots[:, 0], dots[:, 1]
        delta_sq = torch.tensor(self.delta_sq, dtype=torch.float64)
        prev_norm = torch.tensor(self.prev_norm, dtype=torch.float64)
        beta = torch.where(delta_sq > 0, dot / delta_sq.clamp(min=1e-300), torch.zeros_like(dot))
        perp_sq = (xi_sq - beta * dot).clamp(min=1e-30)  # |xi - (vhat.xi) vhat|^2 = |xi|^2 - (delta.xi)^2/|delta|^2
        guided = torch.tensor(self.guided)
        c = torch.where(guided, math.sqrt(max(0.0, 1 - d * d)) * prev_norm / perp_sq.sqrt(), torch.ones_like(dot))
        a = torch.where(guided, torch.full_like(dot, d), torch.zeros_like(dot))
        if self.blocks != "whole":
            a = a * self.block_weights(seed)[self.block_index]
        if self.scale != "paper":
            r = self._scale_ratio()
            c, a = c * r, a * r
        # z = a*prev + c*xi - c*beta*delta
        # every direction of a step stays cached until advance(): a q-direction step applies each one's update
        # after the last is prepared
        self._cache.pop(seed, None)
        self._cache[seed] = (a, c, -c * beta)

    def block_weights(self, seed: int) -> torch.Tensor:
        """The Gaussian weight of each block in direction ``seed`` (float64, ``[n_blocks]``; all ones with
        ``blocks="whole"``): the spec's Gaussians (:mod:`zokernels.rng`) of a seed derived from ``seed``, so every rank,
        replay and torch version draws the same."""
        if self.blocks == "whole":
            return torch.ones(self.n_blocks, dtype=torch.float64)
        return rng.gaussian(derive_seed(seed, BLOCK_WEIGHTS), 0, 0, self.n_blocks).double()  # the Philox spec

    def _scale_ratio(self) -> torch.Tensor:
        """Per tensor, the factor ``scale`` puts on its direction (float64): ``numel``: ``sqrt(numel) / |prev|`` on
        guided tensors; ``unit``: ``1 / |prev|`` (all tensors together) on guided ones, ``1 / sqrt(D)`` on the rest;
        ``paper``: 1."""
        prev_norm = torch.tensor(self.prev_norm, dtype=torch.float64)
        guided = torch.tensor(self.guided)
        ones = torch.ones_like(prev_norm)
        if self.scale == "numel":
            return torch.where(guided, self.numel.sqrt() / prev_norm.clamp(min=1e-300), ones)
        if self.scale == "unit":
            total = float(prev_norm.pow(2).sum().sqrt())  # 0 only when no tensor is guided
            return torch.where(guided, torch.full_like(ones, 1 / total if total > 0 else 0.0),
                               torch.full_like(ones, 1 / math.sqrt(float(self.numel.sum()))))
        return ones

    def guide_share(self, t: int) -> float:
        """Share of the squared norm of update ``t``'s direction that comes from the guide ``prev``, the rest from the
        noise. A guided tensor's direction is ``r (d prev + sqrt(1 - d^2) |prev| xi_perp / |xi_perp|)``: guide part
        ``(r d |prev|)^2``, noise part ``r^2 (1 - d^2) |prev|^2``, exactly; an unguided tensor is all noise, ``r xi``,
        counted at ``|xi|^2 = numel``, its expected value (``r``: :meth:`_scale_ratio`). With ``blocks`` other than
        ``"whole"`` the guide part is its expectation over the block weights (``E[s_b^2] = 1``)."""
        d = self.mixing(t)
        norms = torch.tensor(self.prev_norm, dtype=torch.float64)
        guided = torch.tensor(self.guided)
        r = self._scale_ratio()
        guide_sq = float(torch.where(guided, (r * d * norms) ** 2, torch.zeros_like(norms)).sum())
        noise_sq = float(torch.where(guided, r ** 2 * (1 - d * d) * norms ** 2, r ** 2 * self.numel).sum())
        return guide_sq / (guide_sq + noise_sq) if guide_sq + noise_sq > 0 else 0.0

    def coefficients(self, seed: int):
        """``(a, c, e)`` of ``z(seed) = a*prev + c*xi + e*delta`` per tensor, after ``prepare(seed)``."""
        return self._cache[seed]

    def z_bound(self, seed: int) -> torch.Tensor:
        """Per tensor (float64), an upper bound on ``|z|`` of every element after ``prepare(seed)``:
        ``|a| max|prev| + |c| max|xi| + |e| max|delta|``, a guide's largest element bounded by its L2 norm, known
        since ``bind``: no pass over the guides. That is loose by up to sqrt(numel) for a spread-out guide, which
        matters only for an update within that factor of the weights' largest value."""
        a, c, e = self._cache[seed]
        prev_norm = torch.tensor(self.prev_norm, dtype=torch.float64)
        delta_norm = torch.tensor(self.delta_sq, dtype=torch.float64).sqrt()
        return a.abs() * prev_norm + c.abs() * super().z_bound(seed) + e.abs() * delta_norm

    def apply(self, params, streams, terms, decay, offsets=None):
        prev_c = sum(coef * self._cache[s][0] for s, coef in terms)
        noise = [(s, coef * self._cache[s][1]) for s, coef in terms]
        delta_c = sum(coef * self._cache[s][2] for s, coef in terms)
        groups = self._groups()
        for idx, has_prev, has_delta in groups:
            ts, ss = [params[i] for i in idx], [streams[i] for i in idx]
            guides = []
            if has_prev:
                guides.append(([self.prev[i] for i in idx], prev_c[idx].float()))
            if has_delta:
                guides.append(([self.delta[i] for i in idx], delta_c[idx].float()))
            guided_perturb_(ts, noise=[(s, c[idx].float()) for s, c in noise], guides=guides,
                            decay=decay[idx].float(), dist=self.dist, streams=ss, impl=self.impl,
                            offsets=[offsets[i] for i in idx] if offsets is not None else None)

    def _groups(self):
        """Launch groups: guides of one kind per call (dense vs LowRank), unguided tensors on their own."""
        if self._group_cache is None:
            self._group_cache = self._make_groups()
        return self._group_cache

    def _make_groups(self):
        kinds: dict = {}
        for i, (p, d) in enumerate(zip(self.prev, self.delta)):
            kind = "none" if p is None else ("lowrank" if isinstance(p, LowRank) else "dense")
            kinds.setdefault((kind, d is not None), []).append(i)
        return [(torch.tensor(idx), kind != "none", has_d) for (kind, has_d), idx in kinds.items()]

    def state_dict(self) -> dict:
        return {"name": self.name, "dist": self.dist, "t": self.t, "d0": self.d0, "schedule": self.schedule,
                "scale": self.scale, "blocks": self.blocks}

    def load_state_dict(self, state: dict) -> None:
        _check_name(self, state)
        _check_same(self, {"blocks": state.get("blocks", "whole"), "scale": state.get("scale", self.scale),
                           "schedule": state.get("schedule", self.schedule), "d0": state.get("d0", self.d0),
                           "dist": state.get("dist", self.dist)})
        t = state.get("t")
        if not (isinstance(t, int) and not isinstance(t, bool) and t >= 0):
            raise ValueError(f"the {self.name} sampler state has t={t!r}: not a count of updates")
        self.t = t


class RankGuided(Targeted):
    """:class:`Targeted` with guides held as rank-``rank`` factors of each matrix (``torch.svd_lowrank``, seeded).

    Factors are computed once, when the optimiser binds the sampler; a guide then costs ``rank*(m+n)`` numbers
    instead of ``m*n``. Vectors (biases, norms) keep dense guides: they are small. At full rank this is Targeted
    up to the SVD's rounding.
    """

    name = "rank_guided"

    def __init__(self, prev, reward_delta=None, *, rank: int = 8, svd_seed: int = 0, **kwargs):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(prev, reward_delta, **kwargs)
        self.rank, self.svd_seed = rank, svd_seed

    def _make_guide(self, tensor, param):
        if isinstance(tensor, LowRank) or tensor.dim() != 2:
            return super()._make_guide(tensor, param)
        lr = LowRank.from_matrix(tensor.to(param.device), self.rank, seed=self.svd_seed,
                                 dtype=self.guide_dtype or param.dtype)
        return lr

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        _check_name(self, state)
        _check_same(self, {"rank": state.get("rank", self.rank)})
        super().load_state_dict(state)


class Core:
    """Directions in a small subspace: each tensor ``i`` with a basis ``U_i [m, k]`` (orthonormal columns) moves along
    ``U_i @ xi_i``, ``xi_i [k, n]`` the spec's Gaussians of (seed, the tensor's stream); tensors without a basis do not
    move. The whole direction is scaled to norm 1 (as ``scale="unit"``), so ``eps`` and a step ``lr * g`` are
    distances in weight space whatever the number of dimensions ``sum_i k_i * n_i``.

    For a LoRA pair ``(A [r, in], B [out, r])`` with ``U`` the top-``r`` left singular vectors of the base weight
    (LoRA-XS, Balazy et al. 2024) the update is ``s * U xi A``: an ``r x r`` core between frozen factors, ``r^2``
    numbers a module instead of ``r * (out + in)``. Directions are formed per tensor by a matmul on the parameters'
    device (small: ``m * k * n`` multiply-adds), not inside the fused kernels; unsharded tensors only.
    """

    name = "core"
    supports_weight_decay = True

    def __init__(self, bases: Mapping[str, torch.Tensor], diagonal: bool = False):
        """``diagonal``: ``xi`` is a diagonal ``k x k`` matrix (``k == n``), so each tensor moves along ``U diag(xi)``:
        ``k`` numbers a tensor (for LoRA, its r singular values between frozen factors, as ESSA)."""
        self.bases_src = dict(bases)
        self.diagonal = bool(diagonal)
        self.name = "singular" if self.diagonal else "core"  # the metrics' mode: zo-core or zo-singular
        self._cache: dict = {}

    def bind(self, names, params):
        unknown = sorted(set(self.bases_src) - set(names))
        if unknown:
            raise ValueError(f"core bases name parameters the optimiser does not have: {unknown[:5]}")
        if not self.bases_src:
            raise ValueError("core: no basis given, so no parameter could move")
        self.bases, self.shapes = [], []
        for name, p in zip(names, params):
            u = self.bases_src.get(name)
            if u is not None:
                if u.dim() != 2 or p.dim() != 2 or u.shape[0] != p.shape[0] or u.shape[1] > p.shape[0]:
                    raise ValueError(f"core basis of {name!r} has shape {tuple(u.shape)}: it must be [m, k] with "
                                     f"k <= m for a parameter [m, n], got {tuple(p.shape)}")
                if self.diagonal and u.shape[1] != p.shape[1]:
                    raise ValueError(f"diagonal core basis of {name!r} has {u.shape[1]} columns: it must have as many "
                                     f"as the parameter {tuple(p.shape)}")
                u = u.detach().to(device=p.device, dtype=torch.float32).contiguous()
                self.shapes.append((u.shape[1], p.shape[1]))
            else:
                self.shapes.append(None)
            self.bases.append(u)
        self.dims = sum(k if self.diagonal else k * n for k, n in (s for s in self.shapes if s is not None))
        del self.bases_src

    def _xi(self, seed: int, i: int, stream: int) -> torch.Tensor:
        k, n = self.shapes[i]
        if self.diagonal:
            return torch.diag(rng.gaussian(seed, stream, 0, k, device=self.bases[i].device))
        return rng.gaussian(seed, stream, 0, k * n, device=self.bases[i].device).view(k, n)

    def prepare(self, seed: int) -> None:
        """The direction's norm and largest element (one small matmul a tensor): its scale to norm 1 and its bound."""
        sq, largest = 0.0, 0.0
        for i, u in enumerate(self.bases):
            if u is not None:
                z = u @ self._xi(seed, i, i)
                sq += float(z.double().pow(2).sum())
                largest = max(largest, float(z.abs().max()))
        scale = 1.0 / math.sqrt(sq) if sq > 0 else 0.0
        self._cache.pop(seed, None)
        self._cache[seed] = (scale, largest * scale)

    def advance(self) -> None:
        """Keep only the last direction's numbers (the next step's first pass restores it)."""
        if len(self._cache) > 1:
            last = next(reversed(self._cache))
            self._cache = {last: self._cache[last]}

    def guide_share(self, t: int) -> float:
        return 0.0

    def z_bound(self, seed: int) -> float:
        """The largest ``|z|`` element of direction ``seed``, measured by :meth:`prepare` (plus float32 rounding)."""
        return self._cache[seed][1] * (1 + 1e-6)

    def coefficients(self, seed: int):
        raise ValueError("core directions cannot move quantised codes: use them on float parameters")

    def direction(self, seed: int, i: int, stream: int) -> torch.Tensor | None:
        """Tensor ``i``'s part of direction ``seed`` (float32, norm-1 scaled), or None where it has no basis."""
        if self.bases[i] is None:
            return None
        return (self.bases[i] @ self._xi(seed, i, stream)) * self._cache[seed][0]

    def apply(self, params, streams, terms, decay: torch.Tensor, offsets=None) -> None:
        """``w = decay*w + sum_k coef_k * z(seed_k)`` per tensor, in float32, rounded once to the weight's type."""
        if offsets is not None:
            raise ValueError("core directions take whole tensors, not DTensor shards")
        with torch.no_grad():
            for i, p in enumerate(params):
                d = float(decay[i])
                if self.bases[i] is None:
                    if d != 1.0:
                        p.copy_(p.float() * d)
                    continue
                acc = p.float() * d if d != 1.0 else p.float()
                for seed, coef in terms:
                    acc = acc + float(coef[i]) * self.direction(seed, i, streams[i])
                p.copy_(acc)

    def state_dict(self) -> dict:
        return {"name": self.name, "dims": self.dims, "diagonal": self.diagonal}

    def load_state_dict(self, state: dict) -> None:
        _check_name(self, state)
        _check_same(self, {"dims": state.get("dims"), "diagonal": state.get("diagonal", False)})
