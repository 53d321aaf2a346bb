"""Snapshots and ``python -m zopro.train.visualize`` on the smoke preset (issue 15).

One smoke run with a snapshot every step is shared by the module: the report's numbers are checked against values
computed here, independently, from the saved snapshot files (numpy, float64); its images must decode and the page
must not reach the network. Further small runs check that snapshots change nothing a run computes and survive a
kill and resume.
"""

import base64
import dataclasses
import io
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from zopro.train import analysis, checkpoint, run, visualize
from zopro.train.config import preset

VOLATILE = {"step_time", "peak_rollout", "peak_update"}


def _smoke(root, name, **overrides):
    return dataclasses.replace(preset("smoke"), output_dir=str(root / name), threads=1, **overrides)


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _snap(out, step):
    path = out / "snapshots" / f"snap-{step:06d}.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return meta, {k: v.double().numpy() for k, v in load_file(str(path)).items()}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    run(_smoke(root, "run", snapshot_every=1, seed=3), progress=False)
    out = root / "run"
    assert visualize.main([str(out), "--out", str(root / "report")]) == 0
    report = json.loads((root / "report" / "report.json").read_text())["runs"][0]
    return out, root / "report", report


# ---------------------------------------------------------------------------------------------------------------------
# Snapshots
def test_snapshots_sit_at_every_step_and_hold_the_reward_adapter_at_boundaries(smoke):
    out, _, _ = smoke
    files = sorted(p.name for p in (out / "snapshots").iterdir())
    assert files == [f"snap-{s:06d}.safetensors" for s in range(5)]
    kinds = [_snap(out, s)[0] for s in range(5)]
    assert [(m["kind"], m["iteration"], m["step"], m["mode"]) for m in kinds] == [
        ("iteration", "0", "0", "first-order"), ("step", "0", "1", "first-order"),
        ("iteration", "1", "0", "zo-targeted"), ("step", "1", "1", "zo-targeted"),
        ("final", "1", "2", "zo-targeted")]
    for s in range(5):
        tensors = _snap(out, s)[1]
        has_reward = any(k.startswith("reward.") for k in tensors) and "score.weight" in tensors
        assert has_reward == (s in (0, 2, 4))
    final = _snap(out, 4)[1]
    policy = load_file(str(out / "policy_adapter.safetensors"))
    reward = load_file(str(out / "reward_adapter.safetensors"))
    assert all(np.array_equal(final[f"policy.{k}"], v.double().numpy()) for k, v in policy.items())
    assert all(np.array_equal(final[k if k.startswith("score.") else f"reward.{k}"], v.double().numpy())
               for k, v in reward.items())


def test_boundary_snapshots_are_the_guides_the_next_iteration_used(tmp_path):
    """The checkpoint of a run killed in iteration 1 holds the guides built at the end of iteration 0; they equal
    the differences of the boundary snapshots, bit for bit."""
    cfg = _smoke(tmp_path, "cut", snapshot_every=1, seed=3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, stop_after_steps=3)
    loaded = checkpoint.load(tmp_path / "cut")
    a, b = load_file(str(tmp_path / "cut/snapshots/snap-000000.safetensors")), \
        load_file(str(tmp_path / "cut/snapshots/snap-000002.safetensors"))
    prev, delta = loaded.tensors["guides_prev"], loaded.tensors["guides_delta"]
    assert prev and all(torch.equal(prev[n], b[f"policy.{n}"] - a[f"policy.{n}"]) for n in prev)
    assert all(torch.equal(delta[n], b[f"reward.{n}"] - a[f"reward.{n}"]) for n in delta)
    assert any(delta[n].abs().sum() > 0 for n in delta)


def test_snapshots_change_nothing_the_run_computes(smoke, tmp_path):
    out, _, _ = smoke
    run(_smoke(tmp_path, "off", snapshot_every=0, seed=3), progress=False)
    assert not (tmp_path / "off" / "snapshots").exists()
    assert _records(tmp_path / "off") == _records(out)
    for name in ("policy_adapter", "reward_adapter"):
        a, b = load_file(str(out / f"{name}.safetensors")), load_file(str(tmp_path / "off" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_and_resume_leaves_the_snapshots_of_an_uninterrupted_run(smoke, tmp_path):
    out, _, _ = smoke
    cfg = _smoke(tmp_path, "parts", snapshot_every=1, seed=3, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, stop_after_steps=1)
    folder = tmp_path / "parts" / "snapshots"
    # a kill inside a later step: its snapshot written, or half written, but no checkpoint vouches for it
    (folder / "snap-000009.safetensors").write_bytes(b"stale")
    (folder / "snap-000003.safetensors.tmp").write_bytes(b"half")
    with pytest.raises(KeyboardInterrupt):
        run(cfg, resume=True, progress=False, stop_after_steps=2)
    run(cfg, resume=True, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (out / "snapshots").iterdir())
    for s in range(5):
        (ma, ta), (mb, tb) = _snap(out, s), _snap(tmp_path / "parts", s)
        assert ma == mb and ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_step_metrics_match_the_snapshots_and_the_optimiser_log(smoke):
    out, _, _ = smoke
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = preset("smoke")
    for r in records:  # with a snapshot every step, 'moved' is the distance between neighbouring snapshots
        a, b = _snap(out, r["global_step"])[1], _snap(out, r["global_step"] + 1)[1]
        sq = sum(((b[k] - a[k]) ** 2).sum() for k in a if k.startswith("policy."))
        assert r["moved"] == pytest.approx(math.sqrt(sq), rel=1e-12) and r["moved"] > 0
    zo = [r for r in records if r["mode"].startswith("zo")]
    losses = torch.load(out / "zo_log_iter1.pt")["log"]["losses"].tolist()
    for i, r in enumerate(zo):
        assert r["zo_g"] == [(losses[2 * i] - losses[2 * i + 1]) / (2 * cfg.zo_eps)] == [r["grad"]]
        assert r["zo_d"] == [cfg.d0]  # the constant schedule
        # every smoke tensor has a guide after a first-order iteration: the guide's share of |z|^2 is d^2
        assert r["zo_guide_share"] == [pytest.approx(cfg.d0 ** 2, rel=1e-12)]
    assert all("zo_g" not in r for r in records if r["mode"] == "first-order")


# ---------------------------------------------------------------------------------------------------------------------
# The report
def _layer(name):
    m = re.search(r"layers\.(\d+)\.", name)
    return f"layer {int(m.group(1)):02d}" if m else "other"


def _groups(tensors):
    out = {}
    for n, t in tensors.items():
        out.setdefault(_layer(n), []).append(t.ravel())
    flat = {k: np.concatenate(v) for k, v in out.items()}
    return {**flat, "all": np.concatenate([tensors[n].ravel() for n in tensors])}


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_report_norms_and_cosines_equal_values_from_the_snapshots(smoke):
    out, folder, report = smoke
    snap = {s: _snap(out, s)[1] for s in (0, 2, 4)}
    update = {it: _groups({k: snap[b][k] - snap[a][k] for k in snap[a] if k.startswith("policy.")})
              for it, (a, b) in enumerate([(0, 2), (2, 4)])}
    delta0 = _groups({k: snap[2][k] - snap[0][k] for k in snap[0] if k.startswith("reward.")})
    rows = {r["iteration"]: r["layers"] for r in report["iterations"]}
    assert sorted(rows) == [0, 1] and set(rows[0]) == {"layer 00", "layer 01", "all"}
    for lay in rows[0]:
        r0, r1 = rows[0][lay], rows[1][lay]
        assert r0["update_norm"] == pytest.approx(np.linalg.norm(update[0][lay]), rel=1e-12)
        assert r0["reward_delta_norm"] == pytest.approx(np.linalg.norm(delta0[lay]), rel=1e-12)
        assert r0["cos_reward"] == pytest.approx(_cos(update[0][lay], delta0[lay]), rel=1e-9)
        assert r0["angle_reward"] == pytest.approx(math.degrees(math.acos(r0["cos_reward"])), rel=1e-12)
        assert r1["cos_previous"] == pytest.approx(_cos(update[1][lay], update[0][lay]), rel=1e-9)
        assert r0["cos_previous"] is None and r1["cos_reward"] is None  # nothing before it0; no refinement after it1
    html = (folder / "report.html").read_text()
    assert f"<td>{visualize.fmt(rows[0]['all']['cos_reward'])}</td>" in html
    assert f"<td>{visualize.fmt(rows[1]['all']['update_norm'])}</td>" in html


def test_report_pca_coordinates_equal_an_svd_of_the_snapshots(smoke):
    out, folder, report = smoke
    points = np.stack([np.concatenate([v.ravel() for k, v in sorted(_snap(out, s)[1].items())
                                       if k.startswith("policy.")]) for s in range(5)])
    centred = points - points.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    expected = u[:, :2] * s[:2]
    got = np.array(report["trajectories"]["policy"]["coords"])
    assert report["trajectories"]["policy"]["global_steps"] == [0, 1, 2, 3, 4]
    for k in range(2):  # a component's sign is a convention: its largest coordinate is positive
        sign = np.sign(expected[np.abs(expected[:, k]).argmax(), k])
        np.testing.assert_allclose(got[:, k], sign * expected[:, k], rtol=1e-7, atol=1e-12 * np.abs(s).max())
    assert report["trajectories"]["policy"]["explained"][0] == pytest.approx(s[0] ** 2 / (s ** 2).sum(), rel=1e-9)
    html = (folder / "report.html").read_text()
    assert f"<td>{visualize.fmt(got[4, 0])}</td><td>{visualize.fmt(got[4, 1])}</td>" in html
    # the reward adapter is snapshotted at the three boundaries only
    assert report["trajectories"]["reward"]["global_steps"] == [0, 2, 4]


def test_report_zo_table_from_the_metrics(smoke):
    out, _, report = smoke
    g = [json.loads(line)["zo_g"][0] for line in (out / "metrics.jsonl").read_text().splitlines()[2:]]
    rows = report["zo_updates"]
    assert [r["g"] for r in rows] == g
    assert [r["running_mean"] for r in rows] == pytest.approx([g[0], (g[0] + g[1]) / 2], rel=1e-12)
    mean = (g[0] + g[1]) / 2
    assert rows[1]["sign_agreement"] == sum((x > 0) == (mean > 0) for x in g) / 2


def test_every_embedded_image_decodes(smoke):
    from PIL import Image

    html = (smoke[1] / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == 4  # curves, trajectories, angles, ZO
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=True))) as img:
            img.load()
            assert img.format == "PNG" and min(img.size) > 100


def test_report_renders_offline(smoke):
    html = (smoke[1] / "report.html").read_text()
    assert not re.search(r"https?:|<script|<link|@import|url\(|<iframe|<object", html, re.I)
    assert all(src.startswith("data:") for src in re.findall(r'(?:src|href)="([^"]*)"', html))


# ---------------------------------------------------------------------------------------------------------------------
# What the command accepts
def test_a_folder_that_is_not_a_run_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path, tmp_path / "missing", tmp_path / "file"):
        assert visualize.main([str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{path}: not a run directory" in err


def test_a_running_run_an_old_run_and_several_runs_in_one_report(smoke, tmp_path):
    out, _, _ = smoke
    cfg = _smoke(tmp_path, "running", snapshot_every=1, seed=3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, progress=False, stop_after_steps=3)
    with open(tmp_path / "running" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 1, "step": 1, "glob')  # the line being written
    old = tmp_path / "old"  # a run from before snapshots: no folder, no per-update fields
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("snapshots"))
    lines = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in (
        "moved", "zo_g", "zo_d", "zo_guide_share")}) + "\n" for r in lines))
    assert visualize.main([str(tmp_path / "running"), str(old), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    assert [r["iteration"] for r in report[0]["iterations"]] == [0]  # iteration 1 has no end yet
    assert report[0]["steps"] == 3
    assert report[1]["iterations"] == [] and report[1]["trajectories"] == {}
    assert [r["g"] for r in report[1]["zo_updates"]] == [r["grad"] for r in lines[2:]]
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "No snapshots" in html and "running" in html and "old" in html


def test_a_ppo_run(tmp_path):
    run(_smoke(tmp_path, "ppo", algorithm="ppo", snapshot_every=1), progress=False)
    assert visualize.main([str(tmp_path / "ppo"), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"][0]
    assert report["zo_updates"] == [] and [m["mode"] for m in report["moved"]] == ["ppo"] * 4
    assert [r["mode"] for r in report["iterations"]] == ["ppo", "ppo"]
    assert report["iterations"][0]["layers"]["all"]["cos_reward"] is not None


def test_runs_with_the_same_folder_name_get_labels_that_tell_them_apart(tmp_path):
    paths = [tmp_path / "seed0" / "full", tmp_path / "seed1" / "full", tmp_path / "seed1" / "iter1"]
    assert analysis.unique_labels(paths) == ["seed0/full", "seed1/full", "iter1"]
    assert analysis.unique_labels([tmp_path / "a" / "run"]) == ["run"]


def test_the_report_overlays_the_runs_gold_curves_and_frontiers(tmp_path, capsys):
    for name, reward in (("judge", "judge"), ("model", "model")):
        run(_smoke(tmp_path, name, eval_every=1, eval_curve_prompts=2, reward=reward), progress=False)
    assert visualize.main([str(tmp_path / "judge"), str(tmp_path / "model"), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "report.json").read_text())["runs"]
    for r, name in zip(report, ("judge", "model"), strict=True):
        written = [json.loads(line) for line in (tmp_path / name / "eval_curve.jsonl").read_text().splitlines()]
        assert r["curve"] == written and [p["global_step"] for p in written] == [0, 1, 2, 3, 4]
    assert (tmp_path / "rep" / "gold.png").read_bytes()[:4] == b"\x89PNG"
    assert "<h2>Held-out gold score</h2><p><img alt=\"gold\"" in (tmp_path / "rep" / "report.html").read_text()
    with open(tmp_path / "model" / "eval_curve.jsonl", "a") as f:
        f.write('{"global_step": 5, "score": NaN, "kl": 0.1}\n')
    assert visualize.main([str(tmp_path / "model"), "--out", str(tmp_path / "rep2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "eval_curve.jsonl:6: not an in-run evaluation" in err
