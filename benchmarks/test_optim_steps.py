"""The perturbation work of one ZO optimiser step, per sampler, against MeZO's four torch passes.

The closure returns a constant, so a step's time is its weight passes alone (what ``ZOOptimizer`` adds on top of
the two forward passes a step needs anyway). Ops, per list (``benchmarks/shapes.py``):

* ``mezo``: MeZO's step, four passes of ``benchmarks.baselines.mezo_perturb_`` (+eps z, -2 eps z, +eps z, -lr g z);
* ``isotropic/step``: ``ZOOptimizer.step`` (3 passes); ``isotropic/step_many``: ``step_many`` over 8 closures,
  per step (2 passes + 1 at the end);
* ``targeted/step``: ZOPrO's direction from dense guides (``prev``, reward delta) of the weights' shapes and dtype:
  one reduction pass reading the reward delta, then 3 weight passes that each also read both guides;
* ``rank_guided/step``: the same with rank-8 guides (k(m+n) numbers per matrix).

``bytes`` is what a step must move: each weight pass reads and writes the weights (+ the guides it reads), so
"% of copy" is the bandwidth reached over those bytes as a fraction of ``dst.copy_(src)``'s.
"""

import pytest
import torch

from benchmarks.baselines import mezo_perturb_
from benchmarks.common import copy_pass
from zopro import Isotropic, RankGuided, Targeted, ZOOptimizer

EPS, LR = 1e-3, 1e-6
MANY = 8
OPS = ("copy", "mezo", "isotropic/step", "isotropic/step_many", "targeted/step", "rank_guided/step")


def _guides(weights, seed):
    g = torch.Generator(device=weights[0].device).manual_seed(seed)
    return {f"p{i}": torch.randn(w.shape, generator=g, device=w.device, dtype=torch.float32).to(w.dtype) * 1e-3
            for i, w in enumerate(weights)}


def _optimizer(op, named):
    weights = list(named.values())
    if op.startswith("isotropic"):
        sampler = Isotropic()
    else:
        kind = Targeted if op.startswith("targeted") else RankGuided
        extra = {"rank": 8} if kind is RankGuided else {}
        sampler = kind(_guides(weights, 1), _guides(weights, 2), schedule="constant", **extra)
    return ZOOptimizer(named, lr=LR, eps=EPS, sampler=sampler, seed=3)


def _step_fn(op, weights):
    if op == "mezo":
        def mezo_step():
            for scale in (EPS, -2 * EPS, EPS):
                mezo_perturb_(weights, 7, scale)
            mezo_perturb_(weights, 7, -LR * 0.5)
        return mezo_step, 4, 0
    named = {f"p{i}": w for i, w in enumerate(weights)}
    opt = _optimizer(op, named)
    guide_bytes = 0
    if not op.startswith("isotropic"):
        sampler = opt.sampler
        guide_bytes = sum(
            (g.u.numel() + g.v.numel()) * g.u.element_size() if hasattr(g, "u") else g.numel() * g.element_size()
            for g in sampler.prev + sampler.delta if g is not None)
    if op == "isotropic/step_many":
        return (lambda: opt.step_many([lambda: 0.0] * MANY)), (2 * MANY + 1) / MANY, 0
    return (lambda: opt.step(lambda: 0.0)), 3, guide_bytes


@pytest.mark.parametrize("op", OPS)
def test_step(op, tensor_list, weights, device, measure, record):
    if op == "copy":
        record(tensor_list, op, measure(copy_pass(tensor_list.nbytes, device)), impl="copy", passes=1)
        return
    fn, passes, guide_bytes = _step_fn(op, weights)
    timing = measure(fn)
    if timing is not None and op == "isotropic/step_many":
        timing = {**timing, "seconds": timing["seconds"] / MANY, "min_seconds": timing["min_seconds"] / MANY}
    # weights read + written per pass; guides read by every weight pass plus the reduction pass (delta only)
    moved = passes * 2 * tensor_list.nbytes + (passes * guide_bytes + guide_bytes // 2 if guide_bytes else 0)
    record(tensor_list, op, timing, impl="torch (MeZO loop)" if op == "mezo" else "zopro", passes=passes,
           bytes_moved=moved, guide_bytes=guide_bytes)
