"""Score finished runs' held-out prompts again, with another number of samples per prompt.

``python -m zopro.evaluate RUN_DIR [RUN_DIR ...] [--eval-samples 8] [--device auto|cpu|cuda] [--threads N]``

For each run: its own config and held-out prompts, the policy before training (the base: LoRA adapters start as the
identity) and the run's final policy adapter, both evaluated as the training program does
(``zopro.train.evaluate`` with ``--eval-samples N``). Prints a markdown row per run (before, after, change with its
paired standard error) and writes nothing into the run. Use it on runs made before a change of the evaluation, or
to tell a run's effect from sampling noise with more samples than the job itself spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from pathlib import Path

import torch

from zopro import checkpoint
from zopro.config import TrainConfig, load_saved, validate
from zopro.train import evaluate, load_judge, load_models, load_prompts, paired_change, resolve_device


def reevaluate(run_dir: Path, eval_samples: int, device: str | None = None) -> dict:
    """Before/after held-out score of the finished run in ``run_dir`` with ``eval_samples`` samples per prompt, on
    ``device`` (default: the run's own)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.json)")
    try:
        saved = validate(TrainConfig(**load_saved(config_path)))
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    cfg = dataclasses.replace(saved, eval_samples=eval_samples, device=device or saved.device)
    # the final checkpoint or nothing, never an earlier one; runs made before checksums existed load unverified
    loaded = checkpoint.load(run_dir, fallback=False, unverified_legacy=True)
    if loaded is None or loaded.meta["phase"] != "done":
        raise ValueError(f"{run_dir}: not a finished run (no checkpoint in phase 'done')")
    _, held_out = load_prompts(cfg)
    if not held_out:
        raise ValueError(f"{run_dir}: the run has no held-out prompts (--n-eval-prompts 0)")
    device = resolve_device(cfg)
    bundle, tokenizer = load_models(cfg, device)
    judge = load_judge(cfg, device)
    prompts = [r.prompt for r in held_out]
    metric, before, texts = evaluate(bundle, tokenizer, judge, prompts, cfg)
    bundle.load_trainable_state_(loaded.tensors["trainable"])
    _, after, _ = evaluate(bundle, tokenizer, judge, prompts, cfg, reference_texts=texts)
    change, se = paired_change(before, after)
    return {"run": str(run_dir), "metric": metric, "prompts": len(prompts), "samples": eval_samples,
            "before": statistics.fmean(before), "after": statistics.fmean(after), "change": change, "change_se": se}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m zopro.evaluate", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of finished runs")
    parser.add_argument("--eval-samples", type=int, default=8, help="sampled completions per held-out prompt")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run's own")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    args = parser.parse_args(argv)
    if args.eval_samples < 1:
        parser.error(f"--eval-samples must be at least 1, got {args.eval_samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| run | prompts x samples | before | after | change ± paired SE |\n|---|---:|---:|---:|---:|", flush=True)
    rows = []
    for run_dir in args.runs:
        try:
            r = reevaluate(run_dir, args.eval_samples, args.device)
        except ValueError as err:
            parser.error(str(err))
        se = f" ± {r['change_se']:.4f}" if r["change_se"] is not None else ""
        print(f"| {run_dir.name} | {r['prompts']} x {r['samples']} | {r['before']:.4f} | {r['after']:.4f} "
              f"| {r['change']:+.4f}{se} |", flush=True)
        rows.append(r)
    return rows


if __name__ == "__main__":
    main()
