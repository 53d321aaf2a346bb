"""Score finished runs' held-out prompts again, with another number of samples per prompt.

``python -m zopro.evaluate RUN_DIR [RUN_DIR ...] [--eval-samples 8] [--device auto|cpu|cuda] [--threads N]
[--probe-guide A [A ...]]``

For each run: its own config and held-out prompts, the policy before training (the base: LoRA adapters start as the
identity) and the run's final policy adapter, both evaluated as the training program does
(``zopro.train.evaluate`` with ``--eval-samples N``). Prints a markdown row per run (before, after, change with its
paired standard error) and writes nothing into the run. Use it on runs made before a change of the evaluation, or
to tell a run's effect from sampling noise with more samples than the job itself spent. ``--probe-guide`` scores
the final policy moved along the run's guide instead (:func:`probe_guide`): whether the guide carries reward before
ZO steps are spent on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from pathlib import Path

import torch

from zopro import checkpoint
from zopro.train import evaluate, load_judge, load_models, load_prompts, paired_change, resolve_device


def _finished_run(run_dir: Path, eval_samples: int, device: str | None):
    """``(cfg, checkpoint tensors, bundle, tokenizer, judge, held-out prompts)`` of the finished run in ``run_dir``,
    its config's evaluation set to ``eval_samples`` samples per prompt on ``device`` (default: the run's own); the
    bundle holds the base policy (adapters at their start)."""
    # runs made before checksums existed load unverified (reading only)
    saved, loaded = checkpoint.load_finished(run_dir, unverified_legacy=True)
    cfg = dataclasses.replace(saved, eval_samples=eval_samples, device=device or saved.device)
    _, held_out = load_prompts(cfg)
    if not held_out:
        raise ValueError(f"{run_dir}: the run has no held-out prompts (--n-eval-prompts 0)")
    device = resolve_device(cfg)
    bundle, tokenizer = load_models(cfg, device)
    return cfg, loaded.tensors, bundle, tokenizer, load_judge(cfg, device), [r.prompt for r in held_out]


def reevaluate(run_dir: Path, eval_samples: int, device: str | None = None) -> dict:
    """Before/after held-out score of the finished run in ``run_dir`` with ``eval_samples`` samples per prompt, on
    ``device`` (default: the run's own)."""
    cfg, tensors, bundle, tokenizer, judge, prompts = _finished_run(run_dir, eval_samples, device)
    metric, before, texts = evaluate(bundle, tokenizer, judge, prompts, cfg)
    bundle.load_trainable_state_(tensors["trainable"])
    _, after, _ = evaluate(bundle, tokenizer, judge, prompts, cfg, reference_texts=texts)
    change, se = paired_change(before, after)
    return {"run": str(run_dir), "metric": metric, "prompts": len(prompts), "samples": eval_samples,
            "before": statistics.fmean(before), "after": statistics.fmean(after), "change": change, "change_se": se}


def probe_guide(run_dir: Path, distances: list[float], eval_samples: int, device: str | None = None) -> list[dict]:
    """Held-out score of the finished run's final policy moved ``a`` along its guide, for each ``a`` in
    ``distances``: ``theta + a * guide / |guide|``, so ``a`` is a distance in weight space, the unit of
    ``--zo-lr`` steps under ``--zo-scale unit``. The guide is the one the run would target next (``--guide``,
    computed when its last iteration ended). Each row: the distance, the score, and its change against ``a = 0``
    (the same sampling seeds) with the paired standard error. A guide that carries reward shows a rising score for
    small positive ``a``; one that is noise shows changes within their errors at every ``a``."""
    cfg, tensors, bundle, tokenizer, judge, prompts = _finished_run(run_dir, eval_samples, device)
    if "guides_prev" not in tensors:
        raise ValueError(f"{run_dir}: the final checkpoint holds no guide")
    bundle.load_trainable_state_(tensors["trainable"])
    params = bundle.policy_parameters()
    guide = {n: tensors["guides_prev"][n].to(p.device, p.dtype) for n, p in params.items()}
    norm = sum(float(g.double().pow(2).sum()) for g in guide.values()) ** 0.5
    if norm == 0:
        raise ValueError(f"{run_dir}: the run's guide is zero")
    start = {n: p.detach().clone() for n, p in params.items()}
    metric, base, texts = evaluate(bundle, tokenizer, judge, prompts, cfg)
    rows = []
    for a in distances:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n] + (a / norm) * guide[n])
        _, values, _ = evaluate(bundle, tokenizer, judge, prompts, cfg, reference_texts=texts)
        change, se = paired_change(base, values)
        rows.append({"run": str(run_dir), "metric": metric, "distance": a, "guide_norm": norm,
                     "score": statistics.fmean(values), "change": change, "change_se": se})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m zopro.evaluate", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of finished runs")
    parser.add_argument("--eval-samples", type=int, default=8, help="sampled completions per held-out prompt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's own")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    parser.add_argument("--probe-guide", type=float, nargs="+", metavar="A", help=(
        "instead: score the final policy moved A along the run's guide (A a distance in weight space), "
        "against A = 0"))
    args = parser.parse_args(argv)
    if args.eval_samples < 1:
        parser.error(f"--eval-samples must be at least 1, got {args.eval_samples}")
    if args.probe_guide and not all(math.isfinite(a) for a in args.probe_guide):
        parser.error(f"--probe-guide distances must be finite, got {args.probe_guide}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_guide:
        return _print_probe(parser, args)
    print("| run | prompts x samples | before | after | change ± paired SE |\n|---|---:|---:|---:|---:|", flush=True)
    rows = []
    for run_dir in args.runs:
        try:
            r = reevaluate(run_dir, args.eval_samples, args.device)
        except ValueError as err:
            parser.error(str(err))
        print(f"| {run_dir.name} | {r['prompts']} x {r['samples']} | {r['before']:.4f} | {r['after']:.4f} "
              f"| {r['change']:+.4f}{_se(r)} |", flush=True)
        rows.append(r)
    return rows


def _se(row) -> str:
    return f" ± {row['change_se']:.4f}" if row["change_se"] is not None else ""


def _print_probe(parser, args) -> list[dict]:
    print("| run | guide norm | distance | score | change vs 0 ± paired SE |\n|---|---:|---:|---:|---:|", flush=True)
    rows = []
    for run_dir in args.runs:
        try:
            found = probe_guide(run_dir, args.probe_guide, args.eval_samples, args.device)
        except ValueError as err:
            parser.error(str(err))
        for r in found:
            print(f"| {run_dir.name} | {r['guide_norm']:.4f} | {r['distance']:g} | {r['score']:.4f} "
                  f"| {r['change']:+.4f}{_se(r)} |", flush=True)
        rows += found
    return rows


if __name__ == "__main__":
    main()
