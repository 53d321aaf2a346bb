"""Populations of directions with fitness shaped within the step (``ZOOptimizer(q=N, fitness=...)``): the update the
spec gives for scripted losses, the invariances that define each shaping, bit-exact replay and resume with a guided
sampler of several directions, and the refusals."""

import math

import pytest
import torch

from zokernels import rng
from zopro.optim import ZOOptimizer
from zopro.samplers import Targeted
from zopro.seeds import derive_seed

Z_MAX = 4.72  # the spec's Gaussian never exceeds 4.71 in absolute value (zokernels.rng)
U32 = 2.0**-24  # float32 unit roundoff


def _z(seed, numel):
    return rng.gaussian(seed, 0, 0, numel).double()


def _scripted(values):
    """A closure returning ``values`` in turn: the losses of a step's members, whatever the weights."""
    it = iter(values)
    return lambda: next(it)


def _zscore(losses):
    x = torch.tensor(losses, dtype=torch.float64)
    return ((x - x.mean()) / x.std(unbiased=False)).tolist()


def _centred_ranks(losses):
    # ranks with ties averaged (scipy.stats.rankdata's "average"), from 0, scaled to [-0.5, 0.5]
    n = len(losses)
    ranks = [sum(v < x for v in losses) + (sum(v == x for v in losses) - 1) / 2 for x in losses]
    return [r / (n - 1) - 0.5 for r in ranks]


@pytest.mark.parametrize("fitness, shape", [("zscore", _zscore), ("ranks", _centred_ranks)])
def test_one_step_equals_the_spec_for_scripted_losses(fitness, shape):
    # q = 3 antithetic pairs, their six losses scripted (one tie): w1 = w0 - lr/q sum_j (f(L+_j) - f(L-_j)) / 2 z_j,
    # f the shaping of all six; allowed: float32 rounding of the 3q+1 passes, as for raw SPSA (test_optim_scale)
    q, d, lr, eps, seed = 3, 64, 0.05, 1e-2, 7
    losses = [4.0, 1.0, 2.5, 2.5, -3.0, 10.0]
    w = torch.linspace(-1.0, 1.0, d)
    w0 = w.double().clone()
    opt = ZOOptimizer([w], lr=lr, eps=eps, q=q, fitness=fitness, seed=seed)
    result = opt.step(_scripted(losses))
    f = shape(losses)
    coef = [(f[2 * j] - f[2 * j + 1]) / 2 for j in range(q)]
    expected = w0 - lr / q * sum(c * _z(derive_seed(seed, 0, j), d) for j, c in enumerate(coef))
    bound = (3 * q + 1) * 2 * U32 * (w0.abs() + 2 * eps * Z_MAX + lr * Z_MAX)
    assert ((w.double() - expected).abs() <= bound).all(), (w.double() - expected).abs().max()
    assert (w.double() - w0).norm() > 100 * bound.norm()  # a real step, not rounding
    # the step reports the raw two-point estimate, not the shaped coefficient
    assert result.grad == pytest.approx(sum((losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(q)) / q)


def test_centred_ranks_see_only_the_order_of_the_losses():
    # any increasing transform of the losses gives the same weights bit for bit; raw SPSA sees even a scale
    def run(fitness, transform):
        w = torch.linspace(-1.0, 1.0, 32)
        opt = ZOOptimizer([w], lr=0.1, eps=1e-2, q=4, fitness=fitness, seed=3)
        target = torch.linspace(1.0, -1.0, 32, dtype=torch.float64)
        opt.step_many([lambda: transform(float((w.double() - target).pow(2).sum()))] * 5)
        return w

    assert torch.equal(run("ranks", lambda v: v), run("ranks", lambda v: 1e3 * math.exp(v) - 7.0))
    assert not torch.equal(run("raw", lambda v: v), run("raw", lambda v: 2.0 * v))  # twice the loss, twice the step


def test_zscore_sees_neither_the_scale_nor_the_offset_of_the_losses():
    # z-scores of a*L + b equal those of L up to float64 rounding: the weights agree to float32 rounding
    def run(a, b):
        w = torch.linspace(-1.0, 1.0, 32)
        opt = ZOOptimizer([w], lr=0.1, eps=1e-2, q=4, fitness="zscore", seed=3)
        target = torch.linspace(1.0, -1.0, 32, dtype=torch.float64)
        opt.step_many([lambda: a * float((w.double() - target).pow(2).sum()) + b] * 5)
        return w

    torch.testing.assert_close(run(1.0, 0.0), run(250.0, -40.0), rtol=0, atol=1e-6)


def test_equal_losses_move_nothing_and_a_nan_skips_the_update():
    w = torch.linspace(-1.0, 1.0, 16)
    opt = ZOOptimizer([w], lr=1.0, eps=2.0**-7, q=2, fitness="zscore", seed=1)
    w0 = w.clone()
    result = opt.step(_scripted([3.0] * 4))  # no spread: every shaped fitness is 0, only the probes' round trip
    assert not result.skipped and (w - w0).abs().max() <= 8 * U32 * 2
    result = opt.step(_scripted([1.0, float("nan"), 2.0, 0.0]))
    assert result.skipped and opt.skipped == 1


@pytest.mark.parametrize("fitness", ["zscore", "ranks"])
def test_a_guided_population_replays_and_resumes_bit_for_bit(fitness):
    # q = 3 targeted directions a step (every direction's coefficients stay cached until the step's update)
    def problem():
        g = torch.Generator().manual_seed(0)
        w = torch.randn(6, 8, generator=g)
        prev = {"w": torch.randn(6, 8, generator=g)}
        delta = {"w": torch.randn(6, 8, generator=g)}
        return w, lambda: Targeted(prev, delta, d0=0.6, scale="numel")

    target = torch.linspace(-1, 1, 48, dtype=torch.float64).view(6, 8)
    w, sampler = problem()
    start = w.clone()
    opt = ZOOptimizer({"w": w}, lr=0.05, eps=1e-2, q=3, fitness=fitness, sampler=sampler(), seed=9)
    loss = lambda: float((w.double() - target).pow(2).sum())  # noqa: E731
    opt.step_many([loss] * 3)
    middle = {"state": opt.state_dict(), "w": w.clone()}
    opt.step(loss)
    opt.step_many([loss] * 2)
    assert not torch.equal(w, start)

    fresh, sampler2 = problem()
    replayer = ZOOptimizer({"w": fresh}, lr=0.05, eps=1e-2, q=3, fitness=fitness, sampler=sampler2(), seed=9)
    replayer.replay(opt.state_dict()["log"])
    assert torch.equal(fresh, w)

    resumed, sampler3 = problem()
    resumed.copy_(middle["w"])
    opt3 = ZOOptimizer({"w": resumed}, lr=0.05, eps=1e-2, q=3, fitness=fitness, sampler=sampler3(), seed=9)
    opt3.load_state_dict(middle["state"])
    loss3 = lambda: float((resumed.double() - target).pow(2).sum())  # noqa: E731
    opt3.step(loss3)
    opt3.step_many([loss3] * 2)
    assert torch.equal(resumed, w)


def test_fitness_is_part_of_the_state_and_bad_settings_are_refused():
    w = torch.zeros(4)
    opt = ZOOptimizer([w], lr=0.1, q=2, fitness="ranks")
    opt.step(lambda: float(w.sum()))
    state = opt.state_dict()
    assert state["fitness"] == "ranks"
    other = ZOOptimizer([torch.zeros(4)], lr=0.1, q=2, fitness="zscore")
    with pytest.raises(ValueError, match="fitness='ranks' but this optimiser has 'zscore'"):
        other.load_state_dict(state)
    old = dict(state)
    del old["fitness"]  # a state saved before fitness shaping existed is raw SPSA
    ZOOptimizer([torch.zeros(4)], lr=0.1, q=2).load_state_dict(old)
    with pytest.raises(ValueError, match="fitness must be one of raw, zscore, ranks"):
        ZOOptimizer([torch.zeros(4)], lr=0.1, fitness="softmax")
    with pytest.raises(ValueError, match="needs one_sided=False"):
        ZOOptimizer([torch.zeros(4)], lr=0.1, fitness="zscore", one_sided=True)


def _quadratic_members(w, target, streams_numel):
    """``evaluate(seeds, eps)`` of a quadratic loss computed from the spec's directions, without touching ``w``."""
    def evaluate(seeds, eps):
        out = []
        for seed in seeds:
            z = _z(seed, streams_numel)
            for sign in (1, -1):
                out.append(float(0.5 * (w.double() + sign * eps * z - target).pow(2).sum()))
        return out
    return evaluate


@pytest.mark.parametrize("fitness", ["raw", "zscore"])
def test_members_scored_together_match_the_probing_step_and_replay_bit_for_bit(fitness):
    d, target = 40, torch.linspace(-1, 1, 40, dtype=torch.float64)
    a, b = torch.linspace(0.5, -0.5, d), torch.linspace(0.5, -0.5, d)
    opt_a = ZOOptimizer([a], lr=0.05, eps=1e-2, q=4, fitness=fitness, seed=2)
    opt_b = ZOOptimizer([b], lr=0.05, eps=1e-2, q=4, fitness=fitness, seed=2)
    for _ in range(3):
        opt_a.step(lambda: float(0.5 * (a.double() - target).pow(2).sum()))
        opt_b.step_members(_quadratic_members(b, target, d))
    # the same losses up to the rounding of the probes, the same update up to it
    torch.testing.assert_close(torch.tensor(opt_b.log["losses"]), torch.tensor(opt_a.log["losses"]), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert opt_b.state_dict()["log"]["members"] == [0, 1, 2]
    # a log mixing the three kinds of call replays bit for bit
    opt_b.step_many([lambda: float(0.5 * (b.double() - target).pow(2).sum())] * 2)
    opt_b.step_members(_quadratic_members(b, target, d))
    fresh = torch.linspace(0.5, -0.5, d)
    ZOOptimizer([fresh], lr=0.05, eps=1e-2, q=4, fitness=fitness, seed=2).replay(opt_b.state_dict()["log"])
    assert torch.equal(fresh, b)


def test_members_that_raise_or_miscount_change_nothing():
    w = torch.linspace(-1, 1, 8)
    start = w.clone()
    opt = ZOOptimizer([w], lr=0.1, q=2, seed=0)

    def boom(seeds, eps):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step_members(boom)
    with pytest.raises(ValueError, match="returned 3 losses for 4 members"):
        opt.step_members(lambda seeds, eps: [1.0, 2.0, 3.0])
    assert torch.equal(w, start) and opt.step_count == 0 and opt.log["losses"] == [] and opt.log["members"] == []
    with pytest.raises(ValueError, match="one_sided=False"):
        ZOOptimizer([w], lr=0.1, one_sided=True).step_members(boom)
    state = opt.state_dict()
    state["log"]["members"] = [5]
    with pytest.raises(ValueError, match="log\\['members'\\]"):
        ZOOptimizer([torch.zeros(8)], lr=0.1, q=2).load_state_dict(state)
