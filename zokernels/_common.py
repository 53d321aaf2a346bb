"""Argument checks and implementation choice shared by every public op of zokernels."""

from __future__ import annotations

import math
import os

import torch

from zokernels import rng

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return rng.triton is not None


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` before they were defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The one place where ``impl="auto" | "triton" | "torch"`` becomes ``"triton"`` or ``"torch"``.

    ``auto`` picks Triton for CUDA tensors and the torch reference elsewhere (the CPU path of the library is the
    reference, not the interpreter). ``triton`` on CPU tensors needs ``TRITON_INTERPRET=1``.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("impl='triton' needs the triton package, which is not installed")
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got tensors on {device}")
    return "triton"


def fast_math(device: torch.device) -> bool:
    """Hardware approximations (PTX lg2/sin/cos.approx) only when compiling for an NVIDIA GPU."""
    return device.type == "cuda" and torch.version.hip is None and not interpreting()


def as_tensor_list(tensors, name: str = "tensors") -> list[torch.Tensor]:
    """One tensor or a list/tuple of tensors, as a list; raises TypeError naming the culprit."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    if not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(tensors)


def check_float_tensors(tensors: list[torch.Tensor], name: str = "tensors", dtypes=FLOAT_DTYPES) -> None:
    """Floating dtype, one device, contiguous, no two tensors sharing memory. Raises before anything is modified."""
    device = tensors[0].device if tensors else None
    for i, t in enumerate(tensors):
        if t.dtype not in dtypes:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
        if t.device != device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {device}: one device per call")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] (shape {tuple(t.shape)}) is not contiguous")
    check_disjoint(tensors, name, "share memory: each would be updated twice")


def check_disjoint(tensors: list[torch.Tensor], name: str, why: str) -> None:
    """No two (contiguous) tensors' byte ranges overlap: views of one storage count, not only equal start pointers
    (``[b[0:4], b[2:6]]`` would update ``b[2:4]`` twice). Sorted by start, any overlap shows between neighbours."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), i)
                   for i, t in enumerate(tensors) if t.numel())
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name}[{min(i, j)}] and {name}[{max(i, j)}] {why}")


def check_scale(scale, name: str = "scale") -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(scale.shape)}")
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{name} must be finite, got {scale}")
    return scale


def f32_scalar(x: float) -> float:
    """``x`` rounded to float32, so that a torch reference and its Triton kernel (an fp32 scalar) use one value."""
    return float(torch.tensor(x, dtype=torch.float32))


def check_streams(streams, n: int, name: str = "streams") -> list[int]:
    """``None`` gives ``0 .. n-1``; otherwise one int in [0, 2**32) per tensor."""
    if streams is None:
        return list(range(n))
    if isinstance(streams, int):
        streams = [streams]
    streams = list(streams)
    if len(streams) != n:
        raise ValueError(f"{name} has {len(streams)} entries for {n} tensors")
    return [rng.check_stream(s, f"{name}[{i}]") for i, s in enumerate(streams)]


def check_offsets(offsets, n: int, name: str = "offsets") -> list[int]:
    """``None`` gives zeros; otherwise one int in [0, 2**62) per tensor: the global flat index of the tensor's first
    element in the (unsharded) tensor whose noise it draws. A rank holding elements ``[o, o + n)`` of a tensor then
    draws exactly ``z[o:o + n]`` of the whole (:mod:`zokernels.rng`: the noise is a function of the element index)."""
    if offsets is None:
        return [0] * n
    if isinstance(offsets, int):
        offsets = [offsets]
    offsets = list(offsets)
    if len(offsets) != n:
        raise ValueError(f"{name} has {len(offsets)} entries for {n} tensors")
    for i, o in enumerate(offsets):
        if isinstance(o, bool) or not isinstance(o, int):
            raise TypeError(f"{name}[{i}] must be a Python int, got {type(o).__name__}")
        if not 0 <= o < 2**62:  # block starts and ends stay int64 in the launch table
            raise ValueError(f"{name}[{i}] must be in [0, 2**62), got {o}")
    return offsets


def check_dist(dist: str) -> str:
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    return dist


def seed_pieces(seed: int) -> tuple[int, int, int, int]:
    """A 64-bit seed as four 16-bit integers, low first (see ``rng.seed_key_tl``)."""
    return seed & 0xFFFF, (seed >> 16) & 0xFFFF, (seed >> 32) & 0xFFFF, (seed >> 48) & 0xFFFF


# ---------------------------------------------------------------------------------------------------------------------
# Launch constants, one set for every kernel file.
#
# Elements per chunk of the torch references. Chunks bound the temporaries (about a dozen int64 Philox tensors of
# chunk/8 entries) whatever the tensor size. Measured on the 2-core CI CPU, Gaussian over 4 Mi fp32 elements:
# 87 ms at 16 Ki, 40 ms at 64 Ki, 36 ms at 256 Ki, 31 ms unchunked (per-op dispatch dominates small chunks).
TORCH_CHUNK = 1 << 18
# Elements per Triton program: a power of two and a multiple of 128 (one Rademacher call) and of 8 (one Gaussian
# call). 4096 (16 per thread at 8 warps) lets each thread own whole 16-element Rademacher groups: at 2048, two threads
# recomputed each group's Philox call (2.8-4.6 calls per thread instead of 1).
TRITON_BLOCK = 4096
TRITON_WARPS = 8


def check_block(block) -> int | None:
    """``block`` (Triton elements per program) as given, after checking it is ``None`` (the launcher's default) or a
    power of two and a multiple of 128 (whole Rademacher calls). Raises ValueError before anything is modified."""
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, int) or block < rng.RADEMACHER_PER_CALL \
            or block % rng.RADEMACHER_PER_CALL or block & (block - 1):
        raise ValueError(f"block must be a power of two and a multiple of 128, got {block}")
    return block


# ---------------------------------------------------------------------------------------------------------------------
# Launch tables: one launch serves a whole list of tensors (a LoRA model has hundreds of small tensors, and a launch
# costs ~5 us). Program p reads row p of an int64 table whose first columns every kernel shares (read on the device
# by ``table_row_tl``):
#   OFFSET  the tensor's first element, in elements from the launch's base tensor (may be negative; tensors of one
#           dtype are aligned to their itemsize, so byte distances divide evenly), minus its global offset ``o``
#   NUMEL   the end of its elements in global index, ``o + numel``
#   STREAM  its noise stream
#   BLOCK   which block of the tensor the program handles (global elements BLOCK*block .. +block)
# A tensor with a global offset ``o`` (a shard holding elements ``[o, o + numel)`` of a larger tensor) is cut into
# blocks of the *global* index, so a block's noise is generated exactly as for the whole tensor and the kernel's
# element arrangement (rng.arranged_offsets_tl) stays aligned to Philox calls; only its first block may start before
# ``o``. Such a table (``offsets`` given, any nonzero) has one more column, the last: LO = ``o``, which the kernel
# reads to mask the elements below it. With every offset 0 the table is the unsharded one, with no LO column.
# With ``matrix=True`` three more follow, so that a kernel finds the row and column of its elements with 32-bit
# arithmetic only (a 64-bit division is a ~70-instruction subroutine on the GPU):
#   NCOLS   elements per row (the last dimension; 1 for a 0-d tensor)
#   ROW0    the (local) row of the block's first element (negative in a shard's first block when it starts before o)
#   COL0    that element's column
# then the kernel's own per-tensor columns (``extra``), from column ``table.shape[1] - len(extra)`` on.
OFFSET, NUMEL, STREAM, BLOCK, NCOLS, ROW0, COL0 = range(7)
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 64


def launch_table(tensors: list[torch.Tensor], streams: list[int], block: int, *, extra=None,
                 matrix: bool = False, offsets: list[int] | None = None) -> tuple[torch.Tensor, bool]:
    """The per-block launch table (int64 ``(n_blocks, 4 [+ 3] + len(extra[i]))`` on the tensors' device) and whether
    every tensor starts on a 16-byte boundary (then the kernel may promise aligned vector loads).

    ``tensors`` share one device and, where a kernel reads them through OFFSET, one dtype (``guide_dot`` reads no
    weight and mixes them); offsets are counted from ``tensors[0]``. ``extra``: one tuple of ints per
    tensor (all of one length), appended to each of its rows. ``offsets``: each tensor's global offset (above);
    any nonzero adds the LO column and counts aligned only where ``o`` is a multiple of the 16-byte vector. Cached
    by layout: a training step launches the same lists again and again.
    """
    base = tensors[0]
    itemsize = base.element_size()
    extra = [tuple(e) for e in extra] if extra is not None else [()] * len(tensors)
    offsets = offsets if offsets is not None and any(offsets) else None
    key = (base.device, base.dtype, block, matrix, offsets is not None,
           tuple((t.data_ptr(), tuple(t.shape), s, e, o) for t, s, e, o in
                 zip(tensors, streams, extra, offsets or [0] * len(tensors))))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    rows, aligned = [], True
    for i, (t, s, e) in enumerate(zip(tensors, streams, extra)):
        o = offsets[i] if offsets is not None else 0
        lo = (o,) if offsets is not None else ()
        distance = t.data_ptr() - base.data_ptr()
        assert t.dtype != base.dtype or distance % itemsize == 0, "tensors of one dtype are aligned to their itemsize"
        aligned &= t.data_ptr() % 16 == 0 and (o * itemsize) % 16 == 0
        blocks = range(o // block, (o + t.numel() + block - 1) // block)
        if matrix:
            ncols = t.shape[-1] if t.dim() else 1
            if ncols + block >= 2**31:  # in-row positions of a block's elements are int32 on the device
                raise ValueError(f"tensors[{i}] has {ncols} columns; the Triton path takes fewer than 2**31 - {block}")
            # Python's floor division: a first block starting before o has a negative row and a column in [0, ncols)
            rows.extend((distance // itemsize - o, o + t.numel(), s, b, ncols, (b * block - o) // ncols,
                         (b * block - o) % ncols, *e, *lo) for b in blocks)
        else:
            rows.extend((distance // itemsize - o, o + t.numel(), s, b, *e, *lo) for b in blocks)
    cols = 4 + 3 * matrix + (len(extra[0]) if extra else 0) + (offsets is not None)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, cols).to(base.device)
    if len(_TABLE_CACHE) >= _TABLE_CACHE_SIZE:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = (table, aligned)
    return table, aligned


def group_by_dtype(tensors: list[torch.Tensor], streams: list[int]):
    """``{dtype: (tensors, streams)}`` without empty tensors: one launch per dtype."""
    groups: dict = {}
    for t, s in zip(tensors, streams):
        if t.numel():
            ts, ss = groups.setdefault(t.dtype, ([], []))
            ts.append(t)
            ss.append(s)
    return groups


def split_small(tensors: list[torch.Tensor], chunk: int) -> tuple[list[int], list[list[int]]]:
    """(indices of tensors of at least ``chunk // 4`` elements, batches of indices of the smaller ones, each batch
    closed once it reaches ``chunk`` elements). The torch references process a batch with one Philox evaluation: a
    LoRA model's hundreds of small tensors otherwise pay per-op dispatch each."""
    large, batches, batch, size = [], [], [], 0
    for i, t in enumerate(tensors):
        if t.numel() >= chunk // 4:
            large.append(i)
            continue
        batch.append(i)
        size += t.numel()
        if size >= chunk:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return large, batches


# ---------------------------------------------------------------------------------------------------------------------
# The device side of the launch table
if triton_available():
    import triton
    import triton.language as tl

    # The first of the kernel's own columns in a table built with matrix=True (``launch_table``).
    MATRIX_EXTRA_TL = tl.constexpr(7)

    @triton.jit
    def table_row_tl(table_ptr, COLS: tl.constexpr, BLOCK: tl.constexpr):
        """This program's row of a launch table of ``COLS`` columns: (program id, pointer to the row, OFFSET, NUMEL,
        STREAM, the block's first element), all int64."""
        pid = tl.program_id(0).to(tl.int64)
        row = table_ptr + pid * COLS
        return pid, row, tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3) * BLOCK

    @triton.jit
    def block_bounds_tl(row, numel, start, BLOCK: tl.constexpr, OFFSETS: tl.constexpr, COLS: tl.constexpr):
        """(rem, first, full) of a block starting at global element ``start``: its elements that belong to the tensor
        are the arranged offsets in ``[first, rem)`` (int32), all of them when ``full``. ``numel`` is the table's
        NUMEL (the end); with ``OFFSETS`` the table's last column holds the tensor's first global element, below which
        a shard's first block is masked; without, ``first`` is the constant 0 and the mask is the tail's only."""
        rem = tl.minimum(numel - start, BLOCK).to(tl.int32)
        if OFFSETS:
            lo = tl.load(row + COLS - 1)
            return rem, tl.maximum(lo - start, 0).to(tl.int32), (start >= lo) & (start + BLOCK <= numel)
        else:
            return rem, 0, start + BLOCK <= numel

    @triton.jit
    def block_mask_tl(local, rem, first, OFFSETS: tl.constexpr):
        """The mask of :func:`block_bounds_tl`'s ``[first, rem)``: one comparison of 32-bit offsets without OFFSETS.
        Kernels build it where a masked access needs it: built once ahead of the full-block branch, it changed the
        unsharded kernels' register allocation (perturb2_ fp16 Gaussian SR: 80 -> 96 registers on sm_90)."""
        if OFFSETS:
            return (local >= first) & (local < rem)
        else:
            return local < rem

    @triton.jit
    def matrix_row_col_tl(row, local):
        """Row (int64) and column (int32) of the elements ``local`` (int32 offsets from the block's first) of a table
        row built with matrix=True: 32-bit divisions per element, none in 64 bits (``NCOLS + BLOCK < 2**31``)."""
        ncols = tl.load(row + 4).to(tl.int32)
        in_row = tl.load(row + 6).to(tl.int32) + local
        di = in_row // ncols
        return tl.load(row + 5) + di, in_row - di * ncols
