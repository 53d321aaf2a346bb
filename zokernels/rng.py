"""The random-number spec of zokernels: every perturbation is a pure function of (seed, stream, element index).

Generator
    Philox4x32-10 exactly as Random123 defines it (Salmon et al., SC'11): a 128-bit counter ``(c0, c1, c2, c3)``
    and a 64-bit key ``(k0, k1)`` give four 32-bit words. Ten rounds; in each round
    ``(hi0, lo0) = mulhilo(0xD2511F53, c0)``, ``(hi1, lo1) = mulhilo(0xCD9E8D57, c2)``,
    ``c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``, then the key is bumped by ``(0x9E3779B9, 0xBB67AE85)``.
    :func:`philox4x32_10` reproduces Random123's published known-answer vectors (see the tests).

Mapping (seed, stream, index) -> (counter, key)
    * ``seed`` is an integer in ``[0, 2**64)``: ``key = (seed & 0xFFFFFFFF, seed >> 32)``.
    * ``stream`` is an integer in ``[0, 2**32)`` naming one tensor (the optimiser gives each parameter its own).
    * ``index`` is the element's flat index in its tensor (for a shard holding elements ``[o, o + n)`` of a larger
      tensor, the index in that whole tensor: the ops' ``offsets=o``). Elements are grouped into Philox *calls* of
      ``per_call`` elements (below); call ``c = index // per_call`` uses
      ``counter = (c & 0xFFFFFFFF, c >> 32, stream, domain)``.
    * ``domain`` separates uses of the same seed: ``DOMAIN_NOISE = 0`` for perturbation noise,
      ``DOMAIN_ROUNDING = 1`` for stochastic-rounding bits, ``DOMAIN_CODES = 2`` for quantised-code rounding.
    So an element's value depends only on (seed, stream, index, distribution): not on block size, grid, device
    or which other tensors share a launch.

Conversions
    * **Rademacher** (128 elements per call): element ``j = index % 128`` takes bit ``j % 32`` of word ``j // 32``;
      ``z = 1 - 2*bit``. Exactly ±1, bit-identical between Triton and torch.
    * **Gaussian** (8 elements per call): element ``j = index % 8`` uses word ``w = word[j // 2]``, split into two
      16-bit uniforms ``u = ((w & 0xFFFF) + 0.5) / 2**16`` (never 0 or 1) and
      ``theta = ((w >> 16) - 2**15) * 2*pi / 2**16`` (in ``[-pi, pi)``). Box–Muller:
      ``z = C * sqrt(-2 ln u) * (cos theta if j is even else sin theta)``.
      The distribution is a fine discrete approximation of N(0, 1): the angle grid is symmetric, so its mean and
      odd moments are exactly 0; ``C = GAUSSIAN_C`` rescales so that the variance is exactly 1
      (``E[-ln u]`` over the 2**16 grid is 0.9999947); the kurtosis is 2.99982 (normal: 3); ``|z| <= GAUSSIAN_MAX``
      (4.8546, at the smallest uniform; a normal exceeds that with probability 1.2e-6). Both Box–Muller outputs
      are used, so 8 normals per call.
      The torch reference (and the Triton interpreter) evaluate this with libm; compiled Triton on an NVIDIA GPU
      uses the hardware approximations ``lg2.approx``, ``sin.approx``, ``cos.approx`` and ``sqrt.approx``, whose
      documented worst-case errors are the ``*_APPROX_*`` constants below. ``lg2.approx`` has an *absolute* error
      (2**-22) that the square root magnifies near u = 1 (4.2e-5 in z at the top uniform), so there the compiled
      path computes the squared radius ``-2 C**2 ln u`` from ``d = 1 - u`` (exact in fp32) by the series
      ``2 C**2 (d + d**2/2)`` for ``d < GAUSSIAN_SERIES_BELOW`` (truncation below ``d**2 / 3`` = 5e-6 relative
      there, 2e-7 in z). With that, the compiled z is within
      ``GAUSSIAN_COMPILED_BOUND`` (6e-6) of the float64 spec value for every one of the 2**16 uniforms and every
      angle (checked exhaustively, from those documented errors, by ``tests/zokernels/test_rng.py``), inside
      ``GAUSSIAN_ATOL``. The values the reference computes are unchanged by this: only the compiled path differs.
    * **Uniform 32-bit** (4 elements per call, one word each): ``u = (w >> 8) * 2**-24`` in ``[0, 1)``, used for
      stochastic rounding.
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

DOMAIN_NOISE = 0
DOMAIN_ROUNDING = 1
DOMAIN_CODES = 2

GAUSSIAN_PER_CALL = 8
RADEMACHER_PER_CALL = 128
UNIFORM_PER_CALL = 4
# 1 / sqrt(mean over k in [0, 2**16) of -ln((k + 0.5) / 2**16)): makes the discrete Box–Muller variance exactly 1.
GAUSSIAN_C = 1.0000026441522867
# Triton (hardware approximations on GPU) vs torch (libm); the compiled path's proven bound is tighter (below).
GAUSSIAN_ATOL = 2e-5
# Worst-case errors of the hardware approximations, the inputs of the compiled-path bound below. None of them was
# measured (no GPU has been available); where each comes from, as checked on 2026-12-02:
# * lg2.approx.f32 (MUFU.LG2): absolute 2**-22 for x in [0.5, 2], 2 ulp elsewhere: the CUDA C++ Programming Guide's
#   table of single-precision intrinsics (__log2f), quoted from that table; its text was not available to re-read.
# * sin/cos.approx.f32 (MUFU.SIN/COS after ptxas's range-reduction FMUL.RZ): absolute 2**-20.9 in the first quadrant,
#   as NVIDIA's MUFU opcode notes state for COS (a public copy of the SASS opcode reference, opMUFU: "COS Accuracy:
#   absolute |error| <= 2^-20.9 in quadrant 00"); the Programming Guide gives 2**-21.41 (__sinf) and 2**-21.19
#   (__cosf) on [-pi, pi]. The larger, 2**-20.9, is used for both.
# * sqrt.approx.f32: ptxas emits MUFU.SQRT for it on sm_80 and sm_90 (seen in the SASS); no documented bound was
#   found. 2**-22 relative is an assumption (rsqrt.approx, the other MUFU square-root unit, is documented at
#   2**-22.9 in the PTX ISA, as recalled, not re-read).
# A GPU run should measure them: compiled _radius_tl over all 2**16 uniforms and cos/sin over all 2**16 angles
# against float64 is exhaustive (2 x 65,536 values) and would replace these citations by measurements.
LG2_APPROX_ABS_ERR = 2.0**-22
SINCOS_APPROX_ABS_ERR = 2.0**-20.9
SQRT_APPROX_REL_ERR = 2.0**-22
# Below this distance from 1, the compiled path computes -ln u by the series (see the docstring). At 2**-8 a series
# to d**2 (3 operations) is exact enough and lg2.approx's absolute error costs at most 1.9e-6 in z above it; at 2**-6
# the series needed d**4 (7 operations).
GAUSSIAN_SERIES_BELOW = 2.0**-8
# The compiled path's worst error in z over all 2**16 uniforms and all angles, from the errors above (tested).
GAUSSIAN_COMPILED_BOUND = 6e-6
# The largest |z| the Gaussian conversion gives: C * sqrt(-2 ln(0.5 / 2**16)) = 4.854599 at the smallest uniform,
# rounded up past float32 rounding and GAUSSIAN_COMPILED_BOUND. ZOOptimizer bounds an update's |coef * z| with it.
GAUSSIAN_MAX = 4.8547
TWO_PI = 2.0 * math.pi

DISTRIBUTIONS = ("gaussian", "rademacher")
PER_CALL = {"gaussian": GAUSSIAN_PER_CALL, "rademacher": RADEMACHER_PER_CALL}


def arranged_group(dist: str, itemsize: int) -> int:
    """The group size G by which a kernel arranges its elements (``arranged_offsets_tl``): a whole 128-bit access
    (``16 // itemsize`` elements) and a whole part of a call (8 Gaussian elements; 16 Rademacher elements, half a
    word)."""
    return max(16 // itemsize, GAUSSIAN_PER_CALL if dist == "gaussian" else 16)


def check_seed(seed, name: str = "seed") -> int:
    """Return ``seed`` as a Python int after checking it is an integer in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be a Python int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {seed}")
    return seed


def check_stream(stream, name: str = "stream") -> int:
    """Return ``stream`` as a Python int after checking it is an integer in [0, 2**32)."""
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"{name} must be a Python int in [0, 2**32), got {type(stream).__name__}")
    if not 0 <= stream <= MASK32:
        raise ValueError(f"{name} must be in [0, 2**32), got {stream}")
    return stream


def split_seed(seed: int) -> tuple[int, int]:
    """The Philox key ``(k0, k1)`` of a 64-bit seed."""
    return seed & MASK32, seed >> 32


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 products of two 32-bit values wrap modulo 2**64; the arithmetic shift plus mask still yields bits 32..63.
    lo = x * m
    hi = (lo >> 32).bitwise_and_(MASK32)
    return hi, lo.bitwise_and_(MASK32)  # in place on fresh tensors: a third fewer allocations per round


def philox4x32_10(counter: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 (Random123) on int64 tensors holding 32-bit values.

    ``counter``: ``(..., 4)``, ``key``: ``(..., 2)`` (broadcastable), values in [0, 2**32). Returns ``(..., 4)`` int64.
    """
    if counter.dtype != torch.int64 or key.dtype != torch.int64:
        raise TypeError("counter and key must be int64 tensors holding values in [0, 2**32)")
    if counter.shape[-1] != 4 or key.shape[-1] != 2:
        raise ValueError(f"counter must end in 4 and key in 2, got {tuple(counter.shape)} and {tuple(key.shape)}")
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    return torch.stack(_philox_rounds(c0, c1, c2, c3, k0, k1), dim=-1)


def _philox_rounds(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on int64 tensors (keys may be Python ints); returns the four output words. The inputs are
    not modified; the xors run in place on the round's fresh products."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1.bitwise_xor_(c1).bitwise_xor_(k0), lo1, hi0.bitwise_xor_(c3).bitwise_xor_(k1), lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_words(seed: int, stream: int, first_call: int, n_calls: int, domain: int = DOMAIN_NOISE,
                 device=None) -> torch.Tensor:
    """The four words of calls ``first_call .. first_call + n_calls - 1``: int64 tensor ``(n_calls, 4)``."""
    calls = torch.arange(first_call, first_call + n_calls, dtype=torch.int64, device=device)
    return philox_calls(seed, stream, calls, domain)


def philox_calls(seed: int, streams, calls: torch.Tensor, domain: int = DOMAIN_NOISE) -> torch.Tensor:
    """Words of arbitrary calls: ``calls`` int64 ``(n,)``, ``streams`` an int or an int64 tensor ``(n,)``."""
    k0, k1 = split_seed(seed)
    # The key is the same for every call: keep it a Python int so each round does no extra tensor work.
    c2 = torch.full_like(calls, streams) if isinstance(streams, int) else streams
    c3 = torch.full_like(calls, domain)
    return torch.stack(_philox_rounds(calls & MASK32, calls >> 32, c2, c3, k0, k1), dim=-1)


def _gaussian_from_words(w: torch.Tensor) -> torch.Tensor:
    """``(calls, 4)`` words -> ``(calls * 8,)`` normals, element order of the spec.

    In-place steps on fresh temporaries: with allocation of every intermediate, page faults on new memory cost more
    than the arithmetic (Philox rounds: 6.3 ms in place vs 27-38 ms allocating, 305 k calls, one thread).
    """
    u = (w & 0xFFFF).to(torch.float32).add_(0.5).mul_(1.0 / 65536.0)
    theta = (w >> 16).sub_(32768).to(torch.float32).mul_(TWO_PI / 65536.0)
    radius = u.log_().mul_(-2.0).sqrt_().mul_(GAUSSIAN_C)
    out = torch.empty(*w.shape, 2, dtype=torch.float32, device=w.device)
    torch.mul(radius, torch.cos(theta), out=out[..., 0])
    torch.mul(radius, theta.sin_(), out=out[..., 1])
    return out.reshape(-1)


def gaussian(seed: int, stream: int, start: int, n: int, device=None) -> torch.Tensor:
    """Gaussian noise of elements ``start .. start + n - 1`` of ``stream`` (float32, shape ``(n,)``)."""
    first = start // GAUSSIAN_PER_CALL
    last = (start + n + GAUSSIAN_PER_CALL - 1) // GAUSSIAN_PER_CALL
    z = _gaussian_from_words(philox_words(seed, stream, first, last - first, device=device))
    offset = start - first * GAUSSIAN_PER_CALL
    return z[offset:offset + n]


def rademacher_bits(seed: int, stream: int, start: int, n: int, device=None) -> torch.Tensor:
    """The sign bits (int64 0/1, shape ``(n,)``) behind :func:`rademacher`."""
    first = start // RADEMACHER_PER_CALL
    last = (start + n + RADEMACHER_PER_CALL - 1) // RADEMACHER_PER_CALL
    w = philox_words(seed, stream, first, last - first, device=device)  # (calls, 4)
    shifts = torch.arange(32, dtype=torch.int64, device=w.device)
    bits = ((w.unsqueeze(-1) >> shifts) & 1).reshape(-1)  # word-major, bit-minor: j = 32*word + bit
    offset = start - first * RADEMACHER_PER_CALL
    return bits[offset:offset + n]


_SIGN_TABLES: dict = {}


def _rademacher_from_words(w: torch.Tensor) -> torch.Tensor:
    """``(calls, 4)`` words -> ``(calls * 128,)`` signs: each byte expands through a 256 x 8 sign table, which
    measured 1.7x faster than shifting out single bits (0.44 vs 0.76 ms for 256 Ki elements, 2-core CPU)."""
    table = _SIGN_TABLES.get(w.device)
    if table is None:
        byte_bits = (torch.arange(256, device=w.device).unsqueeze(-1) >> torch.arange(8, device=w.device)) & 1
        table = _SIGN_TABLES[w.device] = 1.0 - 2.0 * byte_bits.to(torch.float32)
    byte_shifts = torch.tensor([0, 8, 16, 24], device=w.device)
    return table[(w.unsqueeze(-1) >> byte_shifts) & 0xFF].reshape(-1)  # j = 32*word + 8*byte + bit


def rademacher(seed: int, stream: int, start: int, n: int, device=None) -> torch.Tensor:
    """Rademacher signs (float32 ±1, shape ``(n,)``) of elements ``start .. start + n - 1`` of ``stream``;
    equal to ``1 - 2 * rademacher_bits(...)``."""
    first = start // RADEMACHER_PER_CALL
    last = (start + n + RADEMACHER_PER_CALL - 1) // RADEMACHER_PER_CALL
    signs = _rademacher_from_words(philox_words(seed, stream, first, last - first, device=device))
    offset = start - first * RADEMACHER_PER_CALL
    return signs[offset:offset + n]


_BATCH_LAYOUTS: dict = {}


def noise_batch(dist: str, seed: int, streams: list[int], numels: list[int], device=None,
                starts: list[int] | None = None) -> torch.Tensor:
    """Noise of elements ``start .. start + numel - 1`` of several streams, concatenated (float32,
    ``(sum(numels),)``); ``starts`` defaults to zeros.

    Equal to ``cat([noise(dist, seed, s, o, n) for s, o, n in zip(streams, starts, numels)])`` with one Philox
    evaluation for all: the torch reference of a LoRA model's hundreds of small tensors otherwise pays per-op dispatch
    for each.
    """
    per_call = PER_CALL[dist]
    starts = list(starts) if starts is not None else [0] * len(numels)
    key = (per_call, tuple(streams), tuple(numels), tuple(starts), str(device))
    layout = _BATCH_LAYOUTS.get(key)
    if layout is None:
        first_call = [o // per_call for o in starts]  # each stream's first call, and how many it needs
        n_calls = torch.tensor([(o + n + per_call - 1) // per_call - c for o, n, c in zip(starts, numels, first_call)])
        first = torch.cumsum(n_calls, 0) - n_calls  # first call of each stream in the batch
        calls = torch.arange(int(n_calls.sum())) - torch.repeat_interleave(first, n_calls) \
            + torch.repeat_interleave(torch.tensor(first_call, dtype=torch.int64), n_calls)
        stream_of_call = torch.repeat_interleave(torch.tensor(streams, dtype=torch.int64), n_calls)
        pick = torch.cat([torch.arange(n) + int(f) * per_call + o - c * per_call
                          for n, f, o, c in zip(numels, first, starts, first_call)])
        layout = tuple(x.to(device) for x in (calls, stream_of_call, pick))
        if len(_BATCH_LAYOUTS) >= 64:
            _BATCH_LAYOUTS.pop(next(iter(_BATCH_LAYOUTS)))
        _BATCH_LAYOUTS[key] = layout
    calls, stream_of_call, pick = layout
    w = philox_calls(seed, stream_of_call, calls)
    z = _gaussian_from_words(w) if dist == "gaussian" else _rademacher_from_words(w)
    return z[pick]


def uniform_words(seed: int, stream: int, start: int, n: int, domain: int = DOMAIN_ROUNDING,
                  device=None) -> torch.Tensor:
    """One 32-bit word per element (int64 in [0, 2**32), shape ``(n,)``), four elements per call."""
    first = start // UNIFORM_PER_CALL
    last = (start + n + UNIFORM_PER_CALL - 1) // UNIFORM_PER_CALL
    w = philox_words(seed, stream, first, last - first, domain=domain, device=device).reshape(-1)
    offset = start - first * UNIFORM_PER_CALL
    return w[offset:offset + n]


def uniform(seed: int, stream: int, start: int, n: int, domain: int = DOMAIN_ROUNDING, device=None) -> torch.Tensor:
    """Uniform floats in [0, 1) with 24 random bits (float32, shape ``(n,)``)."""
    return (uniform_words(seed, stream, start, n, domain, device) >> 8).to(torch.float32) * 2.0**-24


def noise(dist: str, seed: int, stream: int, start: int, n: int, device=None) -> torch.Tensor:
    """``gaussian`` or ``rademacher`` noise by name."""
    if dist == "gaussian":
        return gaussian(seed, stream, start, n, device)
    if dist == "rademacher":
        return rademacher(seed, stream, start, n, device)
    raise ValueError(f"dist must be one of {DISTRIBUTIONS}, got {dist!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The same spec as Triton helpers. Triton is optional at import time (it does not install everywhere torch does).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:
    _SERIES_BELOW = tl.constexpr(GAUSSIAN_SERIES_BELOW)
    # The compiled path computes the squared radius C**2 * (-2 ln u) directly, GAUSSIAN_C folded into its constants
    # (a multiply and an add per Box–Muller pair fewer than sqrt(2 * -ln u) * C).
    _R2_LG2 = tl.constexpr(-2.0 * GAUSSIAN_C**2 * math.log(2.0))
    _R2_D1 = tl.constexpr(2.0 * GAUSSIAN_C**2)
    _R2_D2 = tl.constexpr(GAUSSIAN_C**2)

    @triton.jit
    def philox_tl(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 values (tensors or scalars); returns the four output words."""
        for _ in tl.static_range(10):
            hi0 = tl.umulhi(c0, 0xD2511F53)
            lo0 = c0 * 0xD2511F53
            hi1 = tl.umulhi(c2, 0xCD9E8D57)
            lo1 = c2 * 0xCD9E8D57
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0, c1, c2, c3

    @triton.jit
    def seed_key_tl(s0, s1, s2, s3):
        """The Philox key from a seed passed as four 16-bit integers (low first).

        Passing 16-bit pieces keeps every seed the same Triton argument type (i32), so no seed triggers a recompile.
        """
        k0 = s0.to(tl.uint32) | (s1.to(tl.uint32) << 16)
        k1 = s2.to(tl.uint32) | (s3.to(tl.uint32) << 16)
        return k0, k1

    @triton.jit
    def calls_words_tl(first_call, N_CALLS: tl.constexpr, stream, domain, k0, k1):
        """Words of calls ``first_call + [0, N_CALLS)``: four uint32 tensors of shape ``(N_CALLS,)``."""
        calls = first_call + tl.arange(0, N_CALLS).to(tl.int64)
        c0 = (calls & 0xFFFFFFFF).to(tl.uint32)
        c1 = (calls >> 32).to(tl.uint32)
        c2 = tl.full((N_CALLS,), 0, tl.uint32) + stream.to(tl.uint32)
        c3 = tl.full((N_CALLS,), domain, tl.uint32)
        return philox_tl(c0, c1, c2, c3, k0, k1)

    @triton.jit
    def select_word_tl(w0, w1, w2, w3):
        """Stack four ``(R,)`` word tensors into ``(R, 4)``."""
        col = tl.arange(0, 4)[None, :]
        return tl.where(col == 0, w0[:, None], tl.where(col == 1, w1[:, None],
                                                         tl.where(col == 2, w2[:, None], w3[:, None])))

    @triton.jit
    def _log2_tl(x, FAST: tl.constexpr):
        if FAST:
            # .ftz: the uniforms are >= 2**-17, never subnormal, so flushing changes no value and saves ptxas's
            # three-instruction subnormal fix-up around MUFU.LG2
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.log2(x)

    @triton.jit
    def _cos_tl(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.cos(x)

    @triton.jit
    def _sin_tl(x, FAST: tl.constexpr):
        if FAST:
            return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.sin(x)

    @triton.jit
    def radius_sq_near_one_tl(d):
        """The squared radius ``-2 C**2 ln(1 - d)`` for ``0 < d < GAUSSIAN_SERIES_BELOW`` by its series to ``d**2``:
        truncation below ``d**2 / 3`` relative (5e-6 at 2**-8)."""
        return d * (_R2_D1 + d * _R2_D2)

    @triton.jit
    def _radius_tl(k, FAST: tl.constexpr):
        """``C * sqrt(-2 ln u)`` for ``u = (k + 0.5) / 2**16`` (``k`` the low 16 bits, float32)."""
        u = (k + 0.5) * (1.0 / 65536.0)
        if FAST:
            # lg2.approx's absolute error would be magnified by the square root near u = 1: there, the series on
            # d = 1 - u (exact: u has 17 significant bits) instead.
            d = 1.0 - u
            return tl.sqrt(tl.where(d < _SERIES_BELOW, radius_sq_near_one_tl(d), _R2_LG2 * _log2_tl(u, FAST)))
        else:
            # -2 ln u = -2 ln(2) log2(u); GAUSSIAN_C folds into the constant.
            return tl.sqrt(-1.3862943611198906 * _log2_tl(u, FAST)) * 1.0000026441522867

    @triton.jit
    def gaussian_tl(k0, k1, stream, start, BLOCK: tl.constexpr, FAST: tl.constexpr):
        """Gaussian noise of elements ``start + [0, BLOCK)`` (``start`` a multiple of 8): float32 ``(BLOCK,)``."""
        R: tl.constexpr = BLOCK // 8
        w0, w1, w2, w3 = calls_words_tl(start // 8, R, stream, 0, k0, k1)
        w = select_word_tl(w0, w1, w2, w3)  # (R, 4): one Box–Muller pair per word
        theta = ((w >> 16).to(tl.int32) - 32768).to(tl.float32) * (6.283185307179586 / 65536.0)
        radius = _radius_tl((w & 0xFFFF).to(tl.float32), FAST)
        z = tl.join(radius * _cos_tl(theta, FAST), radius * _sin_tl(theta, FAST))  # (R, 4, 2): cos even, sin odd
        return tl.reshape(z, (BLOCK,))

    @triton.jit
    def rademacher_tl(k0, k1, stream, start, BLOCK: tl.constexpr):
        """Rademacher ±1 (float32 ``(BLOCK,)``) of elements ``start + [0, BLOCK)`` (``start`` a multiple of 128)."""
        R: tl.constexpr = BLOCK // 128
        w0, w1, w2, w3 = calls_words_tl(start // 128, R, stream, 0, k0, k1)
        w = select_word_tl(w0, w1, w2, w3)  # (R, 4)
        shift = tl.arange(0, 32).to(tl.uint32)[None, None, :]
        bits = (w[:, :, None] >> shift) & 1  # (R, 4, 32): element 128*r + 32*word + bit
        return 1.0 - 2.0 * tl.reshape(bits, (BLOCK,)).to(tl.float32)

    @triton.jit
    def noise_tl(k0, k1, stream, start, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr):
        if GAUSSIAN:
            return gaussian_tl(k0, k1, stream, start, BLOCK, FAST)
        else:
            return rademacher_tl(k0, k1, stream, start, BLOCK)

    @triton.jit
    def uniform_words_tl(k0, k1, stream, start, BLOCK: tl.constexpr, DOMAIN: tl.constexpr):
        """One uint32 word per element of ``start + [0, BLOCK)`` (``start`` a multiple of 4)."""
        R: tl.constexpr = BLOCK // 4
        w0, w1, w2, w3 = calls_words_tl(start // 4, R, stream, DOMAIN, k0, k1)
        return tl.reshape(select_word_tl(w0, w1, w2, w3), (BLOCK,))

    # -----------------------------------------------------------------------------------------------------------------
    # The same noise, arranged so that each Philox word is computed once, by the thread that uses it.
    #
    # A kernel that works on elements ``start + [0, BLOCK)`` as a flat tensor gets Triton's layout of V elements per
    # 128-bit access per thread, repeated: a thread's elements then fall in several Philox calls, each shared with
    # neighbouring threads, and every thread recomputes whole calls (3.6 calls per thread for 16 fp32 Gaussian
    # elements where 2 suffice; 3.6 for Rademacher where a thread's 16 elements lie in one call). Arranged as
    # ``(G // V, BLOCK // G, V)`` with ``[h, c, q] = start + G*c + V*h + q``, one thread holds the G consecutive
    # elements of group c (the first and last axes stay inside a thread), so the calls of a group are computed once
    # per group. The values per element are those of the flat helpers above, bit for bit.
    @triton.jit
    def arranged_offsets_tl(BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr):
        """Offsets ``G*c + V*h + q`` from a block's first element, as an int32 ``(G // V, BLOCK // G, V)`` tensor."""
        h = tl.arange(0, G // V)[:, None, None]
        c = tl.arange(0, BLOCK // G)[None, :, None]
        q = tl.arange(0, V)[None, None, :]
        return G * c + (V * h + q)

    @triton.jit
    def _position_tl(G: tl.constexpr, V: tl.constexpr):
        """Each element's position ``V*h + q`` in its group, ``(G // V, 1, V)`` int32 (constants inside a thread)."""
        return V * tl.arange(0, G // V)[:, None, None] + tl.arange(0, V)[None, None, :]

    @triton.jit
    def _word_tl(w0, w1, w2, w3, J: tl.constexpr):
        if J == 0:
            return w0
        elif J == 1:
            return w1
        elif J == 2:
            return w2
        else:
            return w3

    @triton.jit
    def gaussian_arranged_tl(k0, k1, stream, start, BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                             FAST: tl.constexpr):
        """:func:`gaussian_tl` arranged as :func:`arranged_offsets_tl` (G a multiple of 8, ``start`` of G)."""
        C: tl.constexpr = BLOCK // G
        pos = _position_tl(G, V)
        z = tl.zeros((G // V, C, V), tl.float32)
        for m in tl.static_range(G // 8):  # the calls of a group
            calls = start // 8 + m + (G // 8) * tl.arange(0, C).to(tl.int64)
            w0, w1, w2, w3 = philox_tl((calls & 0xFFFFFFFF).to(tl.uint32), (calls >> 32).to(tl.uint32),
                                       tl.full((C,), 0, tl.uint32) + stream.to(tl.uint32),
                                       tl.full((C,), 0, tl.uint32), k0, k1)
            for j in tl.static_range(4):  # one Box–Muller pair per word: elements 2j (cos) and 2j + 1 (sin)
                w = _word_tl(w0, w1, w2, w3, j)
                theta = ((w >> 16).to(tl.int32) - 32768).to(tl.float32) * (6.283185307179586 / 65536.0)
                radius = _radius_tl((w & 0xFFFF).to(tl.float32), FAST)
                zc = (radius * _cos_tl(theta, FAST))[None, :, None]
                zs = (radius * _sin_tl(theta, FAST))[None, :, None]
                z = tl.where(pos == 8 * m + 2 * j, zc, tl.where(pos == 8 * m + 2 * j + 1, zs, z))
        return z

    @triton.jit
    def rademacher_arranged_tl(k0, k1, stream, start, BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr):
        """:func:`rademacher_tl` arranged as :func:`arranged_offsets_tl` with G = 16 (``start`` a multiple of 128):
        a group is half of one word, so each thread computes one call per group."""
        tl.static_assert(G == 16)
        C: tl.constexpr = BLOCK // G
        c = tl.arange(0, C).to(tl.int64)
        calls = start // 128 + c // 8
        w0, w1, w2, w3 = philox_tl((calls & 0xFFFFFFFF).to(tl.uint32), (calls >> 32).to(tl.uint32),
                                   tl.full((C,), 0, tl.uint32) + stream.to(tl.uint32),
                                   tl.full((C,), 0, tl.uint32), k0, k1)
        j = (c % 8) // 2  # group c holds bits 16*(c % 2) + [0, 16) of word j of its call
        w = tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3)))
        w = (w >> (16 * (c % 2)).to(tl.uint32))[None, :, None]
        bits = (w >> _position_tl(G, V).to(tl.uint32)) & 1
        return 1.0 - 2.0 * bits.to(tl.float32)

    @triton.jit
    def noise_arranged_tl(k0, k1, stream, start, BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                          GAUSSIAN: tl.constexpr, FAST: tl.constexpr):
        if GAUSSIAN:
            return gaussian_arranged_tl(k0, k1, stream, start, BLOCK, G, V, FAST)
        else:
            return rademacher_arranged_tl(k0, k1, stream, start, BLOCK, G, V)

    @triton.jit
    def uniform_words_arranged_tl(k0, k1, stream, start, BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                                  DOMAIN: tl.constexpr):
        """:func:`uniform_words_tl` arranged as :func:`arranged_offsets_tl` (G a multiple of 4)."""
        C: tl.constexpr = BLOCK // G
        pos = _position_tl(G, V)
        out = tl.zeros((G // V, C, V), tl.uint32)
        for m in tl.static_range(G // 4):
            calls = start // 4 + m + (G // 4) * tl.arange(0, C).to(tl.int64)
            w0, w1, w2, w3 = philox_tl((calls & 0xFFFFFFFF).to(tl.uint32), (calls >> 32).to(tl.uint32),
                                       tl.full((C,), 0, tl.uint32) + stream.to(tl.uint32),
                                       tl.full((C,), DOMAIN, tl.uint32), k0, k1)
            for j in tl.static_range(4):
                out = tl.where(pos == 4 * m + j, _word_tl(w0, w1, w2, w3, j)[None, :, None], out)
        return out
