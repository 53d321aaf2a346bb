"""Global element offsets (``offsets=``): a shard holding elements ``[o, o + n)`` of a tensor is perturbed with exactly
``z[o:o + n]`` of the whole, so the pieces of a tensor, perturbed with their offsets and concatenated, equal the whole
tensor perturbed, bit for bit (stochastic-rounding bits included); guide dots of the pieces sum to the whole's.

Uneven pieces on purpose: 5 (not a whole Philox call, not a 16-byte vector), 1000, 37; and 8, 8, 1026, whose
offsets are whole vectors (the aligned Triton path) and whose middle piece starts and ends inside one block. Triton
runs in the interpreter on CPU (tests/conftest.py)."""

import pytest
import torch

from zokernels import _common, perturb2_, perturb_, rng
from zokernels.guided import LowRank, guide_dot, guided_perturb_

SPLITS = [[5, 1000, 37], [8, 8, 1026]]
BLOCK = 256  # several Triton blocks per piece, so first, inner and tail blocks all meet an offset


def _offsets(sizes):
    return [sum(sizes[:i]) for i in range(len(sizes))]


def _weights(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    return request.param


@pytest.fixture(params=[("torch", False), ("torch", True), ("triton", False)],
                ids=["torch-batched", "torch-chunked", "triton"])
def impl_path(request, monkeypatch):
    """The torch reference batches small tensors and chunks large ones; a 64-element chunk sends the pieces of 16
    elements or more (a quarter chunk) through the chunked path (chunks start inside them at 64, 128, ...)."""
    impl, chunked = request.param
    if chunked:
        monkeypatch.setattr(_common, "TORCH_CHUNK", 64)
    return impl


@pytest.mark.parametrize("sizes", SPLITS, ids=["5-1000-37", "8-8-1026"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_pieces_with_offsets_equal_the_whole_bit_for_bit(impl_path, sizes, dtype, dist):
    impl = impl_path
    w = _weights(sum(sizes), dtype)
    rounding = 9 if dtype == torch.bfloat16 else None  # stochastic rounding words also follow the global index
    whole = w.clone()
    perturb2_(whole, 1, 1e-3, 2, -1e-4, dist=dist, streams=[3], rounding_seed=rounding, decay=0.99, impl=impl,
              block=BLOCK)
    pieces = [p.clone() for p in w.split(sizes)]
    perturb2_(pieces, 1, 1e-3, 2, -1e-4, dist=dist, streams=[3] * 3, rounding_seed=rounding, decay=0.99, impl=impl,
              block=BLOCK, offsets=_offsets(sizes))
    assert torch.equal(torch.cat(pieces), whole)
    assert not torch.equal(whole, w)  # the perturbation did something
    if impl != "torch":
        return
    # the offsets matter: the same pieces drawn from their own index 0 differ from the whole
    unshifted = [p.clone() for p in w.split(sizes)]
    perturb_(unshifted, 1, 1e-3, dist=dist, streams=[3] * 3, impl=impl, block=BLOCK)
    single = w.clone()
    perturb_(single, 1, 1e-3, dist=dist, streams=[3], impl=impl, block=BLOCK)
    assert not torch.equal(torch.cat(unshifted), single)


def test_a_piece_mixed_with_unsharded_tensors_in_one_call(impl):
    """One launch, offsets 0 and nonzero side by side, two dtypes (one launch each)."""
    a, b, c = _weights(300, torch.float32, 1), _weights(1042, torch.float32, 2), _weights(77, torch.bfloat16, 3)
    ref = [a.clone(), b.clone(), c.clone()]
    perturb_(ref, 4, 0.1, streams=[0, 1, 2], impl=impl, block=BLOCK)
    tail = b[600:].clone()
    got = [a.clone(), tail, c.clone()]
    perturb_(got, 4, 0.1, streams=[0, 1, 2], offsets=[0, 600, 0], impl=impl, block=BLOCK)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1][600:]) and torch.equal(got[2], ref[2])


@pytest.mark.parametrize("bad, error, message", [
    ([0, -1, 5], ValueError, r"offsets\[1\] must be in \[0, 2\*\*62\)"),
    ([0, 5], ValueError, "offsets has 2 entries for 3 tensors"),
    ([0, 5.0, 7], TypeError, r"offsets\[1\] must be a Python int, got float"),
    ([0, True, 7], TypeError, r"offsets\[1\] must be a Python int, got bool"),
])
def test_bad_offsets_are_refused_before_anything_is_modified(bad, error, message):
    pieces = [_weights(n, torch.float32) for n in (5, 1000, 37)]
    before = [p.clone() for p in pieces]
    g = [torch.ones_like(p) for p in pieces]
    c = torch.ones(3)
    for call in (lambda: perturb_(pieces, 1, 1.0, offsets=bad),
                 lambda: perturb2_(pieces, 1, 1.0, 2, 1.0, offsets=bad),
                 lambda: guided_perturb_(pieces, noise=[(1, c)], guides=[(g, c)], offsets=bad),
                 lambda: guide_dot(pieces, g, 1, offsets=bad)):
        with pytest.raises(error, match=message):
            call()
    assert all(torch.equal(p, q) for p, q in zip(pieces, before))


# ---------------------------------------------------------------------------------------------------------------------
# Guided ops: row shards of a (41, 37) matrix, with the matching rows of a dense guide or of a LowRank's u
ROWS, COLS = [1, 37, 3], 37


def _guides(kind, g):
    dense = torch.randn(sum(ROWS), COLS, generator=g)
    lowrank = LowRank(torch.randn(sum(ROWS), 4, generator=g), torch.randn(COLS, 4, generator=g))
    whole = dense if kind == "dense" else lowrank
    pieces = ([p.contiguous() for p in dense.split(ROWS)] if kind == "dense"
              else [LowRank(u.contiguous(), lowrank.v) for u in lowrank.u.split(ROWS)])
    return whole, pieces


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_guided_row_shards_equal_the_whole(impl, dtype, kind):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(sum(ROWS), COLS, generator=g) * 0.02).to(dtype)
    whole_guide, piece_guides = _guides(kind, g)
    offsets = [r * COLS for r in _offsets(ROWS)]
    x, c, decay = torch.tensor([1e-3]), torch.tensor([0.3]), torch.tensor([0.99])

    dots = guide_dot([w], [whole_guide], 5, streams=[2], impl=impl, block=BLOCK)[0]
    piece_dots = guide_dot(list(w.split(ROWS)), piece_guides, 5, streams=[2] * 3, impl=impl, block=BLOCK,
                           offsets=offsets)
    # sums over the shards = the whole's within reassociation (guide_dot's docstring), relative to sum |guide * xi|:
    # torch adds float64 products (n * 2**-53; its LowRank rows come from a float32 matmul, see below), Triton
    # float32 block partials of at most BLOCK elements (BLOCK * 2**-24)
    dense = whole_guide.u.double() @ whole_guide.v.double().T if kind == "lowrank" else whole_guide.double()
    xi = rng.gaussian(5, 2, 0, w.numel()).double()
    scale = float((dense.reshape(-1) * xi).abs().sum())
    bound = (w.numel() * 2.0**-53 if impl == "torch" and kind == "dense" else BLOCK * 2.0**-24) * scale
    assert abs(float(piece_dots[:, 0].sum() - dots[0])) <= bound
    assert abs(float(piece_dots[:, 1].sum() - dots[1])) <= (w.numel() * 2.0**-53 if impl == "torch"
                                                             else BLOCK * 2.0**-24) * float(dots[1])
    assert float(dots[0]) != 0.0

    whole = w.clone()
    guided_perturb_([whole], noise=[(5, x)], guides=[([whole_guide], c)], decay=decay, streams=[2], impl=impl,
                    block=BLOCK)
    pieces = [p.clone() for p in w.split(ROWS)]
    guided_perturb_(pieces, noise=[(5, x.repeat(3))], guides=[(piece_guides, c.repeat(3))], decay=decay.repeat(3),
                    streams=[2] * 3, impl=impl, block=BLOCK, offsets=offsets)
    if impl == "torch" and kind == "lowrank":
        # the torch reference rebuilds LowRank rows by a matmul, whose summation order may change with the number of
        # rows (BLAS blocking): equal within a rounding of the rank-4 dot product times c
        tol = 4 * 2.0**-23 * 0.3 * float((whole_guide.u.abs() @ whole_guide.v.abs().T).max()) + 2.0**-8 * 0.03
        torch.testing.assert_close(torch.cat(pieces).float(), whole.float(), atol=tol, rtol=0)
    else:  # Triton adds a LowRank element's products in rank order from +0, whatever the row: bit for bit
        assert torch.equal(torch.cat(pieces), whole)
