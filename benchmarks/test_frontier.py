"""The frontier benchmark at its small size: every method on the tiny smoke model (seconds per run), so that
``pytest benchmarks/`` always exercises the comparison. The reference task's full size: ``python -m
benchmarks.frontier`` (see benchmarks/RESULTS.md for the command behind each table)."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import frontier
from benchmarks.common import RESULTS_DIR, device_kind


def test_every_method_on_the_frontier_of_the_smoke_task(tmp_path):
    methods = frontier.DEFAULT_METHODS + ["iter0", "es-sv"]
    summary = frontier.main(["--methods", *methods, "--seeds", "0", "1", "--tag", "smoke", "--runs-dir", str(tmp_path),
                             "--quiet", "--", "--preset", "smoke", "--threads", "1", "--eval-every", "1",
                             "--eval-curve-prompts", "2"])
    assert list(summary) == methods
    stem = RESULTS_DIR / f"frontier-smoke-{device_kind()}"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert {r["config"]["reward"] for r in rows} == {"judge"}
    for method, s in summary.items():
        steps = [0, 1, 2] if method == "iter0" else [0, 1, 2, 3, 4]  # iteration 0 alone: its 2 steps
        assert s["seeds"] == [0, 1] and [p["global_step"] for p in s["points"]] == steps
        passes = [p["token_passes"][0] for p in s["points"]]
        assert passes == sorted(passes) and passes[-1] > passes[0]
        assert s["points"][0]["kl"] == (0.0, 0.0)  # every method starts at the reference policy
        assert s["final"]["score_change"][1] is not None
    # the methods' first points are the same evaluation of the same base policy, with the same seeds
    first = {m: s["points"][0]["score"] for m, s in summary.items()}
    assert len(set(first.values())) == 1
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    # each method against iteration 0 alone: the mean per-prompt difference of the same seed's final scores
    versus = frontier.against(rows, "iter0")
    assert set(versus) == set(methods) - {"iter0"}

    def after(method, seed):
        lines = (tmp_path / f"frontier-smoke-{method}-seed{seed}" / "eval_samples.jsonl").read_text().splitlines()
        return [json.loads(line)["after_score"] for line in lines]

    d = [a - b for a, b in zip(after("zopro", 1), after("iter0", 1), strict=True)]
    assert versus["zopro"]["per_seed"][1] == (statistics.fmean(d), statistics.stdev(d) / len(d) ** 0.5)
    assert "Against `iter0` on the same seeds" in stem.with_suffix(".md").read_text()

    # earlier results join a sweep of the same job whatever their thread count; another job's are refused
    assert frontier._job_flags(["--threads=2", "--k", "4", "--threads", "1"]) == ["--k", "4"]
    flags = ["--", "--preset", "smoke", "--threads", "2", "--eval-every", "1", "--eval-curve-prompts", "2"]
    joined = frontier.main(["--methods", "rloo", "--seeds", "0", "--tag", "smoke", "--runs-dir", str(tmp_path),
                            "--results-dir", str(tmp_path / "res"), "--quiet", "--include",
                            str(stem.with_suffix(".json")), *flags])
    assert set(joined) == set(methods) and joined["rloo"]["seeds"] == [0, 1]
    flags[flags.index("--eval-every") + 1] = "2"
    with pytest.raises(ValueError, match="not the same job"):
        frontier.main(["--methods", "rloo", "--seeds", "0", "--tag", "smoke", "--runs-dir", str(tmp_path),
                       "--results-dir", str(tmp_path / "res"), "--quiet", "--include",
                       str(stem.with_suffix(".json")), *flags])
