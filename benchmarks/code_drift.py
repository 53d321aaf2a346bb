"""Where a ``--zo-target codes`` run moved the base: along its guide, or elsewhere (the rounding's noise).

``python -m benchmarks.code_drift RUN_DIR [RUN_DIR ...]``

For a finished run with ``--zo-target codes`` (NF4 or int8), the base is loaded as the run loaded it (its codes before
any ZO step) and its final codes from ``base_quantised.pt``; each quantised matrix is dequantised before and after,
and the change ``dW`` is split against the run's guide, each matrix's policy update ``G = scaling * B @ A`` from
``policy_adapter.safetensors`` (the adapter is frozen in those iterations, so it is the guide they had):

* ``along``: ``<dW, G> / |G|`` over all matrices together, the movement along the unit guide;
* ``across``: ``sqrt(|dW|^2 - along^2)``, every other direction: with d = 0.999 the steps hold ~4.5 % isotropic
  noise, so nearly all of it is what the stochastic rounding added;
* ``intended``: ``-sum(lr * g * d)`` over the run's ZO steps (``metrics.jsonl``), the movement along the unit guide
  that the same steps make in float weights (the LoRA arm's update).

Prints one line per run and writes ``benchmarks/results/history/code-drift.json`` (the runs' figures).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment
from zokernels.quant import NF4Weight
from zopro.train import checkpoint, files
from zopro.train.loading import load_models
from zopro.train.quant_target import BASE_LAYER, code_space


def intended(run_dir: Path) -> float:
    """``-sum(lr * g * d)`` over the ZO steps of the run's metrics: the movement along the unit guide they ask for."""
    total = 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["mode"].startswith("zo"):
            total -= r["lr"] * sum(g * d for g, d in zip(r["zo_g"], r["zo_d"]))
    return total


def drift(run_dir: Path) -> dict:
    cfg, _ = checkpoint.load_finished(run_dir)
    if cfg.zo_target != "codes":
        raise ValueError(f"{run_dir}: --zo-target is {cfg.zo_target}, not codes")
    bundle, _ = load_models(cfg, torch.device("cpu"))
    space = code_space(bundle)
    before = {n: w.dequantize().float() for n, w in space.weights.items()}
    codes_before = {n: w.codes.clone() for n, w in space.weights.items()}
    legacy = checkpoint.made_before_output_checksums(run_dir)  # outputs checked against their SHA-256 sums
    space.load_state_(files.torch_load(run_dir / "base_quantised.pt", unchecked_legacy=legacy))
    adapter, _ = files.load_tensors(run_dir / "policy_adapter.safetensors", unchecked_legacy=legacy)
    scaling = cfg.lora_alpha / cfg.lora_r
    dot = dw2 = g2 = 0.0
    changed = total = 0
    for name, w in space.weights.items():
        dw = w.dequantize().float() - before.pop(name)
        prefix = name[:-len(BASE_LAYER)]
        a, b = adapter[f"{prefix}.lora_A.weight"].float(), adapter[f"{prefix}.lora_B.weight"].float()
        g = scaling * (b @ a)
        dot += float((dw * g).sum())
        dw2 += float((dw * dw).sum())
        g2 += float((g * g).sum())
        new, old = w.codes, codes_before.pop(name)
        if isinstance(w, NF4Weight):  # two 4-bit codes per byte
            changed += int(((new >> 4) != (old >> 4)).sum() + ((new & 15) != (old & 15)).sum())
        else:
            changed += int((new != old).sum())
        total += w.numel
    along = dot / math.sqrt(g2)
    return {"run": str(run_dir), "quantize": cfg.quantize, "weights": total, "codes_changed": changed,
            "dw_norm": math.sqrt(dw2), "along": along, "across": math.sqrt(max(dw2 - along * along, 0.0)),
            "intended": intended(run_dir), "guide_norm": math.sqrt(g2)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.code_drift", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for run_dir in args.runs:
        row = drift(run_dir)
        rows.append(row)
        print(f"{run_dir}: {row['codes_changed']:,} of {row['weights']:,} codes changed; |dW| {row['dw_norm']:.3f}: "
              f"along the unit guide {row['along']:+.4f} (the steps asked {row['intended']:+.4f}), "
              f"across it {row['across']:.3f}; |guide| {row['guide_norm']:.3f}", flush=True)
    out = RESULTS_DIR / "code-drift.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(out, json.dumps({**environment(), "runs": rows}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
