"""What a run did, read from its directory alone (finished or still running): its ``config.json``, ``metrics.jsonl``,
``eval_curve.jsonl`` and adapter snapshots (:mod:`zopro.train.snapshots`), and the numbers the visual report
(:mod:`zopro.train.visualize`) draws: the policy's and reward model's trajectories projected to 2D (PCA in torch), per
iteration and per layer the norms of the policy update and the reward delta and the angles between them, and per
ZO update the projected gradient, the mixing weight and the guide's share.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from zopro.train import snapshots

_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass
class RunData:
    path: Path
    config: dict
    records: list[dict]
    snaps: list[dict]
    label: str = ""  # the folder's name, or as much of its path as tells it from the other runs (unique_labels)
    curve: list[dict] = field(default_factory=list)  # eval_curve.jsonl: the in-run held-out evaluations


def unique_labels(paths: list[Path]) -> list[str]:
    """Each path's shortest tail of folder names that no other path ends with: ``full`` alone, ``seed0/full`` and
    ``seed1/full`` side by side."""
    parts = [Path(p).resolve().parts for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        n = 1
        while n < len(mine) and any(j != i and other[-n:] == mine[-n:] for j, other in enumerate(parts)):
            n += 1
        labels.append("/".join(mine[-n:]))
    return labels


def load_run(path) -> RunData:
    """A run directory's config, metrics lines and snapshot listing; ValueError (one line) for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: not a run directory (no such directory)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a run directory (no config.json)")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'}: unreadable ({type(err).__name__})") from None
    return RunData(path, config, read_metrics(path / "metrics.jsonl"), snapshots.listing(path), path.resolve().name,
                   read_curve(path / "eval_curve.jsonl"))


def read_curve(path: Path) -> list[dict]:
    """The in-run evaluations of ``eval_curve.jsonl`` (none for a run without ``--eval-every``); a line that is not a
    point with a finite gold score, KL and step is refused in one line naming the file."""
    if not path.is_file():
        return []
    points = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            point = json.loads(line)
            ok = isinstance(point, dict) and all(isinstance(point.get(k), (int, float)) and math.isfinite(point[k])
                                                 for k in ("global_step", "score", "kl"))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{path}:{n}: not an in-run evaluation (a global_step, score and kl)")
        points.append(point)
    return points


def read_metrics(path: Path) -> list[dict]:
    """The complete lines of ``metrics.jsonl`` (a running run may be writing its last line: that one is skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if "global_step" in r]


# ---------------------------------------------------------------------------------------------------------------------
# The numbers
def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors in name order as one float64 vector."""
    return torch.cat([tensors[n].double().flatten() for n in sorted(tensors)]) if tensors else torch.zeros(0)


def pca_2d(points: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Coordinates of the rows of ``points`` (n x D) on their first two principal components, and the share of the
    variance each explains. From the n x n Gram matrix of the centred rows (n snapshots, D up to millions of weights:
    never a D x D matrix). Each component's sign is chosen so that its largest coordinate (in absolute value) is
    positive; fewer than two components leave zeros."""
    n = points.shape[0]
    centred = points - points.mean(0, keepdim=True)
    values, vectors = torch.linalg.eigh(centred @ centred.T)  # ascending
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    coords = torch.zeros(n, 2, dtype=torch.float64)
    total = float(values.sum())
    explained = [0.0, 0.0]
    for k in range(min(2, n)):
        if values[k] <= 1e-12 * max(total, 1e-300):
            continue
        c = vectors[:, k] * values[k].sqrt()
        coords[:, k] = c if c[c.abs().argmax()] >= 0 else -c
        explained[k] = float(values[k]) / total
    return coords, explained


def layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return f"layer {int(m.group(1)):02d}" if m else "other"


def cosine(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else None


def angle(cos: float | None) -> float | None:
    return None if cos is None else math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _by_layer(tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    if tensors is None:
        return None
    groups: dict[str, dict] = {}
    for n, t in tensors.items():
        groups.setdefault(layer_of(n), {})[n] = t
    return {**{k: flatten(v) for k, v in sorted(groups.items())}, "all": flatten(tensors)}


def layer_stats(update: dict, reward_delta: dict | None, previous: dict | None) -> dict[str, dict]:
    """Per layer (and ``all``): norms of the policy update and the reward delta, cosine and angle between them and
    between the update and the previous iteration's update (None where one is missing or zero)."""
    u, r, p = _by_layer(update), _by_layer(reward_delta), _by_layer(previous)
    out = {}
    for key, vec in u.items():
        rv, pv = (r or {}).get(key), (p or {}).get(key)
        cos_r, cos_p = cosine(vec, rv), cosine(vec, pv)
        out[key] = {"update_norm": float(vec.norm()), "reward_delta_norm": None if rv is None else float(rv.norm()),
                    "cos_reward": cos_r, "angle_reward": angle(cos_r), "cos_previous": cos_p,
                    "angle_previous": angle(cos_p)}
    return out


def boundaries(snaps: list[dict]) -> dict[int, tuple[dict, dict]]:
    """``{iteration: (start snapshot, end snapshot)}`` for every iteration whose both ends were saved: its start
    (kind ``iteration``) and the next iteration's start or the final snapshot."""
    starts = {s["iteration"]: s for s in snaps if s["kind"] == "iteration"}
    finals = [s for s in snaps if s["kind"] == "final"]
    out = {}
    for it, start in starts.items():
        end = starts.get(it + 1) or next((f for f in finals if f["iteration"] == it), None)
        if end is not None:
            out[it] = (start, end)
    return out


def iteration_table(run: RunData) -> list[dict]:
    """Per complete iteration: its mode and :func:`layer_stats` of the policy update over it, the reward delta over
    it (the adapter only, not the score head: the tensors the targeted sampler reads) and the previous update."""
    rows, previous = [], (None, None)  # (iteration, its update)
    for it, (start, end) in sorted(boundaries(run.snaps).items()):
        p0, p1 = snapshots.load(start["path"], "policy"), snapshots.load(end["path"], "policy")
        update = {n: p1[n].double() - p0[n].double() for n in p1}  # float64: the report's own rounding only
        r0, r1 = snapshots.load(start["path"], "reward"), snapshots.load(end["path"], "reward")
        delta = {n: r1[n].double() - r0[n].double() for n in r1} if r0 and r1 else None
        before = previous[1] if previous[0] == it - 1 else None
        rows.append({"iteration": it, "mode": start["mode"], "from_step": start["global_step"],
                     "to_step": end["global_step"], "layers": layer_stats(update, delta, before)})
        previous = (it, update)
    return rows


def trajectories(run: RunData) -> dict[str, dict]:
    """PCA coordinates of the policy snapshots (all) and of the reward snapshots (boundaries only: the reward adapter
    and its score head change nowhere else)."""
    out = {}
    for part in ("policy", "reward"):
        chosen, vectors = [], []
        for s in run.snaps:
            tensors = snapshots.load(s["path"], part)
            if part == "reward" and tensors:
                tensors |= {f"score.{n}": t for n, t in snapshots.load(s["path"], "score").items()}
            if tensors:
                chosen.append(s)
                vectors.append(flatten(tensors))
        if len(chosen) >= 2:
            coords, explained = pca_2d(torch.stack(vectors))
            out[part] = {"global_steps": [s["global_step"] for s in chosen], "iterations": [s["iteration"] for s in
                                                                                            chosen],
                         "modes": [s["mode"] for s in chosen], "kinds": [s["kind"] for s in chosen],
                         "coords": coords.tolist(), "explained": explained, "_points": torch.stack(vectors)}
    return out


def zo_table(records: list[dict]) -> list[dict]:
    """One row per ZO update: g, its running mean and sign agreement within the iteration (the share of the
    iteration's updates so far whose g has the running mean's sign), d and the guide's share. Runs that predate the
    per-update fields fall back to the step's mean g ('grad')."""
    rows, state = [], {}
    for r in records:
        if not str(r.get("mode", "")).startswith("zo"):
            continue
        gs = r.get("zo_g") or [r.get("grad")]
        ds = r.get("zo_d") or [None] * len(gs)
        shares = r.get("zo_guide_share") or [None] * len(gs)
        seen = state.setdefault(r["iteration"], [])
        for j, (g, d, share) in enumerate(zip(gs, ds, shares)):
            if g is None or not math.isfinite(g):
                continue
            seen.append(g)
            mean = sum(seen) / len(seen)
            agree = sum((x > 0) == (mean > 0) and x != 0 for x in seen) / len(seen)
            rows.append({"iteration": r["iteration"], "global_step": r["global_step"], "update": j, "g": g,
                         "running_mean": mean, "sign_agreement": agree, "d": d, "guide_share": share})
    return rows


def analyse(run: RunData) -> dict:
    return {"path": str(run.path), "label": run.label, "steps": len(run.records),
            "snapshots": [{k: v for k, v in s.items() if k != "path"} for s in run.snaps],
            "trajectories": trajectories(run), "iterations": iteration_table(run), "zo_updates": zo_table(run.records),
            "moved": [{"global_step": r["global_step"], "mode": r.get("mode"), "moved": r["moved"]}
                      for r in run.records if r.get("moved") is not None]}
