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
    # the jackknife's leave-one-out shares from the sums equal those recomputed without each rollout
    loo = torch.tensor([zo_capture.capture([g[:100] for g in grads[:i] + grads[i + 1:]], grads[:i] + grads[i + 1:])[0]
                        for i in range(len(grads))], dtype=torch.float64)
    expected = float(((len(loo) - 1) / len(loo) * (loo - loo.mean()).pow(2).sum()) ** 0.5)
    se = zo_capture.jackknife_se(zo_capture.Sums.of([g[:100] for g in grads]), zo_capture.Sums.of(grads))
    assert se == pytest.approx(expected, rel=1e-9) and 0 < se < 0.5


def test_every_space_is_an_orthonormal_basis_of_the_lora_weights():
    """Coordinates of the unit vectors of the weights, stacked: ``M M^T = I`` exactly when the basis is orthonormal."""
    gen = torch.Generator().manual_seed(1)
    shapes = {}
    for layer in (0, 1):
        for module, out in (("self_attn.v_proj", 6), ("mlp.down_proj", 9)):
            stem = f"base_model.model.model.layers.{layer}.{module}"
            shapes[f"{stem}.lora_A.weight"] = (3, 5)
            shapes[f"{stem}.lora_B.weight"] = (out, 3)
    names = list(shapes)
    bases = {n: torch.linalg.qr(torch.randn(shapes[n][0], 3, generator=gen, dtype=torch.float64))[0]
             for n in names if ".lora_B." in n}
    guide = {n: torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in names}
    guide[names[1]] = torch.outer(torch.randn(6, generator=gen, dtype=torch.float64),
                                  torch.randn(3, generator=gen, dtype=torch.float64))  # a rank-1 part of the guide
    sizes = [torch.Size(shapes[n]).numel() for n in names]
    table = zo_capture.spaces(names, bases, guide)
    assert {"lora", "core", "singular", "guide-layer", "update-core", "update-sv", "B-v_proj"} <= set(table)
    for space, fn in table.items():
        rows = []
        for k in range(sum(sizes)):
            flat = torch.zeros(sum(sizes), dtype=torch.float64)
            flat[k] = 1.0
            rows.append(fn({n: part.view(shapes[n]) for n, part in zip(names, flat.split(sizes))}))
        m = torch.stack(rows, dim=1)
        torch.testing.assert_close(m @ m.T, torch.eye(m.shape[0], dtype=torch.float64), msg=space)
    assert table["guide-layer"](guide).numel() == 2 and table["guide-tensor"](guide).numel() == len(names)
    assert table["update-top2"](guide).numel() == 2 * 3 + 1 * 3 + 2 * 3 + 2 * 3  # the rank-1 part keeps 1 vector
    assert table["B-v_proj"](guide).numel() + table["B-down_proj"](guide).numel() == table["lora-B"](guide).numel()


@pytest.mark.slow
def test_spaces_are_nested_projections_at_a_runs_policy(tmp_path):
    frontier.main(["--methods", "iter0", "--seeds", "0", "--tag", "capture", "--runs-dir", str(tmp_path), "--quiet",
                   "--results-dir", str(tmp_path), "--", "--preset", "smoke", "--threads", "1", "--eval-every", "1",
                   "--eval-curve-prompts", "2"])
    out = tmp_path / "capture.json"
    zo_capture.main(["--run", str(tmp_path / "frontier-capture-iter0-seed0"), "--rollouts", "3", "--threads", "1",
                     "--json", str(out)])
    saved = json.loads(out.read_text())
    rows = {r["space"]: r for r in saved["rows"]}
    assert all(r["energy"] <= 1 + 1e-12 for r in rows.values())
    assert sum(saved["tensor_signal"].values()) == pytest.approx(1.0)
    kinds = [r for s, r in rows.items() if s.startswith("B-")]  # the module kinds partition the B factors
    assert sum(r["energy"] for r in kinds) == pytest.approx(rows["lora-B"]["energy"])
    assert sum(r["signal"] for r in kinds) == pytest.approx(rows["lora-B"]["signal"])
    assert [rows[f"guide-{b}"]["energy"] for b in ("whole", "layer", "tensor")] == sorted(
        rows[f"guide-{b}"]["energy"] for b in ("whole", "layer", "tensor"))
    energy = [rows[s]["energy"] for s in ("update-top1", "update-top2", "update-core", "lora-B", "lora")]
    assert energy == sorted(energy) and energy[0] > 0
    assert rows["update-sv"]["energy"] <= rows["update-core"]["energy"] + 1e-12
    assert rows["singular"]["energy"] <= rows["core"]["energy"] + 1e-12 <= rows["lora-B"]["energy"] + 2e-12
    # iteration 0 moved every B to full rank r: r x r cores and r numbers a matrix, as the base's spaces
    assert rows["update-core"]["dims"] == rows["core"]["dims"]
    assert rows["update-top1"]["dims"] == rows["update-sv"]["dims"] == rows["singular"]["dims"]
    assert 0 < rows["guide-layer"]["dims"] < rows["guide-tensor"]["dims"]
