"""Guided perturbations: noise mixed with per-tensor guide directions, generated inside the kernels.

ZOPrO's targeted direction for one tensor is ``z = d*prev + c*(xi - alpha*vhat)`` with ``xi`` the seeded noise,
``prev`` and ``vhat`` two guides of the tensor's shape, ``alpha = vhat . xi`` and ``c`` fixed by ``|xi - alpha*vhat|``.
Two ops make that affordable without any parameter-sized temporary:

* :func:`guide_dot` — one reduction pass that regenerates ``xi`` and reads one guide: per tensor
  ``(sum guide*xi, sum xi*xi)``, in float64, deterministically (block partials are combined in a fixed order, so a
  replayed run reproduces them bit for bit on the same device).
* :func:`guided_perturb_` — one in-place pass over the weights:
  ``w = decay[t]*w + sum_k x_k[t]*xi(seed_k) + sum_g c_g[t]*guide_g`` with per-tensor coefficients ``[t]``.

A guide is a dense tensor of the weight's shape (any float dtype: bf16 halves its traffic) or a :class:`LowRank`
``U @ V.T`` whose elements the kernel rebuilds on the fly (k multiply-adds per element, k*(m+n) numbers stored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zokernels import _common, rng

# Elements per program for LowRank guides (the others take _common.TRITON_BLOCK): at 2048 the rank loop fits in
# registers (4096: 255 registers and 256-384 bytes of spills).
TRITON_BLOCK_LOWRANK = 2048
MAX_NOISE = 2
MAX_GUIDES = 2
# LowRank ranks per iteration of the kernels' rank loop: unrolled, their loads take immediate address offsets
# (one rank per iteration spent two 64-bit address adds per element and rank).
LOWRANK_UNROLL = 4


@dataclass(frozen=True)
class LowRank:
    """A matrix stored as ``u @ v.T`` (``u``: ``(m, k)``, ``v``: ``(n, k)``); its singular values live in ``u``."""

    u: torch.Tensor
    v: torch.Tensor

    def __post_init__(self):
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]:
            raise ValueError(f"LowRank needs u (m, k) and v (n, k), got {tuple(self.u.shape)} and "
                             f"{tuple(self.v.shape)}")
        if self.u.dtype != self.v.dtype or self.u.device != self.v.device:
            raise ValueError("LowRank u and v must share dtype and device")
        if not (self.u.is_contiguous() and self.v.is_contiguous()):
            raise ValueError("LowRank u and v must be contiguous")

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.v.shape[0]

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def numel(self) -> int:
        return self.u.shape[0] * self.v.shape[0]

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0 .. r1-1`` of the dense matrix, float32."""
        return self.u[r0:r1].float() @ self.v.float().T

    def dense(self) -> torch.Tensor:
        return self.rows(0, self.u.shape[0])

    def sq_norm(self) -> torch.Tensor:
        """``|u v^T|_F^2 = trace((u^T u)(v^T v))`` without forming the matrix (float64 scalar tensor)."""
        u, v = self.u.double(), self.v.double()
        return ((u.T @ u) * (v.T @ v)).sum()

    @classmethod
    def from_matrix(cls, matrix: torch.Tensor, rank: int, *, seed: int = 0, niter: int = 4,
                    dtype: torch.dtype | None = None) -> LowRank:
        """Best rank-``rank`` approximation by randomised SVD (``torch.svd_lowrank``), seeded locally.

        ``svd_lowrank`` draws its sketch from torch's global generator; it runs inside ``fork_rng`` so the caller's
        generator state is left as it was.
        """
        if matrix.dim() != 2:
            raise ValueError(f"LowRank.from_matrix needs a matrix, got shape {tuple(matrix.shape)}")
        rank = min(rank, *matrix.shape)
        m = matrix.detach().float()
        devices = [m.device] if m.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if rank == min(m.shape):
                u, s, v = torch.linalg.svd(m, full_matrices=False)
                v = v.T
            else:
                u, s, v = torch.svd_lowrank(m, q=min(rank + 8, min(m.shape)), niter=niter)
        dtype = dtype or matrix.dtype
        return cls((u[:, :rank] * s[:rank]).to(dtype).contiguous(), v[:, :rank].to(dtype).contiguous())


def _check_guides(guides, tensors, name):
    """Each guide is None, a tensor of its weight's shape, or a LowRank of its (2-D) weight's shape."""
    if len(guides) != len(tensors):
        raise ValueError(f"{name} has {len(guides)} entries for {len(tensors)} tensors")
    kinds = set()
    for i, (g, w) in enumerate(zip(guides, tensors)):
        if g is None:
            continue
        if isinstance(g, LowRank):
            if w.dim() != 2 or tuple(w.shape) != g.shape:
                raise ValueError(f"{name}[{i}] is LowRank of shape {g.shape} but its tensor has shape {tuple(w.shape)}")
            kinds.add("lowrank")
            if g.u.device != w.device:
                raise ValueError(f"{name}[{i}] is on {g.u.device} but its tensor is on {w.device}")
        elif isinstance(g, torch.Tensor):
            if g.shape != w.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(g.shape)} but its tensor has {tuple(w.shape)}")
            if g.dtype not in _common.FLOAT_DTYPES or g.device != w.device or not g.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous float tensor on {w.device}")
            kinds.add("dense")
        else:
            raise TypeError(f"{name}[{i}] must be None, a tensor or a LowRank, got {type(g).__name__}")
    if len(kinds) > 1:
        raise ValueError(f"{name} mixes dense and LowRank guides; pass one kind per call")


def _check_coef(coef, n, name):
    if not isinstance(coef, torch.Tensor) or coef.dim() != 1 or coef.numel() != n or not coef.is_floating_point():
        raise ValueError(f"{name} must be a 1-D float tensor with one coefficient per tensor ({n})")
    return coef


# ---------------------------------------------------------------------------------------------------------------------
# Torch reference
def _chunks(w: torch.Tensor, guides):
    """(start, end) element ranges; for LowRank guides they are whole rows, so the guide chunk is ``rows(r0, r1)``."""
    n = w.numel()
    if any(isinstance(g, LowRank) for g in guides) and n:
        cols = w.shape[1]
        rows = max(1, _common.TORCH_CHUNK // cols)
        return [(r * cols, min(n, (r + rows) * cols)) for r in range(0, w.shape[0], rows)]
    return [(s, min(n, s + _common.TORCH_CHUNK)) for s in range(0, n, _common.TORCH_CHUNK)]


def _guide_chunk(g, w, s, e):
    if isinstance(g, LowRank):
        cols = w.shape[1]
        return g.rows(s // cols, e // cols).reshape(-1)
    return g.reshape(-1)[s:e].float()


def _flat_guide(g) -> torch.Tensor:
    """A small tensor's whole guide, flat float32 (a view for a float32 dense guide: never modify it)."""
    return g.dense().reshape(-1) if isinstance(g, LowRank) else g.reshape(-1).float()


def _guide_dot_torch(tensors, guides, seed, dist, streams, offsets):
    out = torch.zeros(len(tensors), 2, dtype=torch.float64)
    large, batches = _common.split_small(tensors, _common.TORCH_CHUNK)
    for t in large:
        w, g, stream = tensors[t], guides[t], streams[t]
        for s, e in _chunks(w, [g]):
            xi = rng.noise(dist, seed, stream, offsets[t] + s, e - s, device=w.device).double()
            if g is not None:
                out[t, 0] += (_guide_chunk(g, w, s, e).double() * xi).sum().cpu()
            out[t, 1] += (xi * xi).sum().cpu()
    for idx in batches:
        numels = [tensors[i].numel() for i in idx]
        device = tensors[idx[0]].device
        xi = rng.noise_batch(dist, seed, [streams[i] for i in idx], numels, device=device,
                             starts=[offsets[i] for i in idx]).double()
        g = torch.cat([_flat_guide(guides[i]) if guides[i] is not None
                       else torch.zeros(tensors[i].numel(), device=device) for i in idx]).double()
        segment = torch.repeat_interleave(torch.arange(len(idx), device=device), torch.tensor(numels, device=device))
        sums = torch.zeros(len(idx), 2, dtype=torch.float64, device=device)
        sums[:, 0].index_add_(0, segment, g * xi)  # sequential on the CPU: deterministic
        sums[:, 1].index_add_(0, segment, xi * xi)
        out[torch.tensor(idx)] = sums.cpu()
    return out


def _guided_perturb_torch(tensors, streams, noise_terms, guide_terms, decay, dist, offsets):
    decay = decay.tolist()
    noise_terms = [(seed, coef.tolist()) for seed, coef in noise_terms]
    guide_terms = [(guides, coef.tolist()) for guides, coef in guide_terms]
    large, batches = _common.split_small(tensors, _common.TORCH_CHUNK)
    for t in large:
        w, stream = tensors[t], streams[t]
        flat = w.view(-1)
        for s, e in _chunks(w, [gs[t] for gs, _ in guide_terms]):
            y = flat[s:e] if w.dtype == torch.float32 else flat[s:e].float()
            if decay[t] != 1.0:
                y.mul_(decay[t])
            for seed, coef in noise_terms:
                y.add_(rng.noise(dist, seed, stream, offsets[t] + s, e - s, device=w.device).mul_(coef[t]))
            for guides, coef in guide_terms:
                if guides[t] is not None:
                    y.add_(_guide_chunk(guides[t], w, s, e) * coef[t])  # a float32 guide chunk is a view: no mul_
            if w.dtype != torch.float32:
                flat[s:e] = y
    for idx in batches:
        # the same float32 operations, element by element, as the large-tensor path: mul, then add, in this order
        ws = [tensors[i] for i in idx]
        ys = [w.view(-1) if w.dtype == torch.float32 else w.view(-1).float() for w in ws]
        torch._foreach_mul_(ys, [decay[i] for i in idx])
        numels = [w.numel() for w in ws]
        for seed, coef in noise_terms:
            zs = list(rng.noise_batch(dist, seed, [streams[i] for i in idx], numels, device=ws[0].device,
                                      starts=[offsets[i] for i in idx]).split(numels))
            torch._foreach_mul_(zs, [coef[i] for i in idx])
            torch._foreach_add_(ys, zs)
        for guides, coef in guide_terms:
            sel = [j for j, i in enumerate(idx) if guides[i] is not None]
            if sel:
                scaled = torch._foreach_mul([_flat_guide(guides[idx[j]]) for j in sel],
                                            [coef[idx[j]] for j in sel])
                torch._foreach_add_([ys[j] for j in sel], scaled)
        for w, y in zip(ws, ys):
            if w.dtype != torch.float32:
                w.view(-1).copy_(y)


# ---------------------------------------------------------------------------------------------------------------------
# Triton kernels
# The launch table (``_common.launch_table`` with matrix=True) carries, after its shared columns, the tensor's index
# (its row of coefficients) and for each of the two guides: has-guide flag, offset (dense: the guide; LowRank: u),
# offset of v, rank (``_guide_columns``).

if _common.triton_available():
    import triton
    import triton.language as tl

    from zokernels._common import MATRIX_EXTRA_TL, block_bounds_tl, block_mask_tl, matrix_row_col_tl, table_row_tl
    from zokernels.rng import arranged_offsets_tl, noise_arranged_tl, seed_key_tl
    from zokernels.rounding import round_nearest_bf16_tl

    _UNROLL = tl.constexpr(LOWRANK_UNROLL)
    # LowRank guides rebuild an element from k products in a loop over the tensor's own rank (a runtime bound), one
    # rank per iteration: registers stay bounded whatever the rank. Unrolled over rank 64, the compiler kept every
    # tile live (255 registers, 2.5-3.9 KB of spills per thread); a loop over (BLOCK, 4) tiles still needed 255
    # registers, for the 64-bit addresses of both tiles.
    #
    # Elements are arranged as in perturb (rng.arranged_offsets_tl: each thread computes its Philox calls once), and
    # full blocks load and store without a mask (128-bit accesses where the data is aligned).

    @triton.jit
    def _lowrank_acc_tl(acc, u_ptrs, v_ptrs, k, mask, MASKED: tl.constexpr, RVEC: tl.constexpr):
        """``acc + sum_r u[., r] * v[., r]`` for ranks r = 0 .. k-1 in order (one rounding per product and per sum,
        as the interpreter computes it): whole chunks of LOWRANK_UNROLL ranks, then the remaining ones. Masked loads
        give 0, and ``acc + 0 * 0`` is acc (acc starts at +0 and a sum never rounds to -0), so the tail block's
        masked elements and the full blocks' unmasked ones add the same products. With ``RVEC`` (every rank a
        multiple of 4 and u, v aligned to 4 elements: the launcher checks) a chunk's four ranks are one vector load
        per element and factor, split back into four products added in rank order."""
        k_main = k - k % _UNROLL
        for r0 in tl.range(0, k_main, _UNROLL):
            if RVEC and not MASKED:
                q = tl.arange(0, 4)[None, None, None, :]
                u4 = tl.load(u_ptrs[:, :, :, None] + (r0 + q)).to(tl.float32)
                v4 = tl.load(v_ptrs[:, :, :, None] + (r0 + q)).to(tl.float32)
                p02, p13 = tl.split(tl.reshape(u4 * v4, u4.shape[:3] + [2, 2]))
                p0, p2 = tl.split(p02)
                p1, p3 = tl.split(p13)
                acc = (((acc + p0) + p1) + p2) + p3
            else:
                for dr in tl.static_range(_UNROLL):
                    if MASKED:
                        u = tl.load(u_ptrs + (r0 + dr), mask=mask, other=0.0).to(tl.float32)
                        v = tl.load(v_ptrs + (r0 + dr), mask=mask, other=0.0).to(tl.float32)
                    else:
                        u = tl.load(u_ptrs + (r0 + dr)).to(tl.float32)
                        v = tl.load(v_ptrs + (r0 + dr)).to(tl.float32)
                    acc += u * v
        for r in tl.range(k_main, k):
            if MASKED:
                u = tl.load(u_ptrs + r, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(v_ptrs + r, mask=mask, other=0.0).to(tl.float32)
            else:
                u = tl.load(u_ptrs + r).to(tl.float32)
                v = tl.load(v_ptrs + r).to(tl.float32)
            acc += u * v
        return acc

    @triton.jit
    def _guide_tl(gbase, row, K: tl.constexpr, start, local, mask, full, LOWRANK: tl.constexpr, GVEC: tl.constexpr):
        """Guide ``K`` of this block's tensor at elements ``start + local`` (0 where it has none), float32."""
        cols = row + MATRIX_EXTRA_TL + 1 + 4 * K  # has-guide, offset, offset of v, rank
        has = tl.load(cols)
        off = tl.load(cols + 1)
        if LOWRANK:
            acc = tl.zeros(local.shape, tl.float32)
            if has != 0:  # a uniform branch: a tensor without this guide loads nothing (its acc stays +0)
                v_off = tl.load(cols + 2)
                k = tl.load(cols + 3)
                i, j = matrix_row_col_tl(row, local)
                if GVEC > 1:  # RVEC: offsets and ranks are multiples of 4 (the launcher checked)
                    u_ptrs = gbase + tl.multiple_of(off, 4) + i * (k // 4 * 4)
                    v_ptrs = gbase + tl.multiple_of(v_off, 4) + j * (k // 4 * 4)
                else:
                    u_ptrs = gbase + off + i * k
                    v_ptrs = gbase + v_off + j * k
                if full:  # no per-element mask: the loads need no predicate and no zero fill
                    acc = _lowrank_acc_tl(acc, u_ptrs, v_ptrs, k, mask, False, GVEC > 1)
                else:
                    acc = _lowrank_acc_tl(acc, u_ptrs, v_ptrs, k, mask, True, GVEC > 1)
            return acc
        else:
            ptrs = gbase + (tl.multiple_of(off, GVEC) + start) + local
            if has == 0:
                g = tl.zeros(local.shape, tl.float32)
            elif full:
                g = tl.load(ptrs).to(tl.float32)
            else:
                g = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            return g

    @triton.jit
    def _block_start(table_ptr, BLOCK: tl.constexpr, G: tl.constexpr, V: tl.constexpr, COLS: tl.constexpr,
                     OFFSETS: tl.constexpr):
        """(program, its table row, OFFSET, STREAM, first element, arranged offsets, element mask, full block?)."""
        pid, row, offset, numel, stream, start = table_row_tl(table_ptr, COLS, BLOCK)
        local = arranged_offsets_tl(BLOCK, G, V)
        rem, first, full = block_bounds_tl(row, numel, start, BLOCK, OFFSETS, COLS)
        return pid, row, offset, stream, start, local, block_mask_tl(local, rem, first, OFFSETS), full

    @triton.jit(do_not_specialize=["s0", "s1", "s2", "s3"])
    def _guide_dot_kernel(gbase, table_ptr, partial_ptr, s0, s1, s2, s3,
                          BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr,
                          LOWRANK: tl.constexpr, GVEC: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                          COLS: tl.constexpr, OFFSETS: tl.constexpr = False):
        pid, row, _, stream, start, local, mask, full = _block_start(table_ptr, BLOCK, G, V, COLS, OFFSETS)
        k0, k1 = seed_key_tl(s0, s1, s2, s3)
        xi = tl.where(mask, noise_arranged_tl(k0, k1, stream, start, BLOCK, G, V, GAUSSIAN, FAST), 0.0)
        g = _guide_tl(gbase, row, 0, start, local, mask, full, LOWRANK, GVEC)
        tl.store(partial_ptr + pid * 2, tl.sum(tl.sum(tl.sum(g * xi, axis=2), axis=1), axis=0))
        tl.store(partial_ptr + pid * 2 + 1, tl.sum(tl.sum(tl.sum(xi * xi, axis=2), axis=1), axis=0))

    @triton.jit(do_not_specialize=["a0", "a1", "a2", "a3", "b0", "b1", "b2", "b3"])
    def _guided_perturb_kernel(wbase, gbase, table_ptr, coef_ptr, a0, a1, a2, a3, b0, b1, b2, b3,
                               BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, FAST: tl.constexpr,
                               N_NOISE: tl.constexpr, N_GUIDES: tl.constexpr, LOWRANK: tl.constexpr,
                               VEC: tl.constexpr, GVEC: tl.constexpr, G: tl.constexpr, V: tl.constexpr,
                               COLS: tl.constexpr, OFFSETS: tl.constexpr = False):
        _, row, _, stream, start, local, mask, full = _block_start(table_ptr, BLOCK, G, V, COLS, OFFSETS)
        # the OFFSET column loaded here, not taken from _block_start: tl.multiple_of on a value returned through a
        # helper's tuple failed an assertion in Triton 3.9's AxisInfo (TritonGPUCoalesce) for this kernel
        offset = tl.multiple_of(tl.load(row), VEC)
        coef = coef_ptr + tl.load(row + MATRIX_EXTRA_TL) * (1 + N_NOISE + N_GUIDES)
        ptrs = wbase + (offset + start) + local
        if full:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
        y = x.to(tl.float32) * tl.load(coef)
        if N_NOISE >= 1:
            k0, k1 = seed_key_tl(a0, a1, a2, a3)
            y = y + tl.load(coef + 1) * noise_arranged_tl(k0, k1, stream, start, BLOCK, G, V, GAUSSIAN, FAST)
        if N_NOISE >= 2:
            k0, k1 = seed_key_tl(b0, b1, b2, b3)
            y = y + tl.load(coef + 2) * noise_arranged_tl(k0, k1, stream, start, BLOCK, G, V, GAUSSIAN, FAST)
        if N_GUIDES >= 1:
            y = y + tl.load(coef + 1 + N_NOISE) * _guide_tl(gbase, row, 0, start, local, mask, full, LOWRANK, GVEC)
        if N_GUIDES >= 2:
            y = y + tl.load(coef + 2 + N_NOISE) * _guide_tl(gbase, row, 1, start, local, mask, full, LOWRANK, GVEC)
        if wbase.dtype.element_ty == tl.bfloat16 and not FAST:  # see perturb: compiled for NVIDIA, the cast is RNE
            y = round_nearest_bf16_tl(y)
        if full:
            tl.store(ptrs, y.to(wbase.dtype.element_ty))
        else:
            tl.store(ptrs, y.to(wbase.dtype.element_ty), mask=mask)


def _guide_storage(guide_lists):
    """(base tensor of every guide in ``guide_lists``, lowrank?); the kernels find each guide by its offset from it."""
    flat = [g for gs in guide_lists for g in gs if g is not None]
    if not flat:
        return None, False
    lowrank = isinstance(flat[0], LowRank)
    parts = [p for g in flat for p in ((g.u, g.v) if lowrank else (g,))]
    dtypes = {p.dtype for p in parts}
    if len(dtypes) > 1:
        raise ValueError(f"the Triton path needs all guides of one call in one dtype, got {sorted(map(str, dtypes))}")
    return parts[0], lowrank


def _guide_vec(guides, lowrank, offsets=()) -> int:
    """Elements per 16 bytes of the dense guides if every one starts on a 16-byte boundary and every global offset
    is a whole number of 16 bytes (then the kernel may promise aligned vector loads), else 1. For LowRank guides: 4
    if every rank is a multiple of 4 and every u and v starts on a 4-element boundary (then a thread loads 4 ranks
    of an element at once), else 1 (their addresses come from rows and columns, not offsets)."""
    if lowrank:
        parts = [p for g in guides if g is not None for p in (g.u, g.v)]
        ok = parts and all(g.rank % 4 == 0 for g in guides if g is not None) \
            and all(p.data_ptr() % (4 * p.element_size()) == 0 for p in parts)
        return 4 if ok else 1
    dense = [g for g in guides if g is not None and not lowrank]
    if not dense or any(g.data_ptr() % 16 for g in dense) or any(o * dense[0].element_size() % 16 for o in offsets):
        return 1
    return 16 // dense[0].element_size()


def _guide_columns(tensors, guide_lists, gbase, offsets) -> list[tuple]:
    """Per tensor, the kernels' own table columns: its index, then for each of ``MAX_GUIDES`` guides (has-guide flag,
    offset from ``gbase`` (dense: the guide, less the tensor's global offset, as the weight's OFFSET column;
    LowRank: u), offset of v, rank), zeros where there is none."""
    out = []
    for t in range(len(tensors)):
        cols = [t]
        for gs in list(guide_lists) + [[None] * len(tensors)] * (MAX_GUIDES - len(guide_lists)):
            g = gs[t]
            if g is None:
                cols += [0, 0, 0, 0]
            elif isinstance(g, LowRank):
                size = g.u.element_size()
                cols += [1, (g.u.data_ptr() - gbase.data_ptr()) // size, (g.v.data_ptr() - gbase.data_ptr()) // size,
                         g.rank]
            else:
                cols += [1, (g.data_ptr() - gbase.data_ptr()) // g.element_size() - offsets[t], 0, 0]
        out.append(tuple(cols))
    return out


def _triton_table(tensors, streams, guide_lists, gbase, block, offsets):
    """The launch table of tensors of one dtype (the caller groups them) and whether they are 16-byte aligned."""
    return _common.launch_table(tensors, streams, block, extra=_guide_columns(tensors, guide_lists, gbase, offsets),
                                matrix=True, offsets=offsets)


def _guide_dot_triton(tensors, guides, seed, dist, streams, offsets, block=None):
    keep = [i for i, w in enumerate(tensors) if w.numel()]
    out = torch.zeros(len(tensors), 2, dtype=torch.float64, device=tensors[0].device)
    if not keep:
        return out.cpu()
    ts, gs, ss = [tensors[i] for i in keep], [guides[i] for i in keep], [streams[i] for i in keep]
    os_ = [offsets[i] for i in keep]
    gbase, lowrank = _guide_storage([gs])
    block = block or (TRITON_BLOCK_LOWRANK if lowrank else _common.TRITON_BLOCK)
    table, _ = _triton_table(ts, ss, [gs], gbase if gbase is not None else ts[0], block, os_)
    partial = torch.empty(table.shape[0], 2, dtype=torch.float32, device=ts[0].device)
    gtensor = gbase if gbase is not None else ts[0]
    _guide_dot_kernel[(table.shape[0],)](
        gtensor, table, partial, *_common.seed_pieces(seed),
        BLOCK=block, GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(ts[0].device), LOWRANK=lowrank,
        GVEC=_guide_vec(gs, lowrank, os_), G=rng.arranged_group(dist, gtensor.element_size()),
        V=16 // gtensor.element_size(), COLS=table.shape[1], OFFSETS=any(os_), num_warps=_common.TRITON_WARPS,
        enable_fp_fusion=False)  # pinned: Triton's default changes in 3.10, and replays rely on these sums' bits
    # Deterministic segment sums: blocks of a tensor are contiguous rows; a float64 prefix sum (a fixed-order scan)
    # and differences at segment ends avoid atomics, whose order changes from run to run.
    counts = torch.tensor([(o + w.numel() + block - 1) // block - o // block for w, o in zip(ts, os_)])
    ends = counts.cumsum(0)
    prefix = torch.cat([torch.zeros(1, 2, dtype=torch.float64, device=partial.device),
                        partial.double().cumsum(0)])
    sums = prefix[ends.to(partial.device)] - prefix[(ends - counts).to(partial.device)]
    out[torch.tensor(keep, device=out.device)] = sums
    return out.cpu()


def _guided_perturb_triton(tensors, streams, noise_terms, guide_terms, decay, dist, offsets, block=None):
    coef_cols = [decay] + [c for _, c in noise_terms] + [c for _, c in guide_terms]
    seeds = [s for s, _ in noise_terms] + [0] * (MAX_NOISE - len(noise_terms))
    guide_lists = [g for g, _ in guide_terms]
    by_dtype: dict = {}
    for t, w in enumerate(tensors):
        if w.numel():
            by_dtype.setdefault(w.dtype, []).append(t)
    for idx in by_dtype.values():
        ts = [tensors[i] for i in idx]
        gl = [[gs[i] for i in idx] for gs in guide_lists]
        gbase, lowrank = _guide_storage(gl)
        blk = block or (TRITON_BLOCK_LOWRANK if lowrank else _common.TRITON_BLOCK)
        os_ = [offsets[i] for i in idx]
        table, aligned = _triton_table(ts, [streams[i] for i in idx], gl, gbase if gbase is not None else ts[0], blk,
                                       os_)
        coef = torch.stack([c.float()[idx] for c in coef_cols], dim=1).contiguous().to(ts[0].device)
        _guided_perturb_kernel[(table.shape[0],)](
            ts[0], gbase if gbase is not None else ts[0], table, coef,
            *_common.seed_pieces(seeds[0]), *_common.seed_pieces(seeds[1]),
            BLOCK=blk, GAUSSIAN=dist == "gaussian", FAST=_common.fast_math(ts[0].device),
            N_NOISE=len(noise_terms), N_GUIDES=len(guide_terms), LOWRANK=lowrank,
            VEC=16 // ts[0].element_size() if aligned else 1,
            GVEC=_guide_vec([g for gs in gl for g in gs], lowrank, os_),
            G=rng.arranged_group(dist, ts[0].element_size()), V=16 // ts[0].element_size(), COLS=table.shape[1],
            OFFSETS=any(os_), num_warps=_common.TRITON_WARPS,
            enable_fp_fusion=False)  # each term is multiplied, then added (two roundings), as in the torch reference


# ---------------------------------------------------------------------------------------------------------------------
# Public ops
def guide_dot(tensors, guides, seed: int, *, dist: str = "gaussian", streams=None, impl: str = "auto",
              block: int | None = None, offsets=None) -> torch.Tensor:
    """Per tensor ``(sum guide * xi, sum xi * xi)`` with ``xi = noise(dist, seed, stream, index)``.

    Args:
        tensors: the weights (only their shapes, dtypes and device are used: they are not read or modified, so
            they need not be contiguous or own their memory: zero-stride stand-ins of a packed weight's shape do).
        guides: one entry per tensor: None (first column is 0), a dense tensor of the weight's shape, or a
            :class:`LowRank` of the (2-D) weight's shape.
        offsets: one int >= 0 per tensor (default 0): the global flat index of the tensor's first element, as in
            :func:`~zokernels.perturb.perturb_`; ``xi`` is drawn at the global indices, the guide is read at the
            local ones (a row shard of W pairs with the matching rows of a dense guide or of a LowRank's ``u``).
    Returns a CPU float64 tensor ``(len(tensors), 2)``; deterministic for a given device and impl. The sums over
    shards equal the whole's within reassociation: the torch path sums float64 products (relative to
    ``sum |guide*xi|``, below n * 2**-53); the Triton path adds float32 block partials (below BLOCK * 2**-24).
    """
    tensors = _common.as_tensor_list(tensors)
    _check_shapes_only(tensors)
    guides = list(guides)
    _check_guides(guides, tensors, "guides")
    seed = rng.check_seed(seed)
    _common.check_dist(dist)
    streams = _common.check_streams(streams, len(tensors))
    offsets = _common.check_offsets(offsets, len(tensors))
    block = _common.check_block(block)
    if not tensors:
        return torch.zeros(0, 2, dtype=torch.float64)
    with torch.no_grad():
        if _common.resolve_impl(impl, tensors[0].device) == "triton":
            return _guide_dot_triton(tensors, guides, seed, dist, streams, offsets, block)
        return _guide_dot_torch(tensors, guides, seed, dist, streams, offsets)


def _check_shapes_only(tensors) -> None:
    """guide_dot's check: float dtypes and one device (the tensors are never read)."""
    for i, t in enumerate(tensors):
        if t.dtype not in _common.FLOAT_DTYPES:
            raise TypeError(f"tensors[{i}] has dtype {t.dtype}; expected one of "
                            f"{', '.join(map(str, _common.FLOAT_DTYPES))}")
        if t.device != tensors[0].device:
            raise ValueError(f"tensors[{i}] is on {t.device} but tensors[0] is on {tensors[0].device}: one device "
                             "per call")


def guided_perturb_(tensors, *, noise=(), guides=(), decay=None, dist: str = "gaussian", streams=None,
                    impl: str = "auto", block: int | None = None, offsets=None) -> None:
    """In place: ``w[t] = decay[t]*w[t] + sum_k x_k[t]*xi(seed_k)[t] + sum_g c_g[t]*guide_g[t]``.

    Args:
        tensors: float32/bf16/fp16 contiguous weights on one device; modified in place (bf16/fp16 rounded to
            nearest once).
        noise: up to two ``(seed, x)`` pairs, ``x`` a 1-D float tensor with one coefficient per tensor.
        guides: up to two ``(guide_list, c)`` pairs; ``guide_list`` has one entry per tensor (None, a dense tensor
            of the weight's shape, or a :class:`LowRank`); ``c`` one coefficient per tensor.
        decay: per-tensor multipliers applied to the weights first (default all ones).
        offsets: one int >= 0 per tensor (default 0): the global index of its first element, as in :func:`guide_dot`.
    Nothing is modified if any argument is rejected.
    """
    tensors = _common.as_tensor_list(tensors)
    _common.check_float_tensors(tensors)
    n = len(tensors)
    noise, guides = list(noise), list(guides)
    if len(noise) > MAX_NOISE or len(guides) > MAX_GUIDES:
        raise ValueError(f"at most {MAX_NOISE} noise terms and {MAX_GUIDES} guide terms per pass")
    noise = [(rng.check_seed(s, f"noise[{k}] seed"), _check_coef(c, n, f"noise[{k}] coefficients"))
             for k, (s, c) in enumerate(noise)]
    for k, (gs, c) in enumerate(guides):
        _check_guides(list(gs), tensors, f"guides[{k}]")
        _check_coef(c, n, f"guides[{k}] coefficients")
    guides = [(list(gs), c) for gs, c in guides]
    decay = torch.ones(n) if decay is None else _check_coef(decay, n, "decay")
    for name, c in [("decay", decay)] + [(f"noise[{k}]", c) for k, (_, c) in enumerate(noise)] + \
            [(f"guides[{k}]", c) for k, (_, c) in enumerate(guides)]:
        if not torch.isfinite(c).all():
            raise ValueError(f"{name} coefficients must be finite")
    _common.check_dist(dist)
    streams = _common.check_streams(streams, n)
    offsets = _common.check_offsets(offsets, n)
    block = _common.check_block(block)
    if not tensors:
        return
    with torch.no_grad():
        if _common.resolve_impl(impl, tensors[0].device) == "triton":
            _guided_perturb_triton(tensors, streams, noise, guides, decay, dist, offsets, block)
        else:
            _guided_perturb_torch(tensors, streams, noise, guides, decay, dist, offsets)
