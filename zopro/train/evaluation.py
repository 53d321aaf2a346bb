"""Held-out evaluation: the training program's (:func:`evaluate`, before and after a run) and a finished run's
again, from its run directory alone (:func:`reevaluate`, with another number of samples per prompt; :func:`probe_guide`,
the final policy moved along the run's guide). ``python -m zopro.train.evaluate`` is the command line of the last two.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import torch

from zopro.seeds import RunSeeds
from zopro.train import checkpoint
from zopro.train.config import EvalConfig, eval_config
from zopro.train.loading import load_judge, load_models, load_prompts, resolve_device
from zopro.train.rollout import repeat_each, sample_completions


def evaluate(bundle, tokenizer, judge, prompts, ev: EvalConfig, seeds: RunSeeds, reference_texts=None, ranks=None):
    """Held-out evaluation: ``ev.samples`` sampled completions per prompt.

    Prompts go ``max(1, ev.batch // ev.samples)`` to a generate call; call ``c`` samples from seed
    ``seeds.evaluation(c)``, so "before" and "after" draw the same random numbers and their difference is not
    blurred by fresh sampling noise. transformers samples a call's rows from one generator, so the answers depend on
    ``ev.batch`` (``--eval-batch``) as they do on the seed. Each prompt's value is the mean judge score of its
    completions, or, for pairwise-only judges, the rate at which completion j wins against ``reference_texts[i][j]``
    (0.5 with no reference). Returns (metric name, per-prompt values, texts ``[prompt][sample]``).

    ``ranks`` (a data-parallel job's :class:`~zopro.train.distributed.Ranks`): rank ``r`` of ``W`` makes the generate
    calls ``c`` with ``c % W == r``, the texts are gathered on every rank, and rank 0 alone scores them, with the same
    judge calls as one process (the values are bit for bit a single process's); the other ranks return None values.
    """
    if not prompts:
        return "none", [], []
    n, sampling = ev.samples, ev.sampling
    per_call = max(1, ev.batch // n)
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    texts = []
    for c, start in enumerate(range(0, len(prompts), per_call)):
        if c % world != rank:
            continue
        chunk = prompts[start:start + per_call]
        _, answers = sample_completions(bundle, tokenizer, chunk, n, sampling.max_new_tokens, sampling.temperature,
                                        seeds.evaluation(c), sampling.max_prompt_len)
        texts += [answers[i * n:(i + 1) * n] for i in range(len(chunk))]
    if world > 1:  # rank r holds calls r, r + W, ...: interleave them back into call order
        parts = ranks.gather_json(texts, "the held-out evaluation's answers")
        calls = [[part[i:i + per_call] for i in range(0, len(part), per_call)] for part in parts]
        texts = [t for c in range(-(-len(prompts) // per_call)) for t in calls[c % world][c // world]]
        if rank != 0:
            return None, None, texts
    rows = repeat_each(prompts, n)
    flat = [t for ts in texts for t in ts]
    if hasattr(judge, "score"):
        metric, values = "mean judge score", judge.score(rows, flat).float()
    elif reference_texts is None:
        metric, values = "win rate vs before", torch.full((len(flat),), 0.5)
    else:
        reference = [t for ts in reference_texts for t in ts]
        metric, values = "win rate vs before", judge.prefer(rows, flat, reference).float()
    return metric, values.view(len(prompts), n).mean(1).tolist(), texts


def paired_change(before: list[float], after: list[float]) -> tuple[float | None, float | None]:
    """Mean per-prompt change ``after - before`` and its standard error over prompts; the error is None with fewer
    than two prompts, and both are None with none."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    if len(d) < 2:
        return (d[0] if d else None), None
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


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
    ev, seeds = eval_config(cfg), RunSeeds.of(cfg)
    metric, before, texts = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    bundle.load_trainable_state_(tensors["trainable"])
    _, after, _ = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=texts)
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
    ev, seeds = eval_config(cfg), RunSeeds.of(cfg)
    metric, base, texts = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    rows = []
    for a in distances:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n] + (a / norm) * guide[n])
        _, values, _ = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=texts)
        change, se = paired_change(base, values)
        rows.append({"run": str(run_dir), "metric": metric, "distance": a, "guide_norm": norm,
                     "score": statistics.fmean(values), "change": change, "change_se": se})
    return rows
