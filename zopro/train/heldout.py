"""Held-out evaluation: the training program's (:func:`evaluate`, before and after a run) and a finished run's
again, from its run directory alone (:func:`reevaluate`, with another number of samples per prompt; :func:`probe_guide`,
the final policy moved along the run's guide; :func:`since_step`, what the steps after a snapshot added).
``python -m zopro.train.evaluate`` is the command line of the last three.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from zopro.seeds import RunSeeds
from zopro.train import checkpoint, snapshots
from zopro.train.config import EvalConfig, eval_config
from zopro.train.judges import words
from zopro.train.loading import load_judge, load_models, load_prompts, resolve_device
from zopro.train.rollout import repeat_each, sample_completions
from zopro.train.state import HeldOut, Progress, mean_or_none


def evaluate(bundle, tokenizer, judge, prompts, ev: EvalConfig, seeds: RunSeeds, reference_texts=None,
             ranks=None, progress: bool = False) -> HeldOut:
    """Held-out evaluation: ``ev.samples`` sampled completions per prompt.

    Prompts go ``max(1, ev.batch // ev.samples)`` to a generate call; call ``c`` samples from seed
    ``seeds.evaluation(c)``, so "before" and "after" (and every arm of a comparison run with the same ``--seed``) draw
    the same random numbers and their difference is not blurred by fresh sampling noise. transformers samples a
    call's rows from one generator, so the answers depend on ``ev.batch`` (``--eval-batch``) as they do on the seed.
    Each prompt's value is the mean judge score of its completions, or, for pairwise-only judges, the rate at which
    completion j wins against ``reference_texts[i][j]`` (0.5 with no reference).

    The KL of an answer is ``log pi(y|x) - log pi_ref(y|x)`` summed over its tokens at ``ev.logprob_temperature``
    (the temperature the answers were sampled at, as the rollouts' KL): its mean over answers sampled from the
    policy estimates KL(pi || pi_ref) without bias.

    ``ranks`` (a data-parallel job's :class:`~zopro.train.distributed.Ranks`): rank ``r`` of ``W`` makes the generate
    calls ``c`` with ``c % W == r``, the answers are gathered on every rank, and rank 0 alone scores them, with the
    same judge calls as one process (the values are bit for bit a single process's); the other ranks return None
    values. ``progress``: a progress bar over the generate calls on stderr.
    """
    if not prompts:
        return HeldOut("none", [], [])
    n, sampling = ev.samples, ev.sampling
    per_call = max(1, ev.batch // n)
    rank, world = (ranks.rank, ranks.world) if ranks is not None else (0, 1)
    texts, kl, tokens = [], [], []
    starts = list(enumerate(range(0, len(prompts), per_call)))
    for c, start in tqdm(starts, desc="generate", unit="call", disable=not progress, leave=False, file=sys.stderr):
        if c % world != rank:
            continue
        chunk = prompts[start:start + per_call]
        gen, answers = sample_completions(bundle, tokenizer, chunk, n, sampling.max_new_tokens, sampling.temperature,
                                          seeds.evaluation(c), sampling.max_prompt_len)
        texts += [answers[i * n:(i + 1) * n] for i in range(len(chunk))]
        if gen is not None:
            row_kl, row_tokens = _answer_kl(bundle, gen, ev.logprob_temperature)
            kl += row_kl.view(len(chunk), n).mean(1).tolist()
            tokens += row_tokens.view(len(chunk), n).mean(1).tolist()
    if world > 1:  # rank r holds calls r, r + W, ...: interleave them back into call order
        parts = ranks.gather_json([texts, kl, tokens], "the held-out evaluation's answers")
        columns = []
        for j in range(3):
            calls = [[part[j][i:i + per_call] for i in range(0, len(part[j]), per_call)] for part in parts]
            columns.append([t for c in range(-(-len(prompts) // per_call)) for t in calls[c % world][c // world]])
        texts, kl, tokens = columns
        if rank != 0:
            return HeldOut(None, None, texts)
    rows = repeat_each(prompts, n)
    flat = [t for ts in texts for t in ts]
    if hasattr(judge, "score"):
        metric, values = "mean judge score", judge.score(rows, flat).float()
    elif reference_texts is None:
        metric, values = "win rate vs before", torch.full((len(flat),), 0.5)
    else:
        reference = [t for ts in reference_texts for t in ts]
        metric, values = "win rate vs before", judge.prefer(rows, flat, reference).float()
    return HeldOut(metric, values.view(len(prompts), n).mean(1).tolist(), texts, kl or None, tokens or None)


def _answer_kl(bundle, gen, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sampled row's ``log pi - log pi_ref`` summed over its answer's tokens, and its answer's token count.

    A policy whose every LoRA ``B`` is zero (the adapter as initialised) computes exactly the reference's logits, so
    its KL is exactly 0 and the two log-prob passes are skipped: they cost more than the sampling itself (8.9 s each
    against 12.9 s for 32 rows of the default job on one CPU core)."""
    tokens = gen.response_mask.sum(1).float().cpu()
    lora_b = [p for n, p in bundle.policy_parameters().items() if "lora_B" in n]
    if lora_b and all(not p.any() for p in lora_b):
        return torch.zeros(len(tokens)), tokens
    with torch.inference_mode():
        args = (gen.sequences, gen.attention_mask, gen.response_mask)
        policy, _ = bundle.policy_logprobs(*args, temperature=temperature)
        reference, _ = bundle.reference_logprobs(*args, temperature=temperature)
    return (policy - reference).float().cpu(), tokens


def text_stats(texts: list[list[str]]) -> dict:
    """What shows reward hacking in a set of answers (``texts[prompt][sample]``): ``distinct_2``, the distinct word
    bigrams over all bigrams of all answers (lower when the policy says the same things to every prompt), and per
    prompt ``repeat_3``, the mean share of an answer's word trigrams that repeat an earlier trigram of the same answer
    (0 below 3 words), and ``words``, the mean answer length in words."""
    bigrams, repeat, lengths = [], [], []
    for answers in texts:
        rep, n_words = [], []
        for text in answers:
            w = words(text)
            bigrams += zip(w, w[1:], strict=False)
            trigrams = list(zip(w, w[1:], w[2:], strict=False))
            rep.append(1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0)
            n_words.append(len(w))
        repeat.append(statistics.fmean(rep) if rep else 0.0)
        lengths.append(statistics.fmean(n_words) if n_words else 0.0)
    return {"distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0, "repeat_3": repeat, "words": lengths}


def summarise(held_out: HeldOut, base: HeldOut | None = None) -> dict:
    """A held-out evaluation's headline numbers: the mean score, KL (nats per answer) and answer length (tokens,
    words), ``repeat_3`` and ``distinct_2`` (:func:`text_stats`); against ``base`` (the same prompts and sampling
    seeds before training) each per-prompt quantity's change with its paired standard error over prompts
    (``<name>_change``, ``<name>_change_se``)."""
    stats = text_stats(held_out.texts)
    per_prompt = {"score": held_out.values, "kl": held_out.kl, "tokens": held_out.tokens,
                  "repeat_3": stats["repeat_3"], "words": stats["words"]}
    out = {"prompts": len(held_out.texts), "distinct_2": stats["distinct_2"]}
    out |= {name: statistics.fmean(v) for name, v in per_prompt.items() if v}
    if base is not None:
        base_stats = text_stats(base.texts)
        before = {"score": base.values, "kl": base.kl, "tokens": base.tokens, "repeat_3": base_stats["repeat_3"],
                  "words": base_stats["words"]}
        for name, v in per_prompt.items():
            if v and before[name]:
                out[f"{name}_change"], out[f"{name}_change_se"] = paired_change(before[name], v)
        out["distinct_2_before"] = base_stats["distinct_2"]
    return out


def paired_change(before: list[float], after: list[float]) -> tuple[float | None, float | None]:
    """Mean per-prompt change ``after - before`` and its standard error over prompts; the error is None with fewer
    than two prompts, and both are None with none."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    if len(d) < 2:
        return (d[0] if d else None), None
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


def _finished_run(run_dir: Path, eval_samples: int, device: str | None):
    """``(cfg, final checkpoint, bundle, tokenizer, judge, held-out prompts)`` of the finished run in ``run_dir``, its
    config's evaluation set to ``eval_samples`` samples per prompt on ``device`` (default: the run's own); the bundle
    holds the base policy (adapters at their start)."""
    # runs made before checksums existed load unverified (reading only)
    saved, loaded = checkpoint.load_finished(run_dir, unverified_legacy=True)
    cfg = dataclasses.replace(saved, eval_samples=eval_samples, device=device or saved.device)
    _, held_out = load_prompts(cfg)
    if not held_out:
        raise ValueError(f"{run_dir}: the run has no held-out prompts (--n-eval-prompts 0)")
    device = resolve_device(cfg)
    bundle, tokenizer = load_models(cfg, device)
    return cfg, loaded, bundle, tokenizer, load_judge(cfg, device), [r.prompt for r in held_out]


def reevaluate(run_dir: Path, eval_samples: int, device: str | None = None) -> dict:
    """Before/after held-out score of the finished run in ``run_dir`` with ``eval_samples`` samples per prompt, on
    ``device`` (default: the run's own)."""
    cfg, loaded, bundle, tokenizer, judge, prompts = _finished_run(run_dir, eval_samples, device)
    ev, seeds = eval_config(cfg), RunSeeds.of(cfg)
    before = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    bundle.load_trainable_state_(loaded.tensors["trainable"])
    after = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=before.texts)
    change, se = paired_change(before.values, after.values)
    return {"run": str(run_dir), "metric": before.metric, "prompts": len(prompts), "samples": eval_samples,
            "before": statistics.fmean(before.values), "after": statistics.fmean(after.values), "change": change,
            "change_se": se, "kl": mean_or_none(after.kl)}


def probe_guide(run_dir: Path, distances: list[float], eval_samples: int, device: str | None = None) -> list[dict]:
    """Held-out score of the finished run's final policy moved ``a`` along its guide, for each ``a`` in
    ``distances``: ``theta + a * guide / |guide|``, so ``a`` is a distance in weight space, the unit of
    ``--zo-lr`` steps under ``--zo-scale unit``. The guide is the one the run would target next (``--guide``,
    computed when its last iteration ended). Each row: the distance, the score, and its change against ``a = 0``
    (the same sampling seeds) with the paired standard error. A guide that carries reward shows a rising score for
    small positive ``a``; one that is noise shows changes within their errors at every ``a``."""
    cfg, loaded, bundle, tokenizer, judge, prompts = _finished_run(run_dir, eval_samples, device)
    tensors = loaded.tensors
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
    base = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    rows = []
    for a in distances:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(start[n] + (a / norm) * guide[n])
        moved = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=base.texts)
        change, se = paired_change(base.values, moved.values)
        rows.append({"run": str(run_dir), "metric": base.metric, "distance": a, "guide_norm": norm,
                     "score": statistics.fmean(moved.values), "change": change, "change_se": se})
    return rows


def since_step(run_dir: Path, global_step: int, eval_samples: int, device: str | None = None) -> dict:
    """What the finished run's steps after ``global_step`` added: the held-out score of its snapshot at that step
    (``snapshots/snap-<step>``, checksum verified) and of its final policy, on the same prompts and sampling seeds,
    so the change has a paired standard error over prompts. The question a learning curve on a few prompts cannot
    settle, e.g. whether the last third of the steps still gains. With the run's own ``--eval-samples`` the final
    policy's numbers are its own final evaluation's (the same seeds and weights: :func:`reevaluate` reproduces them),
    so only the snapshot is evaluated."""
    found = {s["global_step"]: s for s in snapshots.listing(run_dir)}
    if global_step not in found:
        raise ValueError(f"{run_dir}: no snapshot of step {global_step} (the run has steps {sorted(found)})")
    cfg, loaded, bundle, tokenizer, judge, prompts = _finished_run(run_dir, eval_samples, device)
    params = bundle.policy_parameters()
    earlier = snapshots.load(found[global_step]["path"], "policy")
    if set(earlier) != set(params):
        raise ValueError(f"{found[global_step]['path']}: its policy tensors are not this run's adapter")
    ev, seeds = eval_config(cfg), RunSeeds.of(cfg)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(earlier[n])
    then = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    own = Progress.from_meta(loaded.meta).evaluation
    if own.samples == eval_samples and hasattr(judge, "score") and own.after.kl is not None:
        now_values, now_kl = own.after.values, own.after.kl
    else:
        bundle.load_trainable_state_(loaded.tensors["trainable"])
        now = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=then.texts)
        now_values, now_kl = now.values, now.kl
    change, se = paired_change(then.values, now_values)
    return {"run": str(run_dir), "metric": then.metric, "prompts": len(prompts), "samples": eval_samples,
            "step": global_step, "before": statistics.fmean(then.values), "after": statistics.fmean(now_values),
            "change": change, "change_se": se, "kl_before": mean_or_none(then.kl),
            "kl": mean_or_none(now_kl)}
