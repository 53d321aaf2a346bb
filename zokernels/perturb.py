"""Fused seeded perturbation: ``w += a * z(seed_a) [+ b * z(seed_b)]`` in place over a list of tensors.

z is never stored: it is regenerated from (seed, stream, element index) by the spec in :mod:`zokernels.rng`, so
the same call gives the same z on any block size, grid, device or grouping of tensors. One SPSA step of MeZO
costs four weight passes (+eps z, -2 eps z, +eps z, then -lr g z); with :func:`perturb2_` the restore and the
update share a pass (3 passes), and back-to-back steps fold the restore-and-update into the next step's +eps z'
(2 passes).

Read top to bottom: the torch reference (the CPU path and the test oracle), the Triton kernel, its launcher, then
the public ops.
"""

from __future__ import annotations

import torch

from zokernels import _common, rng
from zokernels.rounding import stochastic_round

# Warps per program of the perturb kernel: 4, so that a thread owns 32 of the block's _common.TRITON_BLOCK elements
# (8 warps: 16) and its fixed cost (table row, addresses, each seed's Philox key schedule) spreads over twice as many.
# From the compiled SASS (sm_90, benchmarks/sass.py): perturb2_ bf16 Gaussian 45.6 -> 42.6 instructions per element.
# The guided kernels keep 8 (guide_dot at 4 warps needs 255 registers).
PERTURB_WARPS = 4


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference
def _perturb_torch(tensors, streams, terms, dist, rounding_seed, decay=1.0, offsets=None):
    """``terms`` is a list of ``(seed, scale)``; ``offsets`` each tensor's global first element (default 0). Works
    on any device; chunks keep temporaries in cache.

    Tensors smaller than a chunk are batched: one Philox evaluation serves up to a chunk's worth of them
    (``rng.noise_batch``), which a LoRA model's hundreds of small tensors need on the CPU.
    """
    offsets = offsets if offsets is not None else [0] * len(tensors)
    large, batches = _common.split_small(tensors, _common.TORCH_CHUNK)
    for i in large:
        _perturb_torch_large(tensors[i], streams[i], terms, dist, rounding_seed, decay, offsets[i])
    for idx in batches:
        _perturb_torch_batch([(tensors[i], streams[i], offsets[i]) for i in idx], terms, dist, rounding_seed, decay)


def _store(flat, s, e, y, dtype, rounding_seed, stream, offset=0):
    """Write the float32 result ``y`` of elements ``s:e`` back into ``flat`` (float32 results are already there);
    stochastic rounding draws the words of the global elements ``offset + s ..``."""
    if dtype == torch.float32:
        return
    if rounding_seed is None:
        flat[s:e] = y
    else:
        words = rng.uniform_words(rounding_seed, stream, offset + s, e - s, device=y.device)
        flat[s:e] = stochastic_round(y, dtype, words)


def _perturb_torch_large(t, stream, terms, dist, rounding_seed, decay, offset=0):
    flat = t.view(-1)
    n = flat.numel()
    for s in range(0, n, _common.TORCH_CHUNK):
        e = min(n, s + _common.TORCH_CHUNK)
        y = flat[s:e] if t.dtype == torch.float32 else flat[s:e].float()
        if decay != 1.0:
            y.mul_(decay)
        for seed, scale in terms:
            # multiply, then add (two roundings): add_(alpha=) fuses into an FMA only on vectorised spans, which
            # would make an element's result depend on where the chunk boundary falls.
            y.add_(rng.noise(dist, seed, stream, offset + s, e - s, device=t.device).mul_(scale))
        _store(flat, s, e, y, t.dtype, rounding_seed, stream, offset)


def _perturb_torch_batch(batch, terms, dist, rounding_seed, decay):
    tensors = [t for t, _, _ in batch]
    streams, offsets, numels = [s for _, s, _ in batch], [o for _, _, o in batch], [t.numel() for t in tensors]
    ys = [t.view(-1) if t.dtype == torch.float32 else t.view(-1).float() for t in tensors]
    if decay != 1.0:
        torch._foreach_mul_(ys, decay)
    for seed, scale in terms:
        z = rng.noise_batch(dist, seed, streams, numels, device=tensors[0].device, starts=offsets).mul_(scale)
        torch._foreach_add_(ys, list(z.split(numels)))  # plain adds: the same rounding as the large-tensor path
    for t, y, stream, offset in zip(tensors, ys, streams, offsets):
        _store(t.view(-1), 0, t.numel(), y, t.dtype, rounding_seed, stream, offset)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernel
if _common.triton_available():
    import triton
    import triton.language as tl

    from zokernels._common import block_bounds_tl, block_mask_tl, table_row_tl
    from zokernels.rng import arranged_offsets_tl, noise_arranged_tl, seed_key_tl, uniform_words_arranged_tl
    from zokernels.rounding import round_nearest_bf16_tl, stochastic_round_tl

    @triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "scale_a", "b0", "b1", "b2", "b3", "scale_b",
                                   "r0", "r1", "r2", "r3", "decay"])
    def _perturb_kernel(base_ptr, table_ptr,
                        a0, a1, a2, a3, scale_a, b0, b1, b2, b3, scale_b, r0, r1, r2, r3, decay,
                        BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, TWO: tl.constexpr, ROUND: tl.constexpr,
                        FAST: tl.constexpr, VEC: tl.constexpr, G: tl.constexpr, V: tl.constexpr, COLS: tl.constexpr,
                        OFFSETS: tl.constexpr = False):
        _, row, offset, numel, stream, start = table_row_tl(table_ptr, COLS, BLOCK)
        offset = tl.multiple_of(offset, VEC)
        # Elements arranged so that each thread computes the Philox calls of its own elements once (rng).
        local = arranged_offsets_tl(BLOCK, G, V)
        ptrs = base_ptr + (offset + start) + local
        # Full blocks load and store without a mask: a mask built from the runtime numel hides the contiguity, and
        # every access became a scalar 2- or 4-byte one instead of 128 bits. The tail's mask compares 32-bit offsets
        # (with OFFSETS, a shard's first block also masks the elements before its global offset).
        rem, first, full = block_bounds_tl(row, numel, start, BLOCK, OFFSETS, COLS)
        if full:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=block_mask_tl(local, rem, first, OFFSETS), other=0.0)
        y = x.to(tl.float32)
        if decay != 1.0:  # exact either way (y * 1.0 == y); a uniform branch saves a multiply per element
            y = y * decay
        k0, k1 = seed_key_tl(a0, a1, a2, a3)
        y = y + scale_a * noise_arranged_tl(k0, k1, stream, start, BLOCK, G, V, GAUSSIAN, FAST)
        if TWO:
            k0, k1 = seed_key_tl(b0, b1, b2, b3)
            y = y + scale_b * noise_arranged_tl(k0, k1, stream, start, BLOCK, G, V, GAUSSIAN, FAST)
        if ROUND > 0:
            k0, k1 = seed_key_tl(r0, r1, r2, r3)
            y = stochastic_round_tl(y, uniform_words_arranged_tl(k0, k1, stream, start, BLOCK, G, V, 1), ROUND == 1)
        elif base_ptr.dtype.element_ty == tl.bfloat16 and not FAST:
            # Only where the cast may not round to nearest even (the interpreter truncates); FAST means compiled for
            # NVIDIA, whose cvt.rn.bf16.f32 gives the same bits and saves ~5 instructions per element.
            y = round_nearest_bf16_tl(y)
        if full:
            tl.store(ptrs, y.to(base_ptr.dtype.element_ty))
        else:
            tl.store(ptrs, y.to(base_ptr.dtype.element_ty), mask=block_mask_tl(local, rem, first, OFFSETS))


def _perturb_triton(tensors, streams, terms, dist, rounding_seed, decay=1.0, block=_common.TRITON_BLOCK,
                    offsets=None):
    (seed_a, scale_a), *rest = terms
    seed_b, scale_b = rest[0] if rest else (0, 0.0)
    offsets = offsets if offsets is not None else [0] * len(tensors)
    for dtype, (ts, pairs) in _common.group_by_dtype(tensors, list(zip(streams, offsets))).items():
        ss, os_ = [s for s, _ in pairs], [o for _, o in pairs]
        table, aligned = _common.launch_table(ts, ss, block, offsets=os_)
        rounding = 0 if rounding_seed is None or dtype == torch.float32 else (1 if dtype == torch.bfloat16 else 2)
        _perturb_kernel[(table.shape[0],)](
            ts[0], table, *_common.seed_pieces(seed_a), scale_a, *_common.seed_pieces(seed_b), scale_b,
            *_common.seed_pieces(rounding_seed or 0), decay,
            BLOCK=block, GAUSSIAN=dist == "gaussian", TWO=bool(rest), ROUND=rounding,
            FAST=_common.fast_math(ts[0].device), VEC=16 // ts[0].element_size() if aligned else 1,
            G=rng.arranged_group(dist, ts[0].element_size()), V=16 // ts[0].element_size(), COLS=table.shape[1],
            OFFSETS=any(os_), num_warps=PERTURB_WARPS,
            # no FMA: the reference multiplies, then adds (two roundings); fused, test_decay_scales_the_weights_first
            # differs in 314 of 5,000 elements (emulated). Triton 3.9 fuses by default (3.10 will not).
            enable_fp_fusion=False)


# ---------------------------------------------------------------------------------------------------------------------
# Public ops
def _run(tensors, terms, dist, streams, rounding_seed, impl, block, decay, offsets):
    tensors = _common.as_tensor_list(tensors)
    _common.check_float_tensors(tensors)
    offsets = _common.check_offsets(offsets, len(tensors))
    terms = [(rng.check_seed(seed, seed_name), _common.check_scale(scale, scale_name))
             for seed, scale, seed_name, scale_name in terms]
    _common.check_dist(dist)
    decay = _common.check_scale(decay, "decay")
    streams = _common.check_streams(streams, len(tensors))
    if rounding_seed is not None:
        rng.check_seed(rounding_seed, "rounding_seed")
    block = _common.check_block(block)
    if not tensors:
        return
    with torch.no_grad():
        if _common.resolve_impl(impl, tensors[0].device) == "triton":
            _perturb_triton(tensors, streams, terms, dist, rounding_seed, decay, block or _common.TRITON_BLOCK,
                            offsets)
        else:
            _perturb_torch(tensors, streams, terms, dist, rounding_seed, decay, offsets)


def perturb_(tensors, seed: int, scale: float, *, dist: str = "gaussian", streams=None,
             rounding_seed: int | None = None, decay: float = 1.0, impl: str = "auto",
             block: int | None = None, offsets=None) -> None:
    """In place: ``w = decay * w + scale * z(seed, stream, index)`` for every element of every tensor.

    Args:
        tensors: one tensor or a list; float32, bfloat16 or float16, contiguous, all on one device, any size
            (0 included). Modified in place; nothing is modified if any argument is rejected.
        seed: integer in [0, 2**64) selecting z.
        scale: finite real number.
        dist: ``"gaussian"`` or ``"rademacher"`` (see :mod:`zokernels.rng`).
        streams: one integer in [0, 2**32) per tensor naming its noise stream; default ``0 .. len(tensors)-1``.
            A tensor's z depends on its stream, not on its position in the list.
        rounding_seed: ``None`` stores bf16/fp16 results rounded to nearest; an integer stores them with seeded,
            exactly unbiased stochastic rounding (:mod:`zokernels.rounding`). float32 tensors ignore it.
        decay: multiplies the weights first (``1 - lr * weight_decay`` fuses decoupled weight decay into a pass).
        impl: ``"auto"`` (Triton on CUDA, the torch reference elsewhere), ``"triton"`` or ``"torch"``.
        block: Triton elements per program (tests use it to show the result does not depend on it).
        offsets: one int >= 0 per tensor (default all 0): the global flat index of the tensor's first element. A
            shard holding elements ``[o, o + n)`` of a tensor is perturbed with exactly ``z[o:o + n]`` of the whole,
            stochastic-rounding bits included, so the union of shards equals the unsharded result bit for bit.

    Arithmetic is float32; a list is one launch per dtype.
    """
    _run(tensors, [(seed, scale, "seed", "scale")], dist, streams, rounding_seed, impl, block, decay, offsets)


def perturb2_(tensors, seed_a: int, a: float, seed_b: int, b: float, *, dist: str = "gaussian", streams=None,
              rounding_seed: int | None = None, decay: float = 1.0, impl: str = "auto",
              block: int | None = None, offsets=None) -> None:
    """In place, one pass: ``w = decay * w + a * z(seed_a) + b * z(seed_b)``. Same arguments as :func:`perturb_`.

    Used to fuse SPSA's restore (``+eps z``) with the update (``-lr g z``), or the restore-and-update of one step
    with the next step's ``+eps z'``. The result equals two :func:`perturb_` calls up to one rounding of the
    sum in float32 (and one instead of two roundings to bf16/fp16).
    """
    _run(tensors, [(seed_a, a, "seed_a", "a"), (seed_b, b, "seed_b", "b")], dist, streams, rounding_seed, impl, block,
         decay, offsets)
