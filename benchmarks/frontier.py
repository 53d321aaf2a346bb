"""The reward–KL frontier: every method on the reference task, the gold score against KL, compute and wall-clock.

``python -m benchmarks.frontier [--methods rloo ppo zopro mezo] [--seeds 0 1 2] [--tag NAME] [-- extra train flags]``
runs ``python -m zopro.train`` once per method and seed (``runs/frontier-<tag>-<method>-seed<N>``; a finished run is
reused, an unfinished one resumed) and writes ``benchmarks/results/history/frontier-<tag>-<device>.json``, ``.md``
and ``.png``.

Every method runs the same job (``FRONTIER``, then the extra flags): the describe task, the gold judge (VADER), and by
default ``--reward judge``, so the methods are compared as optimisers of the gold score itself and not through a
reward model's errors (pass ``-- --reward model`` for the paper's loop). All arms of a seed share the sampling seeds
of every evaluation, so their curves are paired. Only the policy's optimisation differs:

* ``rloo``: first-order RLOO (backprop, AdamW) in every iteration;
* ``ppo``: first-order PPO with a value adapter and head, GAE, ``--ppo-epochs`` epochs (TRL's defaults);
* ``zopro``: the paper's ZOPrO: first-order RLOO in iteration 0, then two-point ZO along the previous update;
* ``mezo``: MeZO-style isotropic two-point ZO from the first step, no first-order step anywhere.

A run's learning curve is its in-run evaluations (``eval_curve.jsonl``: one answer to each of ``--eval-curve-prompts``
held-out prompts every ``--eval-every`` steps, the gold score and KL(policy || reference) of the answers) against the
training's forward token-passes and its cumulative step time; the table gives the final held-out evaluation (all
``--n-eval-prompts``, ``--eval-samples`` answers each): the change of the gold score with its paired standard error over
prompts, per seed, and the mean over seeds ± its standard error; KL, length and what shows reward hacking beside it.
``--tag smoke -- --preset smoke ...`` runs the whole pipeline on the tiny random model in seconds (the benchmark
suite does that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment

METHODS = {
    "rloo": ["--algorithm", "rloo"],
    "ppo": ["--algorithm", "ppo"],
    "zopro": ["--algorithm", "zopro"],
    # iteration 0 alone (its 6 first-order steps, then the final evaluation): what the ZO iterations must add to
    "iter0": ["--algorithm", "zopro", "--iterations", "1"],
    # an isotropic z over the d LoRA weights has norm ~sqrt(d) (~2200 for SmolLM2-135M's r-8 adapters): the ZOPrO lr,
    # sized for unit guided directions, diverges; 1e-5 keeps a step's norm near 0.1 (benchmarks/e2e.py measured it)
    "mezo": ["--algorithm", "zopro", "--sampler", "isotropic", "--first-order-iteration0", "false", "--zo-lr", "1e-5"],
    # Populations: 8 antithetic pairs a step, losses z-scored within the step. eps from a probe on training
    # prompts only (RESULTS.md): the largest of {0.3, 1, 3, 10} (core) / {1e-3, 3e-3, 1e-2} (lora, per weight) whose
    # mean per-answer |delta log p| stays ~0.05, well inside the 0.2 clip; lr so that a step (~0.35 lr for 8 unit
    # directions with shaped fitness ~1) is about eps. Not tuned on held-out prompts.
    "es-core": ["--algorithm", "zopro", "--first-order-iteration0", "false", "--zo-space", "core", "--sampler",
                "isotropic", "--zo-population", "8", "--zo-fitness", "zscore", "--zo-eps", "1", "--zo-lr", "3"],
    # the diagonal of the core (r numbers a module, ESSA's singular values): 1,680 dimensions for SmolLM2's r-8
    # adapters against the core's 13,440, so the run's 8 x 18 probes cover a larger share of the space; a larger lr
    # than es-core's, which moved KL by ~0.02 in 6 steps
    "es-sv": ["--algorithm", "zopro", "--first-order-iteration0", "false", "--zo-space", "singular", "--sampler",
              "isotropic", "--zo-population", "8", "--zo-fitness", "zscore", "--zo-eps", "1", "--zo-lr", "10"],
    "es-lora": ["--algorithm", "zopro", "--first-order-iteration0", "false", "--sampler", "isotropic",
                "--zo-population", "8", "--zo-fitness", "zscore", "--zo-eps", "1e-3", "--zo-lr", "1e-3"],
    "zopro-pop": ["--algorithm", "zopro", "--guide-blocks", "layer", "--zo-population", "8", "--zo-fitness", "zscore",
                  "--zo-lr", "1"],
    # the same with centred ranks instead of z-scores (the issue's "measure which")
    "zopro-pop-ranks": ["--algorithm", "zopro", "--guide-blocks", "layer", "--zo-population", "8", "--zo-fitness",
                        "ranks", "--zo-lr", "1"],
    # ES as Qiu et al.: each member scored by the gold reward of its greedy answers to the step's prompts; eps 3 in
    # the core (mean |delta log p| ~0.15 an answer in the probe) so that greedy answers can change between members
    "es-gen": ["--algorithm", "zopro", "--first-order-iteration0", "false", "--zo-space", "core", "--sampler",
               "isotropic", "--zo-population", "8", "--zo-fitness", "zscore", "--zo-objective", "generation",
               "--zo-eps", "3", "--zo-lr", "6"],
    "core-after-fo": ["--algorithm", "zopro", "--zo-space", "core", "--sampler", "isotropic", "--zo-population", "8",
                      "--zo-fitness", "zscore", "--zo-eps", "1", "--zo-lr", "3"],
}
DEFAULT_METHODS = ["rloo", "ppo", "zopro", "mezo"]
# The frontier's job: the default job optimising the gold score directly
FRONTIER = ["--reward", "judge"]


def run_arm(method: str, seed: int, tag: str, extra: list[str], runs_dir: Path, quiet: bool) -> dict:
    """One method and seed: the run (reused when finished, resumed when not) and what the frontier reads of it."""
    out = runs_dir / f"frontier-{tag}-{method}-seed{seed}"
    t0 = time.perf_counter()
    if not (out / "summary.json").is_file():
        cmd = [sys.executable, "-m", "zopro.train", "--output-dir", str(out), "--seed", str(seed), *FRONTIER,
               *METHODS[method], *extra]
        if (out / "config.json").is_file():
            cmd.append("--resume")
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None,
                       stderr=subprocess.DEVNULL if quiet else None)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    curve_path = out / "eval_curve.jsonl"
    if not curve_path.is_file():
        raise ValueError(f"{out}: no eval_curve.jsonl (the frontier needs --eval-every > 0)")
    curve = [json.loads(line) for line in curve_path.read_text().splitlines() if line.strip()]
    held_out = summary["evaluation"].get("held_out") or {}
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines() if line.strip()]
    return {"method": method, "seed": seed, "curve": curve, "held_out": held_out,
            "after_scores": [s["after_score"] for s in samples],  # per held-out prompt: arms of a seed pair up
            "before": summary["evaluation"]["before"], "after": summary["evaluation"]["after"],
            "wall_seconds": wall if wall >= 1 else summary.get("wall_seconds"),
            "config": json.loads((out / "config.json").read_text())}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and its standard error (None for one value)."""
    if len(values) < 2:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def aggregate(rows: list[dict]) -> dict[str, dict]:
    """Per method: the curve's points averaged over seeds (each point: mean and SE over seeds of the gold score, the
    KL, the token-passes and the training seconds), and the final held-out change (per seed, mean ± SE over seeds)."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        n_points = min(len(r["curve"]) for r in rs)
        points = []
        for i in range(n_points):
            at = [r["curve"][i] for r in rs]
            points.append({"global_step": at[0]["global_step"],
                           **{k: mean_se([p[k] for p in at]) for k in ("score", "kl", "token_passes",
                                                                       "train_seconds")}})
        final = {k: mean_se([r["held_out"][k] for r in rs]) for k in ("score_change", "kl", "tokens", "repeat_3",
                                                                        "distinct_2") if all(k in r["held_out"]
                                                                                             for r in rs)}
        out[method] = {"seeds": [r["seed"] for r in rs], "points": points, "final": final,
                       "wall_seconds": mean_se([r["wall_seconds"] for r in rs if r["wall_seconds"]] or [0.0])}
    return out


def against(rows: list[dict], baseline: str) -> dict[str, dict]:
    """Each method against ``baseline`` on the same seeds: per seed the mean per-prompt difference of the final
    held-out scores (the arms of a seed share prompts and sampling seeds) and its paired standard error; over seeds
    the mean ± its standard error. Rows without per-prompt scores (older results) are left out."""
    base = {r["seed"]: r["after_scores"] for r in rows if r["method"] == baseline and r.get("after_scores")}
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        if method == baseline:
            continue
        per_seed = {}
        for r in rows:
            if r["method"] == method and r.get("after_scores") and r["seed"] in base:
                d = [a - b for a, b in zip(r["after_scores"], base[r["seed"]], strict=True)]
                per_seed[r["seed"]] = (statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)))
        if per_seed:
            out[method] = {"per_seed": per_seed, "mean": mean_se([m for m, _ in per_seed.values()])}
    return out


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    """Three panels: the gold score against KL (the frontier), against forward token-passes and against training
    seconds; mean over seeds with ± one standard error as bars or bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, s in summary.items():
        pts = s["points"]
        score = [p["score"][0] for p in pts]
        se = [p["score"][1] or 0.0 for p in pts]
        lo = [m - e for m, e in zip(score, se, strict=True)]
        hi = [m + e for m, e in zip(score, se, strict=True)]
        label = f"{method} ({len(s['seeds'])} seeds)"
        kl = [p["kl"][0] for p in pts]
        axes[0].errorbar(kl, score, yerr=se, xerr=[p["kl"][1] or 0.0 for p in pts], marker="o", ms=3, capsize=2,
                         label=label)
        for ax, key in ((axes[1], "token_passes"), (axes[2], "train_seconds")):
            x = [p[key][0] for p in pts]
            ax.plot(x, score, marker=".", label=label)
            ax.fill_between(x, lo, hi, alpha=0.15)
    axes[0].set(xlabel="KL(policy || reference), nats per answer", ylabel="gold score of held-out answers",
                title=f"{title}: reward–KL frontier")
    axes[1].set(xlabel="forward token-passes of training", title="against compute")
    axes[2].set(xlabel="training seconds (sum of step times)", title="against wall-clock")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pm(value: tuple[float, float | None], fmt: str, sign: str = "") -> str:
    mean, se = value
    return f"{mean:{sign}{fmt}}" + (f" ± {se:{fmt}}" if se is not None else "")


def markdown(env: dict, tag: str, extra: list[str], rows: list[dict], summary: dict[str, dict]) -> str:
    cfg = rows[0]["config"]
    lines = [f"# Reward–KL frontier: `{tag}` ({' '.join(FRONTIER + extra)})", "",
             f"{env['date']}: {env['device']}; commit {env.get('commit')}; torch {env['torch']}. Task "
             f"{cfg['dataset']}, judge {cfg['judge']}, reward {cfg['reward']}; {cfg['iterations']} x "
             f"{cfg['steps_per_iteration']} steps of {cfg['prompts_per_step']} prompts x {cfg['k']} answers; held out "
             f"{cfg['n_eval_prompts']} prompts x {cfg['eval_samples']} answers.", "",
             "| method | seeds | gold score change (held out) | KL | answer tokens | repeated trigrams | distinct-2 "
             "| curve: last gold score | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, s in summary.items():
        f = s["final"]
        last = s["points"][-1]
        lines.append(f"| {method} | {len(s['seeds'])} | {_pm(f['score_change'], '.4f', '+')} | {_pm(f['kl'], '.3f')} "
                     f"| {_pm(f['tokens'], '.1f')} | {_pm(f['repeat_3'], '.4f')} | {_pm(f['distinct_2'], '.4f')} "
                     f"| {_pm(last['score'], '.4f')} | {_pm(s['wall_seconds'], '.0f')} |")
    lines += ["", "Per run (the change's ± is its paired standard error over held-out prompts):", "",
              "| method | seed | before | after | change | KL | wall (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        h = r["held_out"]
        lines.append(f"| {r['method']} | {r['seed']} | {r['before']:.4f} | {r['after']:.4f} | "
                     f"{h['score_change']:+.4f} ± {h['score_change_se']:.4f} | {h['kl']:.3f} | "
                     f"{r['wall_seconds'] or 0:.0f} |")
    lines += ["", "In the first table ± is the standard error of the mean over seeds."]
    for baseline in ("iter0", "zopro", "zopro-pop"):
        versus = against(rows, baseline)
        if versus:
            lines += ["", f"Against `{baseline}` on the same seeds (final held-out scores, per-prompt differences; per "
                      "seed ± its paired standard error, over seeds ± the standard error of the mean):", "",
                      "| method | per seed | mean over seeds |", "|---|---|---:|"]
            for method, v in versus.items():
                seeds = ", ".join(f"{s}: {m:+.4f} ± {e:.4f}" + (f" ({m / e:+.1f} SE)" if e else "")
                                  for s, (m, e) in v["per_seed"].items())
                lines.append(f"| {method} | {seeds} | {_pm(v['mean'], '.4f', '+')} |")
    return "\n".join(lines) + "\n"


def _job_flags(flags: list[str]) -> list[str]:
    """The extra flags that make a different job: all but ``--threads N``, which sets how many cores a run uses (each
    row's config keeps it): the same job, though a reduction split over more threads may round differently."""
    out, value_of_threads = [], False
    for a in flags:
        if not value_of_threads and a != "--threads" and not a.startswith("--threads="):
            out.append(a)
        value_of_threads = a == "--threads"
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontier")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="default")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--quiet", action="store_true", help="hide the training jobs' own output")
    parser.add_argument("--include", nargs="*", default=[], metavar="FILE.json", help=(
        "earlier frontier results to show beside these runs (their rows, e.g. other methods on the same job and "
        "seeds); refused when their job's flags differ"))
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    rows = [run_arm(m, s, args.tag, extra, Path(args.runs_dir), args.quiet)  # seed-major: a cut-short sweep
            for s in args.seeds for m in args.methods]                        # still has every method
    for path in args.include:
        earlier = json.loads(Path(path).read_text())
        if _job_flags(earlier.get("extra_flags", [])) != _job_flags(extra):
            raise ValueError(f"--include {path}: its runs took the extra flags {earlier.get('extra_flags')}, these "
                             f"{extra}: not the same job")
        rows += [r for r in earlier["rows"] if (r["method"], r["seed"]) not in {(x["method"], x["seed"]) for x in rows}]
    env = environment()
    summary = aggregate(rows)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"frontier-{args.tag}-{env['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps({**env, "tag": args.tag, "extra_flags": extra, "rows": rows,
                                                     "summary": summary}, indent=1) + "\n")
    text = markdown(env, args.tag, extra, rows, summary)
    stem.with_suffix(".md").write_text(text)
    plot(summary, stem.with_suffix(".png"), args.tag)
    print(text)
    return summary


if __name__ == "__main__":
    main()
