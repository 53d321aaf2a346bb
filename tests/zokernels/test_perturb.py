"""perturb_ / perturb2_: the torch reference at the top, then every property the op promises.

Triton runs compiled on CUDA and interpreted on CPU (tests/conftest.py); sizes stay small for the interpreter.
"""

import pytest
import torch

from zokernels import perturb2_, perturb_, rng
from zokernels.rounding import stochastic_round

# (dtype, unit roundoff) of the stored format
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
SIZES = [0, 1, 7, 127, 129, 4097, 12_345]


def reference(w, seed, scale, dist="gaussian", stream=0):
    """The spec written out: w + scale * z in float32, rounded once to w's dtype."""
    z = rng.noise(dist, seed, stream, 0, w.numel()).reshape(w.shape)
    return (w.float().cpu() + scale * z).to(w.dtype)


def _weights(n, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype).to(device)


@pytest.fixture(params=["torch", "triton"])
def impl(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_matches_spec(impl, device, dtype, dist):
    for n in SIZES:
        w = _weights(n, dtype, device)
        expected = reference(w, 77, 1e-3, dist, stream=0)
        perturb_(w, 77, 1e-3, dist=dist, impl=impl)
        if dist == "rademacher" or (impl == "torch" and device.type == "cpu"):
            # ±scale is exact, so fused or unfused multiply-add round the same way: bit-identical.
            assert torch.equal(w.cpu(), expected), n
        else:
            # Triton's Gaussian differs from libm by at most GAUSSIAN_ATOL (rng docstring), then one rounding.
            tol = 1e-3 * rng.GAUSSIAN_ATOL + UNIT[dtype] * 0.1
            torch.testing.assert_close(w.cpu().float(), expected.float(), atol=tol, rtol=2 * UNIT[dtype])


def test_shapes_and_parameters(impl, device):
    p = torch.nn.Parameter(_weights(3 * 5 * 7, torch.float32, device).reshape(3, 5, 7))
    expected = reference(p.detach(), 3, 0.5)
    perturb_(p, 3, 0.5, impl=impl)  # a leaf that requires grad is modified in place without autograd errors
    torch.testing.assert_close(p.detach().cpu(), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_invariant_to_block_size(device, dist):
    results = []
    for block in (128, 1024, 8192):
        w = _weights(20_000, torch.float32, device)
        perturb_(w, 5, 0.1, dist=dist, impl="triton", block=block)
        results.append(w)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_list_equals_per_tensor_and_streams_follow_the_tensor(impl, device, dist):
    sizes, dtypes = [5000, 0, 300, 4096, 1], [torch.float32, torch.bfloat16, torch.float32, torch.float16,
                                               torch.bfloat16]
    streams = [40, 41, 7, 1000, 2**32 - 1]
    together = [_weights(n, d, device, i) for i, (n, d) in enumerate(zip(sizes, dtypes))]
    alone = [t.clone() for t in together]
    perturb_(together, 123, 0.01, dist=dist, streams=streams, impl=impl)
    for t, s in zip(alone, streams):
        perturb_(t, 123, 0.01, dist=dist, streams=[s], impl=impl)
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    # the same tensor in another list, at another position, gets the same noise
    x = _weights(5000, torch.float32, device, 0)
    moved = [_weights(64, torch.float32, device, 9), x.clone()]
    perturb_(x, 123, 0.01, dist=dist, streams=[40], impl=impl)
    perturb_(moved, 123, 0.01, dist=dist, streams=[3, 40], impl=impl)
    assert torch.equal(moved[1], x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_seed_form_equals_two_calls(impl, device, dtype):
    w = _weights(9000, dtype, device)
    fused, twice = w.clone(), w.clone()
    perturb2_(fused, 1, 2e-3, 2, -5e-3, impl=impl)
    perturb_(twice, 1, 2e-3, impl=impl)
    perturb_(twice, 2, -5e-3, impl=impl)
    # one float32 rounding of the sum vs two roundings to the stored format: at most 2 units of it per element
    bound = 2 * UNIT[dtype] * (w.float().abs() + 7 * 4.72e-3) + 1e-9
    assert ((fused.float() - twice.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_spsa_round_trip_returns_within_bound(impl, device, dtype, dist):
    eps = 1e-3
    w0 = _weights(10_000, dtype, device)
    w = w0.clone()
    perturb_(w, 99, eps, dist=dist, impl=impl)
    perturb_(w, 99, -2 * eps, dist=dist, impl=impl)
    perturb_(w, 99, eps, dist=dist, impl=impl)
    # three stores, each off by at most one unit roundoff of a value bounded by |w| + eps|z| (|z| <= 4.72)
    bound = 3 * (UNIT[dtype] + 2.0**-24) * (w0.float().abs() + eps * 4.72)
    assert ((w.float() - w0.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_identical_across_impls(device, dtype):
    n = 1 << 16
    # From 1.0, +2**-9 sits a quarter of the way up a step of 2**-7 (bf16) and -2**-9 halfway down a step of 2**-8;
    # fp16 steps are 8x finer, so use 2**-12 there for the same fractions.
    s = 2.0**-9 if dtype == torch.bfloat16 else 2.0**-12
    outs = {}
    for impl in ("torch", "triton"):
        w = torch.ones(n, dtype=dtype, device=device)
        perturb_(w, 4, s, dist="rademacher", rounding_seed=17, impl=impl)
        outs[impl] = w.cpu()
    assert torch.equal(outs["torch"], outs["triton"])
    exact = 1.0 + s * rng.rademacher(4, 0, 0, n)
    err = outs["torch"].double() - exact.double()
    up = exact > 1
    for sel, p, step in ((up, 0.25, 4 * s), (~up, 0.5, 2 * s)):
        # rounding error is step*(1-p) w.p. p, -step*p w.p. 1-p: mean 0, sd step*sqrt(p(1-p))
        sd = step * (p * (1 - p)) ** 0.5 / sel.sum().item() ** 0.5
        assert abs(err[sel].mean().item()) < 5 * sd
    assert not torch.equal(outs["torch"], (1.0 + s * rng.rademacher(4, 0, 0, n)).to(dtype))  # not plain rounding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_statistics_on_random_values(dtype):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(64, generator=g) * torch.logspace(-3, 3, 64)
    draws = torch.stack([stochastic_round(y, dtype, rng.uniform_words(seed, 0, 0, 64)) for seed in range(4000)])
    lo = y.to(dtype)  # nearest; the two candidates are lo and its neighbour towards y
    step = (torch.nextafter(lo.float(), torch.full_like(y, float("inf")))).to(dtype).float() - lo.float()
    assert set(torch.unique(draws.float() - y.unsqueeze(0)).sign().tolist()) <= {-1.0, 0.0, 1.0}
    spread = draws.float().std(0)
    err = (draws.float().mean(0) - y).abs()
    assert (err <= 5 * spread / 4000 ** 0.5 + 1e-12).all(), (err, spread, step)


BAD_CALLS = [
    (lambda good: [good, torch.zeros(3, dtype=torch.int32)], {}, TypeError, r"tensors\[1\] has dtype torch.int32"),
    (lambda good: [good, torch.zeros(4, 4).t()], {}, ValueError, r"tensors\[1\].*not contiguous"),
    (lambda good: [good, good], {}, ValueError, "share memory"),
    (lambda good: [good, 3.0], {}, TypeError, r"tensors\[1\] must be a torch.Tensor"),
    (lambda good: [good], {"scale": float("inf")}, ValueError, "(scale|a) must be finite"),
    (lambda good: [good], {"scale": float("nan")}, ValueError, "(scale|a) must be finite"),
    (lambda good: [good], {"seed": -1}, ValueError, r"seed(_a)? must be in \[0, 2\*\*64\)"),
    (lambda good: [good], {"seed": 2**64}, ValueError, r"seed(_a)? must be in \[0, 2\*\*64\)"),
    (lambda good: [good], {"seed": 1.5}, TypeError, "seed(_a)? must be a Python int"),
    (lambda good: [good], {"streams": [0, 1]}, ValueError, "streams has 2 entries for 1 tensors"),
    (lambda good: [good], {"streams": [2**32]}, ValueError, r"streams\[0\] must be in"),
    (lambda good: [good], {"dist": "uniform"}, ValueError, "dist must be one of"),
    (lambda good: [good], {"impl": "cuda"}, ValueError, "impl must be one of"),
    (lambda good: [good], {"rounding_seed": -3}, ValueError, "rounding_seed must be in"),
    (lambda good: [good], {"block": 100}, ValueError, "block must be a power of two"),
]


@pytest.mark.parametrize("make, kwargs, exc, match", BAD_CALLS)
def test_bad_input_is_rejected_before_anything_changes(make, kwargs, exc, match):
    good = torch.arange(10, dtype=torch.float32)
    args = {"seed": 1, "scale": 0.1, **kwargs}
    seed, scale = args.pop("seed"), args.pop("scale")
    with pytest.raises(exc, match=match):
        perturb_(make(good), seed, scale, **args)
    with pytest.raises(exc, match=match):
        perturb2_(make(good), seed, scale, 2, 0.5, **args)
    assert torch.equal(good, torch.arange(10, dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_are_rejected():
    a, b = torch.zeros(4), torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match=r"tensors\[1\] is on cuda"):
        perturb_([a, b], 1, 0.1)
    assert not a.any() and not b.any()


def test_auto_uses_the_torch_reference_on_cpu(monkeypatch):
    import zokernels.perturb as P

    def boom(*args, **kwargs):
        raise AssertionError("auto must not pick Triton for CPU tensors")

    monkeypatch.setattr(P, "_perturb_triton", boom)
    w = torch.zeros(10)
    perturb_(w, 1, 1.0)
    assert torch.equal(w, rng.gaussian(1, 0, 0, 10))


def test_decay_scales_the_weights_first(impl, device):
    w = _weights(5000, torch.float32, device)
    expected = reference(w * 0.75, 8, 0.1, "rademacher")
    perturb_(w, 8, 0.1, dist="rademacher", decay=0.75, impl=impl)
    assert torch.equal(w.cpu(), expected)


@pytest.mark.parametrize("views", [lambda b: [b[0:4], b[2:6]], lambda b: [b, b[1:]], lambda b: [b[5:], b[:6]]])
def test_overlapping_views_are_refused_before_anything_changes(views):
    b = torch.arange(10, dtype=torch.float32)
    with pytest.raises(ValueError, match="share memory"):
        perturb_(views(b), seed=1, scale=1.0, impl="torch")
    assert torch.equal(b, torch.arange(10, dtype=torch.float32))
    perturb_([b[0:5], b[5:]], seed=1, scale=1.0, impl="torch")  # adjacent, disjoint: accepted
