"""Seeded stochastic rounding of float32 values to bfloat16 or float16, exactly unbiased, in torch and Triton.

Each element consumes one 32-bit word ``r`` of ``rng.uniform_words(seed, stream, index, DOMAIN_ROUNDING)``.

* **bfloat16** is the upper half of a float32: add the low 16 random bits ``r & 0xFFFF`` to the float32's bit pattern
  and clear the low 16 bits. The magnitude rounds up with probability (dropped bits) / 2**16, which is exactly the
  fractional position between the two neighbouring bfloat16 values, so ``E[round(y)] = y`` exactly; the sign bit is
  untouched because the carry moves only the magnitude.
* **float16** has its own exponent range, so work on the magnitude ``a = |y|``: its float16 spacing is
  ``ulp = 2**(max(e, -14) - 10)`` with ``e`` the float32 exponent of ``a``; ``a / ulp`` is exact and, for normal
  float16 values, has at most 13 fractional bits (24-bit float32 significand, 11 integer bits); adding a 13-bit
  uniform ``(r >> 19) / 2**13`` is then exact, so ``floor(a / ulp + u) * ulp`` is exactly unbiased. In the float16
  subnormal range (``|y| < 2**-14``) the sum can round and the bias is below 2**-13 of a subnormal step.
Non-finite values are stored as they are.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

ROUNDABLE = (torch.bfloat16, torch.float16)


def stochastic_round(y: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """Round float32 ``y`` to ``dtype`` (bf16 or fp16) using one random word per element (int64 in [0, 2**32))."""
    if dtype == torch.bfloat16:
        bits = y.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        bits = ((bits + (words & 0xFFFF)) & 0xFFFF0000).to(torch.int32)  # values < 2**32 wrap into int32 bits
        out = bits.view(torch.float32)
    elif dtype == torch.float16:
        a = y.abs()
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
        e = e.clamp(min=-14)
        ulp = ((e - 10 + 127) << 23).view(torch.float32)
        inv_ulp = ((10 - e + 127) << 23).view(torch.float32)  # powers of two: both products below are exact
        u = (words >> 19).to(torch.float32) * 2.0**-13
        out = torch.copysign(torch.floor(a * inv_ulp + u) * ulp, y)
    else:
        raise ValueError(f"stochastic rounding targets bfloat16 or float16, got {dtype}")
    return torch.where(torch.isfinite(y), out, y).to(dtype)


if triton is not None:

    @triton.jit
    def stochastic_round_tl(y, words, IS_BF16: tl.constexpr):
        """Triton twin of :func:`stochastic_round`; returns float32 values exactly representable in the target."""
        if IS_BF16:
            bits = y.to(tl.uint32, bitcast=True)
            out = ((bits + (words & 0xFFFF)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            a = tl.abs(y)
            e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            e = tl.maximum(e, -14)
            ulp = ((e - 10 + 127) << 23).to(tl.float32, bitcast=True)
            inv_ulp = ((10 - e + 127) << 23).to(tl.float32, bitcast=True)
            u = (words >> 19).to(tl.float32) * (1.0 / 8192.0)
            q = tl.floor(a * inv_ulp + u) * ulp
            sign = y.to(tl.uint32, bitcast=True) & 0x80000000
            out = (q.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        finite = (y == y) & (tl.abs(y) < float("inf"))
        return tl.where(finite, out, y)

    @triton.jit
    def round_nearest_bf16_tl(y):
        """float32 -> nearest bf16 value (ties to even), kept in float32.

        Written out because the Triton interpreter truncates on its float32 -> bfloat16 cast while compiled code
        rounds to nearest even; with this, both paths store the same bits. Non-finite values pass through.
        """
        bits = y.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        finite = (y == y) & (tl.abs(y) < float("inf"))
        return tl.where(finite, rounded, y)
