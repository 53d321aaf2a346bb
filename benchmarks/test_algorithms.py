"""One optimisation step of each algorithm, wall time and peak memory, each in a fresh process.

Sizes: CPU ``tiny`` and ``smollm2-135m`` (batch 8 x 128 tokens, fp32); CUDA ``smollm2-135m`` and ``llama-1b``
(1.24 B parameters, batch 8 x 512 tokens, bf16 base); plus NF4 and int8 bitsandbytes bases of the larger size.
Every algorithm runs on the same randomly initialised model with LoRA adapters on all linear layers, the same
synthetic rollout and the same surrogate (``benchmarks/algo_step.py``). Writes
``benchmarks/results/algorithms-<device>.json`` and ``.md``; ratios against ``forward2`` (two inference forwards:
the floor of a two-point ZO step) and against ZOPrO's peak memory.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.algo_step import ALGOS
from benchmarks.common import RESULTS_DIR, environment, merge_json

_FEW = ("forward2", "zopro-targeted")
# (size, batch, tokens, base storage, algorithms). "rloo" on an NF4 base is first-order QLoRA.
CONFIGS = {
    "cpu": [("tiny", 8, 128, "none", ALGOS), ("smollm2-135m", 8, 128, "none", ALGOS),
            ("smollm2-135m", 8, 128, "nf4", _FEW + ("rloo",)), ("smollm2-135m", 8, 128, "int8", _FEW)],
    "cuda": [("smollm2-135m", 8, 512, "none", ALGOS), ("llama-1b", 8, 512, "none", ALGOS),
             ("llama-1b", 8, 512, "nf4", _FEW + ("rloo",)), ("llama-1b", 8, 512, "int8", _FEW)],
}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = {"cpu": 2, "cuda": 5}
CASES = [(algo, size, batch, seq, quant) for size, batch, seq, quant, algos in CONFIGS[DEVICE] for algo in algos]
_ROWS: list[dict] = []


@pytest.mark.parametrize("algo, size, batch, seq, quantize", CASES,
                         ids=[f"{c[1]}-{c[4]}-{c[0]}" for c in CASES])
def test_algorithm_step(algo, size, batch, seq, quantize):
    if quantize != "none":
        pytest.importorskip("bitsandbytes", reason="quantised bases need bitsandbytes")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-m", "benchmarks.algo_step", "--algo", algo, "--size", size,
                          "--batch", str(batch), "--seq", str(seq), "--steps", str(STEPS[DEVICE]),
                          "--quantize", quantize], capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    _ROWS.append(json.loads(out.stdout.strip().splitlines()[-1]))


def _markdown(rows: list[dict], env: dict) -> str:
    lines = [f"# `algorithms` benchmarks: {env['device_kind']}", "",
             f"{env['date']}: {env['device']}; commit {env.get('commit')}; torch {env['torch']}; "
             f"1-minute load average at start {env['load_avg_at_start']}. Peak memory from the loaded model on, "
             "a fresh process per row: CPU, the resident-set high-water mark; CUDA, `max_memory_allocated`.", "",
             "| size | base | batch x tokens | algorithm | s / step | × two forwards | peak MiB "
             "| × ZOPrO-targeted peak (same size) |", "|---|---|---|---|---:|---:|---:|---:|"]
    groups = dict.fromkeys((r["size"], r.get("quantize", "none")) for r in rows)
    for size, quant in groups:
        rs = {r["algo"]: r for r in rows if r["size"] == size and r.get("quantize", "none") == quant}
        floor = rs.get("forward2")
        ref = next((r for r in rows if r["size"] == size and r.get("quantize", "none") == "none"
                    and r["algo"] == "zopro-targeted"), None)
        for algo in ALGOS:
            r = rs.get(algo)
            if r is None:
                continue
            over = f"{r['seconds'] / floor['seconds']:.2f}" if floor else "–"
            mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "–"
            name = "rloo (QLoRA)" if algo == "rloo" and quant == "nf4" else algo
            lines.append(f"| {size} | {quant} | {r['batch']} x {r['seq']} | {name} | {r['seconds']:.3f} | {over} "
                         f"| {r['peak_bytes'] / 2**20:.0f} | {mem} |")
    return "\n".join(lines) + "\n"


def teardown_module(module):
    if not _ROWS:
        return
    env = environment()
    rows = [{**env, **r, "suite": "algorithms", "kind": "step", "list": f"{r['size']}-{r['quantize']}",
             "op": r["algo"]} for r in _ROWS]
    RESULTS_DIR.mkdir(exist_ok=True)
    stem = RESULTS_DIR / f"algorithms-{env['device_kind']}"
    merge_json(stem.with_suffix(".json"), rows)
    stem.with_suffix(".md").write_text(_markdown(rows, env), encoding="utf-8")
    _plot(rows, stem.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    """Step time and peak memory per algorithm, one panel pair per (size, base)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["size"], r["quantize"]) for r in rows))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False)
    for col, (size, quant) in enumerate(groups):
        rs = [r for r in rows if r["size"] == size and r["quantize"] == quant]
        names = [r["algo"] for r in rs]
        axes[0][col].barh(names, [r["seconds"] for r in rs], color="tab:blue")
        axes[0][col].set(title=f"{size}, {quant} base", xlabel="seconds / step")
        axes[1][col].barh(names, [r["peak_bytes"] / 2**20 for r in rs], color="tab:orange")
        axes[1][col].set(xlabel="peak memory (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
