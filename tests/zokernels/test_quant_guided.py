"""Guided code-space ops: int8_code_perturb_ and nf4_code_update_ with the guide terms of guided_perturb_ (dense and
LowRank), so Targeted and RankGuided directions reach quantised storage.

The spec written out densely sits at the top; the torch reference and the Triton kernel (interpreted on CPU) must give
the same codes bit for bit, and both must equal the spec.
"""

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="quantised formats need bitsandbytes")

from zokernels import rng  # noqa: E402
from zokernels.guided import LowRank  # noqa: E402
from zokernels.quant import Int8Weight, NF4Weight, int8_code_perturb_, nf4_code_update_  # noqa: E402
from zokernels.quant.guides import lowrank_rows  # noqa: E402


def dense_guide(g) -> torch.Tensor:
    """A guide as the ops read it, float32: a LowRank summed rank by rank (the spec's order), a dense one as is."""
    return lowrank_rows(g, 0, g.shape[0]) if isinstance(g, LowRank) else g.float()


def guided_step(shape, seed, eps, terms, stream=0, dist="gaussian"):
    """``eps*z + sum c*guide`` in float32, one rounding per product and per sum (the spec of the step)."""
    n = shape[0] * shape[1]
    y = rng.noise(dist, seed, stream, 0, n).reshape(shape) * eps
    for g, c in terms:
        y = y + dense_guide(g) * c
    return y


def int8_spec(w: Int8Weight, step, rounding_seed, stream=0):
    u = (rng.uniform_words(rounding_seed, stream, 0, step.numel(), rng.DOMAIN_CODES) >> 8).float() * 2.0**-24
    scb = w.scb.unsqueeze(1)
    x = (step * (torch.full_like(scb, 127.0) / scb)).clamp(-255, 255)
    fl = torch.floor(x)
    return fl.int() + (u.reshape(step.shape) < x - fl).int()


def _int8(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-120, 121, shape, generator=g, dtype=torch.int8)
    return Int8Weight(codes, torch.rand(shape[0], generator=g) * 0.5 + 0.05)


def _lowrank(shape, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return LowRank((torch.randn(shape[0], k, generator=g) * 0.1).to(dtype),
                   (torch.randn(shape[1], k, generator=g) * 0.1).to(dtype))


def _guide(kind, shape, seed):
    if kind == "lowrank":
        return _lowrank(shape, 5, seed)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.01 if kind == "dense" else (
        torch.randn(shape, generator=g) * 0.01).bfloat16()


@pytest.mark.parametrize("kind", ["bf16", "lowrank"])
def test_int8_guided_step_matches_spec_in_both_impls(kind):
    shapes = [(12, 70), (5, 33)]  # 70 and 33 columns: blocks straddle rows, tails are masked
    out = {}
    for impl in ("torch", "triton"):
        ws = [_int8(s, i) for i, s in enumerate(shapes)]
        before = [w.codes.clone() for w in ws]
        g1 = [_guide(kind, s, 10 + i) for i, s in enumerate(shapes)]
        g2 = [_guide(kind, shapes[0], 20), None]
        eps, c1, c2 = torch.tensor([2e-3, 3e-3]), torch.tensor([0.5, -0.7]), torch.tensor([0.3, 0.0])
        int8_code_perturb_(ws, 7, eps, rounding_seed=9, guides=[(g1, c1), (g2, c2)], impl=impl, block=256)
        out[impl] = [w.codes.clone() for w in ws]
        for t, (w, b) in enumerate(zip(ws, before)):
            terms = [(g1[t], float(c1[t]))] + ([(g2[t], float(c2[t]))] if g2[t] is not None else [])
            step = guided_step(shapes[t], 7, float(eps[t]), terms, stream=t)
            w0 = Int8Weight(b, w.scb)
            expect = (b.int() + int8_spec(w0, step, 9, stream=t)).clamp(-127, 127)
            assert torch.equal(w.codes.int(), expect), (impl, t)
    assert all(torch.equal(a, b) for a, b in zip(out["torch"], out["triton"]))


def test_int8_guided_spsa_cycle_restores_codes_bit_for_bit(impl="torch"):
    """(The Triton kernel computes the same delta: test_int8_guided_step_matches_spec_in_both_impls.)"""
    w = _int8((16, 40), 3)
    w.codes.clamp_(-90, 90)  # room for the direction's steps: nothing saturates, so the cycle is exact everywhere
    start = w.codes.clone()
    guides = [([_lowrank((16, 40), 4, 1)], torch.tensor([0.1]))]
    kw = dict(rounding_seed=4, guides=guides, impl=impl, block=256)
    sat = [int8_code_perturb_(w, 5, 1e-3, times=t, **kw) for t in (1, -2, 1)]
    assert sat == [0, 0, 0]
    assert torch.equal(w.codes, start)
    int8_code_perturb_(w, 5, 1e-3, times=1, **kw)
    assert not torch.equal(w.codes, start)  # the direction does move the codes


def _nf4(shape, blocksize=64, seed=0):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(seed)
    q, state = F.quantize_4bit(torch.randn(*shape, generator=g) * 0.05, blocksize=blocksize, quant_type="nf4")
    return NF4Weight(codes=q.view(torch.uint8).reshape(-1), absmax=state.absmax, code=state.code,
                     blocksize=blocksize, shape=shape)


def nf4_unpack(w):
    p = w.codes.long()
    return torch.stack((p >> 4, p & 15), -1).reshape(-1)[:w.numel]


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_nf4_guided_update_matches_spec_in_both_impls(kind):
    shape = (20, 72)  # blocks of 64 straddle rows of 72
    out = {}
    for impl in ("torch", "triton"):
        w = _nf4(shape)
        old = nf4_unpack(w)
        g1, g2 = _guide(kind, shape, 1), _guide(kind, shape, 2)
        sat = nf4_code_update_(w, 3, 2e-3, rounding_seed=4, guides=[([g1], torch.tensor([0.4])),
                                                                       ([g2], torch.tensor([-0.2]))],
                               impl=impl, block=256)
        out[impl] = nf4_unpack(w)
        step = guided_step(shape, 3, 2e-3, [(g1, 0.4), (g2, -0.2)]).reshape(-1)
        a = w.absmax.repeat_interleave(64)[:w.numel]
        t = w.code[old] + step / a
        k = torch.searchsorted(w.code[1:].contiguous(), t, right=True)
        gap = w.code[torch.clamp(k + 1, max=15)] - w.code[k]
        p = torch.where(k < 15, (t - w.code[k]) * (torch.ones_like(gap) / gap), torch.zeros_like(t))
        u = (rng.uniform_words(4, 0, 0, w.numel, rng.DOMAIN_CODES) >> 8).float() * 2.0**-24
        assert torch.equal(out[impl], k + (u < p).long()), impl
        assert sat == int(((t > 1) | (t < -1)).sum())
    assert torch.equal(out["torch"], out["triton"])


def test_nf4_guided_update_is_unbiased():
    """E[dequantised new] = old + c*guide for every unsaturated element. Each draw moves an element by at most one
    gap times its absmax, so its mean over R draws has standard deviation <= gap*absmax / (2 sqrt(R)); every element
    must lie within 5 such deviations (a false failure over 1,024 elements has probability ~6e-4)."""
    shape, R = (16, 64), 400
    w0 = _nf4(shape, seed=5)
    guide = _lowrank(shape, 3, 6)
    old_val = w0.dequantize().reshape(-1)
    target = old_val + dense_guide(guide).reshape(-1) * 0.05
    total = torch.zeros(w0.numel, dtype=torch.float64)
    for r in range(R):
        w = NF4Weight(codes=w0.codes.clone(), absmax=w0.absmax, code=w0.code, blocksize=64, shape=shape)
        nf4_code_update_(w, 1, 0.0, rounding_seed=100 + r, guides=[([guide], torch.tensor([0.05]))], impl="torch")
        total += w.dequantize().reshape(-1).double()
    mean = total / R
    a = w0.absmax.repeat_interleave(64).double()
    inside = target.abs() < a * 0.99
    bound = a * (w0.code[1:] - w0.code[:-1]).max().double() / (2 * R ** 0.5)
    err = (mean - target.double()).abs()
    assert inside.float().mean() > 0.9
    assert bool((err[inside] <= 5 * bound[inside]).all()), float((err / bound)[inside].max())
    # and the guide matters: without it the mean stays at the old values
    assert float((target - old_val).abs()[inside].mean()) > 3 * float(err[inside].mean())


def test_guided_code_ops_refuse_bad_guides_before_anything_moves():
    w = _int8((8, 16))
    start = w.codes.clone()
    bad = [
        ([([torch.zeros(8, 15)], torch.ones(1))], ValueError),  # wrong shape
        ([([_lowrank((8, 16), 2, 0)], torch.ones(2))], ValueError),  # one coefficient per weight
        ([([_lowrank((8, 16), 2, 0)], torch.tensor([float("nan")]))], ValueError),
        ([(["x"], torch.ones(1))], TypeError),
        ([([None], torch.ones(1))] * 3, ValueError),  # at most two terms
    ]
    for guides, err in bad:
        with pytest.raises(err):
            int8_code_perturb_(w, 1, 1e-3, rounding_seed=2, guides=guides)
    with pytest.raises(ValueError, match="eps"):
        int8_code_perturb_(w, 1, torch.ones(3), rounding_seed=2)
    assert torch.equal(w.codes, start)
    nw = _nf4((8, 64))
    codes = nw.codes.clone()
    with pytest.raises(ValueError, match="shape"):
        nf4_code_update_(nw, 1, 1e-3, rounding_seed=2, guides=[([_lowrank((8, 32), 2, 0)], torch.ones(1))])
    assert torch.equal(nw.codes, codes)


def _nested_nf4(shape, seed=0):
    import bitsandbytes.functional as F

    g = torch.Generator().manual_seed(seed)
    q, st = F.quantize_4bit(torch.randn(*shape, generator=g) * 0.05, blocksize=64, quant_type="nf4",
                            compress_statistics=True)
    return NF4Weight(codes=q.view(torch.uint8).reshape(-1), absmax=st.absmax, code=st.code, blocksize=64,
                     shape=shape, nested_absmax=st.state2.absmax, nested_code=st.state2.code,
                     nested_offset=torch.tensor(float(st.offset)), nested_blocksize=int(st.state2.blocksize))


@pytest.mark.parametrize("fmt", ["int8", "nf4", "nf4-nested"])
@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_scale_guide_is_the_weights_guide_pulled_back_to_the_scales(fmt, kind):
    """scale_guide(w, G) = d<G, W(s)>/ds, the autograd derivative of the dequantised weight along G."""
    from zokernels.quant import scale_guide, scale_params

    shape = (40, 72)  # 2,880 elements: NF4 blocks of 64 straddle rows
    w = _int8(shape) if fmt == "int8" else _nf4(shape) if fmt == "nf4" else _nested_nf4(shape)
    if fmt == "nf4-nested":
        w.nested_blocksize = 16  # several nested blocks on a small weight (the formula does not depend on 256)
        w.nested_absmax = torch.cat([w.nested_absmax] * 3)[:3]
    guide = _guide(kind, shape, 3)
    got = scale_guide(w, guide)
    (s,) = scale_params(w)
    s.requires_grad_(True)
    (dense_guide(guide) * w.dequantize().float()).sum().backward()
    torch.testing.assert_close(got, s.grad, rtol=1e-4, atol=1e-7)
    assert got.shape == s.shape and float(got.abs().sum()) > 0
