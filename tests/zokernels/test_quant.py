"""zokernels.quant: formats on bitsandbytes storage, scale-space and code-space ZO ops.

The spec of each code-space op written out densely (small weights only) sits at the top; the ops themselves work in
chunks. Triton runs compiled on CUDA and interpreted on CPU (tests/conftest.py); sizes stay ~1e4 for the interpreter.
"""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="quantised formats need bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

from zokernels import perturb_, rng  # noqa: E402
from zokernels.quant import (  # noqa: E402
    Int8Weight,
    NF4Weight,
    int8_code_perturb_,
    nf4_code_update_,
    scale_params,
    scale_perturb_,
)


def int8_reference(w: Int8Weight, seed, eps, rounding_seed, stream=0, dist="gaussian"):
    """delta of int8_code_perturb_, densely: SR(eps*z*127/SCB) with u = (word >> 8) / 2**24 (int32, codes' shape)."""
    n = w.codes.numel()
    z = rng.noise(dist, seed, stream, 0, n).reshape(w.shape)
    u = (rng.uniform_words(rounding_seed, stream, 0, n, rng.DOMAIN_CODES) >> 8).float().reshape(w.shape) * 2.0**-24
    scb = w.scb.cpu().unsqueeze(1)
    x = ((z * eps) * (torch.full_like(scb, 127.0) / scb)).clamp(-255, 255)
    fl = torch.floor(x)
    return fl.int() + (u < x - fl).int()


def nf4_reference(w: NF4Weight, seed, coef, rounding_seed, stream=0, dist="gaussian"):
    """(new codes, saturated) of nf4_code_update_, densely, from the dequantised weight and a sorted code book."""
    n, code = w.numel, w.code.cpu()
    a = w.block_absmax(0, w.n_blocks).cpu().repeat_interleave(w.blocksize)[:n]
    t = code[nf4_codes(w)] + (rng.noise(dist, seed, stream, 0, n) * coef) / a  # value / absmax, updated
    k = torch.searchsorted(code[1:].contiguous(), t, right=True)  # code[k] <= t < code[k + 1]
    gap = code[torch.clamp(k + 1, max=15)] - code[k]
    # (t - lo) times the reciprocal of the gap, as the op computes it: a division could differ in the last bit
    p = torch.where(k < 15, (t - code[k]) * (torch.ones_like(gap) / gap), torch.zeros_like(t))
    u = (rng.uniform_words(rounding_seed, stream, 0, n, rng.DOMAIN_CODES) >> 8).float() * 2.0**-24
    return k + (u < p).long(), (t > 1) | (t < -1)


def nf4_codes(w: NF4Weight) -> torch.Tensor:
    p = w.codes.cpu().long()
    return torch.stack((p >> 4, p & 15), -1).reshape(-1)[:w.numel]


def _nf4_linear(n_in, n_out, blocksize=64, nested=False, device="cpu", seed=0, bias=False):
    """A bnb Linear4bit (NF4) quantised on ``device``; Linear4bit has no blocksize argument, its Params4bit has."""
    torch.manual_seed(seed)  # nn.Linear's init draws from the global generator; tests may, library code does not
    lin = bnb.nn.Linear4bit(n_in, n_out, bias=bias, quant_type="nf4", compress_statistics=nested)
    lin.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=blocksize, quant_type="nf4",
                                   compress_statistics=nested, module=lin)
    return lin.to(device)


def _nf4_params(shape, blocksize=64, nested=False, device="cpu", seed=0):
    """A quantised Params4bit of any shape (odd sizes included), straight from bnb.functional.quantize_4bit."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(*shape, generator=g) * 0.05).to(device)
    q, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    p = bnb.nn.Params4bit(q, requires_grad=False, quant_state=state, blocksize=blocksize, quant_type="nf4",
                          compress_statistics=nested, bnb_quantized=True)
    return p, w


def _int8_linear(n_in, n_out, device="cpu", seed=0):
    torch.manual_seed(seed)
    return bnb.nn.Linear8bitLt(n_in, n_out, bias=True, has_fp16_weights=False).to(device)


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    return request.param


# ---------------------------------------------------------------------------------------------------------------------
# Formats
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_structure_reproduces_bitsandbytes(device, blocksize, nested):
    lin = _nf4_linear(256, 40, blocksize, nested, device)
    w = NF4Weight.from_bnb(lin.weight)
    assert w.codes.data_ptr() == lin.weight.data.data_ptr()  # a view of bnb's storage, not a copy
    assert (w.shape, w.blocksize, w.nested, w.n_blocks) == ((40, 256), blocksize, nested, 40 * 256 // blocksize)
    expected = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(w.dequantize(torch.float32), expected.float())  # the same roundings, bit for bit
    chunk = w.dequantize_blocks(3, 7)
    assert torch.equal(chunk, expected.reshape(-1)[3 * blocksize:7 * blocksize])
    assert torch.equal(NF4Weight.from_bnb(lin).codes, w.codes)  # the module is accepted too


@pytest.mark.parametrize("shape, blocksize", [((8, 64), 128), ((5, 96), 64), ((7, 65), 64), ((3, 200), 256)])
def test_nf4_layout_on_blocks_that_straddle_rows(shape, blocksize):
    # bitsandbytes 0.50.2's native CPU dequantize_4bit disagrees with its own quantisation for some shapes whose
    # blocks straddle rows (e.g. (8, 64) with blocksize 128: errors of 1.6 for values of 3), so check the layout
    # against the quantised input instead: each value is within half a code gap (x absmax) of the original.
    p, original = _nf4_params(shape, blocksize)
    w = NF4Weight.from_bnb(p)
    blocks = original.reshape(-1).split(blocksize)  # consecutive flat elements, across row ends
    assert torch.equal(w.absmax, torch.stack([b.abs().max() for b in blocks]))
    a = w.absmax.repeat_interleave(blocksize)[:w.numel]
    half_gap = (w.code[1:] - w.code[:-1]).max() / 2
    err = (w.dequantize(torch.float32).reshape(-1) - original.reshape(-1)).abs()
    assert (err <= half_gap * a * (1 + 1e-6)).all()


def test_nf4_nibble_order_is_high_first():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1] = 1.0, -1.0
    q, state = F.quantize_4bit(x, blocksize=64, compress_statistics=False, quant_type="nf4")
    w = NF4Weight.from_bnb(bnb.nn.Params4bit(q, quant_state=state, blocksize=64, quant_type="nf4",
                                             bnb_quantized=True))
    assert w.codes[0].item() == 0xF0  # element 0 (code 15 = +1) in the high nibble, element 1 (code 0 = -1) low
    assert w.dequantize()[0, :3].tolist() == [1.0, -1.0, 0.0]


def test_int8_structure_reproduces_bitsandbytes(device):
    lin = _int8_linear(96, 24, device)
    p = lin.weight
    w = Int8Weight.from_bnb(p)
    assert w.codes.data_ptr() == p.data.data_ptr() and w.scb is p.SCB and w.shape == (24, 96)
    assert torch.equal(w.dequantize(), F.int8_vectorwise_dequant(p.data, p.SCB))
    assert torch.equal(w.dequantize_rows(5, 9), w.dequantize()[5:9])
    x = torch.randn(3, 96, device=device)
    expected = x @ w.dequantize().T + lin.bias
    torch.testing.assert_close(lin(x).float(), expected, atol=1e-2, rtol=1e-2)
    # the first forward moved CB/SCB to module.state: the parameter alone no longer says its scales
    assert p.SCB is None
    with pytest.raises(ValueError, match="pass the Linear8bitLt"):
        Int8Weight.from_bnb(p)
    assert Int8Weight.from_bnb(lin).scb is lin.state.SCB


NOT_BNB = [torch.zeros(4, 4), torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Linear(4, 4)]


@pytest.mark.parametrize("obj", NOT_BNB, ids=["tensor", "parameter", "linear"])
def test_non_bitsandbytes_objects_are_refused(obj):
    with pytest.raises(TypeError, match="needs a bitsandbytes Params4bit"):
        NF4Weight.from_bnb(obj)
    with pytest.raises(TypeError, match="needs a bitsandbytes Int8Params"):
        Int8Weight.from_bnb(obj)
    with pytest.raises(TypeError, match="NF4Weight or Int8Weight"):
        scale_params(obj)


def test_unsupported_formats_and_broken_invariants_are_refused():
    fp4 = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="quant_type 'fp4' is not supported"):
        NF4Weight.from_bnb(fp4.weight)
    with pytest.raises(ValueError, match="not quantised yet"):
        NF4Weight.from_bnb(bnb.nn.Linear4bit(64, 8, quant_type="nf4").weight)
    with pytest.raises(ValueError, match="not quantised yet"):
        Int8Weight.from_bnb(bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=False).weight)
    with pytest.raises(ValueError, match="has_fp16_weights=True"):
        Int8Weight.from_bnb(bnb.nn.Linear8bitLt(64, 8, has_fp16_weights=True).to("cpu").weight)
    lin = _nf4_linear(128, 8)
    lin.weight.quant_state.packing_format_for_cpu = True  # what an eval-mode no-grad forward on AVX512-BF16 does
    with pytest.raises(ValueError, match="repacked for bitsandbytes' CPU inference kernel"):
        NF4Weight.from_bnb(lin)
    good = NF4Weight.from_bnb(_nf4_linear(128, 8))
    fields = dict(codes=good.codes, absmax=good.absmax, code=good.code, blocksize=64, shape=(8, 128))
    bad = [
        (dict(blocksize=48), "blocksize must be one of"),
        (dict(blocksize=8192), "blocksize must be one of"),
        (dict(shape=(8, 130)), "codes has 512 bytes"),
        (dict(absmax=good.absmax[:-1]), "absmax has shape"),
        (dict(absmax=good.absmax.half()), "absmax must be float32"),
        (dict(code=good.code.flip(0)), "increase strictly"),
        (dict(codes=good.codes.view(torch.int8)), "codes must be uint8"),
        (dict(nested_code=good.code), "go together"),
    ]
    for change, match in bad:
        with pytest.raises(ValueError, match=match):
            NF4Weight(**{**fields, **change})
    i8 = Int8Weight.from_bnb(_int8_linear(64, 8).weight)
    for change, match in [(dict(scb=i8.scb[:-1]), "scb has shape"), (dict(scb=i8.scb.double()), "scb must be float32"),
                          (dict(codes=i8.codes.float()), "codes must be int8"),
                          (dict(scb=-i8.scb), "finite and non-negative")]:
        with pytest.raises(ValueError, match=match):
            Int8Weight(**{"codes": i8.codes, "scb": i8.scb, **change})


# ---------------------------------------------------------------------------------------------------------------------
# Scale space
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_scale_space_moves_each_block_by_its_scale(impl, device, nested):
    lin = _nf4_linear(256, 40, 64, nested, device)
    w = NF4Weight.from_bnb(lin)
    (s,) = scale_params(w)
    assert s is (lin.weight.quant_state.state2.absmax if nested else lin.weight.quant_state.absmax)
    s0, codes0, before = s.clone(), w.codes.clone(), w.dequantize(torch.float32).reshape(-1)
    eps = 1e-3
    scale_perturb_(w, 11, eps, streams=[5], impl=impl)
    z = rng.gaussian(11, 5, 0, s.numel()).to(device)
    assert torch.equal(w.codes, codes0)
    after = w.dequantize(torch.float32).reshape(-1)
    code = w.code[nf4_codes(w).to(device)]
    if nested:  # absmax_b = code2[c_b] * (s_j + eps z_j) + offset: the change is code * code2[c_b] * eps z_j
        blocks = torch.arange(w.n_blocks, device=device)
        factor = (w.nested_code[w.absmax.long()] * eps * z[blocks // w.nested_blocksize]).repeat_interleave(64)
    else:  # value * (1 + eps z_b / absmax_b), i.e. code * eps z_b added
        factor = (eps * z).repeat_interleave(64)
        torch.testing.assert_close(after[before != 0] / before[before != 0],
                                   1 + (factor / s0.repeat_interleave(64))[before != 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(after - before, code * factor, atol=2e-6, rtol=1e-4)
    x = torch.randn(4, 256, device=device)
    torch.testing.assert_close(lin(x).float(), x @ after.reshape(40, 256).T, atol=1e-4, rtol=1e-4)  # bnb sees it
    scale_perturb_(w, 11, -eps, streams=[5], impl=impl)
    # (s + eps z) - eps z: at most one fp32 rounding of each of the two sums away from s
    assert ((s - s0).abs() <= 2.0**-23 * (s0.abs() + eps * 4.72)).all()


def test_int8_scale_space_moves_each_row(impl, device):
    lin = _int8_linear(64, 16, device)
    w = Int8Weight.from_bnb(lin)
    scb0, before = w.scb.clone(), w.dequantize()
    scale_perturb_([w], 3, 1e-3, dist="rademacher", impl=impl)
    z = rng.rademacher(3, 0, 0, 16).to(device)
    assert torch.equal(w.scb, scb0 + 1e-3 * z)  # ±eps is exact to add once
    torch.testing.assert_close(w.dequantize(), before * (1 + 1e-3 * z / scb0).unsqueeze(1), atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# int8 code space
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_int8_code_step_matches_spec_and_undo_is_exact(impl, device, dist):
    w = Int8Weight.from_bnb(_int8_linear(96, 100, device))  # 9600 codes, every row holds a ±127
    codes0 = w.codes.clone()
    eps = 8e-4  # about one code step per element (SCB ~ 0.1: x = eps z 127 / SCB ~ z)
    delta = int8_reference(w, 21, eps, 22, 0, dist).to(device)
    raw = codes0.int() + delta
    saturated = (raw.abs() > 127)
    assert 0 < saturated.sum() < 200 and delta.abs().float().mean() > 0.3  # the test exercises both cases
    n_sat = int8_code_perturb_(w, 21, eps, rounding_seed=22, dist=dist, impl=impl)
    assert n_sat == saturated.sum().item()
    assert torch.equal(w.codes, raw.clamp(-127, 127).to(torch.int8))
    undo_sat = int8_code_perturb_(w, 21, eps, rounding_seed=22, times=-1, dist=dist, impl=impl)
    assert torch.equal(w.codes[~saturated], codes0[~saturated])  # bit for bit wherever nothing saturated
    undo_raw = raw.clamp(-127, 127) - delta
    assert torch.equal(w.codes, undo_raw.clamp(-127, 127).to(torch.int8))
    assert undo_sat == (undo_raw.abs() > 127).sum().item()
    assert not torch.equal(w.codes, codes0)  # a saturated element does not come back


def test_int8_spsa_cycle_restores_and_counts_forced_saturation(impl, device):
    w = Int8Weight.from_bnb(_int8_linear(64, 40, device, seed=1))
    w.codes[3] = 127  # a row pinned at the top: every positive step saturates there
    codes0 = w.codes.clone()
    delta = int8_reference(w, 5, 5e-4, 6).to(device)
    counts = [int8_code_perturb_(w, 5, 5e-4, rounding_seed=6, times=t, impl=impl) for t in (1, -2, 1)]
    pinned_up = (delta[3] > 0).sum().item()
    assert counts[0] == ((codes0.int() + delta).abs() > 127).sum().item() and counts[0] >= pinned_up > 10
    # +d, -2d, +d returns every code for which neither c0 + d nor c0 - d left [-127, 127]
    touched = ((codes0.int() + delta).abs() > 127) | ((codes0.int() - delta).abs() > 127)
    assert torch.equal(w.codes[~touched], codes0[~touched])
    assert ((w.codes != codes0) <= touched).all() and sum(counts) >= touched.sum().item() > 0


@pytest.mark.parametrize("cols", [5, 16, 17])
def test_int8_triton_matches_torch_on_narrow_rows(device, cols):
    """Rows narrower than a group of the kernel (16 elements: per-element rows) or just as wide (per-group scales,
    groups straddling rows); a zero row scale gives no step."""
    g = torch.Generator().manual_seed(cols)
    codes = torch.randint(-127, 128, (50, cols), dtype=torch.int8, generator=g)
    scb = torch.rand(50, generator=g) * 2
    scb[3] = 0.0
    got = {}
    for impl in ("torch", "triton"):
        w = Int8Weight(codes.clone().to(device), scb.to(device))
        n = int8_code_perturb_(w, 9, 5e-2, rounding_seed=4, dist="rademacher", impl=impl, block=256)
        got[impl] = (n, w.codes.cpu())
    assert got["triton"][0] == got["torch"][0] and torch.equal(got["triton"][1], got["torch"][1])
    assert not torch.equal(got["torch"][1], codes)


def test_int8_triton_and_torch_give_identical_codes_on_a_list(device):
    lins = [_int8_linear(n_in, n_out, device, seed=i) for i, (n_in, n_out) in enumerate([(64, 40), (33, 7), (128, 64)])]
    results = {}
    for impl, block in (("torch", None), ("triton", 256), ("triton", 2048)):
        ws = [Int8Weight.from_bnb(lin) for lin in lins]
        saved = [w.codes.clone() for w in ws]
        for dist in ("rademacher", "gaussian"):
            n = int8_code_perturb_(ws, 9, 3e-4, rounding_seed=4, dist=dist, streams=[7, 2, 7000], impl=impl,
                                   block=block)
            results[impl, block, dist] = (n, [w.codes.cpu().clone() for w in ws])
            for w, c in zip(ws, saved):
                w.codes.copy_(c)
    for dist in ("rademacher", "gaussian"):
        ref_n, ref = results["torch", None, dist]
        for block in (256, 2048):
            n, got = results["triton", block, dist]
            if dist == "rademacher" or device.type == "cpu":
                assert n == ref_n and all(torch.equal(a, b) for a, b in zip(got, ref))
            else:  # hardware lg2/sin/cos move z by < GAUSSIAN_ATOL: a rare element may round to the other step
                assert all((a.int() - b.int()).abs().max() <= 1 for a, b in zip(got, ref))
                assert sum((a != b).sum().item() for a, b in zip(got, ref)) < 20
    # the list call equals one call per weight with that weight's stream
    ws = [Int8Weight.from_bnb(lin) for lin in lins]
    for w, stream in zip(ws, [7, 2, 7000]):
        int8_code_perturb_(w, 9, 3e-4, rounding_seed=4, dist="rademacher", streams=[stream], impl="torch")
    assert all(torch.equal(w.codes.cpu(), c) for w, c in zip(ws, results["torch", None, "rademacher"][1]))


def test_int8_stochastic_rounding_is_unbiased(device):
    w = Int8Weight.from_bnb(_int8_linear(64, 32, device))
    w.codes.zero_()  # codes 0: delta stays far from ±127, so the codes after one call are exactly delta
    eps, draws = 2e-4, 400
    z = rng.gaussian(1, 0, 0, w.codes.numel()).reshape(w.shape).to(device)
    x = (z * eps) * (127.0 / w.scb.unsqueeze(1))
    total = torch.zeros_like(x, dtype=torch.float64)
    for r in range(draws):
        assert int8_code_perturb_(w, 1, eps, rounding_seed=1000 + r, impl="torch") == 0
        total += w.codes.double()
        w.codes.zero_()
    mean = total / draws
    frac = (x - torch.floor(x)).double()
    # each draw is floor(x) + Bernoulli(frac): per element the mean of 400 draws has sd sqrt(frac(1-frac)/400)
    se = (frac * (1 - frac) / draws).sqrt()
    assert ((mean - x.double()).abs() <= 5 * se + 1e-6).all()
    # pooled over 2048 elements: the grand mean has sd sqrt(sum frac(1-frac) / 400) / 2048
    pooled_se = ((frac * (1 - frac)).sum() / draws).sqrt() / x.numel()
    assert abs((mean - x.double()).mean().item()) <= 5 * pooled_se.item()
    assert not torch.equal(mean, torch.round(x.double()))  # not plain rounding


# ---------------------------------------------------------------------------------------------------------------------
# NF4 code space
@pytest.mark.parametrize("shape, blocksize, nested", [((40, 256), 64, False), ((40, 256), 128, True),
                                                      ((7, 65), 64, True), ((3, 1000), 256, False)])
def test_nf4_code_update_matches_spec_and_impls_agree(device, shape, blocksize, nested):
    p, _ = _nf4_params(shape, blocksize, nested, device)
    coef = 0.004  # ~1/3 of a code gap for |W| ~ 0.05: codes move by 0 or 1, a few at the ends saturate
    results = {}
    for impl, block in (("torch", None), ("triton", 256), ("triton", 4096)):
        w = NF4Weight.from_bnb(p)
        saved = (w.codes.clone(), w.absmax.clone())
        expected_codes, expected_sat = nf4_reference(w, 8, coef, 9, 3, "rademacher")
        n = nf4_code_update_(w, 8, coef, rounding_seed=9, stream=3, dist="rademacher", impl=impl, block=block)
        results[impl, block] = w.codes.cpu().clone()
        assert n == expected_sat.sum().item() and 0 < n < w.numel // 4
        assert torch.equal(nf4_codes(w), expected_codes)
        assert torch.equal(w.absmax, saved[1])  # scales are not touched
        if w.numel % 2:
            assert w.codes[-1].item() & 15 == saved[0][-1].item() & 15  # the pad nibble is written back as it was
        w.codes.copy_(saved[0])
    assert torch.equal(results["torch", None], results["triton", 256])
    assert torch.equal(results["torch", None], results["triton", 4096])


def test_nf4_code_update_gaussian_impls_agree(device):
    p, _ = _nf4_params((48, 200), 64, True, device)
    out = []
    for impl in ("torch", "triton"):
        w = NF4Weight.from_bnb(p)
        saved = w.codes.clone()
        n = nf4_code_update_(w, 1, 0.003, rounding_seed=2, impl=impl)
        out.append((n, nf4_codes(w)))
        w.codes.copy_(saved)
    (n0, c0), (n1, c1) = out
    if device.type == "cpu":
        assert n0 == n1 and torch.equal(c0, c1)
    else:  # hardware lg2/sin/cos: a rare element may pick the other neighbour
        assert abs(n0 - n1) <= 5 and (c0 != c1).sum() < 20


def test_nf4_code_update_is_unbiased(device):
    p, _ = _nf4_params((8, 256), 64, False, device)
    w = NF4Weight.from_bnb(p)
    saved, coef, draws = w.codes.clone(), 0.003, 200
    before = w.dequantize(torch.float32).reshape(-1)
    a = w.absmax.repeat_interleave(64)
    target = before + coef * rng.gaussian(4, 0, 0, w.numel).to(device)
    total, total_sq = torch.zeros_like(before, dtype=torch.float64), torch.zeros_like(before, dtype=torch.float64)
    for r in range(draws):
        nf4_code_update_(w, 4, coef, rounding_seed=r, impl="torch")
        v = w.dequantize(torch.float32).reshape(-1).double()
        total += v
        total_sq += v * v
        w.codes.copy_(saved)
    mean = total / draws
    inside = target.abs() <= a  # saturated elements are clipped, so biased by design
    assert inside.float().mean() > 0.9
    # each draw is one of the two neighbours of the target: a Bernoulli scaled by the gap x absmax; its sd per element
    # is at most gap*absmax/2, and the 24-bit threshold adds at most 2**-24 gap of bias
    gaps = (w.code[1:] - w.code[:-1]).max()
    err = (mean - target.double()).abs()[inside]
    assert (err <= 5 * (gaps * a[inside] / 2).double() / draws**0.5 + 1e-6).all()
    # pooled over the elements, in units of absmax: the sd of the grand mean is sqrt(sum var_i) / (draws * n)
    var = ((total_sq / draws - mean**2).clamp(min=0) * draws / (draws - 1))[inside] / a[inside].double() ** 2
    pooled = ((mean - target.double())[inside] / a[inside].double()).mean().item()
    assert abs(pooled) <= 5 * (var.sum() / draws).sqrt().item() / inside.sum().item()
    assert (mean - before.double()).abs().max() > 0  # codes did move


def test_nf4_zero_absmax_blocks_stay_and_saturation_is_counted(impl, device):
    p, _ = _nf4_params((4, 256), 64, False, device)
    w = NF4Weight.from_bnb(p)
    w.absmax[2] = 0.0  # an all-zero block: nothing representable, left as it is
    codes0 = nf4_codes(w)
    # a step of ±10 (Rademacher) takes every other element out of [-absmax, absmax]
    n = nf4_code_update_(w, 3, 10.0, rounding_seed=1, dist="rademacher", impl=impl)
    after = nf4_codes(w)
    assert torch.equal(after[128:192], codes0[128:192])
    assert n == w.numel - 64
    assert set(torch.cat((after[:128], after[192:])).unique().tolist()) <= {0, 15}


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: refused, nothing modified
def test_bad_code_space_calls_are_refused_before_anything_changes():
    i8 = Int8Weight.from_bnb(_int8_linear(64, 8))
    nf = NF4Weight.from_bnb(_nf4_linear(128, 8))
    saved = (i8.codes.clone(), nf.codes.clone())
    int8_bad = [
        (([i8, nf], 1, 1e-3), dict(rounding_seed=1), TypeError, r"weights\[1\] must be an Int8Weight"),
        (([i8, i8], 1, 1e-3), dict(rounding_seed=1), ValueError, "share codes"),
        ((i8, 1, float("nan")), dict(rounding_seed=1), ValueError, "eps must be finite"),
        ((i8, -1, 1e-3), dict(rounding_seed=1), ValueError, "seed must be in"),
        ((i8, 1, 1e-3), dict(rounding_seed=2**64), ValueError, "rounding_seed must be in"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, times=0), ValueError, "times must be a nonzero int"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, times=1.0), ValueError, "times must be a nonzero int"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, streams=[0, 1]), ValueError, "streams has 2 entries"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, dist="uniform"), ValueError, "dist must be one of"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, impl="cuda"), ValueError, "impl must be one of"),
        ((i8, 1, 1e-3), dict(rounding_seed=1, block=100), ValueError, "block must be a power of two"),
    ]
    for args, kwargs, exc, match in int8_bad:
        with pytest.raises(exc, match=match):
            int8_code_perturb_(*args, **kwargs)
    nf4_bad = [
        ((i8, 1, 1e-3), dict(rounding_seed=1), TypeError, "weight must be an NF4Weight"),
        ((nf, 1, float("inf")), dict(rounding_seed=1), ValueError, "coef must be finite"),
        ((nf, 1, 1e-3), dict(rounding_seed=1, stream=2**32), ValueError, "stream must be in"),
        ((nf, 1, 1e-3), dict(rounding_seed=-5), ValueError, "rounding_seed must be in"),
    ]
    for args, kwargs, exc, match in nf4_bad:
        with pytest.raises(exc, match=match):
            nf4_code_update_(*args, **kwargs)
    nf.blocksize = 48  # an invariant broken after construction is caught by the op's own check
    with pytest.raises(ValueError, match="blocksize must be one of"):
        nf4_code_update_(nf, 1, 1e-3, rounding_seed=1)
    assert torch.equal(i8.codes, saved[0]) and torch.equal(nf.codes, saved[1])


def test_auto_uses_the_torch_reference_on_cpu(monkeypatch):
    from zokernels.quant import int8 as Q8
    from zokernels.quant import nf4 as Q4

    def boom(*args, **kwargs):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    results = {}
    for impl in ("torch", "auto"):
        if impl == "auto":
            monkeypatch.setattr(Q8, "_int8_triton", boom)
            monkeypatch.setattr(Q4, "_nf4_triton", boom)
        i8 = Int8Weight.from_bnb(_int8_linear(64, 8))
        nf = NF4Weight.from_bnb(_nf4_linear(128, 8))
        before = (i8.codes.clone(), nf.codes.clone())
        counts = (int8_code_perturb_(i8, 1, 2e-3, rounding_seed=1, impl=impl),
                  nf4_code_update_(nf, 1, 4e-3, rounding_seed=1, impl=impl))
        assert not torch.equal(i8.codes, before[0]) and not torch.equal(nf.codes, before[1])  # each op did something
        results[impl] = (i8.codes, nf.codes, counts)
    # auto on the CPU is the torch reference, code for code and count for count
    assert torch.equal(results["auto"][0], results["torch"][0]) and torch.equal(results["auto"][1], results["torch"][1])
    assert results["auto"][2] == results["torch"][2]


# ---------------------------------------------------------------------------------------------------------------------
# End to end: ZO in scale space on a bnb Linear4bit
def test_spsa_on_nf4_absmax_lowers_a_regression_loss():
    """30 two-point SPSA steps on the absmax of a Linear4bit (quantised on CPU, train mode) fit a teacher whose
    absmax differs by up to ±30% per block: only scale space can reach it, the codes stay fixed."""
    student = _nf4_linear(64, 8, 64, nested=False, seed=0)  # 8 blocks: 8 scales to fit
    teacher = _nf4_linear(64, 8, 64, nested=False, seed=0)
    g = torch.Generator().manual_seed(1)
    teacher.weight.quant_state.absmax.mul_(1 + 0.3 * (2 * torch.rand(8, generator=g) - 1))
    x = torch.randn(256, 64, generator=g)
    with torch.no_grad():
        y = teacher(x)
    w = NF4Weight.from_bnb(student)
    params = scale_params(w)
    codes0 = w.codes.clone()

    def loss() -> float:
        with torch.no_grad():
            return torch.nn.functional.mse_loss(student(x), y).item()

    # lr: the loss curvature per scale is ~30 (|x . code| over a 64-block, squared); 0.01 keeps SPSA stable (0.05
    # diverges), and after 30 steps the loss is ~0.1x its start.
    start, eps, lr = loss(), 1e-3, 0.01
    for step in range(30):
        seed = 1000 + step
        perturb_(params, seed, eps)
        plus = loss()
        perturb_(params, seed, -2 * eps)
        minus = loss()
        grad = (plus - minus) / (2 * eps)
        perturb_(params, seed, eps - lr * grad)  # restore and update in one pass
    end = loss()
    assert end < 0.3 * start, (start, end)
    assert torch.equal(w.codes, codes0)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5])
def test_nf4_code_update_refuses_broken_block_scales_before_the_codes_move(nested, bad):
    nf = NF4Weight.from_bnb(_nf4_linear(256, 8, nested=nested))
    codes = nf.codes.clone()
    if nested:  # the dequantised absmax goes through the nested scale of its group
        nf.nested_absmax[0] = bad
    else:  # e.g. after a scale-space step went wrong
        nf.absmax[1] = bad
    with pytest.raises(ValueError, match="absmax of block .* must be finite and non-negative"):
        nf4_code_update_(nf, 1, 1e-3, rounding_seed=1)
    assert torch.equal(nf.codes, codes)


def test_overlapping_views_are_refused_by_their_memory_ranges():
    m = torch.randint(-100, 100, (6, 64), dtype=torch.int8)
    scb = torch.rand(6) + 0.5
    rows = [Int8Weight(m[0:3], scb[0:3].clone()), Int8Weight(m[2:5], scb[2:5].clone())]  # row 2 in both
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share codes"):
        int8_code_perturb_(rows, 1, 1e-3, rounding_seed=1)
    disjoint = [Int8Weight(m[0:3], scb[0:3].clone()), Int8Weight(m[3:6], scb[3:6].clone())]
    int8_code_perturb_(disjoint, 1, 1e-3, rounding_seed=1)  # neighbours that touch but do not overlap are fine
