"""How much of the first-order signal each ZO search space can see: the mechanism behind RESULTS.md section 13.

``python -m benchmarks.zo_capture [--run RUN_DIR] [--rollouts 8] [--population 8] [--seed 0] [--json FILE]``

At a policy (the default job's base, or the final policy of a finished run such as the frontier's ``iter0`` arm),
it collects ``--rollouts`` independent rollouts of the job's training prompts (no held-out prompt is read), scored
by the job's judge (the reward of ``--reward judge``, the frontier's), takes the
surrogate's first-order gradient ``g_i`` on each (the loss every ZO step estimates, at the weights that sampled)
and, for each search space ``S`` (an orthonormal basis in the LoRA weights; projector ``P``), reports

- ``D``: the space's dimensions;
- ``signal``: ``|P gbar|^2 / |gbar|^2``, the share of the expected gradient inside ``S``, estimated by the cross
  products of independent rollouts (``sum_{i<j} <P g_i, P g_j> / sum_{i<j} <g_i, g_j>``: each sum is unbiased,
  their ratio nearly so), with a jackknife SE over rollouts (conservative when noise dominates); its square root,
  ``slope``, is the steepest slope of the expected loss along any direction of ``S`` as a fraction of the
  gradient's;
- ``energy``: ``E|P g|^2 / E|g|^2``, the share of one rollout's gradient (signal and noise) inside ``S``;
- ``efficiency``: the expected decrease of one ZO step with ``q`` antithetic pairs of unit directions in ``S``
  (an unbiased estimate ``(D/q) sum_j (u_j . g) u_j``, ``E|ghat|^2 = E|P g|^2 (D + q - 1) / q``) at its best lr,
  over that of one first-order SGD step, both under the same curvature: ``signal^2 / energy * q / (D + q - 1)``
  (0 where the signal estimate is negative).
  Its inverse is how many ZO steps one first-order step is worth. A MODEL-BASED ESTIMATE (SGD, one curvature for
  every space, no fitness shaping, no clip), not a measured training curve. The guide's blocks are searched by
  ``--guide-blocks`` with block weights scaled by the parts' norms, not isotropically: there the model is
  approximate. ``slope`` and ``efficiency`` are also given at ``signal + 2 SE`` (``*_2se``).

Spaces: ``lora`` (every adapter weight, as MeZO), ``lora-B``, ``core`` / ``singular`` (``--zo-space``: the top-r
left singular vectors of each base weight, LoRA-XS / ESSA), and at a run's policy, from the guide its last iteration
left (iteration 0's update for the ``iter0`` arm): ``guide-layer`` / ``guide-tensor`` (``--guide-blocks``: one
dimension per layer / tensor, the guide's parts), ``update-core`` (each B within the column space of its guide part:
an r x r core between iteration 0's factors), ``update-top1`` / ``update-top2`` (its top 1 / 2 left singular vectors
only), ``update-sv`` (its singular values, ``u_k w_k^T``); ``guide-whole`` is the paper's one line along the guide.
``B-<module>`` (every B of one module kind, e.g. ``B-v_proj``) says where in the network the signal lies.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.common import environment
from zopro.samplers import block_keys
from zopro.train import checkpoint
from zopro.train.config import TrainConfig
from zopro.train.loading import load_judge, load_models, load_prompts
from zopro.train.rollout import collect_rollout
from zopro.train.updaters import core_bases, rollout_options, surrogate


def policy(run: Path | None):
    """``(cfg, bundle, tokenizer, guide)`` at the base (``run`` None) or at a finished run's final policy, with the
    guide its final checkpoint holds (None at the base)."""
    if run is None:
        cfg = TrainConfig()
        bundle, tokenizer = load_models(cfg, torch.device("cpu"))
        return cfg, bundle, tokenizer, None
    cfg, loaded = checkpoint.load_finished(run, unverified_legacy=True)
    bundle, tokenizer = load_models(cfg, torch.device("cpu"))
    bundle.load_trainable_state_(loaded.tensors["trainable"])
    params = bundle.policy_parameters()
    guide = loaded.tensors.get("guides_prev")
    guide = {n: guide[n].double() for n in params} if guide is not None else None
    return cfg, bundle, tokenizer, guide


def gradients(cfg, bundle, tokenizer, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """The surrogate's gradient on ``count`` independent rollouts of the job's size: its training prompts only, its
    judge's rewards (the job under ``--reward judge``, as the frontier runs it)."""
    train = [r.prompt for r in load_prompts(cfg)[0]]
    score = load_judge(cfg, torch.device("cpu")).score
    params = bundle.policy_parameters()
    out = []
    for i in range(count):
        prompts = random.Random(seed * 1000 + i).sample(train, cfg.prompts_per_step)
        rollout = collect_rollout(bundle, tokenizer, prompts, seed=seed * 1000 + i, score_fn=score,
                                  **rollout_options(cfg))
        for p in params.values():
            p.grad = None
        rows = torch.arange(len(rollout.sequences))
        surrogate(bundle, rollout, rows, loss=cfg.loss, clip=cfg.clip, grad=True).backward()
        out.append({n: p.grad.detach().double().clone() for n, p in params.items()})
        print(f"rollout {i + 1}/{count}: mean gold score {rollout.scores.float().mean():.3f}", flush=True)
    for p in params.values():
        p.grad = None
    return out


def spaces(names: list[str], bases: dict[str, torch.Tensor], guide: dict[str, torch.Tensor] | None) -> dict:
    """Each space's ``coordinates(g)``: a gradient dict (``names``, the policy's LoRA tensors) to its coordinates in
    an orthonormal basis of the space, so inner products of coordinates are those of the projections. ``bases``:
    :func:`~zopro.train.updaters.core_bases`; ``guide``: the run's guide (None at the base: no guide spaces)."""
    b_names = [n for n in names if ".lora_B." in n]
    base = {n: u.double() for n, u in bases.items()}

    def flat(chosen):
        return lambda g: torch.cat([g[n].flatten() for n in chosen])
    out = {"lora": flat(names), "lora-B": flat(b_names),
           "core": lambda g: torch.cat([(base[n].T @ g[n]).flatten() for n in b_names]),
           "singular": lambda g: torch.cat([torch.diagonal(base[n].T @ g[n]) for n in b_names])}
    kinds: dict[str, list[str]] = {}
    for n in b_names:  # the module's kind: the last name before .lora_B. (v_proj, down_proj, ...)
        kinds.setdefault(n.split(".lora_B.")[0].rsplit(".", 1)[-1], []).append(n)
    for kind in sorted(kinds):
        out[f"B-{kind}"] = flat(kinds[kind])
    if guide is None:
        return out
    for blocks in ("whole", "layer", "tensor"):  # one dimension a block: the block's part of the guide, normalised
        groups: dict[str, list[str]] = {}
        for n, k in zip(names, block_keys(names, blocks)):
            groups.setdefault(k, []).append(n)
        norms = {k: sum(float(guide[n].pow(2).sum()) for n in ns) ** 0.5 for k, ns in groups.items()}
        groups = {k: ns for k, ns in groups.items() if norms[k] > 0}
        out[f"guide-{blocks}"] = lambda g, groups=groups, norms=norms: torch.tensor(
            [sum(float((g[n] * guide[n]).sum()) for n in ns) / norms[k] for k, ns in groups.items()],
            dtype=torch.float64)
    svd = {n: torch.linalg.svd(guide[n], full_matrices=False) for n in b_names}
    rank = {n: int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0 for n, (_, s, _) in svd.items()}

    def left(k=None):
        return lambda g: torch.cat([(svd[n][0][:, :min(k or rank[n], rank[n])].T @ g[n]).flatten() for n in b_names])
    out["update-core"], out["update-top1"], out["update-top2"] = left(), left(1), left(2)
    out["update-sv"] = lambda g: torch.cat([torch.einsum("ok,or,rk->k", svd[n][0][:, :rank[n]], g[n],
                                                         svd[n][2].T[:, :rank[n]]) for n in b_names])
    return out


class Sums(NamedTuple):
    """What the shares need of ``n`` rollouts' coordinates ``v_i`` in a space: ``cross = sum_{i != j} <v_i, v_j>``
    (``n (n - 1) |vbar|^2`` in expectation for independent ``v_i``), the same without each rollout (``loo[i]``, for
    the jackknife) and ``energy = sum_i |v_i|^2``."""

    cross: float
    loo: torch.Tensor
    energy: float

    @classmethod
    def of(cls, v: list[torch.Tensor] | torch.Tensor) -> Sums:
        v = torch.stack(list(v)) if not isinstance(v, torch.Tensor) else v
        total, norms = v.sum(0), v.pow(2).sum(1)
        cross = float(total @ total - norms.sum())
        # without rollout i: |total - v_i|^2 - (sum |v|^2 - |v_i|^2) = cross - 2 <total, v_i> + 2 |v_i|^2
        return cls(cross, cross - 2 * (v @ total) + 2 * norms, float(norms.sum()))


def capture(coords, total) -> tuple[float, float]:
    """``(signal, energy)`` shares from the coordinates of each rollout's gradient in a space and in the whole
    (lists of vectors, or their :class:`Sums`)."""
    c = coords if isinstance(coords, Sums) else Sums.of(coords)
    t = total if isinstance(total, Sums) else Sums.of(total)
    return c.cross / t.cross, c.energy / t.energy


def jackknife_se(coords: Sums, total: Sums) -> float:
    """The jackknife SE over rollouts of the signal share ``coords.cross / total.cross``."""
    loo = coords.loo / total.loo
    n = len(loo)
    return float(((n - 1) / n * (loo - loo.mean()).pow(2).sum()) ** 0.5)


def row_of(space: str, dims: int, signal: float, se: float, energy: float, q: int) -> dict:
    """A space's line: its shares, the best slope ``sqrt(signal)`` and the model efficiency, each also at ``signal +
    2 SE`` (an upper bound at about 97.5 %: a negative estimate says "no slope measured", not "none")."""
    def eff(share):
        return max(share, 0.0) ** 2 / energy * q / (dims + q - 1) if energy > 0 else 0.0
    upper = signal + 2 * se
    return {"space": space, "dims": dims, "signal": signal, "signal_se": se, "energy": energy,
            "slope": max(signal, 0.0) ** 0.5, "slope_2se": max(upper, 0.0) ** 0.5,
            "efficiency": eff(signal), "efficiency_2se": eff(upper), "q": q}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zo_capture")
    parser.add_argument("--run", type=Path, help="a finished run directory (default: the default job's base policy)")
    parser.add_argument("--rollouts", type=int, default=8)
    parser.add_argument("--population", type=int, default=8, help="q: antithetic pairs a ZO step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.rollouts < 3:
        parser.error(f"--rollouts must be at least 3 (a jackknife over rollouts), got {args.rollouts}")
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()  # the date and load at the start
    cfg, bundle, tokenizer, guide = policy(args.run)
    grads = gradients(cfg, bundle, tokenizer, args.rollouts, args.seed)
    table = spaces(list(bundle.policy_parameters()), core_bases(bundle), guide)
    whole = Sums.of([table["lora"](g) for g in grads])
    n = len(grads)
    snr = whole.cross / (n * (n - 1)) / (whole.energy / n)
    print(f"first order: |gbar|^2 / E|g|^2 = {snr:.4f} (the share of one rollout's gradient that is signal)")
    q, rows = args.population, []
    for name, fn in table.items():
        coords = torch.stack([fn(g) for g in grads])
        dims = coords.shape[1]
        sums = Sums.of(coords)
        del coords
        signal, energy = capture(sums, whole)
        se = jackknife_se(sums, whole)
        row = row_of(name, dims, signal, se, energy, q)
        rows.append(row)
        print(f"{name:13s} D {dims:>9,d}  signal {signal:+.4f} ± {se:.4f}  energy {energy:.4f}  best slope "
              f"{row['slope']:.3f} (< {row['slope_2se']:.3f})  efficiency (q {q}) {row['efficiency']:.2e} "
              f"(< {row['efficiency_2se']:.2e})", flush=True)
    # where the signal lies, tensor by tensor: the fewest tensors whose shares add up to half of it
    shares = {t: Sums.of([g[t].flatten() for g in grads]).cross / whole.cross for t in grads[0]}
    ranked = sorted(shares.items(), key=lambda kv: -kv[1])
    total, half = 0.0, 0
    for _, share in ranked:
        total, half = total + share, half + 1
        if total >= 0.5:
            break
    print(f"half the signal lies in {half} of {len(ranked)} tensors; the largest: "
          + ", ".join(f"{n.split('base_model.model.')[-1]} {v:.3f}" for n, v in ranked[:5]))
    if args.json:
        args.json.write_text(json.dumps({**env, "run": str(args.run.resolve()) if args.run else None,
                                         "rollouts": args.rollouts,
                                         "seed": args.seed, "first_order_snr": snr, "rows": rows,
                                         "tensor_signal": dict(ranked), "half_signal_tensors": half}, indent=1))
    return rows


if __name__ == "__main__":
    main()
