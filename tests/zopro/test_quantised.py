"""zopro.quantised: ZOOptimizer over the codes of bitsandbytes layers (int8 with exact probe undo, NF4 with probes in
the dequantised compute path), driven by Isotropic, Targeted and RankGuided directions; replay exact to the bit."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="quantised formats need bitsandbytes")

from zokernels import rng  # noqa: E402
from zokernels.guided import LowRank  # noqa: E402
from zopro import Isotropic, RankGuided, Targeted, ZOOptimizer, derive_seed  # noqa: E402
from zopro.quantised import CodeSpace  # noqa: E402

SHAPES = [(32, 48), (16, 32)]  # two layers: 48 -> 32 -> 16


def _model(kind, seed=0):
    torch.manual_seed(seed)  # nn.Linear's init draws from the global generator; tests may, library code does not
    layers = []
    for out_f, in_f in SHAPES:
        if kind == "nf4":
            lin = bnb.nn.Linear4bit(in_f, out_f, bias=True, quant_type="nf4", compress_statistics=False)
            lin.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, blocksize=64, quant_type="nf4",
                                           compress_statistics=False, module=lin)
        else:
            lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=True, has_fp16_weights=False)
        layers.append(lin)
    model = torch.nn.Sequential(layers[0], torch.nn.Tanh(), layers[1]).to("cpu")
    model.requires_grad_(False)
    return model


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 48, generator=g), torch.randn(64, 16, generator=g) * 0.1


def _codes(space):
    return [c.clone() for c in space.parameters().values()]


def _lowrank_guides(seed=2, rank=2):
    g = torch.Generator().manual_seed(seed)
    return {f"{i * 2}": LowRank(torch.randn(m, rank, generator=g) * 0.1, torch.randn(n, rank, generator=g) * 0.1)
            for i, (m, n) in enumerate(SHAPES)}


def _direction(name):
    if name == "isotropic":
        return Isotropic()
    guides = _lowrank_guides()
    if name == "targeted":
        return Targeted({k: v.dense() for k, v in guides.items()}, d0=0.9)
    return RankGuided({k: v.dense() for k, v in guides.items()}, rank=2, d0=0.9)


def _lr(direction):
    """Isotropic z has ~1 per element; a guided unit-norm z ~1/sqrt(2,048): lr 20 lets its updates move some
    codes in three steps (at 0.05 the expected number of moved NF4 codes was ~0.6)."""
    return 0.05 if direction == "isotropic" else 20.0


def _run(kind, direction, steps=3, eps=0.02, many=False):
    lr = _lr(direction)
    model = _model(kind)
    space = CodeSpace.from_model(model, impl="torch")
    x, y = _data()
    opt = ZOOptimizer(space.parameters(), lr=lr, eps=eps, sampler=space.sampler(_direction(direction)), seed=5)

    def loss():
        return ((model(x) - y) ** 2).mean()

    if many:
        opt.step_many([loss] * steps)
    else:
        for _ in range(steps):
            opt.step(loss)
    return model, space, opt


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("direction", ["isotropic", "targeted", "rank_guided"])
def test_codes_move_and_the_log_replays_to_the_same_codes(kind, direction):
    start = _codes(CodeSpace.from_model(_model(kind)))
    model, space, opt = _run(kind, direction, many=direction == "targeted")
    moved = _codes(space)
    assert any(not torch.equal(a, b) for a, b in zip(start, moved))
    fresh = CodeSpace.from_model(_model(kind), impl="torch")
    assert all(torch.equal(a, b) for a, b in zip(start, _codes(fresh)))
    again = ZOOptimizer(fresh.parameters(), lr=_lr(direction), eps=0.02, seed=5,
                        sampler=fresh.sampler(_direction(direction)))
    again.replay(opt.state_dict()["log"])
    assert all(torch.equal(a, b) for a, b in zip(moved, _codes(fresh)))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_probes_leave_the_codes_as_they_were(kind):
    """With lr 0 every step's probes (+eps z, -2 eps z, +eps z) are undone exactly: int8 by integer multiples of one
    rounded step, NF4 because its probes never touch the codes."""
    model = _model(kind)
    space = CodeSpace.from_model(model, impl="torch")
    if kind == "int8":  # every row's largest code is 127: room for the probes, or they saturate (counted below)
        for c in space.parameters().values():
            c.clamp_(-110, 110)
    start = _codes(space)
    x, y = _data()
    seen = []

    def loss():
        seen.append([c.clone() for c in space.parameters().values()])
        return ((model(x) - y) ** 2).mean()

    opt = ZOOptimizer(space.parameters(), lr=0.0, eps=0.05, sampler=space.sampler(_direction("targeted")), seed=1)
    opt.step_many([loss] * 2)
    assert all(torch.equal(a, b) for a, b in zip(start, _codes(space)))
    assert space.saturated["probe"] == 0
    during = any(not torch.equal(a, b) for a, b in zip(start, seen[0]))
    assert during == (kind == "int8")  # int8 probes move the codes; NF4 probes live in the forward


def test_int8_probes_that_saturate_are_counted():
    """Rows' largest codes sit at ±127, so isotropic probes of 18 code steps push some past the end: counted (the
    undo is then inexact at those codes, which the count reports)."""
    model, space, opt = _run("int8", "isotropic", steps=1)
    assert space.saturated["probe"] > 0


def test_nf4_probe_is_eps_z_in_the_forward():
    """During a probe an NF4 layer computes with dequantised + eps*z (z: the direction's, here isotropic noise of the
    layer's stream)."""
    model = _model("nf4")
    space = CodeSpace.from_model(model, impl="torch")
    x, _ = _data()
    layer = model[0]
    w0 = space.weights["0"].dequantize(torch.float32)
    got = []
    opt = ZOOptimizer(space.parameters(), lr=0.0, eps=0.1, sampler=space.sampler(Isotropic()), seed=3)
    opt.step(lambda: got.append(layer(x)) or torch.tensor(0.0))
    seed = derive_seed(3, 0, 0)  # step 0, direction 0 of an optimiser with seed 3
    z = rng.noise("gaussian", seed, 0, 0, w0.numel()).reshape(w0.shape)
    for sign, out in zip((1, -1), got):
        expect = torch.nn.functional.linear(x, w0 + sign * 0.1 * z, layer.bias)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_guide_toward_the_target_lowers_the_loss_in_code_space(kind):
    """Targeted with the guide (target - current weights) as a rank-2 LowRank: steps along it lower the loss."""
    model = _model(kind)
    space = CodeSpace.from_model(model, impl="torch")
    x, _ = _data()
    g = torch.Generator().manual_seed(9)
    targets, guides = {}, {}
    for name, w in space.weights.items():
        u, v = torch.randn(w.shape[0], 2, generator=g) * 0.2, torch.randn(w.shape[1], 2, generator=g) * 0.2
        guides[name] = LowRank(u, v)
        targets[name] = w.dequantize().float() + u @ v.T
    with torch.no_grad():
        h = torch.tanh(torch.nn.functional.linear(x, targets["0"], model[0].bias))
        y = torch.nn.functional.linear(h, targets["2"], model[2].bias)

    def loss():
        return ((model(x) - y) ** 2).mean()

    start = float(loss())
    # lr 10: 8 steps took the loss to 0.15x (int8) and 0.26x (NF4); lr 3 to ~0.5x, 30 overshoots (measured)
    opt = ZOOptimizer(space.parameters(), lr=10.0, eps=0.05, seed=2,
                      sampler=space.sampler(Targeted(guides, d0=0.99)))
    opt.step_many([loss] * 8)
    assert float(loss()) < 0.5 * start


def test_weight_decay_and_foreign_parameters_are_refused():
    space = CodeSpace.from_model(_model("int8"))
    with pytest.raises(ValueError, match="weight_decay"):
        ZOOptimizer(space.parameters(), lr=0.1, weight_decay=0.1, sampler=space.sampler(Isotropic()))
    other = CodeSpace.from_model(_model("int8"))
    with pytest.raises(ValueError, match="space.parameters"):
        ZOOptimizer({"x": other.parameters()["0"]}, lr=0.1, sampler=other.sampler(Isotropic()))
    with pytest.raises(ValueError, match="no bitsandbytes"):
        CodeSpace.from_model(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_an_update_that_is_a_whole_multiple_of_eps_is_still_applied(kind):
    """eps 0.25, lr 0.5, g 1.5: the closing coefficient eps - lr g = -2 eps looks like a probe move; it must close the
    probe (nothing left outstanding, no probe term left in the forward) and update the codes as any update does."""
    model = _model(kind)
    space = CodeSpace.from_model(model, impl="torch")
    start = _codes(space)
    sampler = space.sampler(Isotropic())
    opt = ZOOptimizer(space.parameters(), lr=0.5, eps=0.25, sampler=sampler, seed=3)
    losses = iter([1.75, 1.0])  # g = (1.75 - 1.0) / (2 * 0.25) = 1.5
    assert opt.step(lambda: next(losses)).grad == 1.5
    assert not sampler._open and not any(space._probe_terms.values())
    assert any(not torch.equal(a, b) for a, b in zip(start, _codes(space)))  # a step of 0.75 z moves codes


def test_mixed_guide_kinds_are_refused_when_the_optimiser_is_built():
    """The code ops take one kind of guide per layer: a LowRank prev with a dense reward delta on the second layer is
    refused by name at construction, not halfway through a pass that has already moved the first layer's codes."""
    space = CodeSpace.from_model(_model("int8"), impl="torch")
    start = _codes(space)
    guides = _lowrank_guides()
    direction = Targeted(guides, {"2": guides["2"].dense()}, d0=0.9)
    with pytest.raises(ValueError, match="layer '2' has a dense and a LowRank guide"):
        opt = ZOOptimizer(space.parameters(), lr=20.0, eps=0.02, sampler=space.sampler(direction), seed=5)
        opt.step(lambda: 1.0)
    assert all(torch.equal(a, b) for a, b in zip(start, _codes(space)))


def test_an_nf4_update_checks_every_layer_before_the_first_moves():
    """A scale-space step may leave a block's absmax NaN; the update refuses before any layer's codes change."""
    space = CodeSpace.from_model(_model("nf4"), impl="torch")
    start = _codes(space)
    opt = ZOOptimizer(space.parameters(), lr=0.5, eps=0.25, sampler=space.sampler(Isotropic()), seed=3)
    space.weights["2"].absmax[0] = float("nan")  # the second layer
    losses = iter([1.5, 1.0])  # g = 1: an update of -0.5 z would move the first layer's codes
    with pytest.raises(ValueError, match="absmax of block 0 is nan"):
        opt.step(lambda: next(losses))
    assert all(torch.equal(a, b) for a, b in zip(start, _codes(space)))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_losses_near_the_float_limit_skip_the_code_update(kind):
    """g = 3e41 (losses of +-3e38) is skipped exactly as a NaN loss is: the same passes, so the same codes (the int8
    probes' undo is exact except at codes the probe saturated, the same in both)."""
    codes = []
    for losses in ([float("nan"), 1.0], [3e38, -3e38]):
        space = CodeSpace.from_model(_model(kind), impl="torch")
        opt = ZOOptimizer(space.parameters(), lr=0.05, eps=1e-3, sampler=space.sampler(Isotropic()), seed=3)
        it = iter(losses)
        assert opt.step(lambda it=it: next(it)).skipped
        codes.append(_codes(space))
    assert all(torch.equal(a, b) for a, b in zip(*codes))


@pytest.mark.parametrize("state", [None, {"name": "isotropic", "dist": "gaussian"}])
def test_a_malformed_code_sampler_state_is_refused_by_name(state):
    """Not a dict, or a plain direction's state (no space='codes'): ValueError naming the sampler state."""
    space = CodeSpace.from_model(_model("int8"), impl="torch")
    opt = ZOOptimizer(space.parameters(), lr=0.05, sampler=space.sampler(Isotropic()), seed=3)
    saved = opt.state_dict()
    saved["sampler"] = state
    with pytest.raises(ValueError, match="sampler state"):
        opt.load_state_dict(saved)
