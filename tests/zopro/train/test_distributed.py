"""Data-parallel runs (``zopro.train.distributed``) with gloo and two CPU processes on the smoke preset: two ranks give
bit for bit the adapters, metrics and ZO logs of one process with the same data shards; bad combinations fail on
every rank before anything is written; a rank that dies stops the job on every rank and ``--resume`` continues it."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zopro.train import distributed, rundir
from zopro.train.config import preset, reward_config
from zopro.train.models import PolicyRewardModel
from zopro.train.program import main, run
from zopro.train.reward_adapter import ShardedPairs, reward_state, shard_bounds, train_reward

ROOT = Path(__file__).resolve().parents[3]
TIMING = ("step_time", "peak_rollout", "peak_update")  # the values that legitimately differ between runs


def _cfg(out, **overrides):
    return dataclasses.replace(preset("smoke"), output_dir=str(out), threads=1, **overrides)


# one held-out prompt per generate call: three calls, rank 0 makes calls 0 and 2, rank 1 call 1 (so a gather in rank
# order instead of call order would show)
EVAL_SPLIT = {"eval_batch": 2, "n_eval_prompts": 3}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH", "")] if p])
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _adapters(out: Path) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name in ("policy_adapter", "reward_adapter")
            for k, v in load_file(out / f"{name}.safetensors").items()}


def _same(a, b) -> bool:
    """Nested dicts / lists of tensors and numbers, equal bit for bit."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _assert_same_run(a: Path, b: Path) -> None:
    left, right = _adapters(a), _adapters(b)
    assert left.keys() == right.keys()
    assert all(torch.equal(left[k], right[k]) for k in left), "adapters differ"
    assert _metrics(a) == _metrics(b)
    # the held-out answers (generated on both ranks, gathered in call order) and their scores (rank 0's)
    assert (a / "eval_samples.jsonl").read_text() == (b / "eval_samples.jsonl").read_text()
    summaries = [json.loads((d / "summary.json").read_text())["evaluation"] for d in (a, b)]
    assert summaries[0] == summaries[1]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The smoke run in one process with two data shards: what two ranks must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("dp") / "one"
    run(_cfg(out, data_shards=2, **EVAL_SPLIT), progress=False)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Bad combinations
@pytest.mark.parametrize("overrides, world, message", [
    (dict(data_shards=3), 2, "--data-shards 3: must be a multiple of the number of ranks (2)"),
    (dict(prompts_per_step=3), 2, "--prompts-per-step 3: does not split evenly into 2 data shards"),
    (dict(prompts_per_step=4, minibatches=4, k=3), 2, "--minibatches 4: must divide each shard's 6 rows"),
    (dict(algorithm="ppo"), 2, "--algorithm ppo: not data-parallel"),
    (dict(data_shards=2, prompts_per_step=3), 1, "--prompts-per-step 3: does not split evenly into 2"),
])
def test_bad_combinations_are_refused_by_name(overrides, world, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed.check(_cfg("unused", **overrides), world)


def test_one_shard_per_rank_by_default_and_one_process_stays_unsharded():
    assert distributed.check(_cfg("unused", prompts_per_step=4), 4) == 4
    assert distributed.check(_cfg("unused", prompts_per_step=4, data_shards=4), 2) == 4
    ranks = distributed.Ranks(rank=1, world=2, shards=4)
    assert list(ranks.local_shards) == [2, 3] and not ranks.writes and ranks.sharded
    assert not distributed.Ranks().sharded and distributed.SOLO == distributed.Ranks()  # one process, one shard


def test_every_rank_refuses_a_bad_combination_before_writing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "never"
    for rank in ("0", "1"):  # the check needs no process group: each rank raises it alone, before any collective
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert main(["--preset", "smoke", "--prompts-per-step", "3", "--output-dir", str(out)]) == 2
        assert "error: --prompts-per-step 3: does not split evenly into 2 data shards" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        distributed.world_from_env()


class _Broadcast(distributed.Ranks):
    """A rank of two whose broadcast hands back rank 0's text (``sent``) and records what this rank offered."""

    def broadcast_text(self, text, what):
        self.offered = text
        return text if self.rank == 0 else self.sent


def test_rank_0_failing_to_open_the_run_directory_stops_every_rank_with_its_reason(tmp_path, monkeypatch):
    def denied(cfg, resume):
        raise PermissionError(13, "Permission denied", cfg.output_dir)

    monkeypatch.setattr(rundir, "open_run_dir", denied)
    cfg = _cfg(tmp_path / "locked")
    rank0 = _Broadcast(rank=0, world=2, shards=2)
    with pytest.raises(PermissionError):  # rank 0 keeps its own exception and traceback
        rundir.open_shared(cfg, False, rank0)
    assert rank0.offered.startswith(f"rank 0 could not open {cfg.output_dir}: PermissionError")
    rank1 = _Broadcast(rank=1, world=2, shards=2)
    rank1.sent = rank0.offered
    with pytest.raises(ValueError, match="rank 0 could not open .*PermissionError"):  # and the others are told why
        rundir.open_shared(cfg, False, rank1)


@pytest.mark.usefixtures("one_thread")
def test_sharded_reward_training_steps_on_the_whole_batch(tiny_llama_config, make_tiny_model):
    """Three uneven shards of 7 pairs in one process: each Bradley-Terry step's gradient is the whole batch's (the
    same rows as the unsharded path draws, each shard weighted by its share), so the weights match the unsharded
    training to float rounding, and a shard's rows are its own (a wrong offset or share would move them elsewhere)."""
    from transformers import LlamaForCausalLM

    gen = torch.Generator().manual_seed(5)
    n, length = 7, 6
    ids = [torch.randint(4, tiny_llama_config.vocab_size, (n, length), generator=gen) for _ in range(2)]
    mask = torch.ones(n, length, dtype=torch.long)
    pairs = (ids[0], mask, ids[1], mask, 0.5 + 0.5 * torch.rand(n, generator=gen))
    rc = dataclasses.replace(reward_config(preset("smoke")), batch=5, lr=1e-2, soft_labels=True)
    bundles = [PolicyRewardModel(make_tiny_model(LlamaForCausalLM, tiny_llama_config, 0), lora_r=2, seed=0)
               for _ in range(2)]
    start = reward_state(bundles[0])
    bounds = shard_bounds(n, 3)
    assert bounds == [0, 3, 5, 7]
    sharded = ShardedPairs(bounds, {j: tuple(t[bounds[j]:bounds[j + 1]] for t in pairs) for j in range(3)})
    losses = [train_reward(bundles[0], pairs, rc, 3, seed=11),
              train_reward(bundles[1], sharded, rc, 3, seed=11, ranks=distributed.Ranks(shards=3))]
    whole, parts = reward_state(bundles[0]), reward_state(bundles[1])
    assert max((whole[k] - start[k]).abs().max() for k in start) > 1e-3  # the steps moved the weights
    for k in whole:
        torch.testing.assert_close(parts[k], whole[k], rtol=1e-5, atol=1e-6)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Two processes
def test_two_ranks_reproduce_one_process_with_the_same_shards_bit_for_bit(one_process, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
           "zopro.train", "--preset", "smoke", "--threads", "1", "--eval-batch", "2",
           "--n-eval-prompts", "3", "--output-dir", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["data_shards"] == 2  # 0 resolved: a resume needs it
    _assert_same_run(one_process, out)
    # the log stays the checkpoint: the ZO iteration's log (its losses, seeds, lr) is the one-process run's
    logs = [torch.load(d / "zo_log_iter1.pt", weights_only=True) for d in (one_process, out)]
    assert _same(logs[0], logs[1]) and len(logs[0]["log"]["losses"]) == 4  # 2 steps x (L+, L-)
    # only rank 0 wrote: the same files as one process's run, and each once (no rank-1 leftovers)
    names = [sorted(str(p.relative_to(d)) for p in d.rglob("*") if "ckpt-" not in str(p)) for d in (one_process, out)]
    assert names[0] == names[1]


def _worker(out: Path, rank: int, port: int, stop_after: int | None):
    code = ("import sys, dataclasses\n"
            "from zopro.train import distributed\n"
            "from zopro.train.config import preset\n"
            "from zopro.train.program import run\n"
            f"cfg = dataclasses.replace(preset('smoke'), output_dir={str(out)!r}, threads=1, eval_batch=2, "
            "n_eval_prompts=3)\n"
            "try:\n"
            f"    run(cfg, progress=False, stop_after_steps={stop_after!r})\n"
            "except distributed.RankLost as err:\n"
            "    print(f'error: {err}', file=sys.stderr)\n"
            "    sys.exit(3)\n")
    env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def test_a_rank_that_dies_stops_every_rank_and_resume_continues(one_process, tmp_path):
    out, port = tmp_path / "dies", _free_port()
    procs = [_worker(out, 0, port, None), _worker(out, 1, port, 1)]  # rank 1 raises before its second step
    start, errors = time.monotonic(), []
    for p in procs:
        errors.append(p.communicate(timeout=300)[1])
    assert time.monotonic() - start < 300
    assert procs[1].returncode != 0 and "stopped after 1 steps (simulated kill)" in errors[1]
    assert procs[0].returncode == 3, errors[0][-3000:]
    assert "error: rank 0 of 2: lost contact with another rank" in errors[0] and "--resume" in errors[0]
    assert len(_metrics(out)) == 1  # the step both ranks finished, checkpointed by rank 0
    # the run's config holds its 2 shards: one process resumes it and ends where the uninterrupted run ends
    run(_cfg(out, data_shards=2, **EVAL_SPLIT), resume=True, progress=False)
    _assert_same_run(one_process, out)


def test_tear_down_stops_the_gloo_threads_after_transformers_loaded_a_model(tmp_path):
    # from_pretrained imports torch.distributed.nn, whose functions' default arguments would otherwise hold the
    # group: destroy_process_group then freed nothing, and the gloo threads were destroyed only at the interpreter's
    # exit, where a finished rank now and then aborted (SIGABRT, "terminate called without an active exception")
    from zopro.train.loading import build_tiny_model, build_tiny_tokenizer

    build_tiny_model(len(build_tiny_tokenizer()), seed=0, hidden=32, layers=1, heads=2).save_pretrained(tmp_path / "m")
    code = ("import os, dataclasses, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            "from zopro.train import distributed\n"
            "from zopro.train.config import preset\n"
            "def gloo_threads():\n"
            "    names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
            "    return sorted(n for n in names if 'gloo' in n)\n"
            "ranks = distributed.set_up(preset('smoke'), torch.device('cpu'))\n"
            f"AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
            "ranks.barrier('the test')\n"
            "before = gloo_threads()\n"
            "distributed.tear_down(ranks)\n"
            "print(before, gloo_threads())\n")
    port = _free_port()
    env = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
           for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", code], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for e in env]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        before, after = out.strip().splitlines()[-1].split("] [")
        assert "gloo" in before and after == "]", out  # the threads were there (named so), and are gone
