"""int8 code space: ``codes += times * delta`` on an LLM.int8 weight's codes, ``delta`` a seeded stochastic rounding of
``eps * z * 127 / SCB[row]`` to whole code steps (see :func:`int8_code_perturb_`).

Read top to bottom: the torch reference (the CPU path and the test oracle), the Triton kernel, its launcher, the
public op.
"""

from __future__ import annotations

import torch

from zokernels import _common, rng
from zokernels.guided import MAX_GUIDES, TRITON_BLOCK_LOWRANK, _guide_columns, _guide_storage, _guide_vec
from zokernels.quant.formats import INT8_MAX, Int8Weight
from zokernels.quant.guides import add_guides, check_guide_terms

# |delta| is clamped to this many code steps before rounding: any larger step saturates anyway (codes are in
# [-127, 127]), and the clamp keeps the float -> int conversion defined when a row scale is tiny.
INT8_MAX_STEP = 255.0


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference
def _int8_steps(step, words, inv_scale):
    """``delta = floor(x) + (u < x - floor(x))`` with ``x = step * (127/SCB)`` (``step = eps*z`` and any guide terms,
    in weight units) clamped to ±255, ``u`` the word's top
    24 bits / 2**24. ``x - floor(x)`` is exact in fp32 and ``u`` takes 2**24 equally likely values, so
    ``P(delta = floor(x) + 1) = ceil(frac * 2**24) / 2**24``: ``E[delta] = x`` up to 2**-24. (``floor(x + u)`` would
    round ``x + u`` first.) Returns int32."""
    x = step * inv_scale
    x = torch.where(x > INT8_MAX_STEP, INT8_MAX_STEP, torch.where(x < -INT8_MAX_STEP, -INT8_MAX_STEP, x))
    x = torch.where(x == x, x, 0.0)
    fl = torch.floor(x)
    u = (words >> 8).to(torch.float32) * 2.0**-24
    return fl.to(torch.int32) + (u < x - fl).to(torch.int32)


def _inv_scale(scb: torch.Tensor) -> torch.Tensor:
    """``127 / SCB`` (0 for an all-zero row, whose codes carry no value). Tensor / tensor: torch computes a Python
    scalar divided by a tensor as a reciprocal times the scalar, one rounding off IEEE division."""
    safe = torch.where(scb > 0, scb, torch.ones_like(scb))
    return torch.where(scb > 0, torch.full_like(scb, float(INT8_MAX)) / safe, torch.zeros_like(scb))


def _int8_torch(weights, streams, seed, eps, times, rounding_seed, dist, guides):
    saturated = torch.zeros((), dtype=torch.int64, device=weights[0].codes.device)
    for t, (w, stream) in enumerate(zip(weights, streams)):
        rows, cols = w.shape
        flat = w.codes.view(-1)
        rows_per_chunk = max(1, _common.TORCH_CHUNK // max(cols, 1))
        for r0 in range(0, rows, rows_per_chunk):
            r1 = min(rows, r0 + rows_per_chunk)
            s, e = r0 * cols, r1 * cols
            z = rng.noise(dist, seed, stream, s, e - s, device=flat.device)
            words = rng.uniform_words(rounding_seed, stream, s, e - s, rng.DOMAIN_CODES, device=flat.device)
            inv = _inv_scale(w.scb[r0:r1]).repeat_interleave(cols)
            step = add_guides(z * float(eps[t]), guides, t, cols, s, e)
            new = flat[s:e].to(torch.int32) + times * _int8_steps(step, words, inv)
            saturated += ((new > INT8_MAX) | (new < -INT8_MAX)).sum()
            flat[s:e] = new.clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return int(saturated)  # the one sync of the call


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU when TRITON_INTERPRET=1)
if _common.triton_available():
    import triton
    import triton.language as tl

    from zokernels._common import MATRIX_EXTRA_TL, table_row_tl
    from zokernels.guided import _guide_tl

    # a jit function may read a module global only as a constexpr (a plain int once failed to compile)
    MAX_GUIDES_TL = tl.constexpr(MAX_GUIDES)
    from zokernels.rng import arranged_offsets_tl, noise_arranged_tl, seed_key_tl, uniform_words_arranged_tl

    @triton.jit
    def _int8_inv_scale_tl(scb_ptr, i0, first, local, rem, cols, BLOCK: tl.constexpr, G: tl.constexpr,
                           WIDE: tl.constexpr):
        """``127 / SCB[row]`` (IEEE division, as the reference; 0 for an all-zero row) of the elements ``local`` after
        the block's first (row ``i0``, column ``first``; those with ``local < rem`` exist), rows of ``cols`` elements:
        32-bit divisions only. With ``WIDE`` (every row at least G long) a group
        of G elements spans at most two rows, so the scales are loaded and divided twice per group, not per element.
        """
        n32 = cols.to(tl.int32)
        if WIDE:
            g0 = G * tl.arange(0, BLOCK // G)  # each group's first offset
            dr = (first + g0) // n32
            boundary = (dr + 1) * n32 - (first + g0)  # the group's elements from this position on are in row + 1
            s_a = tl.load(scb_ptr + i0 + dr, mask=g0 < rem, other=1.0)
            s_b = tl.load(scb_ptr + i0 + dr + 1, mask=(boundary < G) & (g0 + boundary < rem), other=1.0)
            inv_a = tl.where(s_a > 0, tl.div_rn(tl.full(s_a.shape, 127.0, tl.float32), tl.where(s_a > 0, s_a, 1.0)),
                             0.0)
            inv_b = tl.where(s_b > 0, tl.div_rn(tl.full(s_b.shape, 127.0, tl.float32), tl.where(s_b > 0, s_b, 1.0)),
                             0.0)
            pos = local - g0[None, :, None]
            return tl.where(pos >= boundary[None, :, None], inv_b[None, :, None], inv_a[None, :, None])
        else:
            in_row = first + local
            s = tl.load(scb_ptr + i0 + in_row // n32, mask=local < rem, other=1.0)
            return tl.where(s > 0, tl.div_rn(tl.full(s.shape, 127.0, tl.float32), tl.where(s > 0, s, 1.0)), 0.0)

    @triton.jit(do_not_specialize=["s0", "s1", "s2", "s3", "r0", "r1", "r2", "r3", "times"])
    def _int8_kernel(codes_ptr, scb_ptr, gbase, table_ptr, coef_ptr, partial_ptr, s0, s1, s2, s3, r0, r1, r2, r3,
                     times, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr, VEC: tl.constexpr,
                     G: tl.constexpr, WIDE: tl.constexpr, COLS: tl.constexpr, N_GUIDES: tl.constexpr,
                     LOWRANK: tl.constexpr, GVEC: tl.constexpr):
        pid, row, offset, numel, stream, start = table_row_tl(table_ptr, COLS, BLOCK)
        offset = tl.multiple_of(offset, VEC)
        # the kernel's own columns (_int8_triton): the weight's index, the guide columns of guided.py, the offset of
        # its row scales
        coef = coef_ptr + tl.load(row + MATRIX_EXTRA_TL) * (1 + N_GUIDES)
        scb_offset = tl.load(row + MATRIX_EXTRA_TL + 1 + 4 * MAX_GUIDES_TL)
        # Arranged as in perturb (each thread computes its Philox calls once); full blocks unmasked (128-bit).
        local = arranged_offsets_tl(BLOCK, G, 16)
        rem = tl.minimum(numel - start, BLOCK).to(tl.int32)
        mask = local < rem
        full = start + BLOCK <= numel
        ptrs = codes_ptr + (offset + start) + local
        if full:
            c = tl.load(ptrs).to(tl.int32)
        else:
            c = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
        # the matrix columns of the table (_common.launch_table): NCOLS, and the block's first row and column
        inv = _int8_inv_scale_tl(scb_ptr + scb_offset, tl.load(row + 5), tl.load(row + 6).to(tl.int32), local, rem,
                                 tl.load(row + 4), BLOCK, G, WIDE)
        k0, k1 = seed_key_tl(s0, s1, s2, s3)
        # the step in weight units, rounded as the reference: eps*z, then + coef*guide per guide
        y = noise_arranged_tl(k0, k1, stream, start, BLOCK, G, 16, GAUSSIAN, FAST) * tl.load(coef)
        if N_GUIDES >= 1:
            y = y + tl.load(coef + 1) * _guide_tl(gbase, row, 0, start, local, mask, full, LOWRANK, GVEC)
        if N_GUIDES >= 2:
            y = y + tl.load(coef + 2) * _guide_tl(gbase, row, 1, start, local, mask, full, LOWRANK, GVEC)
        x = y * inv
        x = tl.where(x > 255.0, 255.0, tl.where(x < -255.0, -255.0, x))
        x = tl.where(x == x, x, 0.0)
        k0, k1 = seed_key_tl(r0, r1, r2, r3)
        u = (uniform_words_arranged_tl(k0, k1, stream, start, BLOCK, G, 16, 2) >> 8).to(tl.float32) * (
            1.0 / 16777216.0)
        fl = tl.floor(x)
        delta = fl.to(tl.int32) + (u < x - fl).to(tl.int32)
        new = c + times * delta
        saturated = ((new > 127) | (new < -127)) & mask
        new = tl.minimum(tl.maximum(new, -127), 127).to(tl.int8)
        if full:
            tl.store(ptrs, new)
        else:
            tl.store(ptrs, new, mask=mask)
        tl.store(partial_ptr + pid, tl.sum(tl.sum(tl.sum(saturated.to(tl.int32), axis=2), axis=1), axis=0))


def _int8_triton(weights, streams, seed, eps, times, rounding_seed, dist, block, guides):
    keep = [i for i, w in enumerate(weights) if w.codes.numel()]
    if not keep:
        return 0
    guide_lists = [[gs[i] for i in keep] for gs, _ in guides]
    gbase, lowrank = _guide_storage(guide_lists)
    block = block or (TRITON_BLOCK_LOWRANK if lowrank else _common.TRITON_BLOCK)
    codes = [weights[i].codes for i in keep]
    # One launch serves the whole list; each weight's row scales are found by their offset from weights[0]'s, its
    # guides by their offsets from gbase (guided.py's columns, the weight's index first).
    base_scb = weights[0].scb.data_ptr()
    gcols = _guide_columns(codes, guide_lists, gbase if gbase is not None else codes[0], [0] * len(codes))
    extra = [gc + ((weights[i].scb.data_ptr() - base_scb) // 4,) for gc, i in zip(gcols, keep)]
    table, aligned = _common.launch_table(codes, [streams[i] for i in keep], block, extra=extra, matrix=True)
    coef = torch.stack([eps[keep]] + [c[keep] for _, c in guides], dim=1).contiguous().to(codes[0].device)
    partial = torch.zeros(table.shape[0], dtype=torch.int32, device=table.device)
    device = weights[0].codes.device
    g = rng.arranged_group(dist, 1)
    # enable_fp_fusion=False: eps*z, + coef*guide, *inv and code + x must round exactly as in the torch reference.
    _int8_kernel[(table.shape[0],)](
        codes[0], weights[0].scb, gbase if gbase is not None else weights[0].scb, table, coef, partial,
        *_common.seed_pieces(seed), *_common.seed_pieces(rounding_seed), times,
        BLOCK=block, GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(device),
        VEC=16 if aligned else 1, G=g, WIDE=all(weights[i].shape[1] >= g for i in keep), COLS=table.shape[1],
        N_GUIDES=len(guides), LOWRANK=lowrank, GVEC=_guide_vec([x for gs in guide_lists for x in gs], lowrank),
        num_warps=_common.TRITON_WARPS, enable_fp_fusion=False)
    return int(partial.sum())


# ---------------------------------------------------------------------------------------------------------------------
# Public op
def _check_list(weights, cls, name: str) -> list:
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    for i, w in enumerate(weights):
        if not isinstance(w, cls):
            raise TypeError(f"{name}[{i}] must be an {cls.__name__}, got {type(w).__name__}")
        w.check()
    return weights


def _eps_vector(eps, n: int) -> torch.Tensor:
    """``eps`` (a real number, or a 1-D float tensor with one entry per weight) as float32 ``(n,)`` on the CPU."""
    if isinstance(eps, torch.Tensor) and eps.dim() == 1:
        if eps.numel() != n or not eps.is_floating_point():
            raise ValueError(f"eps must be a real number or a 1-D float tensor with one entry per weight ({n})")
        if not bool(torch.isfinite(eps).all()):
            raise ValueError("eps must be finite")
        return eps.detach().to(torch.float32).cpu()
    return torch.full((n,), _common.f32_scalar(_common.check_scale(eps, "eps")), dtype=torch.float32)


def int8_code_perturb_(weights, seed: int, eps, *, rounding_seed: int, times: int = 1,
                       dist: str = "gaussian", streams=None, guides=(), impl: str = "auto",
                       block: int | None = None) -> int:
    """In place: ``codes = clamp(codes + times * delta, -127, 127)`` on each Int8Weight's int8 codes.

    ``delta = SR(step * 127 / SCB[row])`` with ``step = eps[t] * z(seed, stream, index) + sum_g coef_g[t] *
    guide_g[t]``: the step in weight units expressed in code steps of its row, rounded to an integer by seeded
    stochastic rounding with the words ``rng.uniform_words(rounding_seed, stream, index, DOMAIN_CODES)`` (unbiased:
    ``E[delta] = x`` up to 2**-24, see ``_int8_steps``; ``|x|`` is clamped to 255 first). Rows with ``SCB = 0`` get
    ``delta = 0``. The guide terms are those of :func:`zokernels.guided_perturb_`, so Targeted and RankGuided
    directions reach the codes.

    ``delta`` depends on (seed, eps, guides and their coefficients, rounding_seed, stream, index, SCB) and not on
    ``times``, so calls with the same arguments and ``times`` summing to 0 (``+1, -1`` or SPSA's ``+1, -2, +1``)
    restore the codes bit for bit at every element that none of the calls saturated. Do not undo with ``-eps``:
    ``SR(-x) != -SR(x)`` draw by draw.

    Args:
        weights: one Int8Weight or a list (one device, no two sharing codes). ``SCB`` is read, never written.
        seed, rounding_seed: integers in [0, 2**64). eps: finite, a number or one per weight (1-D float tensor).
        times: a nonzero int. dist: ``"gaussian"`` or ``"rademacher"``. streams: one per weight, default ``0 .. n-1``.
        guides: up to two ``(guide_list, coef)`` pairs as in ``guided_perturb_``: one guide per weight (None, a
            dense tensor of its codes' shape or a :class:`~zokernels.guided.LowRank`), ``coef`` one per weight.
        impl: ``"auto" | "triton" | "torch"``. block: Triton elements per program (power of two, multiple of 128).

    Returns the number of saturated elements (whose ``codes + times*delta`` left [-127, 127]) as a Python int: the
    call's one host sync. Nothing is modified if any argument is rejected.
    """
    weights = _check_list(weights, Int8Weight, "weights")
    rng.check_seed(seed)
    rng.check_seed(rounding_seed, "rounding_seed")
    eps = _eps_vector(eps, len(weights))
    if isinstance(times, bool) or not isinstance(times, int) or times == 0 or abs(times) > 2**20:
        raise ValueError(f"times must be a nonzero int of magnitude at most 2**20, got {times!r}")
    _common.check_dist(dist)
    streams = _common.check_streams(streams, len(weights))
    block = _common.check_block(block)
    if not weights:
        return 0
    _check_disjoint([w.codes for w in weights], "weights")
    guides = check_guide_terms(guides, [w.codes for w in weights])
    with torch.no_grad():
        if _common.resolve_impl(impl, weights[0].codes.device) == "triton":
            return _int8_triton(weights, streams, seed, eps, times, rounding_seed, dist, block, guides)
        return _int8_torch(weights, streams, seed, eps, times, rounding_seed, dist, guides)


def _check_disjoint(tensors, name):
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}: one device per call")
    _common.check_disjoint(tensors, name, "share codes: each would move twice")

