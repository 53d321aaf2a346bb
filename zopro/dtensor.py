"""Sharded parameters for :class:`zopro.optim.ZOOptimizer`: DTensors on a 1-D device mesh, each rank perturbing only
its own shard.

The noise is a pure function of (seed, stream, element index) (:mod:`zokernels.rng`), so a rank that holds elements
``[o, o + n)`` of a parameter draws exactly ``z[o:o + n]`` of the whole by passing ``offsets=[o]`` to the kernels:
the union of the shards sees the single-process z, element for element. The losses the closure returns are global
(a DTensor model's forward does its own collectives; a loss that is still a ``Partial`` DTensor is reduced by
:func:`as_float`, since ``float()`` of one reads this rank's share only), so the projected gradient, and with it
every coefficient of every pass, is the same on every rank; nothing but the model's own forward and these scalars
crosses the network. A run on N ranks therefore ends with the single-process weights, bit for bit when its losses
are the single process's (they are when the forward's reductions run in one order, e.g. on all-gathered weights as
FSDP2's; a forward with sharded reductions reassociates sums, and the weights then follow its losses), and its log
replays in a single process.

Supported: ``Shard(dim)`` where every dimension before ``dim`` has size 1 (so each rank holds one contiguous range of
the row-major flat tensor: ``Shard(0)`` always), uneven and empty shards included; ``Replicate()`` (every rank
updates its whole copy identically); plain tensors beside DTensors (treated as replicated); the Isotropic, Targeted
and RankGuided samplers. Refused with a ValueError: meshes of more than one dimension, ``Partial`` placements, other
``Shard`` dimensions (their local block is strided in the flat tensor: redistribute to ``Shard(0)``), parameters on
different meshes, and DTensor guides for RankGuided (its factors come from an SVD of the whole matrix).

Targeted takes its guides whole (plain tensors, the same on every rank: each rank then keeps its part, but holds the
whole while the sampler binds) or as DTensors placed as their parameters (only the shard is ever held; the norms are
all-reduced). Each direction's guide dots (``delta . xi``, ``|xi|^2``) are summed over the ranks by one all-reduce of
two float64 numbers per tensor. Those sums are reassociated against a single process: a coefficient may differ in
its last float32 bit, so a Targeted run matches one process within one unit in the last place of the weights per
pass, not bit for bit in general (it was bit for bit in the 2-rank test, whose coefficients rounded alike).
RankGuided takes whole guides: every rank computes the same factors (a seeded SVD of the same matrix) and keeps the
rows of ``u`` matching its rows of a matrix (or the rows of ``v`` matching its piece of a one-row matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zokernels.guided import LowRank


def _dtensor_types():
    """``(DTensor, Shard, Replicate)``, or None where torch.distributed.tensor is unavailable (then no parameter can
    be a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    return DTensor, Shard, Replicate


SAMPLERS = ("isotropic", "targeted", "rank_guided")


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    types = _dtensor_types()
    return t.to_local() if types is not None and isinstance(t, types[0]) else t


def as_float(loss) -> float:
    """A closure's loss as a Python float: a DTensor is reduced to its full value first (``float()`` of a ``Partial``
    DTensor, such as a sum over a sharded tensor, returns this rank's share only)."""
    types = _dtensor_types()
    if types is not None and isinstance(loss, types[0]):
        loss = loss.full_tensor()
    return float(loss)


@dataclass(frozen=True)
class ShardLayout:
    """What this rank holds of each parameter: its local tensor (the DTensor's shard, or a plain tensor itself) and
    the global flat index of that tensor's first element. ``sharded[i]`` tells whether parameter ``i`` is split
    across ranks (a sum over it needs an all-reduce) or whole on every rank."""

    names: list[str]
    locals: list
    offsets: list[int]
    sharded: list[bool]
    mesh: object

    def bind(self, sampler) -> None:
        """After ``sampler.bind``: a Targeted sampler keeps only this rank's part of each guide and sums its guide
        dots over the ranks (Isotropic needs nothing)."""
        if sampler.name in ("targeted", "rank_guided"):
            sampler.use_shards(self.locals, self.offsets, self.local_guide, self.sum_shards)

    def local_guide(self, i: int, guide):
        """The part of parameter ``i``'s guide that matches its local tensor: a DTensor guide's own shard (placed as
        the parameter), the flat range ``[offset, offset + numel)`` of a whole guide, or a LowRank's rows of ``u``
        (a shard of whole rows) or of ``v`` (a piece of a single row)."""
        local_ = self.locals[i]
        if isinstance(guide, LowRank):
            rows, cols = local_.shape
            start = self.offsets[i]
            if cols == guide.shape[1]:
                r0 = start // cols
                return LowRank(guide.u[r0:r0 + rows].contiguous(), guide.v)
            c0 = start % guide.shape[1]  # flat_offset admits a column piece only of a matrix with one row
            return LowRank(guide.u, guide.v[c0:c0 + cols].contiguous())
        types = _dtensor_types()
        if types is not None and isinstance(guide, types[0]):
            return guide.to_local().contiguous()  # placed as the parameter: checked by layout()
        o = self.offsets[i]
        return guide.reshape(-1)[o:o + local_.numel()].reshape(local_.shape).contiguous()

    def sum_shards(self, dots: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums ``(len(locals), k)`` (CPU float64) added over the ranks for sharded tensors (one
        all-reduce), left as they are for whole ones. Every rank gets the same bits (the collective's result is one
        value); against a single process the sums are reassociated (about 1e-16 relative)."""
        import torch.distributed as dist

        split = torch.tensor(self.sharded)[:, None]
        total = torch.where(split, dots, torch.zeros_like(dots)).to(self.mesh.device_type)
        dist.all_reduce(total, group=self.mesh.get_group())
        return torch.where(split, total.cpu(), dots)


def flat_offset(name: str, global_shape, local_shape, global_offset, placement) -> int:
    """The flat row-major index, in the whole tensor, of the local shard's first element; raises ValueError where the
    shard is not one contiguous range of the flat tensor."""
    dim = placement.dim % len(global_shape) if global_shape else 0
    whole = tuple(local_shape) == tuple(global_shape)
    if math.prod(global_shape[:dim]) != 1 and not whole and math.prod(local_shape) > 0:
        raise ValueError(f"parameter {name!r} is sharded on dim {placement.dim} of shape {tuple(global_shape)}: its "
                         "shards are strided in the flat tensor; ZOOptimizer takes Shard(0) (or a dim after leading "
                         "size-1 dims): redistribute it")
    strides = [math.prod(global_shape[i + 1:]) for i in range(len(global_shape))]
    return sum(o * s for o, s in zip(global_offset, strides))


def layout(names: list[str], params: list[torch.Tensor], sampler) -> ShardLayout | None:
    """The layout of ``params`` (None when none is a DTensor: the unsharded path). Everything is checked before
    anything is used: a 1-D mesh shared by every DTensor, ``Shard``/``Replicate`` placements with contiguous local
    shards, and a sampler that supports sharded parameters (ValueError naming the parameter or sampler)."""
    types = _dtensor_types()
    if types is None or not any(isinstance(p, types[0]) for p in params):
        return None
    dtensor, shard, replicate = types
    if getattr(sampler, "name", None) not in SAMPLERS:
        raise ValueError(f"sampler {getattr(sampler, 'name', type(sampler).__name__)!r} does not support DTensor "
                         f"parameters: use one of {SAMPLERS}")
    if sampler.name == "rank_guided":
        given = {**sampler.prev_src, **sampler.delta_src}  # the guides as given, before bind
        if any(isinstance(g, dtensor) for g in given.values()):
            raise ValueError("RankGuided takes whole guides (plain tensors) with DTensor parameters: its factors come "
                             "from an SVD of the whole matrix, which a DTensor guide would need gathered first")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    locals_, offsets, sharded, mesh = [], [], [], None
    for name, p in zip(names, params):
        if not isinstance(p, dtensor):
            locals_.append(p)
            offsets.append(0)
            sharded.append(False)
            continue
        if p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {name!r} lives on a {p.device_mesh.ndim}-D device mesh; ZOOptimizer takes "
                             "a 1-D mesh")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} lives on another device mesh than the first DTensor parameter: "
                             "one mesh per optimiser")
        placement = p.placements[0]
        local = p.to_local()
        if not local.is_contiguous():
            raise ValueError(f"parameter {name!r}'s local shard (shape {tuple(local.shape)}) is not contiguous")
        if isinstance(placement, replicate):
            offsets.append(0)
            sharded.append(False)
        elif isinstance(placement, shard):
            local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            assert tuple(local_shape) == tuple(local.shape), (name, local_shape, local.shape)
            offsets.append(flat_offset(name, tuple(p.shape), tuple(local.shape), global_offset, placement))
            sharded.append(True)
        else:
            raise ValueError(f"parameter {name!r} has placement {placement}; ZOOptimizer takes Shard(dim) or "
                             "Replicate()")
        locals_.append(local)
    if sampler.name == "targeted":  # before sampler.bind consumes the guides: a refusal leaves the sampler as it was
        for name, local in zip(names, locals_):
            for g in (sampler.prev_src.get(name), sampler.delta_src.get(name)):
                if isinstance(g, dtensor) and tuple(g.to_local().shape) != tuple(local.shape):
                    raise ValueError(f"a guide of parameter {name!r} is a DTensor whose local shard has shape "
                                     f"{tuple(g.to_local().shape)}, the parameter's {tuple(local.shape)}: place it "
                                     "as the parameter")
    return ShardLayout(list(names), locals_, offsets, sharded, mesh)
