"""The ZO ablation on the smoke task: an arm resumed from the shared iteration 0 is the fresh job of its config."""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load_file

from benchmarks import zo_ablation
from zopro.train import run
from zopro.train.config import from_args


def test_an_arm_is_the_fresh_run_of_its_config(tmp_path):
    flags = ["--preset", "smoke", "--threads", "1"]
    table = zo_ablation.main(["--seeds", "0", "--arms", "iter1", "full", "adam:guide=adam", "--tag", "smoke",
                              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
                              "--", *flags])
    assert set(table) == {"iter1", "full", "adam"} and "vs_iter1" in table["full"]
    cfg, _ = from_args([*flags, "--seed", "0", "--guide", "adam", "--output-dir", str(tmp_path / "fresh")])
    run(cfg, progress=False)
    arm = tmp_path / "runs" / "smoke-seed0" / "adam"
    for name in ("policy_adapter.safetensors", "reward_adapter.safetensors"):
        fresh, forked = load_file(str(tmp_path / "fresh" / name)), load_file(str(arm / name))
        assert fresh.keys() == forked.keys() and all(torch.equal(fresh[k], forked[k]) for k in fresh)
    assert (tmp_path / "fresh" / "eval_samples.jsonl").read_text() == (arm / "eval_samples.jsonl").read_text()
    assert json.loads((arm / "config.json").read_text()) == dataclasses.asdict(
        dataclasses.replace(cfg, output_dir=str(arm)))
    assert (tmp_path / "results" / "zo-ablation-smoke-cpu.md").is_file()
    # the movement figures: the arm's final adapter minus iteration 0's, read back from the adapters users get
    moved = json.loads((tmp_path / "results" / "zo-ablation-smoke-cpu.json").read_text())["results"]["adam"]["0"]
    first = load_file(str(tmp_path / "runs" / "smoke-seed0" / "iter1" / "policy_adapter.safetensors"))
    last = load_file(str(arm / "policy_adapter.safetensors"))
    u = torch.cat([(last[k].double() - first[k].double()).flatten() for k in sorted(first)])
    assert u.norm().item() > 0 and abs(moved["movement"]["later_norm"] - u.norm().item()) < 1e-9 * u.norm().item()
