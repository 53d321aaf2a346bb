"""``python -m zopro.train.visualize RUN_DIR [RUN_DIR ...] [--out DIR]``: how the policy and the reward model moved.

Reads what a run directory holds (finished or still running; first-order, ZO, mixed, PPO, quantised): its
``config.json``, ``metrics.jsonl`` and the adapter snapshots of :mod:`zopro.train.snapshots`, and writes PNGs, the
numbers behind them (``report.json``) and one self-contained ``report.html`` (images embedded as base64, no script,
nothing fetched). Sections:

* curves from ``metrics.jsonl`` (reward-model score, judge score, KL, loss, step time), one line per run directory;
* the held-out gold score of the in-run evaluations (``eval_curve.jsonl``, ``--eval-every``) against step, and
  against KL(policy || reference): every run's reward–KL frontier on one plot;
* per run, the policy and reward trajectories projected to 2D: PCA in torch on all of the run's snapshots (t-SNE
  and UMAP too when scikit-learn / umap-learn happen to be installed; they are not dependencies);
* per run, per iteration and per layer: norm of the policy update and of the reward delta over the iteration,
  cosine and angle between them (the pair the next iteration's targeted sampler uses as ``prev`` and ``v``), and
  between successive policy updates;
* per run, per ZO update: the projected gradient g with its running mean and sign agreement, the mixing weight d
  and the guide's share of the direction (metrics ``zo_g``, ``zo_d``, ``zo_guide_share``), and per step how far
  the policy moved (``moved``).

A folder that is not a run (no ``config.json``) is refused in one line with exit code 2.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from pathlib import Path

import torch

from zopro.train import analysis, files

METRIC_CURVES = (("reward", "reward-model score"), ("judge_score", "judge score"), ("kl", "KL to reference"),
                 ("loss", "surrogate loss"), ("step_time", "step time (s)"))


# ---------------------------------------------------------------------------------------------------------------------
# Pictures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


MARKERS = {"first-order": "o", "ppo": "s"}


def plot_curves(runs: list[analysis.RunData], path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRIC_CURVES), figsize=(4 * len(METRIC_CURVES), 3.4))
    for run in runs:
        for ax, (key, _) in zip(axes, METRIC_CURVES):
            pts = [(r["global_step"], r[key]) for r in run.records if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=run.label)
    for ax, (_, title) in zip(axes, METRIC_CURVES):
        ax.set(xlabel="step", title=title)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_gold(runs: list[analysis.RunData], path: Path) -> Path | None:
    """The in-run held-out gold score against step, and against KL(policy || reference) (the reward–KL frontier),
    one line per run; None when no run has an in-run evaluation."""
    runs = [r for r in runs if r.curve]
    if not runs:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in runs:
        steps, score, kl = zip(*[(p["global_step"], p["score"], p["kl"]) for p in run.curve], strict=True)
        ax1.plot(steps, score, marker=".", label=run.label)
        ax2.plot(kl, score, marker="o", ms=3, label=run.label)
    ax1.set(xlabel="step", ylabel="gold score (held-out subset)", title="in-run evaluation")
    ax2.set(xlabel="KL(policy || reference), nats per answer", title="reward–KL frontier")
    ax1.legend(fontsize=7)
    return _save(fig, path)


def plot_trajectories(traj: dict, path: Path, extra: dict | None = None) -> Path | None:
    panels = [(f"{part} PCA", t["coords"], t) for part, t in traj.items()]
    panels += [(name, coords, traj["policy"]) for name, coords in (extra or {}).items()]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, coords, t) in zip(axes[0], panels):
        xs, ys = [c[0] for c in coords], [c[1] for c in coords]
        ax.plot(xs, ys, color="0.8", zorder=1)
        steps = t["global_steps"]
        for mode in sorted(set(t["modes"])):
            idx = [i for i, m in enumerate(t["modes"]) if m == mode]
            sc = ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], c=[steps[i] for i in idx], cmap="viridis",
                            vmin=min(steps), vmax=max(steps), marker=MARKERS.get(mode, "^"), label=mode, zorder=2)
        for i, kind in enumerate(t["kinds"]):
            if kind != "step":
                ax.annotate(f"it{t['iterations'][i]}" if kind == "iteration" else "end", (xs[i], ys[i]), fontsize=8)
        explained = t["explained"] if "PCA" in title else None
        ax.set(title=title, xlabel="PC1" + (f" ({explained[0]:.0%})" if explained else ""),
               ylabel="PC2" + (f" ({explained[1]:.0%})" if explained else ""))
        ax.legend(fontsize=7)
        fig.colorbar(sc, ax=ax, label="step")
    return _save(fig, path)


def embeddings(points: torch.Tensor) -> dict[str, list]:
    """t-SNE and UMAP of the policy snapshots, when scikit-learn / umap-learn are installed (the paper's views);
    nothing otherwise. Not dependencies of zopro."""
    out, n = {}, points.shape[0]
    if n < 5:
        return out
    x = points.numpy()
    try:
        from sklearn.manifold import TSNE

        out["policy t-SNE"] = TSNE(2, perplexity=min(30.0, n - 1.0), random_state=0, init="pca").fit_transform(
            x).tolist()
    except ImportError:
        pass
    try:
        import umap

        out["policy UMAP"] = umap.UMAP(n_neighbors=min(15, n - 1), random_state=0).fit_transform(x).tolist()
    except ImportError:
        pass
    return out


def plot_iterations(rows: list[dict], path: Path) -> Path | None:
    if not rows:
        return None
    plt = _plt()
    layers = [k for k in rows[0]["layers"] if k != "all"] + ["all"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.5 + 0.28 * max(len(layers), 8)))
    for ax, key, title in ((axes[0], "cos_reward", "cos(policy update, reward delta)"),
                           (axes[1], "cos_previous", "cos(policy update, previous update)")):
        grid = [[float("nan") if r["layers"][lay][key] is None else r["layers"][lay][key] for r in rows]
                for lay in layers]
        im = ax.imshow(grid, cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        ax.set(title=title, xticks=range(len(rows)), xticklabels=[f"it{r['iteration']}" for r in rows],
               yticks=range(len(layers)), yticklabels=layers)
        fig.colorbar(im, ax=ax)
    for r in rows:
        axes[2].plot([r["layers"][lay]["update_norm"] for lay in layers[:-1]] or [r["layers"]["all"]["update_norm"]],
                     marker=".", label=f"it{r['iteration']} ({r['mode']})")
    axes[2].set(title="policy update norm per layer", xlabel="layer", yscale="log")
    axes[2].legend(fontsize=7)
    return _save(fig, path)


def plot_zo(zo: list[dict], moved: list[dict], path: Path) -> Path | None:
    if not zo and not moved:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.4))
    x = list(range(len(zo)))
    axes[0].plot(x, [r["g"] for r in zo], ".", label="g")
    axes[0].plot(x, [r["running_mean"] for r in zo], "-", label="running mean")
    axes[0].axhline(0, color="0.7", lw=0.8)
    axes[0].set(title="projected gradient g", xlabel="ZO update")
    axes[0].legend(fontsize=7)
    axes[1].plot(x, [r["sign_agreement"] for r in zo], marker=".")
    axes[1].set(title="sign agreement with the running mean", xlabel="ZO update", ylim=(0, 1.05))
    shares = [(i, r["guide_share"], r["d"]) for i, r in zip(x, zo) if r["guide_share"] is not None]
    if shares:
        axes[2].plot([s[0] for s in shares], [s[1] for s in shares], marker=".", label="guide share of |z|^2")
        axes[2].plot([s[0] for s in shares], [s[2] for s in shares], "--", label="mixing weight d")
        axes[2].legend(fontsize=7)
    axes[2].set(title="guide vs noise", xlabel="ZO update", ylim=(-0.05, 1.05))
    for mode in sorted({m["mode"] for m in moved}):
        pts = [(m["global_step"], m["moved"]) for m in moved if m["mode"] == mode]
        axes[3].plot(*zip(*pts), marker=".", ls="", label=mode)
    axes[3].set(title="policy movement per step (L2)", xlabel="step", yscale="log" if moved else "linear")
    if moved:
        axes[3].legend(fontsize=7)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------------
# The HTML
def fmt(x) -> str:
    """A report number as the HTML shows it (tests parse it back)."""
    return "–" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
       "font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
       ".note{color:#555}")


def _run_section(k: int, run: analysis.RunData, result: dict, images: dict) -> str:
    cfg = run.config
    parts = [f"<h2>Run {k}: {html.escape(result['label'])}</h2>",
             f"<p>{html.escape(str(run.path))}: algorithm {html.escape(str(cfg.get('algorithm')))}, sampler "
             f"{html.escape(str(cfg.get('sampler')))}, guide {html.escape(str(cfg.get('guide')))}, "
             f"{len(run.records)} steps logged, {len(run.snaps)} snapshots.</p>"]
    if not run.snaps:
        parts.append('<p class="note">No snapshots: the run predates them or ran with --snapshot-every 0; only the '
                     "curves and per-step numbers are shown.</p>")
    parts.append("<h3>Trajectories</h3>" + _img(images.get("trajectory"), "trajectories"))
    for part, t in result["trajectories"].items():
        parts.append(f"<p>{part}: PC1 {t['explained'][0]:.1%}, PC2 {t['explained'][1]:.1%} of the variance.</p>")
        parts.append(_table(["part", "step", "iteration", "mode", "kind", "PC1", "PC2"],
                            [[part, s, i, m, kd, c[0], c[1]] for s, i, m, kd, c in
                             zip(t["global_steps"], t["iterations"], t["modes"], t["kinds"], t["coords"])], "pca"))
    parts.append("<h3>Policy update vs reward delta, per iteration and layer</h3>" + _img(images.get("iterations"),
                                                                                          "angles"))
    rows = [[r["iteration"], r["mode"], lay, s["update_norm"], s["reward_delta_norm"], s["cos_reward"],
             s["angle_reward"], s["cos_previous"], s["angle_previous"]]
            for r in result["iterations"] for lay, s in r["layers"].items()]
    if rows:
        parts.append('<p class="note">reward delta: the reward adapter\'s change over the iteration (what guides the '
                     "next one); none after the last iteration, which refines no reward model.</p>")
        parts.append(_table(["iteration", "mode", "layer", "|policy update|", "|reward delta|", "cos", "angle (deg)",
                             "cos prev update", "angle prev (deg)"], rows, "layers"))
    else:
        parts.append('<p class="note">No complete iteration with snapshots at both ends yet.</p>')
    parts.append("<h3>ZO updates and per-step movement</h3>" + _img(images.get("zo"), "zo"))
    if result["zo_updates"]:
        parts.append(_table(["step", "iteration", "update", "g", "running mean", "sign agreement", "d",
                             "guide share"],
                            [[z["global_step"], z["iteration"], z["update"], z["g"], z["running_mean"],
                              z["sign_agreement"], z["d"], z["guide_share"]] for z in result["zo_updates"]], "zo"))
    if result["moved"]:
        parts.append(_table(["step", "mode", "moved (L2)"], [[m["global_step"], m["mode"], m["moved"]]
                                                             for m in result["moved"]], "moved"))
    return "\n".join(parts)


def build_report(runs: list[analysis.RunData], out: Path) -> Path:
    """Write the PNGs, ``report.json`` and ``report.html`` into ``out``; returns the HTML's path."""
    out.mkdir(parents=True, exist_ok=True)
    for run, label in zip(runs, analysis.unique_labels([r.path for r in runs])):
        run.label = label
    curves = plot_curves(runs, out / "curves.png")
    gold = plot_gold(runs, out / "gold.png")
    sections, results = [], []
    for k, run in enumerate(runs):
        result = analysis.analyse(run)
        traj = result["trajectories"]
        extra = embeddings(traj["policy"]["_points"]) if "policy" in traj else {}
        images = {"trajectory": plot_trajectories(traj, out / f"run{k}-trajectory.png", extra),
                  "iterations": plot_iterations(result["iterations"], out / f"run{k}-iterations.png"),
                  "zo": plot_zo(result["zo_updates"], result["moved"], out / f"run{k}-zo.png")}
        for t in traj.values():
            del t["_points"]
        result["embeddings"] = extra
        result["curve"] = run.curve
        sections.append(_run_section(k, run, result, images))
        results.append(result)
    (out / "report.json").write_text(json.dumps({"runs": results}, indent=1), encoding="utf-8")
    names = ", ".join(html.escape(r.label) for r in runs)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>zopro report: {names}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>zopro report: {names}</h1>\n<h2>Curves</h2>"
            f"{_img(curves, 'curves')}\n<h2>Held-out gold score</h2>" +
            (_img(gold, "gold") if gold else '<p class="note">No in-run evaluation: the runs ran without '
             "--eval-every.</p>") + "\n" + "\n".join(sections) + "\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zopro.train.visualize", description=(
        "Report of one or more run directories: curves, adapter trajectories, policy-reward angles, ZO updates."))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", help="folder for report.html, report.json and the PNGs (default: RUN_DIR/report "
                                      "of the first run)")
    args = parser.parse_args(argv)
    try:
        runs = [analysis.load_run(p) for p in args.run_dirs]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    try:
        path = build_report(runs, out)
    except OSError as err:  # a full disk or a read-only mount: one line
        line = files.disk_error(err, out)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 3
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
