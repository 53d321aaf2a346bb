"""The two quantised formats on bitsandbytes storage: :class:`NF4Weight` and :class:`Int8Weight`, each a small
structure that checks its own invariants, with ``from_bnb`` and ``dequantize``.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# bitsandbytes quantises NF4 with these block sizes (32 only on some backends); all are even, so no byte of packed
# codes straddles two blocks.
SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT8_MAX = 127
# bnb.functional.int8_vectorwise_dequant multiplies by this reciprocal instead of dividing by 127; dequantize()
# does the same so that it reproduces bitsandbytes bit for bit.
INV127 = 7.874015718698502e-3


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


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

