"""The core search space (``zopro.Core``): directions ``U @ xi`` in a fixed column space, scaled to norm 1; the step
the spec gives, tensors without a basis left bit for bit, replay and resume, refusals."""

import pytest
import torch

from zokernels import rng
from zopro import Core, ZOOptimizer
from zopro.seeds import derive_seed

U32 = 2.0**-24


def _orthonormal(m, k, seed):
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.float()


def _problem():
    g = torch.Generator().manual_seed(0)
    params = {"layer.lora_A": torch.randn(3, 10, generator=g), "layer.lora_B": torch.randn(12, 3, generator=g),
              "other.lora_B": torch.randn(8, 3, generator=g)}
    bases = {"layer.lora_B": _orthonormal(12, 3, 1), "other.lora_B": _orthonormal(8, 2, 2)}
    return params, bases


def test_a_step_moves_only_the_tensors_with_a_basis_and_only_inside_their_column_space():
    params, bases = _problem()
    before = {n: p.clone() for n, p in params.items()}
    target = {n: torch.randn_like(p) for n, p in params.items()}
    opt = ZOOptimizer(params, lr=0.5, eps=1e-2, sampler=Core(bases), q=4, fitness="zscore", seed=3)
    loss = lambda: float(sum((params[n] - target[n]).pow(2).sum() for n in params))  # noqa: E731
    opt.step_many([loss] * 3)
    assert torch.equal(params["layer.lora_A"], before["layer.lora_A"])  # no basis: never touched
    for name, u in bases.items():
        moved = (params[name] - before[name]).double()
        assert moved.norm() > 1e-2
        outside = moved - u.double() @ (u.double().T @ moved)
        assert outside.norm() < 1e-5 * moved.norm() + 1e-6  # float32 rounding of the round trips only


def test_one_step_equals_the_spec_and_directions_have_norm_one():
    params, bases = _problem()
    w0 = {n: p.double().clone() for n, p in params.items()}
    lr, eps, seed, q = 0.3, 1e-2, 5, 2
    sampler = Core(bases)
    opt = ZOOptimizer(params, lr=lr, eps=eps, sampler=sampler, q=q, seed=seed)
    target = {n: torch.linspace(-1, 1, p.numel()).view_as(p) for n, p in params.items()}
    opt.step(lambda: float(sum((params[n] - target[n]).pow(2).sum() for n in params)))
    losses = opt.log["losses"]
    names = list(params)

    def z(j):  # the spec: U_i @ xi_i, xi_i the Gaussians of (derive_seed(seed, step 0, j), stream i), norm 1 overall
        parts = {n: (bases[n].double() @ rng.gaussian(derive_seed(seed, 0, j), names.index(n), 0,
                                                      bases[n].shape[1] * params[n].shape[1]).double()
                     .view(bases[n].shape[1], -1)) for n in bases}
        total = sum(float(p.pow(2).sum()) for p in parts.values()) ** 0.5
        return {n: p / total for n, p in parts.items()}

    directions = [z(j) for j in range(q)]
    for d in directions:
        assert sum(float(p.pow(2).sum()) for p in d.values()) == pytest.approx(1.0, rel=1e-12)
    g = [(losses[2 * j] - losses[2 * j + 1]) / (2 * eps) for j in range(q)]
    for n in bases:
        expected = w0[n] - lr / q * sum(g[j] * directions[j][n] for j in range(q))
        bound = (3 * q + 1) * 4 * U32 * (w0[n].abs() + 1.0)
        assert ((params[n].double() - expected).abs() <= bound).all()
        assert (params[n].double() - w0[n]).norm() > 100 * bound.norm()


def test_a_diagonal_core_moves_each_basis_vector_by_one_number():
    g = torch.Generator().manual_seed(0)
    params = {"b": torch.zeros(12, 3), "c": torch.zeros(8, 2)}
    bases = {"b": _orthonormal(12, 3, 1), "c": _orthonormal(8, 2, 2)}
    sampler = Core(bases, diagonal=True)
    opt = ZOOptimizer(params, lr=0.5, eps=1e-2, sampler=sampler, q=4, fitness="ranks", seed=3)
    target = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    opt.step_many([lambda: float(sum((params[n] - target[n]).pow(2).sum() for n in params))] * 3)
    assert sampler.dims == 5
    for name, u in bases.items():
        coords = u.double().T @ params[name].double()  # [k, n]: only the diagonal moved
        assert coords.diagonal().abs().min() > 1e-3
        off = coords - torch.diag(coords.diagonal())
        assert off.abs().max() < 1e-6
    with pytest.raises(ValueError, match="as many"):
        ZOOptimizer({"b": torch.zeros(12, 4)}, lr=0.1, sampler=Core({"b": _orthonormal(12, 3, 1)}, diagonal=True))


def test_replay_and_resume_are_bit_for_bit():
    def build():
        params, bases = _problem()
        opt = ZOOptimizer(params, lr=0.2, eps=1e-2, sampler=Core(bases), q=3, fitness="ranks", seed=8,
                          weight_decay=0.1)
        target = {n: torch.ones_like(p) for n, p in params.items()}
        return params, opt, lambda: float(sum((params[n] - target[n]).pow(2).sum() for n in params))

    params, opt, loss = build()
    opt.step_many([loss] * 2)
    middle = ({n: p.clone() for n, p in params.items()}, opt.state_dict())
    opt.step(loss)
    opt.step_many([loss] * 2)

    fresh, replayer, _ = build()
    replayer.replay(opt.state_dict()["log"])
    assert all(torch.equal(fresh[n], params[n]) for n in params)

    resumed, opt2, loss2 = build()
    for n, p in resumed.items():
        p.copy_(middle[0][n])
    opt2.load_state_dict(middle[1])
    opt2.step(loss2)
    opt2.step_many([loss2] * 2)
    assert all(torch.equal(resumed[n], params[n]) for n in params)


def test_bad_bases_and_states_are_refused():
    params, bases = _problem()
    with pytest.raises(ValueError, match="parameters the optimiser does not have"):
        ZOOptimizer(params, lr=0.1, sampler=Core({"missing": bases["layer.lora_B"]}))
    with pytest.raises(ValueError, match=r"must be \[m, k\]"):
        ZOOptimizer(params, lr=0.1, sampler=Core({"layer.lora_B": torch.zeros(5, 2)}))
    with pytest.raises(ValueError, match="no basis"):
        ZOOptimizer(params, lr=0.1, sampler=Core({}))
    opt = ZOOptimizer(params, lr=0.1, sampler=Core(bases))
    state = opt.state_dict()
    other = ZOOptimizer(_problem()[0], lr=0.1, sampler=Core({"layer.lora_B": bases["layer.lora_B"]}))
    with pytest.raises(ValueError, match="another sampler: dims"):
        other.load_state_dict(state)
