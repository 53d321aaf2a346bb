"""End to end, every algorithm through the same loop: the tiny smoke task here (3 seeds, seconds per run), so that
``pytest benchmarks/`` always exercises the comparison and writes ``results/e2e-smoke-<device>.*``. The embedded
SmolLM2 task takes minutes per run on a CPU: ``python -m benchmarks.e2e --algorithms zopro mezo rloo ppo --tag
embedded -- <flags>`` (see benchmarks/RESULTS.md for the command behind each table)."""

from __future__ import annotations

import json

from benchmarks import e2e
from benchmarks.common import RESULTS_DIR, device_kind

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
