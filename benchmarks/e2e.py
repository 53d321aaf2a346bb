"""End to end: the embedded default job over several seeds, the held-out judge score before and after training.

``python -m benchmarks.e2e --seeds 0 1 2 [--tag NAME] [-- extra train flags]`` runs ``python -m zopro.train`` once per
seed (``runs/e2e-<tag>-seed<N>``; a finished run is reused, an unfinished one resumed), then writes
``benchmarks/results/e2e-<tag>-<device>.json`` and ``.md``: per seed the judge score before and after, its change,
wall time, the peak memory of the rollout and of the updates, and the mean ± standard deviation over seeds. Not
part of ``pytest benchmarks/``: each seed of the default job takes about 12 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.conftest import RESULTS_DIR, environment


def run_seed(seed: int, tag: str, extra: list[str]) -> dict:
    out = Path("runs") / f"e2e-{tag}-seed{seed}"
    summary = out / "summary.json"
    t0 = time.perf_counter()
    if not summary.is_file():
        cmd = [sys.executable, "-m", "zopro.train", "--output-dir", str(out), "--seed", str(seed), *extra]
        if (out / "config.json").is_file():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    result = json.loads(summary.read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    ev = result["evaluation"]
    return {"seed": seed, "before": ev["before"], "after": ev["after"], "change": ev["after"] - ev["before"],
            "metric": ev["metric"], "n_eval": ev["n"], "wall_seconds": wall if wall > 1 else None,
            "steps": len(records),
            "peak_rollout_mib": max(r["peak_rollout"] for r in records) / 2**20,
            "peak_zo_update_mib": max((r["peak_update"] for r in records if r["mode"].startswith("zo")),
                                      default=0) / 2**20,
            "peak_fo_update_mib": max((r["peak_update"] for r in records if r["mode"] in ("first-order", "ppo")),
                                      default=0) / 2**20,
            "config": json.loads((out / "config.json").read_text())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tag", default="default")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    rows = [run_seed(s, args.tag, extra) for s in args.seeds]
    env = environment()
    changes = [r["change"] for r in rows]
    mean, std = statistics.mean(changes), statistics.stdev(changes) if len(changes) > 1 else 0.0
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"e2e-{args.tag}-{env['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps({**env, "tag": args.tag, "extra_flags": extra, "rows": rows,
                                                     "change_mean": mean, "change_std": std}, indent=1) + "\n")
    lines = [f"# End to end: `{args.tag}` ({' '.join(extra) or 'default flags'})", "",
             f"{env['date']}: {env['device']}; commit {env.get('commit')}; torch {env['torch']}.", "",
             "| seed | judge score before | after | change | wall (s) | peak rollout MiB | peak ZO update MiB "
             "| peak first-order update MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        wall = f"{r['wall_seconds']:.0f}" if r["wall_seconds"] else "(earlier run)"
        lines.append(f"| {r['seed']} | {r['before']:.4f} | {r['after']:.4f} | {r['change']:+.4f} | {wall} "
                     f"| {r['peak_rollout_mib']:.0f} | {r['peak_zo_update_mib']:.0f} | {r['peak_fo_update_mib']:.0f} |")
    lines += ["", f"Change of the held-out judge score ({rows[0]['metric']}, {rows[0]['n_eval']} prompts): "
              f"mean {mean:+.4f} ± {std:.4f} (standard deviation over {len(rows)} seeds)."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
