"""Sharded parameters for :class:`zopro.optim.ZOOptimizer`: DTensors on a 1-D device mesh, each rank perturbing only
its own shard.

The noise is a pure function of (seed, stream, element index) (:mod:`zokernels.rng`), so a rank that holds elements
``[o, o + n)`` of a parameter draws exactly ``z[o:o + n]`` of the whole by passing ``offsets=[o]`` to the kernels:
the union of the shards sees the single-process z, element for element. The losses the closure returns are global
(a DTensor model's forward does its own collectives, and a replicated scalar converts to the same float on every
rank), so the projected gradient, and with it every coefficient of every pass, is the same on every rank; nothing
but the model's own forward crosses the network. A run on N ranks therefore ends with the single-process weights,
bit for bit when its losses are the single process's (they are when the forward's reductions run in one order,
e.g. on gathered weights; a forward with sharded reductions reassociates sums, and the weights then follow its
losses), and its log replays in a single process.

Supported: ``Shard(dim)`` where every dimension before ``dim`` has size 1 (so each rank holds one contiguous range of
the row-major flat tensor: ``Shard(0)`` always), uneven and empty shards included; ``Replicate()`` (every rank
updates its whole copy identically); plain tensors beside DTensors (treated as replicated). Refused with a
ValueError: meshes of more than one dimension, ``Partial`` placements, other ``Shard`` dimensions (their local
block is strided in the flat tensor: redistribute to ``Shard(0)``), parameters on different meshes, and the guided
samplers (their guide norms and dots are sums over whole tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _dtensor_types():
    """``(DTensor, Shard, Replicate)``, or None where torch.distributed.tensor is unavailable (then no parameter can
    be a DTensor)."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    return DTensor, Shard, Replicate


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, any other tensor itself."""
    types = _dtensor_types()
    return t.to_local() if types is not None and isinstance(t, types[0]) else t


@dataclass(frozen=True)
class ShardLayout:
    """What this rank holds of each parameter: its local tensor (the DTensor's shard, or a plain tensor itself) and
    the global flat index of that tensor's first element. ``sharded[i]`` tells whether parameter ``i`` is split
    across ranks (a sum over it needs an all-reduce) or whole on every rank."""

    locals: list
    offsets: list[int]
    sharded: list[bool]
    mesh: object


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
    if getattr(sampler, "name", None) != "isotropic":
        raise ValueError(f"sampler {getattr(sampler, 'name', type(sampler).__name__)!r} does not support DTensor "
                         "parameters (its guide norms and dots are sums over whole tensors): use Isotropic")
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
    return ShardLayout(locals_, offsets, sharded, mesh)
