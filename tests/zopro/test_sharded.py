"""ZOOptimizer on DTensor parameters (``zopro.dtensor``), gloo and two CPU processes: the gathered weights after a run
on two ranks equal a single process's bit for bit, uneven and empty shards included; its log replays in a single
process to the same weights, and a single process's log on the shards; a model sharded by FSDP2's ``fully_shard``
too; Targeted and RankGuided within one ulp of their one-process replays (bit for bit here); a Partial loss is the
same full value on every rank; unsupported placements, meshes, guides and samplers are refused by name before
anything changes.

One pair of processes runs every case (this file is their script: ``python test_sharded.py OUT``); the closure
computes the loss from the gathered weights (an all-gather is exact), so the losses, and with them every
coefficient, are the single process's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# name: (shape, dtype, placement). Uneven on purpose: 37 rows and 5 rows on 2 ranks (19/18, 3/2), one element (rank
# 1 holds none), Shard(1) of a (1, 9) row (leading size-1 dims: a contiguous range of 5 and 4), a replicated bias.
PARAMS = {"w": ((37, 11), torch.float32, ("shard", 0)), "u": ((5, 7), torch.bfloat16, ("shard", 0)),
          "one": ((1,), torch.float32, ("shard", 0)), "row": ((1, 9), torch.float32, ("shard", 1)),
          "b": ((11,), torch.float32, ("replicate",))}
# (sampler dist, q, one_sided); each runs step() twice, a step_many whose second step's closure raises after its first
# loss (logged and replayed), then step_many of two (perturb_ and the fused perturb2_ passes)
CASES = {"gauss": ("gaussian", 1, False), "radem_q2_one_sided": ("rademacher", 2, True)}


def initial() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: (torch.randn(shape, generator=g) * 0.5).to(dtype) for n, (shape, dtype, _) in PARAMS.items()}


def loss(full: dict[str, torch.Tensor]) -> torch.Tensor:
    """A fixed quadratic of the whole weights: the same float on every rank and in one process."""
    g = torch.Generator().manual_seed(1)
    total = torch.zeros((), dtype=torch.float64)
    for name in PARAMS:
        w = full[name].double()
        target = torch.randn(w.shape, generator=g, dtype=torch.float64)
        total = total + ((w - target) ** 2).sum()
    return total


def guides() -> tuple[dict, dict]:
    """Targeted's guides, whole: ``prev`` for every parameter but ``one`` (unguided: isotropic noise there),
    ``reward_delta`` for ``w``, ``u`` and ``b``."""
    g = torch.Generator().manual_seed(4)
    prev = {n: torch.randn(shape, generator=g) for n, (shape, _, _) in PARAMS.items() if n != "one"}
    delta = {n: torch.randn(PARAMS[n][0], generator=g) for n in ("w", "u", "b")}
    return prev, delta


def targeted(prev, delta, kind: str):
    from zopro.samplers import RankGuided, Targeted

    return Targeted(prev, delta, d0=0.6) if kind == "targeted" else RankGuided(prev, delta, d0=0.6, rank=3)


def run_targeted(params: dict, gather, prev, delta, kind: str = "targeted") -> tuple[dict, dict]:
    from zopro.optim import ZOOptimizer

    opt = ZOOptimizer(params, lr=1e-3, eps=1e-2, sampler=targeted(prev, delta, kind), seed=7)

    def closure():
        return loss({n: gather(p) for n, p in params.items()})

    opt.step(closure)
    opt.step_many([closure, closure])
    return {n: gather(p).clone() for n, p in params.items()}, opt.state_dict()["log"]


def run_case(params: dict, case: str, gather) -> tuple[dict, dict]:
    from zopro.optim import ZOOptimizer
    from zopro.samplers import Isotropic

    dist, q, one_sided = CASES[case]
    opt = ZOOptimizer(params, lr=1e-3, eps=1e-2, weight_decay=0.1, sampler=Isotropic(dist), seed=7, q=q,
                      one_sided=one_sided)

    def closure():
        return loss({n: gather(p) for n, p in params.items()})

    calls = []

    def out_of_memory_on_its_second_loss():  # on every rank at the same loss: the collectives stay in step
        calls.append(1)
        if len(calls) > 1:
            raise Interrupted("out of memory")
        return closure()

    opt.step(closure)
    opt.step(closure)
    try:
        opt.step_many([closure, out_of_memory_on_its_second_loss])
    except Interrupted:
        pass
    opt.step_many([closure, closure])
    return {n: gather(p).clone() for n, p in params.items()}, opt.state_dict()["log"]


class Interrupted(RuntimeError):
    pass


def mlp() -> torch.nn.Module:
    """The FSDP2 case's model: 13 and 3 output rows, uneven on two ranks (7/6, 2/1)."""
    g = torch.Generator().manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def run_mlp(model: torch.nn.Module) -> tuple[dict, dict]:
    """ZO on the model's own forward (under FSDP2: all-gathered weights, so the single process's losses)."""
    from zopro.optim import ZOOptimizer

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 7, generator=g), torch.randn(5, 3, generator=g)
    opt = ZOOptimizer(dict(model.named_parameters()), lr=1e-2, eps=1e-2, seed=3)

    def closure():
        return ((model(x) - y) ** 2).sum()

    opt.step(closure)
    opt.step_many([closure, closure])
    return opt.state_dict()["log"]


# ---------------------------------------------------------------------------------------------------------------------
# The rank processes
def _rank_main(out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor, init_device_mesh

    from zopro.optim import ZOOptimizer
    from zopro.samplers import Isotropic, RankGuided, Targeted

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def place(name, t):
        kind = PARAMS[name][2]
        return distribute_tensor(t, mesh, [Shard(kind[1]) if kind[0] == "shard" else Replicate()])

    def gather(p):
        return p.full_tensor() if isinstance(p, DTensor) else p

    results = {}
    for case in CASES:
        params = {n: place(n, t) for n, t in initial().items()}
        results[case] = run_case(params, case, gather)
        results[case + "/local_numels"] = [p.to_local().numel() for p in params.values()]
    # the other way round: a one-process log replayed on sharded parameters
    _, plain_log = run_case(initial(), "gauss", lambda p: p)
    params = {n: place(n, t) for n, t in initial().items()}
    dist_, q, one_sided = CASES["gauss"]
    ZOOptimizer(params, lr=1e-3, eps=1e-2, weight_decay=0.1, sampler=Isotropic(dist_), seed=7, q=q,
                one_sided=one_sided).replay(plain_log)
    results["replayed_on_shards"] = {n: gather(p) for n, p in params.items()}

    prev, delta = guides()
    delta["u"] = place("u", delta["u"])  # a guide may also be a DTensor placed as its parameter
    results["targeted"] = run_targeted({n: place(n, t) for n, t in initial().items()}, gather, prev, delta)
    results["rank_guided"] = run_targeted({n: place(n, t) for n, t in initial().items()}, gather, *guides(),
                                          kind="rank_guided")

    # a loss that is still a Partial DTensor (a sum over a sharded tensor): every rank logs the full value
    w = place("w", initial()["w"])
    opt = ZOOptimizer({"w": w}, lr=1e-3, eps=1e-2, seed=7)
    opt.step(lambda: (w.double() ** 2).sum())
    results["partial_loss"] = opt.state_dict()["log"]["losses"]

    from torch.distributed.fsdp import fully_shard

    model = mlp()
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    log = run_mlp(model)
    results["fsdp2"] = ({n: p.full_tensor() for n, p in model.named_parameters()}, log)
    results["fsdp2/placements"] = [str(p.placements) for p in model.parameters()]
    refusals = {}
    mesh2d = init_device_mesh("cpu", (1, dist.get_world_size()))
    zeros = torch.zeros(4, 3)
    cases = {"strided": ({"m": distribute_tensor(zeros, mesh, [Shard(1)])}, None),
             "partial": ({"m": DTensor.from_local(zeros.clone(), mesh, [Partial()])}, None),
             "mesh2d": ({"m": distribute_tensor(zeros, mesh2d, [Replicate(), Shard(0)])}, None),
             "rank_guided": ({n: place(n, t) for n, t in initial().items()},
                             RankGuided({"w": place("w", torch.ones(37, 11))})),
             "guide_placement": ({"m": distribute_tensor(zeros, mesh, [Shard(0)])},
                                 Targeted({"m": distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])}))}
    for what, (params, sampler) in cases.items():
        before = {n: p.to_local().clone() for n, p in params.items()}
        try:
            ZOOptimizer(params, lr=1e-3, sampler=sampler)
            refusals[what] = "accepted"
        except ValueError as err:
            refusals[what] = str(err)
        assert all(torch.equal(p.to_local(), before[n]) for n, p in params.items()), what
    # the refused sampler was not consumed: it still binds to a parameter placed as its guide
    sampler = cases["guide_placement"][1]
    placed = {"m": distribute_tensor(zeros, mesh, [Replicate()])}
    ZOOptimizer(placed, lr=1e-3, sampler=sampler).step(lambda: (placed["m"].full_tensor() ** 2).sum())
    refusals["guide_placement/after"] = [float(x) for x in sampler.prev_norm]
    results["refusals"] = refusals
    torch.save(results, f"{out}/rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out, port = tmp_path_factory.mktemp("sharded"), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH", "")] if p]),
               OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, __file__, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _one_process(case: str):
    params = initial()
    return run_case(params, case, lambda p: p)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_end_with_the_single_process_weights_bit_for_bit(two_ranks, case):
    weights, log = _one_process(case)
    assert two_ranks[0][case + "/local_numels"] == [19 * 11, 3 * 7, 1, 5, 11]  # the uneven split this test claims
    assert two_ranks[1][case + "/local_numels"] == [18 * 11, 2 * 7, 0, 4, 11]
    for rank in two_ranks:
        sharded_weights, sharded_log = rank[case]
        for name, w in weights.items():
            assert not torch.equal(w, initial()[name]), name  # the run moved every parameter
            assert torch.equal(sharded_weights[name], w), name
        assert sharded_log["losses"].tolist() == log["losses"].tolist()


def test_a_one_process_log_replays_on_sharded_parameters(two_ranks):
    weights, _ = _one_process("gauss")
    for rank in two_ranks:
        for name, w in weights.items():
            assert torch.equal(rank["replayed_on_shards"][name], w), name


def test_fully_shard_model_ends_with_the_single_process_weights_bit_for_bit(two_ranks):
    model = mlp()
    log = run_mlp(model)
    assert two_ranks[0]["fsdp2/placements"] == ["(Shard(dim=0),)"] * 4
    for rank in two_ranks:
        weights, sharded_log = rank["fsdp2"]
        assert sharded_log["losses"].tolist() == log["losses"].tolist()
        for name, p in model.named_parameters():
            assert torch.equal(weights[name], p.detach()), name


@pytest.mark.parametrize("case", list(CASES))
def test_the_two_rank_log_replays_in_one_process(two_ranks, case):
    from zopro.optim import ZOOptimizer
    from zopro.samplers import Isotropic

    weights, log = two_ranks[0][case]
    dist, q, one_sided = CASES[case]
    params = initial()
    ZOOptimizer(params, lr=1e-3, eps=1e-2, weight_decay=0.1, sampler=Isotropic(dist), seed=7, q=q,
                one_sided=one_sided).replay(log)
    for name, w in weights.items():
        assert torch.equal(params[name], w), name


@pytest.mark.parametrize("kind", ["targeted", "rank_guided"])
def test_guided_samplers_on_two_ranks_match_one_process_and_its_replay(two_ranks, kind):
    """The guide dots are summed over the ranks (one all-reduce per direction), reassociated against one process,
    and RankGuided's torch reference rebuilds a shard's guide rows by a matmul of fewer rows (BLAS may sum a rank-k
    product in another order): a coefficient or guide element may then differ in its last float32 bit, so the bound
    is one unit in the last place of the weights' dtype against a one-process replay of the same log (same losses),
    and a looser one against a separate one-process run, whose losses then follow (the chaos of a few steps)."""
    from zopro.optim import ZOOptimizer

    weights, log = run_targeted(initial(), lambda p: p, *guides(), kind=kind)
    for rank in two_ranks:
        sharded_weights, sharded_log = rank[kind]
        replayed = initial()
        ZOOptimizer(replayed, lr=1e-3, eps=1e-2, sampler=targeted(*guides(), kind), seed=7).replay(sharded_log)
        for name, w in replayed.items():
            ulp = torch.finfo(w.dtype).eps * w.float().abs().clamp(min=torch.finfo(w.dtype).tiny)
            assert ((sharded_weights[name].float() - w.float()).abs() <= ulp).all(), name
            torch.testing.assert_close(sharded_weights[name].float(), weights[name].float(), rtol=1e-4, atol=1e-4)
            assert not torch.equal(w, initial()[name]), name
    # the guides steer: the same run with isotropic noise ends elsewhere
    assert not torch.equal(two_ranks[0][kind][0]["w"], two_ranks[0]["gauss"][0]["w"])


def test_a_partial_loss_is_reduced_to_its_full_value_on_every_rank(two_ranks):
    from zopro.optim import ZOOptimizer

    w = initial()["w"]
    opt = ZOOptimizer({"w": w}, lr=1e-3, eps=1e-2, seed=7)
    opt.step(lambda: (w.double() ** 2).sum())
    expected = opt.state_dict()["log"]["losses"]
    assert two_ranks[0]["partial_loss"].tolist() == two_ranks[1]["partial_loss"].tolist()
    # the two ranks' partial sums are added in another order than one process's sum: equal within float64 rounding
    torch.testing.assert_close(two_ranks[0]["partial_loss"], expected, rtol=1e-12, atol=0)


def test_unsupported_layouts_and_samplers_are_refused_by_name(two_ranks):
    for rank in two_ranks:
        refusals = rank["refusals"]
        assert "parameter 'm' is sharded on dim 1 of shape (4, 3)" in refusals["strided"]
        assert "RankGuided takes whole guides (plain tensors) with DTensor parameters" in refusals["rank_guided"]
        assert "parameter 'm' has placement P(sum); ZOOptimizer takes Shard(dim)" in refusals["partial"]
        assert "parameter 'm' lives on a 2-D device mesh" in refusals["mesh2d"]
        assert ("a guide of parameter 'm' is a DTensor whose local shard has shape (4, 3), the parameter's (2, 3)"
                in refusals["guide_placement"])
        assert refusals["guide_placement/after"] == [pytest.approx(12 ** 0.5)]  # |ones(4, 3)|


if __name__ == "__main__":
    _rank_main(sys.argv[1])
