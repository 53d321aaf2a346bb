"""The frontier benchmark at its small size: every method on the tiny smoke model (seconds per run), so that
``pytest benchmarks/`` always exercises the comparison. The reference task's full size: ``python -m
benchmarks.frontier`` (see benchmarks/RESULTS.md for the command behind each table)."""

from __future__ import annotations

import json

from benchmarks import frontier
from benchmarks.common import RESULTS_DIR, device_kind


def test_every_method_on_the_frontier_of_the_smoke_task(tmp_path):
    summary = frontier.main(["--seeds", "0", "1", "--tag", "smoke", "--runs-dir", str(tmp_path), "--quiet", "--",
                             "--preset", "smoke", "--threads", "1", "--eval-every", "1", "--eval-curve-prompts", "2"])
    assert list(summary) == list(frontier.METHODS)
    stem = RESULTS_DIR / f"frontier-smoke-{device_kind()}"
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert {r["config"]["reward"] for r in rows} == {"judge"}
    for s in summary.values():
        assert s["seeds"] == [0, 1] and [p["global_step"] for p in s["points"]] == [0, 1, 2, 3, 4]
        passes = [p["token_passes"][0] for p in s["points"]]
        assert passes == sorted(passes) and passes[-1] > passes[0]
        assert s["points"][0]["kl"] == (0.0, 0.0)  # every method starts at the reference policy
        assert s["final"]["score_change"][1] is not None
    # the methods' first points are the same evaluation of the same base policy, with the same seeds
    first = {m: s["points"][0]["score"] for m, s in summary.items()}
    assert len(set(first.values())) == 1
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
