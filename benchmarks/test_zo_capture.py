"""``benchmarks.zo_capture`` on the smoke model: the estimator's algebra, and the spaces as orthonormal projections
(nested spaces hold nested shares of every gradient). The default job's figures: RESULTS.md section 13f."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import frontier, zo_capture


def test_capture_is_the_projected_share_when_every_rollout_agrees():
    g = torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64)
    whole = [g.clone() for _ in range(4)]
    signal, energy = zo_capture.capture([g[:2].clone() for _ in range(4)], whole)
    assert signal == pytest.approx(25 / 169, rel=1e-12) and energy == pytest.approx(25 / 169, rel=1e-12)


def test_capture_removes_independent_noise_from_the_signal():
    gen = torch.Generator().manual_seed(0)
    mean = torch.zeros(400, dtype=torch.float64)
    mean[:100] = 1.0  # the expected gradient lies in the first 100 coordinates
    grads = [mean + 3.0 * torch.randn(400, generator=gen, dtype=torch.float64) for _ in range(64)]
    signal, energy = zo_capture.capture([g[:100] for g in grads], grads)
    # energy ~ (100 + 900) / (100 + 3600) = 0.27; signal ~ 1: the cross products cancel the noise
    assert abs(energy - 1000 / 3700) < 0.02 and abs(signal - 1.0) < 0.15


@pytest.mark.slow
def test_spaces_are_nested_projections_at_a_runs_policy(tmp_path):
    frontier.main(["--methods", "iter0", "--seeds", "0", "--tag", "capture", "--runs-dir", str(tmp_path), "--quiet",
                   "--results-dir", str(tmp_path), "--", "--preset", "smoke", "--threads", "1", "--eval-every", "1",
                   "--eval-curve-prompts", "2"])
    out = tmp_path / "capture.json"
    zo_capture.main(["--run", str(tmp_path / "frontier-capture-iter0-seed0"), "--rollouts", "3", "--threads", "1",
                     "--json", str(out)])
    rows = {r["space"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["lora"]["signal"] == pytest.approx(1.0) and rows["lora"]["energy"] == pytest.approx(1.0)
    energy = [rows[s]["energy"] for s in ("update-top1", "update-top2", "update-core", "lora-B", "lora")]
    assert energy == sorted(energy) and energy[0] > 0
    assert rows["update-sv"]["energy"] <= rows["update-core"]["energy"] + 1e-12
    assert rows["singular"]["energy"] <= rows["core"]["energy"] + 1e-12 <= rows["lora-B"]["energy"] + 2e-12
    # iteration 0 moved every B to full rank r: r x r cores and r numbers a matrix, as the base's spaces
    assert rows["update-core"]["dims"] == rows["core"]["dims"]
    assert rows["update-top1"]["dims"] == rows["update-sv"]["dims"] == rows["singular"]["dims"]
    assert 0 < rows["guide-layer"]["dims"] < rows["guide-tensor"]["dims"]
