"""How far a ZO probe moves the policy, per search space and eps: the basis for choosing ``--zo-eps``.

``python -m benchmarks.zo_probe [--spaces core singular lora] [--eps ...] [--directions 3] [--seed 0]``

On one rollout of the default job's training prompts (4 prompts x 4 answers, judged by VADER; no held-out prompt is
read), for each space and eps it adds ``eps * z`` for a few directions ``z`` of the space's sampler (unit norm for
``core`` / ``singular``, per-weight Gaussian for ``lora``) and prints the mean absolute change of an answer's summed
log-prob and the surrogate's two-point difference ``L(+eps z) - L(-eps z)``. A probe is in the surrogate's useful
range when the change stays well inside the PPO clip (0.2 on the sequence log-ratio) yet far above float rounding.
"""

from __future__ import annotations

import argparse
import random

import torch

from zopro import Core, Isotropic, ZOOptimizer
from zopro.train.config import TrainConfig
from zopro.train.data import load_describe
from zopro.train.judges import VaderJudge
from zopro.train.loading import load_models
from zopro.train.rollout import collect_rollout
from zopro.train.updaters import core_bases, rollout_options, surrogate_terms

DEFAULT_EPS = {"core": [0.3, 1.0, 3.0, 10.0], "singular": [0.3, 1.0, 3.0, 10.0], "lora": [1e-3, 3e-3, 1e-2]}


def training_rollout(seed: int = 0):
    """``(cfg, bundle, rollout)``: the default job's model and one rollout of its training prompts (4 prompts x 4
    answers, scored by VADER; no held-out prompt is read)."""
    cfg = TrainConfig()
    bundle, tokenizer = load_models(cfg, torch.device("cpu"))
    train, _ = load_describe()
    prompts = random.Random(seed).sample([r.prompt for r in train], cfg.prompts_per_step)
    rollout = collect_rollout(bundle, tokenizer, prompts, seed=seed, score_fn=VaderJudge().score,
                              **rollout_options(cfg))
    return cfg, bundle, rollout


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zo_probe")
    parser.add_argument("--spaces", nargs="+", default=list(DEFAULT_EPS), choices=list(DEFAULT_EPS))
    parser.add_argument("--eps", type=float, nargs="+", help="eps values for every space (default: per space)")
    parser.add_argument("--directions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _, bundle, rollout = training_rollout(args.seed)
    rows = torch.arange(len(rollout.sequences))
    bases = core_bases(bundle) if {"core", "singular"} & set(args.spaces) else None
    out = []
    for space in args.spaces:
        sampler = Isotropic() if space == "lora" else Core(bases, diagonal=space == "singular")
        opt = ZOOptimizer(bundle.policy_parameters(), lr=0.0, eps=1.0, sampler=sampler, seed=args.seed)
        for eps in args.eps or DEFAULT_EPS[space]:
            moved, diffs = [], []
            for j in range(args.directions):
                seed = 1000 + j
                sampler.prepare(seed)
                opt._pass([(seed, eps)])  # the optimiser's own weight pass: +eps z, -2 eps z, +eps z
                sums, _ = bundle.policy_logprobs(rollout.sequences, rollout.attention_mask, rollout.response_mask,
                                                 temperature=rollout.logprob_temperature)
                moved.append((sums - rollout.policy_logps).abs().mean().item())
                plus = float(surrogate_terms(bundle, rollout, rows).mean())
                opt._pass([(seed, -2 * eps)])
                minus = float(surrogate_terms(bundle, rollout, rows).mean())
                opt._pass([(seed, eps)])
                diffs.append(plus - minus)
            row = {"space": space, "eps": eps, "mean_abs_dlogp": sum(moved) / len(moved), "loss_differences": diffs}
            print(f"{space:9s} eps {eps:<7g} mean |d log p| {row['mean_abs_dlogp']:.4f}  L+ - L- "
                  + " ".join(f"{d:+.5f}" for d in diffs), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
