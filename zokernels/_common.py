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


def check_dist(dist: str) -> str:
    if dist not in rng.DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {rng.DISTRIBUTIONS}, got {dist!r}")
    return dist


def seed_pieces(seed: int) -> tuple[int, int, int, int]:
    """A 64-bit seed as four 16-bit integers, low first (see ``rng.seed_key_tl``)."""
    return seed & 0xFFFF, (seed >> 16) & 0xFFFF, (seed >> 32) & 0xFFFF, (seed >> 48) & 0xFFFF


# A launch over many tensors: program p handles block table[p, 3] of the tensor whose first element sits
# table[p, 0] elements away from the base tensor's first element (the offset may be negative), with table[p, 1]
# elements and stream table[p, 2]. Tensors of one dtype are aligned to their itemsize, so byte distances divide
# evenly. One launch for the whole list: a LoRA model has hundreds of small tensors, and launches cost ~5 us each.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_SIZE = 64


def block_table(tensors: list[torch.Tensor], streams: list[int], block: int) -> tuple[torch.Tensor, bool]:
    """The per-block launch table (int64 ``(n_blocks, 4)`` on the tensors' device) and whether every tensor starts
    on a 16-byte boundary (then the kernel may promise aligned vector loads). Cached by layout."""
    base = tensors[0]
    itemsize = base.element_size()
    key = (base.device, base.dtype, block,
           tuple((t.data_ptr(), t.numel(), s) for t, s in zip(tensors, streams)))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    rows, aligned = [], True
    for t, s in zip(tensors, streams):
        distance = t.data_ptr() - base.data_ptr()
        assert distance % itemsize == 0, "tensors of one dtype are aligned to their itemsize"
        aligned &= t.data_ptr() % 16 == 0
        n_blocks = (t.numel() + block - 1) // block
        rows.extend((distance // itemsize, t.numel(), s, b) for b in range(n_blocks))
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(base.device)
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
