"""The torch references' large-tensor and multi-chunk paths against per-element formulas written on whole tensors.

The references process a tensor of at least ``TORCH_CHUNK // 4`` = 65,536 elements on its own, in chunks of
``TORCH_CHUNK`` = 262,144 (perturb, guided) or of whole rows / blocks near that size (int8, NF4), and batch smaller
tensors together. The other tests keep sizes small for the Triton interpreter, so these paths would otherwise run with
one chunk and decay 1 only. Here: decay != 1, three or more chunks, sizes that end mid-chunk (odd, prime-ish), a
tensor exactly at the threshold, and small tensors batched in the same call. Every formula is the spec element by
element (``zokernels.rng`` noise generated for the whole tensor at once, so chunk boundaries cannot hide in it).
CPU only and torch only: this is the reference's own code path.
"""

import pytest
import torch

from zokernels import _common, perturb2_, perturb_, rng
from zokernels.guided import LowRank, guide_dot, guided_perturb_
from zokernels.rounding import stochastic_round

CHUNK = _common.TORCH_CHUNK  # one chunk size for every reference (perturb, guided, int8, NF4)
assert CHUNK == 1 << 18  # the sizes below are chosen for this chunk

# numel: exactly the large-tensor threshold; just above one chunk (a 1-element last chunk); three chunks, odd
SIZES = [CHUNK // 4, CHUNK + 1, 2 * CHUNK + 12_345]
SMALL = [1, 7, 4097]  # batched together in the same call


def _weights(numel, seed, dtype=torch.float32):
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed)).to(dtype)


def noise(dist, seed, stream, w):
    return rng.noise(dist, seed, stream, 0, w.numel()).reshape(w.shape)


def perturb_formula(w, terms, dist, stream, decay, rounding_seed=None):
    """``decay * w + sum scale * z`` in float32: one product and one sum per term, in order (as the spec rounds)."""
    y = w.float() * decay
    for seed, scale in terms:
        y = y + noise(dist, seed, stream, w) * scale
    if w.dtype == torch.float32:
        return y
    if rounding_seed is None:
        return y.to(w.dtype)
    return stochastic_round(y.reshape(-1), w.dtype, rng.uniform_words(rounding_seed, stream, 0, w.numel())
                            ).reshape(w.shape)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("two", [False, True])
def test_perturb_large_and_batched_tensors_with_decay(dist, two):
    ws = [_weights(n, i) for i, n in enumerate(SIZES + SMALL)]
    streams = [5, 0, 9, 2, 7, 3]
    terms = [(11, 0.03), (12, -0.7)] if two else [(11, 0.03)]
    expected = [perturb_formula(w, terms, dist, s, 0.875) for w, s in zip(ws, streams)]
    if two:
        perturb2_(ws, 11, 0.03, 12, -0.7, dist=dist, streams=streams, decay=0.875, impl="torch")
    else:
        perturb_(ws, 11, 0.03, dist=dist, streams=streams, decay=0.875, impl="torch")
    for i, (w, e) in enumerate(zip(ws, expected)):
        assert torch.equal(w, e), (i, w.numel(), (w - e).abs().max().item())


@pytest.mark.parametrize("dtype, rounding_seed", [(torch.bfloat16, 21), (torch.float16, None)])
def test_perturb_large_half_precision_with_decay_and_rounding(dtype, rounding_seed):
    w = _weights(2 * CHUNK + 999, 3, dtype)
    expected = perturb_formula(w, [(4, 0.01)], "gaussian", 1, 0.75, rounding_seed)
    perturb_([w], 4, 0.01, streams=[1], decay=0.75, rounding_seed=rounding_seed, impl="torch")
    assert torch.equal(w, expected)


# ---------------------------------------------------------------------------------------------------------------------
# guided
def _guided_setup(kind):
    # (1023, 769): 786,687 elements, three dense chunks; LowRank chunks are whole rows (340 rows, then 340, then 343).
    # (256, 256): exactly the large-tensor threshold. (61, 37): batched.
    shapes = [(1023, 769), (256, 256), (61, 37)]
    ws = [_weights(s[0] * s[1], 10 + i).reshape(s) for i, s in enumerate(shapes)]

    def guide(shape, seed):
        if kind == "lowrank":
            return LowRank(_weights(shape[0] * 3, seed).reshape(shape[0], 3),
                           _weights(shape[1] * 3, seed + 1).reshape(shape[1], 3))
        return _weights(shape[0] * shape[1], seed, torch.bfloat16).reshape(shape)

    prev = [guide(s, 20 + 2 * i) for i, s in enumerate(shapes)]
    vhat = [guide(s, 40 + 2 * i) for i, s in enumerate(shapes)]
    vhat[2] = None
    return ws, prev, vhat


def _dense(g):
    return g.dense() if isinstance(g, LowRank) else g.float()


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_guided_perturb_large_tensors_with_decay(kind):
    ws, prev, vhat = _guided_setup(kind)
    streams = [3, 8, 1]
    noise_terms = [(31, torch.tensor([0.1, -0.2, 0.3])), (32, torch.tensor([0.5, 0.25, -1.0]))]
    guide_terms = [(prev, torch.tensor([1.5, -0.5, 2.0])), (vhat, torch.tensor([-0.25, 0.75, 1.0]))]
    decay = torch.tensor([0.9, 0.8, 0.95])
    expected = []
    for t, (w, s) in enumerate(zip(ws, streams)):
        y = w * decay[t].item()
        for seed, c in noise_terms:
            y = y + noise("gaussian", seed, s, w) * c[t].item()
        for gs, c in guide_terms:
            if gs[t] is not None:
                y = y + _dense(gs[t]) * c[t].item()
        expected.append(y)
    guided_perturb_(ws, noise=noise_terms, guides=guide_terms, decay=decay, streams=streams, impl="torch")
    for t, (w, e) in enumerate(zip(ws, expected)):
        if kind == "dense":
            assert torch.equal(w, e), t
        else:  # a LowRank chunk is u[rows] @ v.T: its rounding may differ from the whole product's in the last bit
            torch.testing.assert_close(w, e, rtol=0, atol=8 * 2.0**-24 * e.abs().max().item())


@pytest.mark.parametrize("kind", ["dense", "lowrank"])
def test_guide_dot_large_tensors(kind):
    ws, prev, _ = _guided_setup(kind)
    prev[1] = None
    streams = [3, 8, 1]
    got = guide_dot(ws, prev, 55, streams=streams, impl="torch")
    for t, (w, g, s) in enumerate(zip(ws, prev, streams)):
        xi = noise("gaussian", 55, s, w).double()
        dot = 0.0 if g is None else (_dense(g).double() * xi).sum().item()
        scale = 0.0 if g is None else (_dense(g).double() * xi).abs().sum().item()
        # float64 sums in another order (per chunk, then across chunks): relative error ~1e-15 of the absolute sum;
        # a float32 LowRank chunk (u[rows] @ v.T) contributes ~1e-7
        assert abs(got[t, 0].item() - dot) <= (1e-6 if kind == "lowrank" else 1e-12) * scale + 1e-12, t
        assert got[t, 1].item() == pytest.approx((xi * xi).sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# quantised (bitsandbytes storage)
def test_int8_code_perturb_multi_chunk():
    from zokernels.quant import Int8Weight, int8_code_perturb_

    rows, cols = 601, 1001  # rows of 1001 codes: 261 rows a chunk, so chunks of 261, 261 and 79 rows
    assert rows * cols > 2 * CHUNK
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    scb = torch.rand(rows, generator=g) * 0.2 + 0.01
    scb[5] = 0.0  # a zero row: its codes carry no value and do not move
    w = Int8Weight(codes=codes.clone(), scb=scb)
    eps = 2e-3
    # the spec per element: delta = floor(x) + (u < x - floor(x)), x = clamp(eps * z * (127 / SCB[row]), +-255)
    z = noise("gaussian", 7, 2, codes)
    u = (rng.uniform_words(8, 2, 0, codes.numel(), rng.DOMAIN_CODES) >> 8).float().reshape(codes.shape) * 2.0**-24
    inv = torch.where(scb > 0, torch.full_like(scb, 127.0) / torch.where(scb > 0, scb, 1.0), 0.0).unsqueeze(1)
    x = ((z * eps) * inv).clamp(-255, 255)
    delta = torch.floor(x).int() + (u < x - torch.floor(x)).int()
    raw = codes.int() + 3 * delta
    saturated = int8_code_perturb_(w, 7, eps, rounding_seed=8, times=3, streams=[2], impl="torch")
    assert torch.equal(w.codes, raw.clamp(-127, 127).to(torch.int8))
    assert saturated == (raw.abs() > 127).sum().item() > 0
    assert (delta != 0).float().mean() > 0.5 and torch.equal(w.codes[5], codes[5])


def _nf4_weight(shape, blocksize, nested):
    pytest.importorskip("bitsandbytes", reason="quantised formats need bitsandbytes")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from zokernels.quant import NF4Weight

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 0.05
    q, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    p = bnb.nn.Params4bit(q, requires_grad=False, quant_state=state, blocksize=blocksize, quant_type="nf4",
                          compress_statistics=nested, bnb_quantized=True)
    return NF4Weight.from_bnb(p)


def _nf4_codes(w):
    p = w.codes.long()
    return torch.stack((p >> 4, p & 15), -1).reshape(-1)[:w.numel]


@pytest.mark.parametrize("nested", [False, True])
def test_nf4_code_update_multi_chunk(nested):
    from zokernels.quant import nf4_code_update_

    shape, blocksize = (601, 999), 64  # 600,399 codes (odd: the last byte holds a pad nibble), 9,382 blocks
    w = _nf4_weight(shape, blocksize, nested)  # 4,096 blocks a chunk: three chunks, the last one partial
    assert w.numel > 2 * CHUNK and w.numel % 2 == 1
    old, pad = _nf4_codes(w), w.codes[-1].item() & 15
    code, n, coef = w.code, w.numel, 0.004
    # the spec per element: t = code[c] + coef*z / absmax; the new code is code[k] or code[k+1] (code[k] <= t), up
    # with probability (t - code[k]) / gap, by the word's top 24 bits; t outside [-1, 1] saturates
    a = w.block_absmax(0, w.n_blocks).repeat_interleave(blocksize)[:n]
    t = code[old] + (rng.noise("gaussian", 3, 6, 0, n) * coef) / a
    k = torch.searchsorted(code[1:].contiguous(), t, right=True)
    gap = code[torch.clamp(k + 1, max=15)] - code[k]
    p = torch.where(k < 15, (t - code[k]) * (torch.ones_like(gap) / gap), torch.zeros_like(t))
    u = (rng.uniform_words(4, 6, 0, n, rng.DOMAIN_CODES) >> 8).float() * 2.0**-24
    expected = k + (u < p).long()
    saturated = nf4_code_update_(w, 3, coef, rounding_seed=4, stream=6, impl="torch")
    assert torch.equal(_nf4_codes(w), expected)
    assert saturated == ((t > 1) | (t < -1)).sum().item() > 0
    assert (expected != old).float().mean() > 0.1
    assert w.codes[-1].item() & 15 == pad
