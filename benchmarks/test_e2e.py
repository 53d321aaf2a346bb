"""End to end, every algorithm through the same loop: the tiny smoke task here (3 seeds, seconds per run), so that
``pytest benchmarks/`` always exercises the comparison and writes ``results/e2e-smoke-<device>.*``. The embedded
SmolLM2 task takes minutes per run on a CPU: ``python -m benchmarks.e2e --algorithms zopro mezo rloo ppo --tag
embedded -- <flags>`` (see benchmarks/RESULTS.md for the command behind each table)."""

from __future__ import annotations

import json

from benchmarks import e2e
from benchmarks.conftest import RESULTS_DIR, device_kind

ALGORITHMS = ["zopro", "mezo", "rloo", "ppo"]


def test_every_algorithm_end_to_end_on_the_smoke_task(tmp_path):
    summary = e2e.main(["--seeds", "0", "1", "2", "--algorithms", *ALGORITHMS, "--tag", "smoke", "--runs-dir",
                        str(tmp_path), "--quiet", "--", "--preset", "smoke", "--threads", "1"])
    assert list(summary) == ALGORITHMS
    stem = RESULTS_DIR / f"e2e-smoke-{device_kind()}"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    modes = {r["algorithm"]: [c["mode"] for c in r["curve"]] for r in rows}
    assert modes == {"zopro": ["first-order"] * 2 + ["zo-targeted"] * 2, "mezo": ["zo-isotropic"] * 4,
                     "rloo": ["first-order"] * 4, "ppo": ["ppo"] * 4}
    for s in summary.values():
        assert s["seeds"] == [0, 1, 2] and len(s["judge_mean"]) == 4 and None not in s["judge_mean"]
        assert s["clock_mean"] == sorted(s["clock_mean"])
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_reevaluate_reproduces_a_runs_own_evaluation_and_refuses_unfinished_runs(tmp_path, capsys):
    import dataclasses

    import pytest

    from benchmarks import reevaluate
    from zopro.config import preset
    from zopro.train import run

    cfg = dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / "run"), threads=1, eval_samples=3)
    ev = run(cfg, progress=False)["evaluation"]
    (again,) = reevaluate.main([str(tmp_path / "run"), "--eval-samples", "3"])
    # same seeds, same weights: the very numbers the job reported, from its final checkpoint alone
    assert (again["before"], again["after"], again["change"], again["change_se"]) == (
        ev["before"], ev["after"], ev["change"], ev["change_se"])
    assert f"| run | {cfg.n_eval_prompts} x 3 |" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(cfg, output_dir=str(tmp_path / "cut")), progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="not a finished run"):
        reevaluate.reevaluate(tmp_path / "cut", 3)
