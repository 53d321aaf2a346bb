"""A ZO population's members scored in batched forwards against perturb-forward-restore, on the default job's model.

``python -m benchmarks.members [--space singular] [--population 8] [--per-forward 1 4 16] [--repeats 2]``

One rollout of the default job (4 training prompts x 4 answers, VADER; no held-out prompt is read); for a population
of ``--population`` antithetic pairs in the ``core`` or ``singular`` space, the seconds to score every member:
``perturb``, the optimiser's probing path (a weight pass, a forward of the rollout's rows, one member at a time), and
``batched N`` (:func:`zopro.train.members.member_losses`, N members a forward, no weight pass). Prints the median
over ``--repeats`` and the largest relative difference of the members' losses between the two paths, and writes
``<results-dir>/members-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, environment
from benchmarks.zo_probe import training_rollout
from zopro import Core, ZOOptimizer
from zopro.seeds import derive_seed
from zopro.train.distributed import SOLO
from zopro.train.losses import reduce_ppo_terms
from zopro.train.members import member_losses
from zopro.train.updaters import core_bases, surrogate_terms


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.members")
    parser.add_argument("--space", default="singular", choices=["core", "singular"])
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--per-forward", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, bundle, ro = training_rollout(0)
    rows = torch.arange(len(ro.sequences))
    opt = ZOOptimizer(bundle.policy_parameters(), lr=0.0, eps=args.eps,
                      sampler=Core(core_bases(bundle), diagonal=args.space == "singular"), q=args.population, seed=0)
    seeds = [derive_seed(0, 0, j) for j in range(args.population)]
    for seed in seeds:
        opt.sampler.prepare(seed)

    def perturb() -> list[float]:
        out = []
        for seed in seeds:
            for sign in (1.0, -1.0):
                opt._pass([(seed, sign * args.eps)])
                out.append(float(reduce_ppo_terms(surrogate_terms(bundle, ro, rows))))
                opt._pass([(seed, -sign * args.eps)])
        return out

    def timed(fn) -> tuple[float, list[float]]:
        times, losses = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            losses = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), losses

    base_seconds, reference = timed(perturb)
    rows_out = [{"path": "perturb", "seconds": base_seconds, "max_rel_diff": 0.0}]
    print(f"perturb-forward-restore: {base_seconds:.2f} s for {2 * args.population} members", flush=True)
    for n in args.per_forward:
        seconds, losses = timed(lambda n=n: member_losses(bundle, opt, [ro], SOLO, seeds, args.eps,
                                                          rows_of=lambda r: rows, loss="sequence", clip=cfg.clip,
                                                          per_forward=n))
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True))
        rows_out.append({"path": f"batched {n}", "seconds": seconds, "max_rel_diff": diff})
        print(f"batched, {n} members a forward: {seconds:.2f} s ({base_seconds / seconds:.2f}x), largest relative "
              f"loss difference {diff:.1e}", flush=True)
    env = environment()
    result = {**env, "space": args.space, "population": args.population, "rows": len(rows), "results": rows_out}
    path = Path(args.results_dir) / f"members-{env['device_kind']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
