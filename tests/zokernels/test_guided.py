"""guide_dot / guided_perturb_ / LowRank against the formulas written out on whole tensors."""

import pytest
import torch

from zokernels import rng
from zokernels.guided import LowRank, guide_dot, guided_perturb_

SHAPES = [(37, 61), (128, 16), (3000,), (0, 8), (5, 1), (300, 301)]  # the last is above the torch batching size


def dense(g):
    return g.dense() if isinstance(g, LowRank) else g


def xi(seed, stream, w, dist="gaussian"):
    return rng.noise(dist, seed, stream, 0, w.numel()).reshape(w.shape)


def reference_perturb(ws, streams, noise, guides, decay, dist="gaussian"):
    out = []
    for t, (w, s) in enumerate(zip(ws, streams)):
        y = w.float().cpu() * decay[t]
        for seed, c in noise:
            y = y + c[t] * xi(seed, s, w, dist)
        for gs, c in guides:
            if gs[t] is not None:
                y = y + c[t] * dense(gs[t]).float().cpu()
        out.append(y)
    return out


def _rand(shape, seed, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype).to(device)


def _lowrank(shape, k, seed, device):
    return LowRank(_rand((shape[0], k), seed, device), _rand((shape[1], k), seed + 1, device))


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    return request.param


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_guide_dot_matches_formula(impl, device, kind):
    shapes = [s for s in SHAPES if kind == "dense" or len(s) == 2]
    ws = [_rand(s, i, device) for i, s in enumerate(shapes)]
    guides = [(_rand(s, 10 + i, device) if kind == "dense" else _lowrank(s, 3, 10 + i, device)) for i, s in
              enumerate(shapes)]
    guides[1] = None
    streams = [9, 3, 7, 1, 2, 11][:len(ws)]
    got = guide_dot(ws, guides, 42, streams=streams, impl=impl)
    for t, (w, g, s) in enumerate(zip(ws, guides, streams)):
        x = xi(42, s, w).double()
        dot = 0.0 if g is None else (dense(g).double().cpu() * x).sum().item()
        # float32 block partials (Triton) or float32 LowRank rows: relative error ~1e-6 of the absolute sum
        scale = 1.0 if g is None else (dense(g).double().cpu().abs() * x.abs()).sum().item()
        assert abs(got[t, 0].item() - dot) <= 1e-5 * scale + 1e-9
        assert got[t, 1].item() == pytest.approx((x * x).sum().item(), rel=1e-6, abs=1e-9)
    again = guide_dot(ws, guides, 42, streams=streams, impl=impl)
    assert torch.equal(got, again)  # deterministic: replays depend on it


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_guided_perturb_matches_formula(impl, device, kind, dist):
    shapes = [s for s in SHAPES if kind == "dense" or len(s) == 2]
    n = len(shapes)
    ws = [_rand(s, i, device) for i, s in enumerate(shapes)]
    make = (lambda s, i: _rand(s, i, device, torch.bfloat16)) if kind == "dense" else \
        (lambda s, i: _lowrank(s, 5, i, device))
    prev = [make(s, 20 + i) for i, s in enumerate(shapes)]
    vhat = [make(s, 40 + i) for i, s in enumerate(shapes)]
    prev[0] = None
    streams = list(range(100, 100 + n))
    noise = [(7, torch.linspace(0.1, 0.5, n)), (8, torch.linspace(-1, 1, n))]
    guides = [(prev, torch.linspace(1, 2, n)), (vhat, -torch.linspace(0.2, 0.3, n))]
    decay = torch.linspace(0.9, 1.0, n)
    expected = reference_perturb(ws, streams, noise, guides, decay, dist)
    guided_perturb_(ws, noise=noise, guides=guides, decay=decay, dist=dist, streams=streams, impl=impl)
    for w, e in zip(ws, expected):
        torch.testing.assert_close(w.cpu(), e, atol=2e-5 * (1 + e.abs().max().item() if e.numel() else 1), rtol=1e-5)


def test_full_rank_lowrank_equals_dense(impl, device):
    w = _rand((24, 40), 0, device)
    m = _rand((24, 40), 1, device)
    lr = LowRank.from_matrix(m, 24)
    torch.testing.assert_close(lr.dense(), m.float(), atol=1e-4, rtol=1e-4)
    a, b = w.clone(), w.clone()
    coef = torch.tensor([0.3])
    m_before = m.clone()
    guided_perturb_([a], noise=[(5, coef)], guides=[([m], coef)], impl=impl)
    assert torch.equal(m, m_before)  # guides are read, never written
    guided_perturb_([b], noise=[(5, coef)], guides=[([lr], coef)], impl=impl)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(guide_dot([w], [m], 3, impl=impl), guide_dot([w], [lr], 3, impl=impl), rtol=1e-4,
                               atol=1e-3)


def test_lowrank_from_matrix_recovers_low_rank_and_keeps_global_rng():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(50, 4, generator=g) @ torch.randn(4, 30, generator=g)
    before = torch.random.get_rng_state()
    lr = LowRank.from_matrix(m, 4, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.testing.assert_close(lr.dense(), m, atol=1e-4, rtol=1e-4)
    assert lr.sq_norm().item() == pytest.approx((m.double() ** 2).sum().item(), rel=1e-5)
    assert lr.u.shape == (50, 4) and lr.v.shape == (30, 4)


def test_bad_input_is_rejected_before_anything_changes():
    w = torch.zeros(4, 6)
    one = torch.ones(1)
    bad = [
        (dict(guides=[([torch.zeros(6, 4)], one)]), ValueError, r"guides\[0\]\[0\] has shape"),
        (dict(guides=[([LowRank(torch.zeros(5, 2), torch.zeros(6, 2))], one)]), ValueError, "LowRank of shape"),
        (dict(noise=[(1, torch.ones(2))]), ValueError, r"noise\[0\] coefficients must be a 1-D"),
        (dict(noise=[(1, torch.tensor([float("nan")]))]), ValueError, r"noise\[0\] coefficients must be finite"),
        (dict(noise=[(-1, one)]), ValueError, "seed must be in"),
        (dict(noise=[(1, one)] * 3), ValueError, "at most 2 noise terms"),
        (dict(guides=[(["x"], one)]), TypeError, "must be None, a tensor or a LowRank"),
    ]
    for kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            guided_perturb_([w], **kwargs)
        assert not w.any()
    with pytest.raises(ValueError, match="mixes dense and LowRank"):
        mixed = [torch.ones(4, 6), LowRank(torch.ones(4, 1), torch.ones(6, 1))]
        guided_perturb_([w, torch.zeros(4, 6)], guides=[(mixed, torch.ones(2))])
    with pytest.raises(ValueError, match="u .m, k. and v .n, k."):
        LowRank(torch.zeros(4, 2), torch.zeros(6, 3))


@pytest.mark.parametrize("rank", [8, 12])
def test_lowrank_vector_rank_loads_add_in_rank_order(impl, device, rank):
    """Ranks that are multiples of 4 with 4-element-aligned u and v take the kernels' vector path (four ranks per
    load): the products must still be added in rank order, so the result equals, bit for bit, the same guide stored
    one element off alignment (the scalar path)."""
    w = _rand((33, 70), 0, device)
    lr = _lowrank((33, 70), rank, 3, device)

    def shifted(t):  # the same values, contiguous, starting one element past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        buf[1:] = t.reshape(-1)
        return buf[1:].view(t.shape)

    off = LowRank(shifted(lr.u), shifted(lr.v))
    assert lr.u.data_ptr() % 16 == 0 and off.u.data_ptr() % 16 != 0
    coef = torch.tensor([0.7])
    a, b = w.clone(), w.clone()
    guided_perturb_([a], noise=[(5, coef)], guides=[([lr], coef)], impl=impl)
    guided_perturb_([b], noise=[(5, coef)], guides=[([off], coef)], impl=impl)
    assert torch.equal(a, b)
    assert torch.equal(guide_dot([w], [lr], 3, impl=impl), guide_dot([w], [off], 3, impl=impl))


def test_guided_ops_check_block():
    w, c = torch.zeros(4, 6), torch.ones(1)
    for block in (100, 96, 0, 2.0):
        with pytest.raises(ValueError, match="block must be a power of two"):
            guided_perturb_([w], noise=[(1, c)], block=block)
        with pytest.raises(ValueError, match="block must be a power of two"):
            guide_dot([w], [None], 1, block=block)
    assert not w.any()
