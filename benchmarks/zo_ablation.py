"""What the ZO iterations add, against their controls, from one shared iteration 0 per seed.

``python -m benchmarks.zo_ablation --seeds 0 1 2 [--arms iter1 full fo placebo NAME:FIELD=VALUE,...] [--tag NAME]
[--runs-dir runs/ablation] [-- train flags]``

Per seed, iteration 0 (first-order RLOO) runs once and is checkpointed after its last step, before the iteration
ends. It is the same in every arm: nothing an arm changes acts before the end of iteration 0 (the guide, the ZO
settings, the algorithm of later iterations, the number of iterations). Each arm is a copy of that run directory
whose ``config.json`` differs in those fields only, resumed by ``zopro.train.run``: the job a fresh run with the arm's
config would be, bit for bit (``benchmarks/test_zo_ablation.py`` checks it on the smoke task), at the cost of one
iteration 0 per seed instead of one per arm. Arms:

* ``iter1``: ``--iterations 1``, iteration 0 alone (the issue's (b));
* ``full``: the job as configured (a);
* ``fo``: ``--algorithm rloo``, first-order RLOO in every iteration (c);
* ``placebo``: ``--guide placebo``, ZO along random directions with the guide's per-tensor norms (d);
* ``NAME:FIELD=VALUE,FIELD=VALUE``: any other (e.g. ``adam:guide=adam``), values parsed as the flags are.

Every arm's held-out evaluation uses the same prompts and sampling seeds, so two arms' per-prompt scores pair up.
For each arm against ``iter1``: per seed the mean per-prompt difference, and over seeds its mean ± standard error;
for ``full`` also the share of what ``fo`` adds over ``iter1`` that it recovers. Writes
``benchmarks/results/zo-ablation-<tag>-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment
from zopro.train import checkpoint, files, program, rundir
from zopro.train.config import TrainConfig, build_parser, coerce, from_args

ARMS = {"iter1": {"iterations": 1}, "full": {}, "fo": {"algorithm": "rloo"}, "placebo": {"guide": "placebo"}}


def parse_arm(text: str) -> tuple[str, dict]:
    """``name`` of a built-in arm, or ``NAME:FIELD=VALUE,...`` with values parsed as the command line parses them."""
    if text in ARMS:
        return text, ARMS[text]
    name, sep, spec = text.partition(":")
    if not sep or not spec:
        raise ValueError(f"--arms: {text!r} is neither one of {', '.join(ARMS)} nor NAME:FIELD=VALUE,...")
    argv = []
    for item in spec.split(","):
        field, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--arms: {item!r} in {text!r} is not FIELD=VALUE")
        argv += [f"--{field.replace('_', '-')}", value]
    args = build_parser().parse_args(argv)
    # the parser hands back text; coerce converts it as from_args does for the command line
    return name, {f: coerce(f, v) for f, v in vars(args).items() if v is not None and f not in ("config", "resume")}


def iteration0(cfg: TrainConfig) -> Path:
    """The run directory of ``cfg`` checkpointed after the last step of iteration 0 (reused when already there)."""
    out = Path(cfg.output_dir)
    done = out.with_name(out.name + ".done")  # beside the run: a run directory holds only the run's own files
    if done.is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    program.run(cfg, pause_after_iteration=0, progress=False)
    done.write_text("iteration 0 complete\n")
    return out


def arm_run(base: Path, cfg0: TrainConfig, overrides: dict, out: Path) -> dict:
    """The arm's finished run in ``out``: a copy of ``base`` resumed with the arm's config (reused when finished)."""
    if not (out / "summary.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        cfg = dataclasses.replace(cfg0, output_dir=str(out), **overrides)
        rundir.branch(base, cfg)
        program.run(cfg, resume=True, progress=False)
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = [r for r in records if r["iteration"] > 0]
    return {"before": [s["before_score"] for s in samples], "after": [s["after_score"] for s in samples],
            "change": summary["evaluation"]["change"], "change_se": summary["evaluation"]["change_se"],
            "wall_seconds": summary["wall_seconds"],
            "later_step_time": statistics.fmean(r["step_time"] for r in later) if later else None,
            "peak_rollout_mib": max(r["peak_rollout"] for r in records) / 2**20,
            "peak_later_update_mib": max((r["peak_update"] for r in later), default=0) / 2**20,
            "later_judge_score": statistics.fmean(r["judge_score"] for r in later)
            if later and None not in [r["judge_score"] for r in later] else None,
            "later_kl": statistics.fmean(r["kl"] for r in later) if later else None,
            # the projected gradients of ZO steps: their sign agreement is what a line search along the guide has
            "later_grads": [r["grad"] for r in later if r["mode"].startswith("zo")]}


def movement(iter1: Path, arm: Path) -> dict:
    """How the arm's later iterations moved the policy adapter, against iteration 0's update (both from checkpoints).

    ``u0`` is iteration 0's update (the guide ``prev`` that ``iter1`` ends with), ``u`` the arm's final policy minus
    iteration 0's last; ``back`` = -<u, u0> / |u0|^2 is the share of iteration 0's update that ``u`` undoes."""
    ref, end = checkpoint.load(iter1), checkpoint.load(arm)
    u0 = ref.tensors["guides_prev"]
    u = {n: end.tensors["trainable"][f"policy.{n}"] - ref.tensors["trainable"][f"policy.{n}"] for n in u0}
    dot = sum(float((u[n].double() * u0[n].double()).sum()) for n in u0)
    n0 = math.sqrt(sum(float(u0[n].double().square().sum()) for n in u0))
    nu = math.sqrt(sum(float(u[n].double().square().sum()) for n in u0))
    return {"iteration0_norm": n0, "later_norm": nu, "cosine": dot / (n0 * nu) if n0 and nu else None,
            "back": -dot / n0**2 if n0 else None}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean per-prompt difference ``a - b`` and its standard error over prompts."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def mean_se(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None)


def analyse(results: dict[str, dict[int, dict]]) -> dict:
    """Per arm against ``iter1``: per-seed paired differences of the after-scores, their mean ± SE over seeds."""
    base = results.get("iter1")
    table = {}
    for name, per_seed in results.items():
        row = {"change": mean_se([r["change"] for r in per_seed.values()])}
        if base is not None and name != "iter1":
            diffs = {s: paired(r["after"], base[s]["after"]) for s, r in per_seed.items() if s in base}
            row["vs_iter1_per_seed"] = diffs
            row["vs_iter1"] = mean_se([d[0] for d in diffs.values()])
        table[name] = row
    if "full" in table and "fo" in table and "vs_iter1" in table["fo"] and "vs_iter1" in table["full"]:
        fo_gain = table["fo"]["vs_iter1"][0]
        table["full"]["recovered_share_of_fo"] = table["full"]["vs_iter1"][0] / fo_gain if fo_gain else None
    return table


def markdown(env: dict, tag: str, extra: list[str], results: dict, table: dict) -> str:
    def pm(pair):
        return f"{pair[0]:+.4f}" + (f" ± {pair[1]:.4f}" if pair[1] is not None else "")

    lines = [f"# ZO ablation `{tag}` ({' '.join(extra) or 'default flags'})", "",
             f"{env['date']}: {env['device']}; commit {env.get('commit')}; torch {env['torch']}.", "",
             "| arm | seeds | held-out change (mean ± SE over seeds) | vs iter1: after-score difference (mean ± SE "
             "over seeds) | per seed (± paired SE over prompts) | rollout judge score, iterations >= 1 | KL, "
             "iterations >= 1 | step time (s), iterations >= 1 | peak update MiB, iterations >= 1 |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, row in table.items():
        runs = results[name].values()
        per_seed = "; ".join(f"{s}: {d[0]:+.4f} ± {d[1]:.4f}" for s, d in row.get("vs_iter1_per_seed", {}).items())

        def avg(key, fmt, runs=runs):
            vals = [r[key] for r in runs if r[key] is not None]
            return format(statistics.fmean(vals), fmt) if vals else "-"
        lines.append(f"| {name} | {len(results[name])} | {pm(row['change'])} | "
                     f"{pm(row['vs_iter1']) if 'vs_iter1' in row else '-'} | {per_seed or '-'} | "
                     f"{avg('later_judge_score', '.3f')} | {avg('later_kl', '.3f')} | {avg('later_step_time', '.2f')} "
                     f"| {avg('peak_later_update_mib', '.0f')} |")
    moved = [(name, s, r["movement"]) for name, per_seed in results.items() for s, r in per_seed.items()
             if r.get("movement")]
    if moved:
        lines += ["", "| arm | seed | iteration 0's update (L2) | later iterations' movement (L2) | cosine with "
                      "iteration 0's update | share of iteration 0's update undone | ZO steps with g > 0 |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, s, m in moved:
            grads = results[name][s]["later_grads"]
            pos = f"{sum(g > 0 for g in grads)}/{len(grads)}" if grads else "-"
            cos = f"{m['cosine']:+.4f}" if m["cosine"] is not None else "-"
            back = f"{m['back']:+.3f}" if m["back"] is not None else "-"
            lines.append(f"| {name} | {s} | {m['iteration0_norm']:.3f} | {m['later_norm']:.3f} | {cos} | {back} "
                         f"| {pos} |")
    if table.get("full", {}).get("recovered_share_of_fo") is not None:
        lines += ["", f"Share of first-order's gain over iter1 that the ZO iterations recover: "
                      f"{table['full']['recovered_share_of_fo']:.2f}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zo_ablation")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--tag", default="default")
    parser.add_argument("--runs-dir", default="runs/ablation")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    arms = dict(parse_arm(a) for a in args.arms)
    results: dict[str, dict[int, dict]] = {name: {} for name in arms}
    for seed in args.seeds:  # seed-major: a cut-short sweep still has every arm
        cfg0, _ = from_args([*extra, "--seed", str(seed), "--output-dir",
                             str(Path(args.runs_dir) / f"{args.tag}-seed{seed}" / "iteration0")])
        t0 = time.perf_counter()
        base = iteration0(cfg0)
        print(f"seed {seed}: iteration 0 in {time.perf_counter() - t0:.0f} s", flush=True)
        for name, overrides in arms.items():
            t0 = time.perf_counter()
            results[name][seed] = arm_run(base, cfg0, overrides, base.parent / name)
            if name != "iter1" and "iter1" in arms:
                results[name][seed]["movement"] = movement(base.parent / "iter1", base.parent / name)
            print(f"seed {seed}: {name} change {results[name][seed]['change']:+.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        # written after every seed: a sweep that is stopped or dies keeps the seeds it finished
        table, text = write_results(Path(args.results_dir), args.tag, extra, arms, results)
    print(text)
    return table


def write_results(out: Path, tag: str, extra: list[str], arms: dict, results: dict) -> tuple[dict, str]:
    table = analyse(results)
    env = environment()
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"zo-ablation-{tag}-{env['device_kind']}"
    files.atomic_write_text(stem.with_suffix(".json"), json.dumps(
        {**env, "tag": tag, "extra_flags": extra, "arms": arms, "results": results, "table": table}, indent=1) + "\n")
    text = markdown(env, tag, extra, results, table)
    files.atomic_write_text(stem.with_suffix(".md"), text)
    return table, text

if __name__ == "__main__":
    main()
