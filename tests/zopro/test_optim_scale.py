"""The size of a ZOOptimizer step, not only its direction: losses whose gradient is known, q > 1 and one-sided
estimates, the round trip with lr = 0, and the targeted sampler's schedule counter across steps and a resume.

"Loss went down" cannot see a step that is twice or q times too large; these tests can: each compares an update with
the one the spec gives (``w <- w - (lr / q) * sum_j g_j z_j``, ``g_j = (L(w + eps z_j) - L(w - eps z_j)) / (2 eps)``
or ``(L(w + eps z_j) - L(w)) / eps`` one-sided), either exactly for one step or in the mean over many.
"""

import math

import pytest
import torch

from zokernels import rng
from zopro.optim import ZOOptimizer
from zopro.samplers import Targeted
from zopro.seeds import derive_seed

# |z| of the spec's Gaussian never exceeds 4.71 (zokernels.rng docstring)
Z_MAX = 4.72
U32 = 2.0**-24  # float32 unit roundoff

PLANS = [(1, False, "step"), (4, False, "step"), (4, False, "many"), (1, True, "step"), (4, True, "many")]


def _run(opt, closure, steps, api):
    if api == "step":
        for _ in range(steps):
            opt.step(closure)
    else:
        opt.step_many([closure] * steps)


@pytest.mark.parametrize("q, one_sided, api, n", [(4, False, "many", 50), (4, True, "step", 100)])
def test_mean_update_on_a_linear_loss_is_minus_lr_times_the_gradient(q, one_sided, api, n):
    # L(w) = c.w: every estimate is exact, g_j = c.z_j (up to rounding), and the step is
    # -(lr/q) sum_j (c.z_j) z_j, whose mean is -lr c (E[z z^T] = I). Along c the step is -(lr/q) sum_j (c.z_j)^2,
    # so r = -(mean step . c) / (lr |c|^2) has mean 1 and, (c.z)/|c| being standard normal (E x^4 = 3), standard
    # deviation sqrt(2 / (q n)) over n steps: 0.1 two-sided (q n = 200), 0.071 one-sided (q n = 400). The test
    # allows 5 of them. A step q = 4 times too large (no 1/q) is 30 or more away; a one-sided step half as large
    # (divided by 2 eps) is 7 away. (Each direction's seed is derived from the step: n steps are n independent draws.)
    d, lr = 12, 1e-2
    c = torch.linspace(-1.0, 2.0, d, dtype=torch.float64)
    w = torch.zeros(d)
    opt = ZOOptimizer([w], lr=lr, eps=0.125, q=q, one_sided=one_sided, seed=11)
    _run(opt, lambda: c @ w.double(), n, api)
    r = -(w.double() @ c).item() / (n * lr * (c @ c).item())
    assert abs(r - 1.0) < 5 * math.sqrt(2 / (q * n)), r
    # across c the mean step is 0: the displacement's orthogonal part has expected squared norm
    # n lr^2 |c|^2 (d - 1) / q; 5 times its root (Markov: exceeded with probability < 1/25 for a random seed)
    perp = w.double() - (w.double() @ c) / (c @ c) * c
    assert perp.norm().item() < 5 * lr * c.norm().item() * math.sqrt((d - 1) * n / q)


def _z(seed, numel):
    return rng.gaussian(seed, 0, 0, numel).double()


@pytest.mark.parametrize("q, one_sided, api", PLANS)
def test_one_step_on_a_quadratic_equals_the_spec(q, one_sided, api):
    # L(w) = 0.5 |w - w*|^2. From the losses the optimiser logged and the spec's directions, the new weights are
    # w0 - (lr/q) sum_j g_j z_j; the only difference allowed is float32 rounding of the 3q+1 passes (each pass is a
    # float32 product and sum, error <= 2 units of roundoff of |w| + |coef z|; |w|, |coef| bounded below).
    d, lr, eps, seed = 50, 0.05, 1e-2, 4
    target = torch.linspace(-1.0, 1.0, d, dtype=torch.float64)
    w = torch.linspace(0.5, -0.5, d)
    w0 = w.double().clone()
    opt = ZOOptimizer([w], lr=lr, eps=eps, q=q, one_sided=one_sided, seed=seed)
    _run(opt, lambda: 0.5 * (w.double() - target).pow(2).sum(), 1, api)
    losses = opt.log["losses"]
    if one_sided:
        grads = [(losses[1 + j] - losses[0]) / eps for j in range(q)]
    else:
        grads = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(q)]
    expected = w0 - lr / q * sum(g * _z(derive_seed(seed, 0, j), d) for j, g in enumerate(grads))
    coef = max(eps, lr * max(abs(g) for g in grads))
    bound = (3 * q + 1) * 2 * U32 * (w0.abs() + 2 * eps * Z_MAX + coef * Z_MAX)
    assert ((w.double() - expected).abs() <= bound).all(), (w.double() - expected).abs().max()
    # and the step is not a rounding: it moves the weights by much more than the bound
    assert (w.double() - w0).norm() > 100 * bound.norm()


@pytest.mark.parametrize("one_sided", [False, True])
@pytest.mark.parametrize("api", ["step", "many"])
def test_lr_zero_with_several_directions_returns_to_the_start(one_sided, api):
    # q = 3 directions per step, 5 steps, lr = 0: every direction is added and taken out again. Each pass rounds
    # once in the product and once in the sum (float32), at most 2 units of roundoff of |w| + 2 eps |z|; a step
    # makes 3 passes per direction two-sided (+eps, -2 eps, +eps), 2 one-sided, plus one (a no-op) per update.
    q, steps, eps = 3, 5, 1e-2
    w0 = torch.linspace(-1.0, 1.0, 40)
    w = w0.clone()
    opt = ZOOptimizer([w], lr=0.0, eps=eps, q=q, one_sided=one_sided, seed=2)
    _run(opt, lambda: (w.double() ** 3).sum(), steps, api)
    passes = steps * q * (2 if one_sided else 3) + steps * q
    bound = passes * 2 * U32 * (w0.abs() + 2 * eps * Z_MAX)
    assert ((w - w0).abs() <= bound).all(), (w - w0).abs().max()
    # From zero with eps a power of two every product and sum is exact: the weights come back bit for bit.
    z = torch.zeros(40)
    opt = ZOOptimizer([z], lr=0.0, eps=2.0**-7, q=q, one_sided=one_sided, seed=2)
    _run(opt, lambda: (z.double() ** 3).sum(), steps, api)
    assert torch.equal(z, torch.zeros(40))


SCHEDULES = {
    "exp": (dict(d0=0.9, schedule="exp", tau=2.0), lambda t: 0.9 * math.exp(-t / 2.0)),
    "linear": (dict(d0=0.9, schedule="linear", total_steps=10), lambda t: max(0.0, 0.9 - t / 10)),
}


@pytest.mark.parametrize("name", ["exp", "linear"])
def test_targeted_mixing_follows_the_schedule_across_steps_and_a_resume(name):
    # With the reward guide equal to prev, the noise part of z is orthogonal to prev, so z . prev / |prev|^2 is the
    # mixing weight d in use: read it off the weights each +eps evaluation sees (from w = 0, lr = 0, eps = 2**-7).
    kwargs, schedule = SCHEDULES[name]
    prev = torch.linspace(-1.0, 2.0, 30)
    w = torch.zeros(30)
    seen = []

    def loss():
        if len(seen) == 0 or seen[-1][1]:  # the first evaluation of a step is at w + eps z
            seen.append([(w.double() @ prev.double()).item() / (2.0**-7 * (prev.double() @ prev.double())), False])
        else:
            seen[-1][1] = True
        return 0.0

    def optimiser():
        sampler = Targeted({"w": prev}, {"w": prev}, scale="paper", **kwargs)  # z . prev = d |prev|^2
        return ZOOptimizer({"w": w}, lr=0.0, eps=2.0**-7, sampler=sampler, seed=3)

    opt = optimiser()
    for _ in range(4):
        opt.step(loss)
    opt.step_many([loss] * 2)
    state = opt.state_dict()
    assert opt.sampler.mixing() == pytest.approx(schedule(6), abs=1e-12)
    resumed = optimiser()
    resumed.load_state_dict(state)
    assert resumed.sampler.mixing() == pytest.approx(schedule(6), abs=1e-12)
    resumed.step_many([loss] * 2)
    resumed.step(loss)
    assert resumed.sampler.mixing() == pytest.approx(schedule(9), abs=1e-12)
    assert [d for d, _ in seen] == pytest.approx([schedule(t) for t in range(9)], abs=1e-5)


@pytest.mark.parametrize("scale", ["unit", "numel", "paper"])
def test_guide_share_counts_the_guide_against_the_noise_at_every_scale(scale):
    """One guided tensor (|prev| = 2, 4 elements) and one unguided (9 elements), d = 0.6: the guide contributes
    (r d |prev|)^2, the noise r^2 (1 - d^2) |prev|^2 plus r_u^2 * 9, with r from the scale (Targeted's docstring)."""
    params = [torch.zeros(4), torch.zeros(9)]
    sampler = Targeted({"a": torch.tensor([2.0, 0.0, 0.0, 0.0])}, d0=0.6, scale=scale)
    sampler.bind(["a", "b"], params)
    r, r_u = {"unit": (1 / 2, 1 / math.sqrt(13)), "numel": (math.sqrt(4) / 2, 1.0), "paper": (1.0, 1.0)}[scale]
    guide = (r * 0.6 * 2) ** 2
    noise = r**2 * (1 - 0.36) * 4 + r_u**2 * 9
    assert sampler.guide_share(0) == pytest.approx(guide / (guide + noise), rel=1e-12)
