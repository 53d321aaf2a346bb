"""The controlled test of targeted sampling (``benchmarks/controlled.py``) at its small size: D = 6,144, 20 steps,
2 seeds, seconds on a CPU. It checks that the sweep runs and writes its files; the size reported in
``benchmarks/RESULTS.md`` is ``python -m benchmarks.controlled --full`` (925-1086 s on one core of the shared
2-core CPU)."""

from __future__ import annotations

import json
import math

from benchmarks import controlled
from benchmarks.common import RESULTS_DIR, device_kind


def test_controlled_sweep_writes_finite_results():
    result = controlled.main([], log=lambda *_: None)  # into RESULTS_DIR, like the rest of the suite
    cfg = controlled.Config()
    stem = RESULTS_DIR / f"controlled-small-{device_kind()}"
    assert json.loads(stem.with_suffix(".json").read_text())["verdicts"] == json.loads(json.dumps(result["verdicts"]))
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "Where targeting wins" in stem.with_suffix(".md").read_text()
    assert len(result["rows"]) == len(controlled.configurations(cfg))
    for row in result["rows"]:
        assert len(row["curves"]) == cfg.seeds and all(len(c) == cfg.steps + 1 for c in row["curves"])
        assert row["curves"][0][0] == 1.0 and math.isfinite(row["lr"]) and row["lr"] > 0


def test_guide_has_the_requested_cosine_and_the_placebo_its_norms():
    task = controlled.Task(controlled.Config().shapes, seed=3, noise=17.0)
    for rho in (0.0, 0.01, 0.3):
        u = task.guide(rho)
        assert abs(task.cosine(u) - rho) < 1e-12 and abs(float(u.norm()) - controlled.GUIDE_NORM) < 1e-9
    u = task.guide(0.3)
    placebo = task.placebo(u)
    for p, q in zip(placebo.split(task.sizes), u.split(task.sizes)):
        assert abs(float(p.norm() - q.norm())) < 1e-9
    assert abs(task.cosine(placebo)) < 5 / math.sqrt(task.D)
