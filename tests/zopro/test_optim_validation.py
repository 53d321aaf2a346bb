"""ZOOptimizer refuses bad settings, states and logs before its first weight pass: weights and counters unchanged."""

import math
import re

import pytest
import torch

from zopro.optim import ZOOptimizer
from zopro.samplers import Targeted


def _params(seed=0, dtype=torch.float32, names=("layer.weight", "layer.bias"), shapes=((4, 8), (4,))):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(dtype) for n, s in zip(names, shapes)}


def _loss(params, calls):
    def closure():
        calls.append(1)
        return sum((p.float() - 1).square().sum() for p in params.values())
    return closure


def _trained(steps=3, **kwargs):
    """An optimiser after ``steps`` steps (one step() and a step_many), with its parameters."""
    params = _params(**kwargs)
    opt = ZOOptimizer(params, lr=1e-2, seed=3)
    calls = []
    opt.step(_loss(params, calls))
    opt.step_many([_loss(params, calls)] * (steps - 1))
    return opt, params


def _unchanged(opt, params, before_params, before_state, calls):
    assert all(torch.equal(params[n], before_params[n]) for n in params)
    after = opt.state_dict()
    assert after["step_count"] == before_state["step_count"] and calls == []
    assert after["log"]["losses"].tolist() == before_state["log"]["losses"].tolist()
    assert (after["lr"], after["eps"], after["sampler"]) == (before_state["lr"], before_state["eps"],
                                                             before_state["sampler"])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, 1e300])
@pytest.mark.parametrize("mode", ["step", "many"])
def test_a_bad_schedule_value_is_refused_before_the_first_pass(mode, bad):
    params = _params()
    opt = ZOOptimizer(params, lr=1e-2, seed=1, lr_schedule=lambda t: bad if t == 1 else 1.0)
    calls = []
    if mode == "step":
        opt.step(_loss(params, calls))  # step 0 is fine
        calls.clear()
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match="^lr of step 1 is"):
        if mode == "step":
            opt.step(_loss(params, calls))
        else:
            opt.step_many([_loss(params, calls)] * 3)  # steps 0..2: nothing runs, not even step 0's passes
    _unchanged(opt, params, before_params, before_state, calls)


def test_a_non_finite_eps_set_between_steps_is_refused():
    params = _params()
    opt = ZOOptimizer(params, lr=1e-2, seed=1)
    opt.eps = math.inf
    before_params, before_state, calls = {n: p.clone() for n, p in params.items()}, opt.state_dict(), []
    with pytest.raises(ValueError, match="^eps of step 0 is inf"):
        opt.step_many([_loss(params, calls)])
    _unchanged(opt, params, before_params, before_state, calls)


def _other_names(state):
    return _params(names=("a", "b"))


def _other_shapes(state):
    return _params(shapes=((8, 4), (4,)))


def _other_dtypes(state):
    return _params(dtype=torch.float64)


def _negative_lr(state):
    state["lr"] = -5.0
    return _params()


def _nan_eps(state):
    state["eps"] = math.nan
    return _params()


def _steps_without_losses(state):
    state["step_count"] += 1  # the log holds the losses of one step fewer
    return _params()


def _bad_logged_lr(state):
    state["log"]["lr"] = [(0, -5.0)]
    return _params()


@pytest.mark.parametrize("spoil, message", [
    (_other_names, "another parameter set: its parameter names differ"),
    (_other_shapes, "another parameter set: its parameter shapes differ"),
    (_other_dtypes, "another parameter set: its parameter dtypes differ"),
    (_negative_lr, "state has lr=-5.0"),
    (_nan_eps, "state has eps=nan"),
    (_steps_without_losses, "log holds 6 losses for 3 steps .2 a step. but the state has 4 steps"),
    (_bad_logged_lr, "log has lr=-5.0 at step 0"),
])
def test_load_state_dict_refuses_another_parameter_sets_or_invalid_state(spoil, message):
    state = _trained()[0].state_dict()
    params = spoil(state)
    opt = ZOOptimizer(params, lr=1e-2, seed=3)
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    _unchanged(opt, params, before_params, before_state, [])


@pytest.mark.parametrize("spoil, message", [
    (_other_shapes, "another parameter set: its parameter shapes differ"),
    (lambda state: (state["log"].update(losses=state["log"]["losses"][:-1]), _params())[1],
     "log holds 5 losses for 3 steps"),
])
def test_replay_refuses_another_parameter_sets_log_before_the_first_pass(spoil, message):
    state = _trained()[0].state_dict()
    params = spoil(state)
    opt = ZOOptimizer(params, lr=1e-2, seed=3)
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match=message):
        opt.replay(state["log"])
    _unchanged(opt, params, before_params, before_state, [])


def test_replay_of_its_own_log_still_reproduces_the_run():
    opt, params = _trained()
    replayer_params = _params()
    replayer = ZOOptimizer(replayer_params, lr=1e-2, seed=3)
    replayer.replay(opt.state_dict()["log"])
    assert all(torch.equal(replayer_params[n], params[n]) for n in params)
    # the replayed steps log the tape's losses: the replaying optimiser's log is the recorded one, so it can be
    # saved, resumed and replayed again (before issue 12 it logged the steps' groups without their losses)
    mine, theirs = replayer.state_dict()["log"], opt.state_dict()["log"]
    assert torch.equal(mine["losses"], theirs["losses"]) and torch.equal(mine["groups"], theirs["groups"])
    assert (replayer.step_count, mine["lr"], mine["eps"]) == (opt.step_count, theirs["lr"], theirs["eps"])


@pytest.mark.parametrize("views", [
    lambda b: [b[0:4], b[2:6]],  # start pointers differ, ranges overlap
    lambda b: [b, b[1:]],
    lambda b: [b.view(4, 4)[:, 1], b.view(4, 4)[2]],  # a strided column crossing a row
])
def test_overlapping_parameters_are_refused_by_their_memory_ranges(views):
    b = torch.zeros(16)
    with pytest.raises(ValueError, match="share memory"):
        ZOOptimizer(views(b), lr=1e-2)
    ZOOptimizer([b[0:4], b[4:8], b.view(4, 4)[3]], lr=1e-2)  # touching but disjoint ranges are fine


def _set(path, value):
    """A spoiler that sets ``state[path[0]][path[1]]...`` to ``value`` (a missing last key: deleted)."""
    def spoil(state):
        *parents, last = path
        target = state
        for key in parents:
            target = target[key]
        if value is _MISSING:
            del target[last]
        else:
            target[last] = value
        return state
    return spoil


_MISSING = object()

MALFORMED_STATES = [  # (the field the message must name, a spoiler); each raised TypeError/AttributeError before
    ("state", lambda state: 5),
    ("step_count", _set(["step_count"], True)),
    ("weight_decay", _set(["weight_decay"], True)),
    ("sampler", _set(["sampler"], None)),
    ("sampler", _set(["sampler", "dist"], "rademacher")),  # a Rademacher run's state on a Gaussian sampler
    ("log['params']", _set(["log", "params"], None)),
    ("log['params']['names']", _set(["log", "params", "names"], 5)),
    ("log['params']['shapes']", _set(["log", "params", "shapes"], _MISSING)),
    ("log['losses']", _set(["log", "losses"], 5)),
    ("log['losses']", _set(["log", "losses"], torch.zeros(3, 2, dtype=torch.float64))),
    ("log['losses']", _set(["log", "losses"], ["a", "b", "c", "d", "e", "f"])),
    ("log['groups']", _set(["log", "groups"], 5)),
    ("log['lr']", _set(["log", "lr"], 5)),
    ("log['lr']", _set(["log", "lr"], [(0,)])),
    ("log['eps']", _set(["log", "eps"], [("a", 1e-3)])),
    ("log['eps']", _set(["log", "eps"], [(0, "0.001")])),
    ("log['eps']", _set(["log", "eps"], [(0.5, 1e-3)])),
    ("log['interrupted']", _set(["log", "interrupted"], 5)),
    ("log has eps=1e+300 at step 2", _set(["log", "eps"], [(0, 1e-3), (2, 1e300)])),  # the replay stopped at step 2
]


@pytest.mark.parametrize("field, spoil", MALFORMED_STATES)
def test_a_malformed_state_is_refused_naming_its_field(field, spoil):
    state = spoil(_trained()[0].state_dict())
    params = _params()
    opt = ZOOptimizer(params, lr=1e-2, seed=3)
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        opt.load_state_dict(state)
    _unchanged(opt, params, before_params, before_state, [])


@pytest.mark.parametrize("field, spoil", [(f, s) for f, s in MALFORMED_STATES if f.startswith("log")])
def test_replay_of_a_malformed_log_is_refused_naming_its_field(field, spoil):
    log = spoil(_trained()[0].state_dict())["log"]
    params = _params()
    opt = ZOOptimizer(params, lr=1e-2, seed=3)
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match=re.escape(field)):
        opt.replay(log)
    _unchanged(opt, params, before_params, before_state, [])


@pytest.mark.parametrize("t", ["x", None, _MISSING, -1, 1.5])
def test_a_targeted_sampler_state_with_an_invalid_step_is_refused(t):
    def optimiser():
        params = _params()
        return ZOOptimizer(params, lr=1e-2, seed=3, sampler=Targeted({"layer.weight": torch.ones(4, 8)})), params

    opt, _ = optimiser()
    opt.step(lambda: 1.0)
    state = _set(["sampler", "t"], t)(opt.state_dict())
    opt, params = optimiser()
    before_params, before_state = {n: p.clone() for n, p in params.items()}, opt.state_dict()
    with pytest.raises(ValueError, match=r"sampler state has t="):
        opt.load_state_dict(state)
    _unchanged(opt, params, before_params, before_state, [])
    assert opt.sampler.t == 0
