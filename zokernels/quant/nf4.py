"""NF4 code space: each 4-bit code moves to one of its two code-book neighbours by seeded stochastic rounding, so that
the dequantised value moves by ``coef * z`` in expectation (see :func:`nf4_code_update_`).

Read top to bottom: the torch reference (the CPU path and the test oracle), the Triton kernel, its launcher, the
public op.
"""

from __future__ import annotations

import torch

from zokernels import _common, rng
from zokernels.guided import TRITON_BLOCK_LOWRANK, LowRank
from zokernels.quant.formats import NF4Weight, pack_nibbles, unpack_nibbles
from zokernels.quant.guides import add_guides, check_guide_terms, shadow


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference
def _inv_gaps(code: torch.Tensor) -> torch.Tensor:
    """``1 / (code[k+1] - code[k])`` for k < 15 and 0 for k = 15 (nothing above the top code), fp32 (16,)."""
    gaps = code[1:] - code[:-1]
    return torch.cat((torch.ones_like(gaps) / gaps, torch.zeros_like(code[:1])))


def _nf4_requantize(old, a, step, words, code, inv_gap):
    """New codes (int64) and the saturation mask, for old codes ``old`` of blocks with absmax ``a`` (per element).

    ``t = code[old] + step / a`` (``step = coef*z`` plus any guide terms, in weight units) is the updated value in
    units of absmax; ``k`` counts the code values above ``code[0]`` that are ``<= t``, so
    ``code[k] <= t < code[k+1]`` inside [-1, 1]; the code moves up to ``k+1`` with probability
    ``p = (t - code[k]) / (code[k+1] - code[k])`` (``u < p``, u with 24 bits): ``E[code[new]] = t``,
    i.e. ``E[dequantised] = value + coef*z``, up to 2**-24 of a gap. ``t`` outside [-1, 1] saturates to code 0 or
    15 (``p <= 0`` below, ``inv_gap[15] = 0`` above). Blocks with absmax 0 are left as they are.
    """
    x = torch.where(a > 0, step / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    t = code[old] + x
    k = torch.searchsorted(code[1:].contiguous(), t, right=True)
    p = (t - code[k]) * inv_gap[k]
    u = (words >> 8).to(torch.float32) * 2.0**-24
    return k + (u < p).to(torch.int64), (t > code[15]) | (t < code[0])


def _nf4_torch(w: NF4Weight, seed, coef, stream, rounding_seed, dist, guides):
    inv_gap = _inv_gaps(w.code)
    blocks_per_chunk = max(1, _common.TORCH_CHUNK // w.blocksize)
    saturated = torch.zeros((), dtype=torch.int64, device=w.codes.device)
    for b0 in range(0, w.n_blocks, blocks_per_chunk):
        b1 = min(w.n_blocks, b0 + blocks_per_chunk)
        s, e = b0 * w.blocksize, min(b1 * w.blocksize, w.numel)  # s is even: blocks hold whole bytes
        packed = w.codes[s // 2:(e + 1) // 2]
        nibbles = unpack_nibbles(packed)  # may end with the pad nibble of an odd-sized weight
        a = w.block_absmax(b0, b1).repeat_interleave(w.blocksize)[:e - s]
        z = rng.noise(dist, seed, stream, s, e - s, device=packed.device)
        words = rng.uniform_words(rounding_seed, stream, s, e - s, rng.DOMAIN_CODES, device=packed.device)
        step = add_guides(z * coef, guides, 0, w.shape[-1], s, e)
        new, sat = _nf4_requantize(nibbles[:e - s], a, step, words, w.code, inv_gap)
        saturated += sat.sum()
        nibbles[:e - s] = new
        packed.copy_(pack_nibbles(nibbles))
    return int(saturated)  # the one sync of the call


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel (interpreted on CPU when TRITON_INTERPRET=1)
if _common.triton_available():
    import triton
    import triton.language as tl

    from zokernels.rng import noise_tl, seed_key_tl, uniform_words_tl

    @triton.jit
    def _nf4_absmax_tl(absmax_ptr, n2_absmax_ptr, n2_code_ptr, offset_ptr, block_idx, mask,
                       NESTED: tl.constexpr, NESTED_BS: tl.constexpr):
        if NESTED:
            c2 = tl.load(absmax_ptr + block_idx, mask=mask, other=0).to(tl.int32)
            a = tl.load(n2_code_ptr + c2, mask=mask, other=0.0) * tl.load(n2_absmax_ptr + block_idx // NESTED_BS,
                                                                          mask=mask, other=0.0)
            return a + tl.load(offset_ptr)
        else:
            return tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)

    @triton.jit
    def _nf4_guide_tl(g_ptr, v_ptr, k, idx, mask, ncols, LOWRANK: tl.constexpr):
        """The guide at flat elements ``idx``, float32: dense ``g[idx]``, or LowRank ``sum_r u[i, r] * v[j, r]``
        (``g_ptr``: u, ``v_ptr``: v, ``k`` ranks) added rank by rank from +0, as the torch reference
        (``quant.guides.lowrank_rows``) and guided.py's kernels add it."""
        if LOWRANK:
            i = idx // ncols
            j = idx - i * ncols
            acc = tl.zeros(idx.shape, tl.float32)
            for r in tl.range(0, k):
                acc += tl.load(g_ptr + i * k + r, mask=mask, other=0.0).to(tl.float32) * tl.load(
                    v_ptr + j * k + r, mask=mask, other=0.0).to(tl.float32)
            return acc
        else:
            return tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    @triton.jit(do_not_specialize=["numel", "n_bytes", "stream", "s0", "s1", "s2", "s3", "r0", "r1", "r2", "r3",
                                   "coef", "c0", "c1", "k0_rank", "k1_rank", "ncols"])
    def _nf4_kernel(codes_ptr, absmax_ptr, code_ptr, inv_gap_ptr, n2_absmax_ptr, n2_code_ptr, offset_ptr, partial_ptr,
                    g0_ptr, v0_ptr, g1_ptr, v1_ptr, numel, n_bytes, stream, s0, s1, s2, s3, r0, r1, r2, r3, coef,
                    c0, c1, k0_rank, k1_rank, ncols,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK: tl.constexpr,
                    GAUSSIAN: tl.constexpr, FAST: tl.constexpr, N_GUIDES: tl.constexpr, LOWRANK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        start = pid * BLOCK
        idx = start + tl.arange(0, BLOCK)
        mask = idx < numel
        in_bytes = idx // 2 < n_bytes  # includes the pad nibble of an odd-sized weight, which is written back as is
        byte = tl.load(codes_ptr + idx // 2, mask=in_bytes, other=0).to(tl.int32)
        old = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        a = _nf4_absmax_tl(absmax_ptr, n2_absmax_ptr, n2_code_ptr, offset_ptr, idx // BLOCKSIZE, mask, NESTED,
                           NESTED_BS)
        k0, k1 = seed_key_tl(s0, s1, s2, s3)
        # the step in weight units, rounded as the reference: coef*z, then + c*guide per guide
        step = noise_tl(k0, k1, stream, start, BLOCK, GAUSSIAN, FAST) * coef
        if N_GUIDES >= 1:
            step = step + c0 * _nf4_guide_tl(g0_ptr, v0_ptr, k0_rank, idx, mask, ncols, LOWRANK)
        if N_GUIDES >= 2:
            step = step + c1 * _nf4_guide_tl(g1_ptr, v1_ptr, k1_rank, idx, mask, ncols, LOWRANK)
        x = tl.where(a > 0, tl.div_rn(step, tl.where(a > 0, a, 1.0)), 0.0)
        t = tl.load(code_ptr + old) + x  # the updated value in units of the block's absmax
        k = tl.zeros((BLOCK,), tl.int32)  # number of code values above code[0] that are <= t
        for j in tl.static_range(1, 16):
            k += (t >= tl.load(code_ptr + j)).to(tl.int32)
        p = (t - tl.load(code_ptr + k)) * tl.load(inv_gap_ptr + k)
        k0, k1 = seed_key_tl(r0, r1, r2, r3)
        u = (uniform_words_tl(k0, k1, stream, start, BLOCK, 2) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        new = tl.where(mask, k + (u < p).to(tl.int32), old)
        saturated = ((t > tl.load(code_ptr + 15)) | (t < tl.load(code_ptr))) & mask
        pairs = tl.reshape(new, (BLOCK // 2, 2))
        packed = tl.sum(pairs << (4 - 4 * tl.arange(0, 2))[None, :], axis=1)
        byte_idx = start // 2 + tl.arange(0, BLOCK // 2)
        tl.store(codes_ptr + byte_idx, packed.to(tl.uint8), mask=byte_idx < n_bytes)
        tl.store(partial_ptr + pid, tl.sum(saturated.to(tl.int32), axis=0))


def _nf4_guide_args(w: NF4Weight, guides):
    """Kernel arguments of up to two guide terms of one weight: pointers (dense: the guide; LowRank: u and v), the
    float32 coefficients and ranks, dummies (the absmax, rank 0) where a term is absent; and whether LowRank."""
    ptrs, coefs, ranks, lowrank = [], [], [], False
    for gs, c in guides:
        g = gs[0]
        if g is None:  # a term that does not touch this weight: coefficient 0 on a dummy would still read it
            ptrs += [w.code, w.code]
            coefs.append(0.0)
            ranks.append(0)
            continue
        lowrank = isinstance(g, LowRank)
        ptrs += [g.u, g.v] if lowrank else [g, g]
        coefs.append(float(c[0]))
        ranks.append(g.rank if lowrank else 0)
    while len(coefs) < 2:
        ptrs += [w.code, w.code]
        coefs.append(0.0)
        ranks.append(0)
    return ptrs, coefs, ranks, lowrank


def _nf4_triton(w: NF4Weight, seed, coef, stream, rounding_seed, dist, block, guides):
    guides = [(gs, c) for gs, c in guides if gs[0] is not None]
    ptrs, coefs, ranks, lowrank = _nf4_guide_args(w, guides)
    # LowRank: guided.py's block for its rank loop (at 4096, 255 registers and 40 bytes of spills on sm_90)
    block = block or (TRITON_BLOCK_LOWRANK if lowrank else _common.TRITON_BLOCK)
    n_programs = -(-w.numel // block)
    partial = torch.zeros(n_programs, dtype=torch.int32, device=w.codes.device)
    n2 = (w.nested_absmax, w.nested_code, w.nested_offset) if w.nested else (w.code, w.code, w.code)  # unused dummies
    _nf4_kernel[(n_programs,)](
        w.codes, w.absmax, w.code, _inv_gaps(w.code), *n2, partial, *ptrs, w.numel, w.codes.numel(), stream,
        *_common.seed_pieces(seed), *_common.seed_pieces(rounding_seed), coef, *coefs, *ranks, w.shape[-1],
        BLOCKSIZE=w.blocksize, NESTED=w.nested, NESTED_BS=w.nested_blocksize or 1, BLOCK=block,
        GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(w.codes.device), N_GUIDES=len(guides), LOWRANK=lowrank,
        num_warps=_common.TRITON_WARPS,
        enable_fp_fusion=False)  # the nested absmax (product, then + offset) rounds twice, as in bitsandbytes
    return int(partial.sum())


# ---------------------------------------------------------------------------------------------------------------------
# Public op
def nf4_code_update_(weight: NF4Weight, seed: int, coef: float, *, rounding_seed: int, stream: int = 0,
                     dist: str = "gaussian", guides=(), impl: str = "auto", block: int | None = None) -> int:
    """In place: each NF4 code moves so that ``E[dequantised] = value + step``, ``step = coef * z(seed, stream,
    index) + sum_g c_g * guide_g``.

    Per element: ``t = code[c] + step / absmax_block``; the new code is one of the two code-book neighbours of
    ``t``, chosen by seeded stochastic rounding (words ``rng.uniform_words(rounding_seed, stream, index,
    DOMAIN_CODES)``) with probability proportional to closeness, so the update is unbiased (``_nf4_requantize``).
    The absmax (or nested absmax state) is kept fixed, so the scale-space parameterisation is untouched; values that
    would leave ``[-absmax, absmax]`` saturate at the end codes and are counted. Not reversible: a code-space
    update is a rounding, meant for the update step, not for SPSA's ±eps probes.

    Args:
        weight: an NF4Weight (its packed codes are rewritten; absmax, code book and nested state are read only).
        seed, rounding_seed: integers in [0, 2**64). coef: finite (``-lr * g`` for a ZO step). stream: [0, 2**32).
        guides: up to two ``(guide_list, c)`` pairs as in ``guided_perturb_`` for the one weight: ``guide_list`` a
            one-entry list (None, a dense tensor of ``weight.shape`` or a :class:`~zokernels.guided.LowRank`),
            ``c`` a one-entry float tensor.
        dist, impl, block: as in :func:`int8_code_perturb_`.

    Returns the number of saturated elements as a Python int (one host sync). Nothing is modified if any argument
    is rejected.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    weight.check()
    rng.check_seed(seed)
    rng.check_seed(rounding_seed, "rounding_seed")
    coef = _common.f32_scalar(_common.check_scale(coef, "coef"))
    stream = rng.check_stream(stream)
    _common.check_dist(dist)
    block = _common.check_block(block)
    guides = check_guide_terms(guides, [shadow(weight.shape, weight.codes.device)])
    if weight.numel == 0:
        return 0
    # a host sync before the codes move: the update divides by the block scale (a scale-space ZO step may have
    # changed it since construction), and a NaN, infinite or negative one would turn codes into garbage
    weight.check_absmax()
    with torch.no_grad():
        if _common.resolve_impl(impl, weight.codes.device) == "triton":
            return _nf4_triton(weight, seed, coef, stream, rounding_seed, dist, block, guides)
        return _nf4_torch(weight, seed, coef, stream, rounding_seed, dist, guides)
