"""One weight pass of each perturbation op over real model shapes, against the MeZO loop and a plain copy.

Lists (``benchmarks/shapes.py``): on CUDA the Llama-3.2-1B weights in bf16 and its r=64 LoRA adapters in fp32; on
CPU a SmolLM2-135M-shaped r=8 LoRA list and a 4 M-element fp32 list. Ops, each one pass over the list:

* ``copy``: the bandwidth reference, ``dst.copy_(src)`` over the list's bytes;
* ``mezo``: ``benchmarks.baselines.mezo_perturb_`` (torch's generator, one ``z`` per tensor);
* ``perturb_/{gaussian,rademacher}`` and ``perturb2_/{gaussian,rademacher}`` with ``impl="auto"``: Triton on CUDA,
  the torch reference on CPU;
* ``guided_perturb_/dense`` (one noise term and one dense guide of the list's dtype: reads the guide too),
  ``guided_perturb_/lowrank8`` (two rank-8 LowRank guides on the matrices, none on vectors: the guides' bytes are
  negligible) and ``guide_dot/dense`` (reads only the guide), all Gaussian, the ZOPrO ops of ``zokernels.guided``.

Figures (time, GB/s, % of copy, speed-up per pass and per SPSA step) go to ``benchmarks/results/`` at the end of
the session; see ``benchmarks/conftest.py`` for how they are measured.
"""

import pytest
import torch

from benchmarks.baselines import mezo_perturb_
from benchmarks.common import copy_pass
from zokernels import perturb2_, perturb_
from zokernels.guided import LowRank, guide_dot, guided_perturb_

SEED_A, SEED_B = 1234, 5678
EPS = 1e-3  # MeZO's default perturbation scale; weights stay far from overflow after hundreds of passes

OPS = ("copy", "mezo", "perturb_/gaussian", "perturb_/rademacher", "perturb2_/gaussian", "perturb2_/rademacher")
GUIDED_OPS = ("guided_perturb_/dense", "guided_perturb_/lowrank8", "guide_dot/dense")


def one_pass(op: str, tensors):
    if op == "mezo":
        return lambda: mezo_perturb_(tensors, SEED_A, EPS)
    name, dist = op.split("/")
    if name == "perturb_":
        return lambda: perturb_(tensors, SEED_A, EPS, dist=dist, impl="auto")
    # SPSA's restore (+eps z) fused with the update (-lr g z'): two seeds, one pass
    return lambda: perturb2_(tensors, SEED_A, EPS, SEED_B, -EPS, dist=dist, impl="auto")


@pytest.mark.parametrize("op", OPS)
def test_pass(op, tensor_list, weights, device, measure, record):
    fn = copy_pass(tensor_list.nbytes, device) if op == "copy" else one_pass(op, weights)
    record(tensor_list, op, measure(fn), impl="copy" if op == "copy" else _impl(op, device))


def _impl(op: str, device) -> str:
    """Which implementation ran: ``torch`` for the MeZO loop, else what ``impl="auto"`` resolves to on ``device``."""
    if op == "mezo":
        return "torch (MeZO loop)"
    from zokernels._common import resolve_impl  # the one place "auto" is resolved; reported, not re-derived

    return resolve_impl("auto", device)


@pytest.fixture(scope="module")
def guides(weights):
    """Per tensor: a dense guide (same shape and dtype), and a rank-8 LowRank on matrices (None on vectors)."""
    with torch.random.fork_rng(devices=[w.device for w in weights[:1] if w.device.type == "cuda"]):
        torch.manual_seed(0)
        dense = [torch.full_like(w, 1e-3) for w in weights]
        lowrank = [LowRank(torch.randn(w.shape[0], 8, device=w.device) * 1e-2,
                           torch.randn(w.shape[1], 8, device=w.device) * 1e-2) if w.dim() == 2 else None
                   for w in weights]
    return dense, lowrank


@pytest.mark.parametrize("op", GUIDED_OPS)
def test_guided_pass(op, tensor_list, weights, guides, device, measure, record):
    dense, lowrank = guides
    n = len(weights)
    x = torch.full((n,), EPS)
    if op == "guided_perturb_/dense":
        def fn():
            guided_perturb_(weights, noise=[(SEED_A, x)], guides=[(dense, x)], impl="auto")
        moved = 3 * tensor_list.nbytes  # weights read and written, the guide read
    elif op == "guided_perturb_/lowrank8":
        def fn():
            guided_perturb_(weights, noise=[(SEED_A, x)], guides=[(lowrank, x), (lowrank, -x)], impl="auto")
        moved = 2 * tensor_list.nbytes
    else:
        def fn():
            guide_dot(weights, dense, SEED_A, impl="auto")
        moved = tensor_list.nbytes  # only the guide is read
    record(tensor_list, op, measure(fn), impl=_impl(op, device), bytes_moved=moved)
