"""Data-parallel step time against ranks: the same job, the same global batch, one process against ``torchrun``.

``python -m benchmarks.distributed [--ranks 1 2] [--tag NAME] [--runs-dir DIR] [-- extra train flags]`` runs
``python -m zopro.train`` once per arm and writes ``benchmarks/results/distributed-<tag>-<device>.json`` and ``.md``:
the median step time of the first-order and the ZO steps (``metrics.jsonl``'s ``step_time``, measured on rank 0,
which waits for the slowest rank at each collective) and the job's wall time. Arms, all with
``--data-shards`` = the largest rank count, so every arm computes the same rows (and, by ``zopro.train.distributed``,
the same weights bit for bit):

* ``1 process, T threads`` for T = 1 and T = the largest rank count (one process given every core the ranks use);
* ``N ranks, 1 thread each`` for each N in ``--ranks`` above 1 (``torchrun --standalone --nproc-per-node N``).

The default task is the smoke preset widened to 8 prompts x 2 answers of 16 tokens, 2 iterations of 4 steps: small
enough for a 2-core machine, large enough that a step's compute is not all process overhead. On a CPU, ranks share
the machine's cores (and its memory bandwidth): N ranks on N cores compete as N threads of one process do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, environment

TASK = ["--preset", "smoke", "--prompts-per-step", "8", "--max-new-tokens", "16", "--steps-per-iteration", "4",
        "--reward-pairs", "8", "--reward-batch", "4"]


def run_arm(name: str, ranks: int, threads: int, shards: int, extra: list[str], runs_dir: Path) -> dict:
    out = runs_dir / f"dist-{name.replace(' ', '_').replace(',', '')}"
    flags = ["-m", "zopro.train", *TASK, *extra, "--data-shards", str(shards), "--threads", str(threads),
             "--output-dir", str(out)]
    if ranks == 1:
        cmd = [sys.executable, *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    times = {mode: [r["step_time"] for r in records if (r["mode"] == "first-order") == (mode == "first-order")]
             for mode in ("first-order", "zo")}
    return {"arm": name, "ranks": ranks, "threads": threads, "shards": shards, "wall_seconds": wall,
            "step_time_median": {m: statistics.median(t) if t else None for m, t in times.items()},
            "step_times": times}


def table(rows: list[dict]) -> str:
    base = rows[0]["step_time_median"]
    lines = ["| arm | first-order step (s) | ZO step (s) | ZO speed-up vs first arm | job wall (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        fo, zo = r["step_time_median"]["first-order"], r["step_time_median"]["zo"]
        lines.append(f"| {r['arm']} | {fo:.3f} | {zo:.3f} | {base['zo'] / zo:.2f}x | {r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tag", default="smoke")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("extra", nargs="*", help="train flags after --")
    args = parser.parse_args(argv)
    widest = max(args.ranks)
    runs_dir = Path(args.runs_dir) / f"distributed-{args.tag}-{int(time.time())}"
    arms = [(f"1 process, {t} thread{'s' * (t > 1)}", 1, t) for t in sorted({1, widest})]
    arms += [(f"{n} ranks, 1 thread each", n, 1) for n in args.ranks if n > 1]
    rows = [run_arm(name, ranks, threads, widest, args.extra, runs_dir) for name, ranks, threads in arms]
    env = environment()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"distributed-{args.tag}-{env['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "task": TASK + args.extra, "rows": rows},
                                                    indent=1))
    text = f"{table(rows)}\n\n{env['device']}, torch {env['torch']}, {env['date']}\n"
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
