"""Guide terms of the code-space ops: the ``(guide_list, coef)`` pairs of :func:`zokernels.guided_perturb_`, checked
and rebuilt chunk by chunk for the torch references.

A code-space op moves a weight by ``step = eps[t]*z + sum_g coef_g[t]*guide_g`` in weight units before it rounds
the step to codes. So that the torch reference and the Triton kernel round the same float32 step to the same codes,
both compute it in one order with one rounding per product and per sum: ``eps*z``, then ``+ coef*guide`` per guide;
a :class:`~zokernels.guided.LowRank` element is ``((0 + u0*v0) + u1*v1) + ...`` in rank order, as the kernels'
rank loop adds it (a matmul, which sums in an order of its own, could flip a stochastic rounding).
"""

from __future__ import annotations

import torch

from zokernels.guided import MAX_GUIDES, LowRank, _check_coef, _check_guides


def shadow(shape, device) -> torch.Tensor:
    """A zero-stride float32 tensor of ``shape``: what guide checks compare a packed weight's guides with."""
    return torch.zeros((), dtype=torch.float32, device=device).expand(*shape)


def check_guide_terms(guides, shadows: list[torch.Tensor]) -> list[tuple[list, torch.Tensor]]:
    """``guides``: up to MAX_GUIDES ``(guide_list, coef)`` pairs, each guide None, a dense tensor of its weight's
    shape or a LowRank, ``coef`` a finite 1-D float tensor with one entry per weight. Raises before anything moves."""
    guides = list(guides)
    if len(guides) > MAX_GUIDES:
        raise ValueError(f"at most {MAX_GUIDES} guide terms per call, got {len(guides)}")
    out = []
    for k, term in enumerate(guides):
        if not isinstance(term, (tuple, list)) or len(term) != 2:
            raise TypeError(f"guides[{k}] must be a (guide_list, coef) pair")
        gs, c = list(term[0]), term[1]
        _check_guides(gs, shadows, f"guides[{k}]")
        _check_coef(c, len(shadows), f"guides[{k}] coefficients")
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"guides[{k}] coefficients must be finite")
        out.append((gs, c.detach().to(torch.float32).cpu()))
    if len({isinstance(g, LowRank) for gs, _ in out for g in gs if g is not None}) > 1:
        raise ValueError("guides mix dense and LowRank guides; pass one kind per call")
    return out


def lowrank_rows(g: LowRank, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0 .. r1-1`` of ``u @ v.T`` in float32, each element summed rank by rank from +0 (the kernels' order)."""
    u, v = g.u[r0:r1].float(), g.v.float()
    acc = torch.zeros(r1 - r0, v.shape[0], dtype=torch.float32, device=u.device)
    for r in range(g.rank):
        acc += u[:, r, None] * v[None, :, r]  # the product is rounded, then added: two roundings, no FMA
    return acc


def guide_chunk(g, cols: int, s: int, e: int) -> torch.Tensor:
    """Flat elements ``s .. e-1`` of guide ``g`` (dense: of any shape; LowRank: of a matrix with ``cols`` columns),
    float32."""
    if isinstance(g, LowRank):
        r0, r1 = s // cols, -(-e // cols)
        return lowrank_rows(g, r0, r1).reshape(-1)[s - r0 * cols:e - r0 * cols]
    return g.reshape(-1)[s:e].float()


def add_guides(y: torch.Tensor, guides, t: int, cols: int, s: int, e: int) -> torch.Tensor:
    """``y + sum_g coef_g[t] * guide_g[t][s:e]`` (guides that are None add nothing), one rounding per op."""
    for gs, coef in guides:
        if gs[t] is not None:
            y = y + guide_chunk(gs[t], cols, s, e) * float(coef[t])
    return y
