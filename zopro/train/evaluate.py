"""Score finished runs' held-out prompts again, with another number of samples per prompt.

``python -m zopro.train.evaluate RUN_DIR [RUN_DIR ...] [--eval-samples 8] [--device auto|cpu|cuda] [--threads N]
[--probe-guide A [A ...] | --since-step S]``

For each run: its own config and held-out prompts, the policy before training (the base: LoRA adapters start as the
identity) and the run's final policy adapter, both evaluated as the training program does
(``zopro.train.heldout.evaluate`` with ``--eval-samples N``). Prints a markdown row per run (before, after,
change with its paired standard error) and writes nothing into the run. Use it on runs made before a change of the
evaluation, or to tell a run's effect from sampling noise with more samples than the job itself spent.
``--probe-guide`` scores the final policy moved along the run's guide instead (:func:`probe_guide`): whether the
guide carries reward before ZO steps are spent on it. ``--since-step S`` scores the run's snapshot at global step S
against its final policy instead (:func:`since_step`): what the steps after S added, e.g. whether a run's last third
still learns, on every held-out prompt rather than the learning curve's few.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from zopro.train import checkpoint, preflight
from zopro.train.heldout import probe_guide, reevaluate, since_step
from zopro.train.loading import resolve_device


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m zopro.train.evaluate", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of finished runs")
    parser.add_argument("--eval-samples", type=int, default=8, help="sampled completions per held-out prompt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's own")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--probe-guide", type=float, nargs="+", metavar="A", help=(
        "instead: score the final policy moved A along the run's guide (A a distance in weight space), "
        "against A = 0"))
    parser.add_argument("--since-step", type=int, metavar="S", help=(
        "instead: the run's snapshot at global step S against its final policy (what the steps after S added)"))
    args = parser.parse_args(argv)
    if args.probe_guide and args.since_step is not None:
        parser.error("--probe-guide and --since-step are two different questions: give one")
    if args.eval_samples < 1:
        parser.error(f"--eval-samples must be at least 1, got {args.eval_samples}")
    if args.probe_guide and not all(math.isfinite(a) for a in args.probe_guide):
        parser.error(f"--probe-guide distances must be finite, got {args.probe_guide}")
    try:
        preflight.check_threads(args.threads)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    n, device = args.eval_samples, args.device
    if args.probe_guide:
        return _table(parser, args.runs, device, n, "| run | guide norm | distance | score | change vs 0 ± paired SE |",
                      lambda d: probe_guide(d, args.probe_guide, n, device),
                      lambda r: f"{r['guide_norm']:.4f} | {r['distance']:g} | {r['score']:.4f} | {_change(r)}")
    if args.since_step is not None:
        return _table(parser, args.runs, device, n,
                      "| run | prompts x samples | step | score then | KL then | final score | final KL "
                      "| change ± paired SE |",
                      lambda d: [since_step(d, args.since_step, n, device)],
                      lambda r: f"{r['prompts']} x {r['samples']} | {r['step']} | {r['before']:.4f} | "
                                f"{_num(r['kl_before'])} | {r['after']:.4f} | {_num(r['kl'])} | {_change(r)}")
    return _table(parser, args.runs, device, n, "| run | prompts x samples | before | after | change ± paired SE |",
                  lambda d: [reevaluate(d, n, device)],
                  lambda r: f"{r['prompts']} x {r['samples']} | {r['before']:.4f} | {r['after']:.4f} | {_change(r)}")


def _table(parser, runs: list[Path], device, eval_samples: int, header: str, measure, cells) -> list[dict]:
    """A markdown table with a row per result of ``measure(run_dir)`` for each run (``cells(result)`` after the run's
    name), printed as each run is done; a run that does not fit or cannot be read ends the command in one line."""
    print(header + "\n|---|" + "---:|" * (header.count("|") - 2), flush=True)
    rows = []
    for run_dir in runs:
        try:
            _check_fits(run_dir, eval_samples, device)
            found = measure(run_dir)
        except ValueError as err:
            parser.error(str(err))
        for r in found:
            print(f"| {run_dir.name} | {cells(r)} |", flush=True)
        rows += found
    return rows


def _check_fits(run_dir: Path, eval_samples: int, device: str | None) -> None:
    """The run's evaluation with ``eval_samples`` samples a prompt fits ``device`` (``zopro.train.preflight``'s
    lower bound of one generate call); ValueError naming the setting otherwise, before any model is loaded."""
    saved, _ = checkpoint.load_finished(run_dir, unverified_legacy=True)
    cfg = dataclasses.replace(saved, eval_samples=eval_samples, device=device or saved.device)
    preflight.check_memory(cfg, resolve_device(cfg), *preflight.prompt_counts(cfg))


def _change(row) -> str:
    return f"{row['change']:+.4f}" + (f" ± {row['change_se']:.4f}" if row["change_se"] is not None else "")


def _num(value) -> str:
    return f"{value:.3f}" if value is not None else "-"


if __name__ == "__main__":
    main()
