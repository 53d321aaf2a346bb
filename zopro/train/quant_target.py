"""``--zo-target scales | codes``: the ZO iterations of a run move the quantised base itself
(:mod:`zopro.quantised`) instead of the policy adapter.

The base's bitsandbytes layers form one :class:`~zopro.quantised.CodeSpace` for the whole run, built when the models
are loaded (its NF4 forward then also keeps bitsandbytes' eval-mode CPU path from repacking the codes). Each ZO
iteration gets an optimiser over its codes (or scales) from :func:`make_quant_optimizer`; for the scales, each guide
below is pulled back onto them (``J^T guide``, :func:`zokernels.quant.scale_guide`).

The guide of a base matrix is what the first-order iteration taught the policy adapter: LoRA's update of the
matrix is exactly ``scaling * B @ A``, already factored, so the guide is the
:class:`~zokernels.guided.LowRank` ``(scaling * B, A.T)`` (rank r; no SVD, no dense temporary). The policy adapter
does not move during code-space iterations, so that guide carries through them. The reward model's update over the
previous iteration, in base space, is ``scaling * (B A - B0 A0)`` with ``B0 = B - dB``, ``A0 = A - dA`` from the
run's guides: rank 2r, factored as ``([sB, -sB0], [A.T, A0.T])``.

Semantics to know: the reference policy (adapters disabled) and the reward adapter sit on the same base, so they
move with it; the KL term then measures the adapter's share only. That is the price of holding one quantised model.
"""

from __future__ import annotations

import torch

from zokernels.guided import LowRank
from zokernels.quant import NF4Weight, int8_code_perturb_, nf4_code_update_, scale_guide
from zopro.optim import ZOOptimizer
from zopro.quantised import CodeSpace, quantised_layers
from zopro.samplers import Isotropic, RankGuided, Targeted
from zopro.seeds import RunSeeds
from zopro.train.config import ZOConfig

POLICY, REWARD = "policy", "reward"
BASE_LAYER = ".base_layer"


def code_space(bundle) -> CodeSpace:
    """The CodeSpace of every bitsandbytes layer of the bundle's base (named as in ``bundle.model``)."""
    return CodeSpace(quantised_layers(bundle.model))


def _factors(bundle, layer: str, adapter: str):
    """``(scaling, A, B)`` of ``adapter`` on the LoRA layer that wraps base layer ``layer``; None without one."""
    if not layer.endswith(BASE_LAYER):
        return None
    prefix = layer[:-len(BASE_LAYER)]
    module = bundle.model.get_submodule(prefix)
    if adapter not in getattr(module, "lora_A", {}):
        return None
    return (float(module.scaling[adapter]), module.lora_A[adapter].weight.detach().float(),
            module.lora_B[adapter].weight.detach().float(), prefix)


def adapter_guide(bundle, layer: str) -> LowRank | None:
    """The policy adapter's update of base layer ``layer``: ``scaling * B @ A`` as LowRank ``(sB, A.T)``."""
    f = _factors(bundle, layer, POLICY)
    if f is None:
        return None
    s, a, b, _ = f
    return LowRank((s * b).contiguous(), a.T.contiguous())


def reward_guide(bundle, layer: str, delta: dict[str, torch.Tensor]) -> LowRank | None:
    """The reward adapter's update of base layer ``layer`` over the previous iteration, ``s (B A - B0 A0)``, from its
    LoRA tensors' changes ``delta`` (keys as ``bundle.policy_parameters()``), as a rank-2r LowRank."""
    f = _factors(bundle, layer, REWARD)
    if f is None:
        return None
    s, a, b, prefix = f
    da, db = delta.get(f"{prefix}.lora_A.weight"), delta.get(f"{prefix}.lora_B.weight")
    if da is None or db is None:
        return None
    a0, b0 = a - da.float(), b - db.float()
    return LowRank(torch.cat([s * b, -s * b0], 1).contiguous(), torch.cat([a.T, a0.T], 1).contiguous())


def merge_adapter_(bundle, space: CodeSpace, seed: int) -> dict[str, LowRank]:
    """``--zo-merge-adapter``: add each layer's policy update ``scaling * B @ A`` to its codes (NF4: the stochastic
    requantisation of :func:`nf4_code_update_`; int8: a stochastically rounded code step; both unbiased, drawn from
    ``seed``), then zero the policy adapter's B. Returns the merged updates (the guides the ZO iterations keep)."""
    merged = {}
    for t, name in enumerate(space.names):
        g = adapter_guide(bundle, name)
        if g is None:
            continue
        w, guides = space.weights[name], [([g], torch.ones(1))]
        if isinstance(w, NF4Weight):
            sat = nf4_code_update_(w, seed, 0.0, rounding_seed=seed, stream=t, guides=guides, impl=space.impl)
        else:
            sat = int8_code_perturb_(w, seed, 0.0, rounding_seed=seed, streams=[t], guides=guides, impl=space.impl)
        space.saturated["update"] += sat
        with torch.no_grad():
            bundle.model.get_submodule(name[:-len(BASE_LAYER)]).lora_B[POLICY].weight.zero_()
        merged[name] = g
    return merged


def lowrank_tensors(guides: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """LowRank guides as flat tensors (``<name>.u``, ``<name>.v``) for a checkpoint; :func:`lowrank_from_tensors`
    inverts it."""
    return {f"{n}.{k}": getattr(g, k).detach().clone() for n, g in guides.items() for k in ("u", "v")}


def lowrank_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, LowRank]:
    names = sorted({k[:-2] for k in tensors})
    return {n: LowRank(tensors[f"{n}.u"], tensors[f"{n}.v"]) for n in names}


def base_guides(bundle, space: CodeSpace, guides, merged: dict[str, LowRank] | None = None) -> tuple[dict, dict]:
    """``(prev, delta)`` guides of the space's layers (see the module docstring); layers without a LoRA wrapper
    get none (isotropic noise for them). ``merged``: the updates :func:`merge_adapter_` moved into the base, which
    replace the (zeroed) adapter's product as ``prev``."""
    prev, delta = {}, {}
    for name in space.names:
        g = merged.get(name) if merged is not None else adapter_guide(bundle, name)
        if g is not None:
            prev[name] = g
        if guides is not None and bundle.shares_parameter_space:
            d = reward_guide(bundle, name, guides.delta)
            if d is not None:
                delta[name] = d
    return prev, delta


def make_quant_optimizer(bundle, space: CodeSpace, target: str, zo: ZOConfig, iteration: int, guides,
                         seeds: RunSeeds, merged: dict[str, LowRank] | None = None) -> ZOOptimizer:
    """The ZO optimiser of ``iteration`` over the base's codes (``target="codes"``) or scales (``"scales"``: the
    guides carried onto the scales by :func:`zokernels.quant.scale_guide`), any sampler. Seeds, schedules and lr
    decay as :func:`zopro.train.updaters.make_zo_optimizer`."""
    total = zo.updates
    decay = (lambda t: max(0.0, 1.0 - t / total)) if zo.lr_decay == "linear" else None
    kw = dict(lr=zo.lr, eps=zo.eps, seed=seeds.zo(iteration), lr_schedule=decay, q=zo.population,
              fitness=zo.fitness)
    if iteration == 0 or zo.sampler == "isotropic" or guides is None:
        direction = Isotropic(zo.noise)
    else:
        prev, delta = base_guides(bundle, space, guides, merged)
        if target == "scales":  # the same guides, pulled back onto the scales (J^T guide, zokernels.quant)
            prev = {n: scale_guide(space.weights[n], g) for n, g in prev.items()}
            delta = {n: scale_guide(space.weights[n], g) for n, g in delta.items()}
        kind = RankGuided if zo.sampler == "rank_guided" else Targeted
        extra = {"rank": zo.rank, "svd_seed": seeds.svd} if kind is RankGuided else {}
        direction = kind(prev, delta, d0=zo.d0, schedule=zo.d_schedule, tau=zo.d_tau, total_steps=total,
                         scale=zo.scale, blocks=zo.blocks, dist=zo.noise, **extra)
    if target == "scales":  # float tensors: the samplers move them directly
        return ZOOptimizer(space.scale_parameters(), sampler=direction, **kw)
    return ZOOptimizer(space.parameters(), sampler=space.sampler(direction), **kw)
