"""Zeroth-order steps on bitsandbytes-quantised weights, in place on bitsandbytes' own storage.

Two formats, each a small structure that checks its invariants (:class:`NF4Weight`, :class:`Int8Weight`), and
three ways to move a quantised weight, none of which ever holds a dequantised copy of a whole weight (the torch
references work in chunks of :data:`TORCH_CHUNK` elements, the Triton kernels in blocks of registers):

* **scale space** (:func:`scale_params`, :func:`scale_perturb_`): the continuous parameters are the fp32 scales
  (NF4 block absmax, or the nested absmax of a double-quantised NF4 weight; int8 row scales ``SCB``); codes stay.
  They are plain float tensors, so :func:`zokernels.perturb_` moves them.
* **int8 code space** (:func:`int8_code_perturb_`): ``codes += times * delta`` with ``delta`` a seeded stochastic
  rounding of ``eps * z * 127 / SCB[row]`` to whole code steps, saturating at ±127. ``delta`` does not depend on
  ``times``, so ``times=+1`` then ``times=-1`` (or SPSA's +1, -2, +1) restores every unsaturated code bit for bit.
* **NF4 code space** (:func:`nf4_code_update_`): per element, dequantise (code book value x block absmax), add
  ``coef * z``, requantise into the 16-value code book by seeded stochastic rounding between the two neighbouring
  code values (unbiased), absmax kept fixed.

Storage as bitsandbytes 0.50 lays it out (checked on CPU; CUDA uses the same layout):

* ``Params4bit`` (NF4): ``param.data`` is ``(ceil(numel/2), 1)`` in ``quant_storage`` (uint8 by default), two codes
  per byte, **element 2i in the high nibble, 2i+1 in the low nibble**, flat row-major over ``quant_state.shape``;
  blocks of ``blocksize`` consecutive flat elements (they may straddle rows). ``quant_state.absmax`` is fp32
  ``(n_blocks,)``; with double quantisation (``quant_state.nested``) it is uint8 codes into ``state2.code`` (256-value
  dynamic map) scaled per ``state2.blocksize`` (256) blocks by fp32 ``state2.absmax``, plus the fp32 scalar
  ``quant_state.offset``: ``absmax[b] = state2.code[absmax[b]] * state2.absmax[b // 256] + offset``.
  In eval mode with a no-grad input, ``Linear4bit.forward`` on an AVX512-BF16 CPU repacks the weight for its CPU
  kernel (``quant_state.packing_format_for_cpu``: other nibble order, absmax transposed to bf16); that layout is
  refused here.
* ``Int8Params`` (``Linear8bitLt(has_fp16_weights=False)`` after ``.to(device)``, CPU included): ``param.data`` is
  int8 ``(out, in)`` codes in [-127, 127] and ``param.SCB`` fp32 ``(out,)`` row absmax; value
  ``codes * SCB / 127``. The first forward moves ``CB``/``SCB`` to ``module.state`` and sets them to ``None`` on the
  parameter, so :meth:`Int8Weight.from_bnb` also accepts the module.

Read top to bottom: the formats, scale space, then for each code-space op its torch reference, its Triton kernel
and launcher, and the public op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zokernels import _common, rng
from zokernels.perturb import perturb_

# Elements per chunk of the torch references (see perturb.TORCH_CHUNK for the measurement behind the size).
TORCH_CHUNK = 1 << 18
# Elements per Triton program: a power of two, a multiple of 128 (one Rademacher call) and of 8 (one Gaussian call).
TRITON_BLOCK = 4096
TRITON_WARPS = 8
# bitsandbytes quantises NF4 with these block sizes (32 only on some backends); all are even, so no byte of packed
# codes straddles two blocks.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT8_MAX = 127
# bnb.functional.int8_vectorwise_dequant multiplies by this reciprocal instead of dividing by 127; dequantize()
# does the same so that it reproduces bitsandbytes bit for bit.
INV127 = 7.874015718698502e-3
# |delta| is clamped to this many code steps before rounding: any larger step saturates anyway (codes are in
# [-127, 127]), and the clamp keeps the float -> int conversion defined when a row scale is tiny.
INT8_MAX_STEP = 255.0


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _f32(x: float) -> float:
    """``x`` rounded to float32, so that the torch reference and the Triton kernel (fp32 scalar) use one value."""
    return float(torch.tensor(x, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------------------
# Formats
@dataclass(eq=False)
class NF4Weight:
    """An NF4 weight on bitsandbytes storage (views, not copies: ops on it modify the bnb parameter).

    Fields:
        codes: uint8 ``(ceil(numel/2),)``, element ``2i`` in the high nibble of byte ``i``, ``2i+1`` in the low one.
        absmax: fp32 ``(n_blocks,)``, or uint8 ``(n_blocks,)`` codes into ``nested_code`` when double-quantised.
        code: fp32 ``(16,)`` code book, strictly increasing from -1 to 1.
        blocksize: elements per absmax block, one of :data:`SUPPORTED_BLOCKSIZES`.
        shape, dtype: the dequantised weight's shape and dtype.
        nested_absmax, nested_code, nested_offset, nested_blocksize: the double-quantisation state (fp32
            ``(ceil(n_blocks / nested_blocksize),)``, fp32 ``(256,)``, fp32 scalar, int), all ``None`` otherwise.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple
    dtype: torch.dtype = torch.float32
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: torch.Tensor | None = None
    nested_blocksize: int | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.check(values=True)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def check(self, values: bool = False) -> None:
        """Raise ValueError naming the first broken invariant. Shapes, dtypes and devices always; with ``values``
        (at construction) also the 16 code-book values, a host sync that the ops skip."""
        _check(self.blocksize in SUPPORTED_BLOCKSIZES,
               f"NF4Weight.blocksize must be one of {SUPPORTED_BLOCKSIZES}, got {self.blocksize}")
        _check(self.codes.dtype == torch.uint8, f"NF4Weight.codes must be uint8, got {self.codes.dtype}")
        _check(self.codes.dim() == 1 and self.codes.is_contiguous(), "NF4Weight.codes must be flat and contiguous")
        _check(self.codes.numel() == (self.numel + 1) // 2,
               f"NF4Weight.codes has {self.codes.numel()} bytes; shape {self.shape} needs {(self.numel + 1) // 2}")
        _check(self.code.dtype == torch.float32 and tuple(self.code.shape) == (16,),
               f"NF4Weight.code must be float32 (16,), got {self.code.dtype} {tuple(self.code.shape)}")
        if values:
            code = self.code.cpu()
            _check(bool((code[1:] > code[:-1]).all()) and code[0] == -1 and code[15] == 1,
                   "NF4Weight.code must increase strictly from -1 to 1")
        _check(tuple(self.absmax.shape) == (self.n_blocks,) and self.absmax.is_contiguous(),
               f"NF4Weight.absmax has shape {tuple(self.absmax.shape)}; {self.numel} elements in blocks of "
               f"{self.blocksize} need ({self.n_blocks},)")
        nested = (self.nested_absmax, self.nested_code, self.nested_offset, self.nested_blocksize)
        _check(all(x is None for x in nested) or all(x is not None for x in nested),
               "NF4Weight nested_absmax, nested_code, nested_offset and nested_blocksize go together")
        if self.nested:
            self._check_nested()
        else:
            _check(self.absmax.dtype == torch.float32, f"NF4Weight.absmax must be float32, got {self.absmax.dtype}")
        tensors = [self.codes, self.absmax, self.code] + ([self.nested_absmax, self.nested_code, self.nested_offset]
                                                          if self.nested else [])
        _check(all(t.device == self.codes.device for t in tensors), "NF4Weight tensors must share one device")

    def _check_nested(self) -> None:
        _check(self.absmax.dtype == torch.uint8,
               f"NF4Weight.absmax of a double-quantised weight must be uint8 codes, got {self.absmax.dtype}")
        nb = self.nested_blocksize
        _check(isinstance(nb, int) and nb > 0, f"NF4Weight.nested_blocksize must be a positive int, got {nb}")
        n2 = -(-self.n_blocks // nb)
        _check(self.nested_absmax.dtype == torch.float32 and tuple(self.nested_absmax.shape) == (n2,)
               and self.nested_absmax.is_contiguous(),
               f"NF4Weight.nested_absmax must be contiguous float32 ({n2},), got {self.nested_absmax.dtype} "
               f"{tuple(self.nested_absmax.shape)}")
        _check(self.nested_code.dtype == torch.float32 and tuple(self.nested_code.shape) == (256,),
               f"NF4Weight.nested_code must be float32 (256,), got {self.nested_code.dtype} "
               f"{tuple(self.nested_code.shape)}")
        _check(self.nested_offset.dtype == torch.float32 and self.nested_offset.numel() == 1,
               "NF4Weight.nested_offset must be a float32 scalar tensor")

    def check_absmax(self) -> None:
        """Raise ValueError unless every block's (dequantised) absmax is finite and non-negative (0: an all-zero
        block, which the code update leaves as it is): a host sync."""
        absmax = self.block_absmax(0, self.n_blocks)
        bad = ~(torch.isfinite(absmax) & (absmax >= 0))
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"NF4Weight absmax of block {b} is {float(absmax[b])}: it must be finite and "
                             "non-negative")

    @classmethod
    def from_bnb(cls, param) -> NF4Weight:
        """The NF4 weight of a quantised ``bnb.nn.Params4bit`` (or of a ``bnb.nn.Linear4bit``), sharing storage."""
        import bitsandbytes as bnb

        if isinstance(param, bnb.nn.Linear4bit):
            param = param.weight
        if not isinstance(param, bnb.nn.Params4bit):
            raise TypeError(f"NF4Weight.from_bnb needs a bitsandbytes Params4bit or Linear4bit, got "
                            f"{type(param).__name__}")
        qs = param.quant_state
        _check(qs is not None and getattr(param, "bnb_quantized", True),
               "Params4bit is not quantised yet: move it to a device first (e.g. module.to('cpu'))")
        _check(qs.quant_type == "nf4", f"quant_type {qs.quant_type!r} is not supported (only 'nf4')")
        _check(not getattr(qs, "packing_format_for_cpu", False),
               "this Params4bit was repacked for bitsandbytes' CPU inference kernel (Linear4bit.forward in eval mode "
               "without grad); keep the module in train mode or undo it with "
               "bnb.functional._convert_weight_packed_for_cpu_inverse")
        data = param.data
        codes = (data if data.dtype == torch.uint8 else data.view(torch.uint8)).reshape(-1)
        assert codes.data_ptr() == data.data_ptr(), "codes must be a view of the parameter's storage"
        nested = {}
        if qs.nested:
            offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
            nested = dict(nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                          nested_offset=offset.to(device=data.device, dtype=torch.float32),
                          nested_blocksize=int(qs.state2.blocksize))
        return cls(codes=codes, absmax=qs.absmax, code=qs.code, blocksize=int(qs.blocksize), shape=tuple(qs.shape),
                   dtype=qs.dtype, **nested)

    def block_absmax(self, b0: int, b1: int) -> torch.Tensor:
        """fp32 absmax of blocks ``b0 .. b1-1`` (dequantised from the nested state when double-quantised, with the
        same two fp32 roundings as bitsandbytes: product, then ``+ offset``)."""
        if not self.nested:
            return self.absmax[b0:b1]
        b = torch.arange(b0, b1, device=self.absmax.device)
        return self.nested_code[self.absmax[b0:b1].long()] * self.nested_absmax[b // self.nested_blocksize] \
            + self.nested_offset

    def dequantize_blocks(self, b0: int, b1: int) -> torch.Tensor:
        """fp32 values of blocks ``b0 .. b1-1`` (flat, ``min(b1*blocksize, numel) - b0*blocksize`` elements)."""
        s, e = b0 * self.blocksize, min(b1 * self.blocksize, self.numel)
        nibbles = unpack_nibbles(self.codes[s // 2:(e + 1) // 2])[:e - s]
        a = self.block_absmax(b0, b1).repeat_interleave(self.blocksize)[:e - s]
        return self.code[nibbles] * a

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight (for tests and inspection only): ``code[nibble] * absmax`` in fp32, then ``dtype``."""
        return self.dequantize_blocks(0, self.n_blocks).reshape(self.shape).to(dtype or self.dtype)


@dataclass(eq=False)
class Int8Weight:
    """An LLM.int8 weight on bitsandbytes storage: int8 ``codes (out, in)`` and fp32 row scales ``scb (out,)``;
    value ``codes * scb / 127``. The codes are a view of the bnb parameter: ops on them modify it."""

    codes: torch.Tensor
    scb: torch.Tensor

    def __post_init__(self):
        self.check(values=True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def check(self, values: bool = False) -> None:
        """Raise ValueError naming the first broken invariant. Shapes, dtypes and devices always; with ``values``
        (at construction) also that the row scales are finite and non-negative, a host sync that the ops skip (their
        kernels treat a scale that is not positive and finite as an all-zero row)."""
        _check(self.codes.dtype == torch.int8, f"Int8Weight.codes must be int8, got {self.codes.dtype}")
        _check(self.codes.dim() == 2 and self.codes.is_contiguous(),
               f"Int8Weight.codes must be a contiguous matrix, got shape {tuple(self.codes.shape)}")
        _check(self.scb.dtype == torch.float32, f"Int8Weight.scb must be float32, got {self.scb.dtype}")
        _check(tuple(self.scb.shape) == (self.codes.shape[0],) and self.scb.is_contiguous(),
               f"Int8Weight.scb has shape {tuple(self.scb.shape)}; codes {tuple(self.codes.shape)} need "
               f"({self.codes.shape[0]},)")
        _check(self.scb.device == self.codes.device, "Int8Weight.codes and scb must share one device")
        if values:
            _check(bool(torch.isfinite(self.scb).all() and (self.scb >= 0).all()),
                   "Int8Weight.scb must be finite and non-negative")

    @classmethod
    def from_bnb(cls, obj) -> Int8Weight:
        """From a quantised ``bnb.nn.Int8Params`` or a ``bnb.nn.Linear8bitLt`` (needed once a forward has moved
        ``SCB`` into ``module.state``)."""
        import bitsandbytes as bnb

        scb = None
        if isinstance(obj, bnb.nn.Linear8bitLt):
            scb = obj.state.SCB
            obj = obj.weight
        if not isinstance(obj, bnb.nn.Int8Params):
            raise TypeError(f"Int8Weight.from_bnb needs a bitsandbytes Int8Params or Linear8bitLt, got "
                            f"{type(obj).__name__}")
        _check(not obj.has_fp16_weights, "Int8Params with has_fp16_weights=True keeps float weights, not int8 codes")
        _check(obj.dtype == torch.int8,
               f"Int8Params is not quantised yet (dtype {obj.dtype}): move the module to a device first")
        scb = obj.SCB if obj.SCB is not None else scb
        _check(scb is not None, "Int8Params.SCB is None (a forward moved it to module.state): pass the Linear8bitLt")
        return cls(codes=obj.data, scb=scb)

    def dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """fp32 rows ``r0 .. r1-1``, computed as ``bnb.functional.int8_vectorwise_dequant`` does."""
        return self.codes[r0:r1] * self.scb[r0:r1].view(-1, 1) * INV127

    def dequantize(self) -> torch.Tensor:
        """The whole weight, fp32 (for tests and inspection only)."""
        return self.dequantize_rows(0, self.codes.shape[0])


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n,)`` -> int64 ``(2n,)`` codes in bitsandbytes' order (high nibble first)."""
    p = packed.to(torch.int64)
    return torch.stack((p >> 4, p & 15), dim=-1).reshape(-1)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int ``(2n,)`` codes in [0, 16) -> uint8 ``(n,)`` (inverse of :func:`unpack_nibbles`)."""
    pairs = codes.reshape(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Scale space
def scale_params(weight: NF4Weight | Int8Weight) -> list[torch.Tensor]:
    """The continuous fp32 tensors a ZO optimiser perturbs to move ``weight`` in scale space (codes untouched).

    * NF4: ``absmax`` (one per block); when double-quantised, the **nested absmax** (``state2.absmax``, one per 256
      blocks). That keeps the bitsandbytes format valid and in place (its forward re-dequantises absmax from the
      nested state on every call), at the price of a coarse parameterisation: a nested scale moves
      ``absmax_b - offset`` of 256 blocks proportionally. The offset and the uint8 absmax codes stay fixed.
    * int8: ``SCB`` (one per row).

    The tensors are the bnb storage itself: modifying them modifies the model.
    """
    if isinstance(weight, NF4Weight):
        return [weight.nested_absmax if weight.nested else weight.absmax]
    if isinstance(weight, Int8Weight):
        return [weight.scb]
    raise TypeError(f"weight must be an NF4Weight or Int8Weight, got {type(weight).__name__}")


def scale_perturb_(weights, seed: int, scale: float, *, dist: str = "gaussian", streams=None,
                   impl: str = "auto") -> None:
    """In place: ``s += scale * z(seed, stream, index)`` on the scale tensors of each weight (:func:`scale_params`).

    ``weights``: one NF4Weight/Int8Weight or a list; ``streams``: one per weight (default ``0 .. n-1``). A thin
    wrapper over :func:`zokernels.perturb_`, so ``scale_perturb_(w, seed, -scale)`` undoes a call up to one fp32
    rounding per scale.
    """
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    tensors = [t for w in weights for t in scale_params(w)]
    perturb_(tensors, seed, scale, dist=dist, streams=streams, impl=impl)


# ---------------------------------------------------------------------------------------------------------------------
# int8 code space: torch reference
def _int8_steps(z, words, eps, inv_scale):
    """``delta = floor(x) + (u < x - floor(x))`` with ``x = (eps*z) * (127/SCB)`` clamped to ±255, ``u`` the word's top
    24 bits / 2**24. ``x - floor(x)`` is exact in fp32 and ``u`` takes 2**24 equally likely values, so
    ``P(delta = floor(x) + 1) = ceil(frac * 2**24) / 2**24``: ``E[delta] = x`` up to 2**-24. (``floor(x + u)`` would
    round ``x + u`` first.) Returns int32."""
    x = (z * eps) * inv_scale
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


def _int8_torch(weights, streams, seed, eps, times, rounding_seed, dist):
    saturated = torch.zeros((), dtype=torch.int64, device=weights[0].codes.device)
    for w, stream in zip(weights, streams):
        rows, cols = w.shape
        flat = w.codes.view(-1)
        rows_per_chunk = max(1, TORCH_CHUNK // max(cols, 1))
        for r0 in range(0, rows, rows_per_chunk):
            r1 = min(rows, r0 + rows_per_chunk)
            s, e = r0 * cols, r1 * cols
            z = rng.noise(dist, seed, stream, s, e - s, device=flat.device)
            words = rng.uniform_words(rounding_seed, stream, s, e - s, rng.DOMAIN_CODES, device=flat.device)
            inv = _inv_scale(w.scb[r0:r1]).repeat_interleave(cols)
            new = flat[s:e].to(torch.int32) + times * _int8_steps(z, words, eps, inv)
            saturated += ((new > INT8_MAX) | (new < -INT8_MAX)).sum()
            flat[s:e] = new.clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return int(saturated)  # the one sync of the call


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreted on CPU when TRITON_INTERPRET=1)
if _common.triton_available():
    import triton
    import triton.language as tl

    from zokernels.rng import (
        arranged_offsets_tl,
        noise_arranged_tl,
        noise_tl,
        seed_key_tl,
        uniform_words_arranged_tl,
        uniform_words_tl,
    )

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

    @triton.jit(do_not_specialize=["s0", "s1", "s2", "s3", "r0", "r1", "r2", "r3", "eps", "times"])
    def _int8_kernel(codes_ptr, scb_ptr, table_ptr, partial_ptr, s0, s1, s2, s3, r0, r1, r2, r3, eps, times,
                     BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr, VEC: tl.constexpr,
                     G: tl.constexpr, WIDE: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        row = table_ptr + pid * 8
        offset = tl.multiple_of(tl.load(row), VEC)
        numel = tl.load(row + 1)
        stream = tl.load(row + 2)
        start = tl.load(row + 3) * BLOCK
        scb_offset = tl.load(row + 4)
        cols = tl.load(row + 5)
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
        inv = _int8_inv_scale_tl(scb_ptr + scb_offset, tl.load(row + 6), tl.load(row + 7).to(tl.int32), local, rem,
                                 cols, BLOCK, G, WIDE)
        k0, k1 = seed_key_tl(s0, s1, s2, s3)
        x = (noise_arranged_tl(k0, k1, stream, start, BLOCK, G, 16, GAUSSIAN, FAST) * eps) * inv
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

    @triton.jit(do_not_specialize=["numel", "n_bytes", "stream", "s0", "s1", "s2", "s3", "r0", "r1", "r2", "r3",
                                   "coef"])
    def _nf4_kernel(codes_ptr, absmax_ptr, code_ptr, inv_gap_ptr, n2_absmax_ptr, n2_code_ptr, offset_ptr, partial_ptr,
                    numel, n_bytes, stream, s0, s1, s2, s3, r0, r1, r2, r3, coef,
                    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BS: tl.constexpr, BLOCK: tl.constexpr,
                    GAUSSIAN: tl.constexpr, FAST: tl.constexpr):
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
        step = noise_tl(k0, k1, stream, start, BLOCK, GAUSSIAN, FAST) * coef
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


def _int8_table(weights, streams, block):
    """One row per program: (codes offset from weights[0].codes, numel, stream, block index, scb offset from
    weights[0].scb in fp32 elements, columns, the block's first row, its first element's column). One launch serves
    the whole list, like ``_common.block_table``; the row and column are divided here, not per program on the GPU
    (a 64-bit division is a ~70-instruction subroutine call there)."""
    base_codes, base_scb = weights[0].codes.data_ptr(), weights[0].scb.data_ptr()
    parts = []
    for w, stream in zip(weights, streams):
        n = w.codes.numel()
        if n == 0:
            continue
        scb_distance = w.scb.data_ptr() - base_scb
        assert scb_distance % 4 == 0, "fp32 tensors are aligned to 4 bytes"
        blocks = torch.arange(-(-n // block), dtype=torch.int64)
        fixed = torch.tensor([w.codes.data_ptr() - base_codes, n, stream, 0, scb_distance // 4, w.shape[1], 0, 0])
        rows = fixed.repeat(blocks.numel(), 1)
        rows[:, 3] = blocks
        rows[:, 6] = blocks * block // w.shape[1]
        rows[:, 7] = blocks * block % w.shape[1]
        parts.append(rows)
    return torch.cat(parts).to(weights[0].codes.device) if parts else None


def _int8_triton(weights, streams, seed, eps, times, rounding_seed, dist, block):
    table = _int8_table(weights, streams, block)
    if table is None:
        return 0
    partial = torch.zeros(table.shape[0], dtype=torch.int32, device=table.device)
    device = weights[0].codes.device
    g = rng.arranged_group(dist, 1)
    # enable_fp_fusion=False: (eps*z)*inv and code + x must round exactly as in the torch reference (no FMA).
    _int8_kernel[(table.shape[0],)](
        weights[0].codes, weights[0].scb, table, partial, *_common.seed_pieces(seed),
        *_common.seed_pieces(rounding_seed), eps, times,
        BLOCK=block, GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(device),
        VEC=16 if all(w.codes.data_ptr() % 16 == 0 for w in weights) else 1, G=g,
        WIDE=all(w.shape[1] >= g for w in weights if w.codes.numel()), num_warps=TRITON_WARPS,
        enable_fp_fusion=False)
    return int(partial.sum())


# ---------------------------------------------------------------------------------------------------------------------
# int8 code space: public op
def _check_list(weights, cls, name: str) -> list:
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    for i, w in enumerate(weights):
        if not isinstance(w, cls):
            raise TypeError(f"{name}[{i}] must be an {cls.__name__}, got {type(w).__name__}")
        w.check()
    return weights


def int8_code_perturb_(weights, seed: int, eps: float, *, rounding_seed: int, times: int = 1,
                       dist: str = "gaussian", streams=None, impl: str = "auto", block: int | None = None) -> int:
    """In place: ``codes = clamp(codes + times * delta, -127, 127)`` on each Int8Weight's int8 codes.

    ``delta = SR(eps * z(seed, stream, index) * 127 / SCB[row])``: the step ``eps * z`` expressed in code steps of
    its row, rounded to an integer by seeded stochastic rounding with the words
    ``rng.uniform_words(rounding_seed, stream, index, DOMAIN_CODES)`` (unbiased: ``E[delta] = x`` up to 2**-24, see
    ``_int8_steps``; ``|x|`` is clamped to 255 first). Rows with ``SCB = 0`` get ``delta = 0``.

    ``delta`` depends on (seed, eps, rounding_seed, stream, index, SCB) and not on ``times``, so calls with the same
    arguments and ``times`` summing to 0 (``+1, -1`` or SPSA's ``+1, -2, +1``) restore the codes bit for bit at every
    element that none of the calls saturated. Do not undo with ``-eps``: ``SR(-x) != -SR(x)`` draw by draw.

    Args:
        weights: one Int8Weight or a list (one device, no two sharing codes). ``SCB`` is read, never written.
        seed, rounding_seed: integers in [0, 2**64). eps: finite. times: a nonzero int.
        dist: ``"gaussian"`` or ``"rademacher"``. streams: one per weight, default ``0 .. n-1``.
        impl: ``"auto" | "triton" | "torch"``. block: Triton elements per program (power of two, multiple of 128).

    Returns the number of saturated elements (whose ``codes + times*delta`` left [-127, 127]) as a Python int: the
    call's one host sync. Nothing is modified if any argument is rejected.
    """
    weights = _check_list(weights, Int8Weight, "weights")
    rng.check_seed(seed)
    rng.check_seed(rounding_seed, "rounding_seed")
    eps = _f32(_common.check_scale(eps, "eps"))
    if isinstance(times, bool) or not isinstance(times, int) or times == 0 or abs(times) > 2**20:
        raise ValueError(f"times must be a nonzero int of magnitude at most 2**20, got {times!r}")
    _common.check_dist(dist)
    streams = _common.check_streams(streams, len(weights))
    block = _check_block(block)
    if not weights:
        return 0
    _check_disjoint([w.codes for w in weights], "weights")
    with torch.no_grad():
        if _common.resolve_impl(impl, weights[0].codes.device) == "triton":
            return _int8_triton(weights, streams, seed, eps, times, rounding_seed, dist, block)
        return _int8_torch(weights, streams, seed, eps, times, rounding_seed, dist)


def _check_block(block):
    if block is None:
        return TRITON_BLOCK
    if not isinstance(block, int) or block < 128 or block % rng.RADEMACHER_PER_CALL or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of 128, got {block}")
    return block


def _check_disjoint(tensors, name):
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}: one device per call")
    _common.check_disjoint(tensors, name, "share codes: each would move twice")


# ---------------------------------------------------------------------------------------------------------------------
# NF4 code space: torch reference
def _inv_gaps(code: torch.Tensor) -> torch.Tensor:
    """``1 / (code[k+1] - code[k])`` for k < 15 and 0 for k = 15 (nothing above the top code), fp32 (16,)."""
    gaps = code[1:] - code[:-1]
    return torch.cat((torch.ones_like(gaps) / gaps, torch.zeros_like(code[:1])))


def _nf4_requantize(old, a, z, words, coef, code, inv_gap):
    """New codes (int64) and the saturation mask, for old codes ``old`` of blocks with absmax ``a`` (per element).

    ``t = code[old] + coef*z / a`` is the updated value in units of absmax; ``k`` counts the code values above
    ``code[0]`` that are ``<= t``, so ``code[k] <= t < code[k+1]`` inside [-1, 1]; the code moves up to ``k+1`` with
    probability ``p = (t - code[k]) / (code[k+1] - code[k])`` (``u < p``, u with 24 bits): ``E[code[new]] = t``,
    i.e. ``E[dequantised] = value + coef*z``, up to 2**-24 of a gap. ``t`` outside [-1, 1] saturates to code 0 or
    15 (``p <= 0`` below, ``inv_gap[15] = 0`` above). Blocks with absmax 0 are left as they are.
    """
    step = z * coef
    x = torch.where(a > 0, step / torch.where(a > 0, a, torch.ones_like(a)), torch.zeros_like(a))
    t = code[old] + x
    k = torch.searchsorted(code[1:].contiguous(), t, right=True)
    p = (t - code[k]) * inv_gap[k]
    u = (words >> 8).to(torch.float32) * 2.0**-24
    return k + (u < p).to(torch.int64), (t > code[15]) | (t < code[0])


def _nf4_torch(w: NF4Weight, seed, coef, stream, rounding_seed, dist):
    inv_gap = _inv_gaps(w.code)
    blocks_per_chunk = max(1, TORCH_CHUNK // w.blocksize)
    saturated = torch.zeros((), dtype=torch.int64, device=w.codes.device)
    for b0 in range(0, w.n_blocks, blocks_per_chunk):
        b1 = min(w.n_blocks, b0 + blocks_per_chunk)
        s, e = b0 * w.blocksize, min(b1 * w.blocksize, w.numel)  # s is even: blocks hold whole bytes
        packed = w.codes[s // 2:(e + 1) // 2]
        nibbles = unpack_nibbles(packed)  # may end with the pad nibble of an odd-sized weight
        a = w.block_absmax(b0, b1).repeat_interleave(w.blocksize)[:e - s]
        z = rng.noise(dist, seed, stream, s, e - s, device=packed.device)
        words = rng.uniform_words(rounding_seed, stream, s, e - s, rng.DOMAIN_CODES, device=packed.device)
        new, sat = _nf4_requantize(nibbles[:e - s], a, z, words, coef, w.code, inv_gap)
        saturated += sat.sum()
        nibbles[:e - s] = new
        packed.copy_(pack_nibbles(nibbles))
    return int(saturated)  # the one sync of the call


def _nf4_triton(w: NF4Weight, seed, coef, stream, rounding_seed, dist, block):
    n_programs = -(-w.numel // block)
    partial = torch.zeros(n_programs, dtype=torch.int32, device=w.codes.device)
    n2 = (w.nested_absmax, w.nested_code, w.nested_offset) if w.nested else (w.code, w.code, w.code)  # unused dummies
    _nf4_kernel[(n_programs,)](
        w.codes, w.absmax, w.code, _inv_gaps(w.code), *n2, partial, w.numel, w.codes.numel(), stream,
        *_common.seed_pieces(seed), *_common.seed_pieces(rounding_seed), coef,
        BLOCKSIZE=w.blocksize, NESTED=w.nested, NESTED_BS=w.nested_blocksize or 1, BLOCK=block,
        GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(w.codes.device), num_warps=TRITON_WARPS,
        enable_fp_fusion=False)  # the nested absmax (product, then + offset) rounds twice, as in bitsandbytes
    return int(partial.sum())


def nf4_code_update_(weight: NF4Weight, seed: int, coef: float, *, rounding_seed: int, stream: int = 0,
                     dist: str = "gaussian", impl: str = "auto", block: int | None = None) -> int:
    """In place: each NF4 code moves so that ``E[dequantised] = value + coef * z(seed, stream, index)``.

    Per element: ``t = code[c] + coef*z / absmax_block``; the new code is one of the two code-book neighbours of
    ``t``, chosen by seeded stochastic rounding (words ``rng.uniform_words(rounding_seed, stream, index,
    DOMAIN_CODES)``) with probability proportional to closeness, so the update is unbiased (``_nf4_requantize``).
    The absmax (or nested absmax state) is kept fixed, so the scale-space parameterisation is untouched; values that
    would leave ``[-absmax, absmax]`` saturate at the end codes and are counted. Not reversible: a code-space
    update is a rounding, meant for the update step, not for SPSA's ±eps probes.

    Args:
        weight: an NF4Weight (its packed codes are rewritten; absmax, code book and nested state are read only).
        seed, rounding_seed: integers in [0, 2**64). coef: finite (``-lr * g`` for a ZO step). stream: [0, 2**32).
        dist, impl, block: as in :func:`int8_code_perturb_`.

    Returns the number of saturated elements as a Python int (one host sync). Nothing is modified if any argument
    is rejected.
    """
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    weight.check()
    rng.check_seed(seed)
    rng.check_seed(rounding_seed, "rounding_seed")
    coef = _f32(_common.check_scale(coef, "coef"))
    stream = rng.check_stream(stream)
    _common.check_dist(dist)
    block = _check_block(block)
    if weight.numel == 0:
        return 0
    # a host sync before the codes move: the update divides by the block scale (a scale-space ZO step may have
    # changed it since construction), and a NaN, infinite or negative one would turn codes into garbage
    weight.check_absmax()
    with torch.no_grad():
        if _common.resolve_impl(impl, weight.codes.device) == "triton":
            return _nf4_triton(weight, seed, coef, stream, rounding_seed, dist, block)
        return _nf4_torch(weight, seed, coef, stream, rounding_seed, dist)
