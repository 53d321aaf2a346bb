"""Sharded ZO step time against ranks: an MLP whose weights are sharded by FSDP2 (``fully_shard``), one process
against N gloo ranks, the same data on every rank (so every arm computes the same losses and weights).

``python -m benchmarks.sharded [--ranks 2] [--width 1024] [--layers 4] [--steps 6] [--tag NAME]`` writes
``benchmarks/results/sharded-<tag>-<device>.json`` and ``.md``: the median time of a ZO step (``step_many``: two weight
passes and two forwards a step) and of one weight pass alone (``perturb2_`` over this rank's shards), the weight bytes
each rank holds, and what crosses the network per step (FSDP2 all-gathers each weight once per forward: two forwards
a step). On a CPU the ranks share the machine's cores and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment


def model(width: int, layers: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.Tanh()]
    m = torch.nn.Sequential(*mods)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / width**0.5)
    return m


def measure(width: int, layers: int, steps: int) -> dict:
    """This process's arm (a rank of a process group when one is initialised)."""
    import torch.distributed as dist

    from zokernels import perturb2_
    from zopro import dtensor
    from zopro.optim import ZOOptimizer

    m = model(width, layers)
    ranked = dist.is_initialized()
    if ranked:
        from torch.distributed.fsdp import fully_shard

        for layer in m[::2]:
            fully_shard(layer)
        fully_shard(m)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, width, generator=g), torch.randn(64, width, generator=g)
    params = dict(m.named_parameters())
    opt = ZOOptimizer(params, lr=1e-4, eps=1e-3, seed=0)

    def closure():
        return ((m(x) - y) ** 2).mean()

    opt.step_many([closure])  # warm-up
    step_times = []
    for _ in range(steps):
        if ranked:
            dist.barrier()
        t0 = time.perf_counter()
        opt.step_many([closure])
        step_times.append(time.perf_counter() - t0)
    locals_ = [dtensor.local(p) for p in params.values()]
    offsets = opt.shards.offsets if opt.shards is not None else None
    pass_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        perturb2_(locals_, 1, 0.0, 2, 0.0, offsets=offsets)
        pass_times.append(time.perf_counter() - t0)
    weight_bytes = sum(t.numel() * t.element_size() for t in locals_)
    total_bytes = sum(p.numel() * p.element_size() for p in params.values())
    return {"step_median_s": statistics.median(step_times), "pass_median_s": statistics.median(pass_times),
            "weight_bytes_per_rank": weight_bytes, "weight_bytes_total": total_bytes,
            "final_loss": float(opt.log["losses"][-1])}


def _rank_main(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    result = measure(args.width, args.layers, args.steps)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="*", default=[2])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tag", default="mlp")
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)  # a rank's result file (internal)
    args = ap.parse_args(argv)
    if args.out:
        _rank_main(args)
        return 0
    torch.set_num_threads(1)
    rows = [{"arm": "1 process, 1 thread", "ranks": 1, **measure(args.width, args.layers, args.steps)}]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for n in args.ranks:
        out = Path(tempfile.mkdtemp()) / "rank0.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
               "benchmarks.sharded", "--width", str(args.width), "--layers", str(args.layers), "--steps",
               str(args.steps), "--out", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        rows.append({"arm": f"{n} ranks (FSDP2), 1 thread each", "ranks": n, **json.loads(out.read_text())})
        out.unlink()
        out.parent.rmdir()
    base = rows[0]
    lines = ["| arm | ZO step (s) | speed-up | one weight pass (s) | weight MB per rank | final loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['step_median_s']:.4f} | {base['step_median_s'] / r['step_median_s']:.2f}x "
                     f"| {r['pass_median_s']:.4f} | {r['weight_bytes_per_rank'] / 1e6:.2f} | {r['final_loss']!r} |")
    env = environment()
    stem = RESULTS_DIR / f"sharded-{args.tag}-{env['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "args": vars(args), "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + f"\n\n{env['device']}, torch {env['torch']}, {env['date']}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
