"""The phases of a run, in the order a run goes through them: plain functions over the run's state
(:class:`zopro.train.program.Run`: the config, the live models and optimisers, and what the checkpoint holds).

* :func:`reward_init`: before iteration 0, the reward model (unless ``--reward judge``), the base policy's held-out
  evaluation and the learning curve's first point, then :func:`begin_iteration` 0;
* :func:`train_step`: one rollout and one update of the iteration's updater, a metrics line; every
  ``--eval-every`` steps a :func:`curve_point`;
* :func:`end_iteration`: the reward adapter refined on judged pairs of the iteration's prompts, the next iteration's
  guides, then :func:`begin_iteration` of the next one, or the final snapshot;
* :func:`finish`: the held-out evaluation of the trained policy, then every output written from the final state.

:func:`zopro.train.program.run` drives them and checkpoints between them.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from pathlib import Path

import torch

from zopro.seeds import derive_seed
from zopro.train import distributed, files, memory, peft_folders, quant_target, snapshots
from zopro.train.config import eval_config, reward_config, sampling_config
from zopro.train.heldout import evaluate, paired_change, summarise
from zopro.train.loading import save_tiny_base
from zopro.train.next_guide import next_guide
from zopro.train.reward_adapter import (
    dataset_pairs,
    judged_pairs,
    merge_reward_,
    reward_state,
    reward_tensors,
    train_reward,
)
from zopro.train.rollout import collect_step
from zopro.train.state import Evaluation, Guides, HeldOut
from zopro.train.updaters import ZORLOO, rollout_options

# the merge's rounding seed: derive_seed(ZO seed of the iteration, MERGE_STEP), a step no optimiser reaches
MERGE_STEP = 1 << 40


def reward_init(run):
    """Before iteration 0: the reward model (unless ``--reward judge``), then the base policy's held-out
    evaluation and the learning curve's first point."""
    cfg = run.cfg
    if cfg.reward == "model":
        has_pairs = any(r.chosen is not None and r.rejected is not None for r in run.train_records)
        if has_pairs:
            with run.announce("reward model: the dataset's preference pairs"):
                pairs = dataset_pairs(run.bundle, run.tokenizer, run.train_records, reward_config(cfg), run.ranks)
        else:
            prompts = random.Random(run.seeds.pairs(0)).sample([r.prompt for r in run.train_records],
                                                                min(cfg.reward_pairs, len(run.train_records)))
            with run.announce(f"reward model: {len(prompts)} pairs of the base policy's answers, judged by "
                              f"--judge {cfg.judge}"):
                pairs = judged_pairs(run.bundle, run.tokenizer, run.judge, prompts, sampling_config(cfg),
                                     run.seeds.pairs(1), run.ranks)
        with run.announce(f"reward model: {cfg.reward_init_steps} Bradley-Terry steps"):
            loss = train_reward(run.bundle, pairs, reward_config(cfg), cfg.reward_init_steps,
                                run.seeds.reward(0), run.ranks)
        distributed.sync_trainable_(run.bundle, run.ranks)
        run.progress.reward_losses.append(loss)
    before = held_out(run, [r.prompt for r in run.eval_records], "held-out evaluation of the base policy")
    # the answers themselves are kept: a pairwise judge scores "after" against them, and users read them
    run.progress.evaluation = Evaluation(before.metric, len(run.eval_records), cfg.eval_samples, before)
    curve_point(run)
    begin_iteration(run, 0)


def held_out(run, prompts: list[str], what: str, reference_texts=None, samples: int | None = None) -> HeldOut:
    """:func:`evaluate` on ``prompts``, shown as the phase ``what``; its forward passes are not the training's, so
    they are not counted in ``token_passes``."""
    ev = eval_config(run.cfg)
    if samples is not None:
        ev = dataclasses.replace(ev, samples=samples)
    passes = run.bundle.token_passes
    with run.announce(what):
        result = evaluate(run.bundle, run.tokenizer, run.judge, prompts, ev, run.seeds,
                          reference_texts=reference_texts, ranks=run.ranks, progress=run.announce.show)
    run.bundle.token_passes = passes
    return result


def count_passes(run) -> int:
    """The forward token-passes of the policy's training so far, every rank's (a collective: every rank calls it
    at the same points), kept in the checkpoint's progress."""
    local = run.bundle.token_passes - run.passes_seen
    run.passes_seen = run.bundle.token_passes
    run.progress.token_passes += sum(run.ranks.gather_json(local, "the step's token-passes"))
    return run.progress.token_passes


def curve_point(run) -> None:
    """The in-run evaluation (``--eval-every``): one answer to each of ``--eval-curve-prompts`` held-out prompts,
    sampled with the evaluation's seeds, so every point and every run with the same ``--seed`` draws alike."""
    if not run.cfg.eval_every:
        return
    result = held_out(run, run.curve_prompts, f"in-run evaluation at step {run.progress.global_step}", samples=1)
    passes = count_passes(run)
    if not run.ranks.writes:
        return
    point = {"global_step": run.progress.global_step, "iteration": run.progress.iteration,
             "token_passes": passes,
             "train_seconds": sum(r["step_time"] for r in run.metrics.read()), **summarise(result),
             # the same prompts and sampling seeds at every point: any two points compare prompt by prompt
             "score_per_prompt": result.values, "kl_per_prompt": result.kl}
    run.progress.curve.append(point)
    write_curve(run.out, run.progress.curve)


def begin_iteration(run, it: int):
    run.progress.phase, run.progress.iteration, run.progress.step = "train", it, 0
    if run.cfg.zo_merge_adapter and it >= 1 and run.merged_guide is None:  # before iter_start: B is zeroed
        run.merged_guide = quant_target.merge_adapter_(run.bundle, run.code_space,
                                                        derive_seed(run.seeds.zo(it), MERGE_STEP))
    policy = run.bundle.policy_parameters()
    run.state.iter_start = {**{f"policy.{n}": p.detach().clone() for n, p in policy.items()},
                            **({f"reward.{n}": p for n, p in reward_state(run.bundle).items()}
                               if run.bundle.shares_parameter_space else {})}
    run.updater = run.make_updater(it)
    snapshot(run, "iteration")  # before the checkpoint that moves past it
    count_passes(run)  # the reward model's passes before it: a resume from this checkpoint must not lose them
    run.save()


def step_prompts(run, it: int, step: int) -> list[str]:
    prompts = [r.prompt for r in run.train_records]
    return random.Random(run.seeds.batch(it, step)).sample(prompts, min(run.cfg.prompts_per_step, len(prompts)))


def train_step(run):
    cfg, it, step = run.cfg, run.progress.iteration, run.progress.step
    t0 = time.perf_counter()
    memory.reset_peak(run.device)
    rollout = collect_step(run.bundle, run.tokenizer, step_prompts(run, it, step), run.ranks,
                           seed=run.seeds.rollout(it, step), score_fn=run.score_fn, **rollout_options(cfg))
    peak_rollout = memory.peak_bytes(run.device)
    memory.reset_peak(run.device)
    zo = run.updater.optimizer if isinstance(run.updater, ZORLOO) else None
    probe = snapshots.StepProbe(run.bundle.policy_parameters(), zo)
    saturated = dict(run.code_space.saturated) if run.code_space is not None else None
    update = run.updater.step(rollout, run.ranks, run.seeds.batch(it, step, 1))
    peak_update = memory.peak_bytes(run.device)
    judge_score = None
    if cfg.reward == "judge":  # the rollout's scores are the judge's
        judge_score = float(rollout.scores.mean())
    elif cfg.log_judge_score and hasattr(run.judge, "score"):  # the gold judge on the policy's own samples
        judge_score = float(rollout.judge_scores(run.judge, run.ranks).mean())
    record = {"iteration": it, "step": step, "global_step": run.progress.global_step, "mode": update.mode,
              "reward": float(rollout.scores.mean()), "reward_total": float(rollout.rewards.mean()),
              "judge_score": judge_score, "kl": float(rollout.kl.mean()), "loss": update.loss,
              "grad": update.grad, "lr": update.lr, "eps": update.eps, "skipped": update.skipped,
              "step_time": time.perf_counter() - t0, "peak_rollout": peak_rollout, "peak_update": peak_update,
              "token_passes": count_passes(run),
              **probe.stats()}
    if saturated is not None:  # codes pushed past the code book's ends in this step (int8 probes: undo inexact)
        record |= {f"saturated_{k}": v - saturated[k] for k, v in run.code_space.saturated.items()}
    run.metrics.write(record)
    run.progress.skipped += update.skipped
    run.progress.step += 1
    run.progress.global_step += 1
    if run.progress.step < cfg.steps_per_iteration:  # the iteration's end gets the boundary snapshot
        snapshot(run, "step", update.mode)
    return record


def end_iteration(run):
    """Refine the reward adapter on judged pairs of this iteration's prompts; compute the next guides."""
    cfg, it = run.cfg, run.progress.iteration
    policy_now = {n: p.detach().clone() for n, p in run.bundle.policy_parameters().items()}
    prev = {n: policy_now[n] - run.state.iter_start[f"policy.{n}"] for n in policy_now}
    delta = {n: torch.zeros_like(p) for n, p in prev.items()}
    # the last refinement would go unused; --reward judge has no reward model to refine
    if run.bundle.shares_parameter_space and cfg.reward == "model" and it + 1 < cfg.iterations:
        seen = sorted({p for s in range(cfg.steps_per_iteration) for p in step_prompts(run, it, s)})
        prompts = random.Random(run.seeds.pairs(it, 2)).sample(seen, min(cfg.reward_pairs, len(seen)))
        previous = reward_state(run.bundle)
        with run.announce(f"reward model: {len(prompts)} judged pairs of iteration {it}'s prompts, "
                          f"{cfg.reward_steps} steps"):
            pairs = judged_pairs(run.bundle, run.tokenizer, run.judge, prompts, sampling_config(cfg),
                                 run.seeds.pairs(it, 3), run.ranks)
            run.progress.reward_losses.append(train_reward(run.bundle, pairs, reward_config(cfg),
                                                           cfg.reward_steps, run.seeds.reward(it + 1),
                                                           run.ranks))
        if cfg.reward_merge_alpha < 1:
            merge_reward_(run.bundle, previous, cfg.reward_merge_alpha)
        distributed.sync_trainable_(run.bundle, run.ranks)
        now = run.bundle.reward_parameters()
        delta = {n: now[n].detach() - run.state.iter_start[f"reward.{n}"] for n in prev}
    previous = run.state.guides.prev if run.state.guides is not None else None
    run.state.guides = Guides(next_guide(cfg.guide, prev, previous, run.updater.first_order_optimizer,
                                         run.bundle.policy_parameters(), run.seeds.placebo(it)), delta)
    log = run.updater.iteration_log()
    if log is not None and run.ranks.writes:  # the ZO optimiser's log: replays the iteration's updates bit for bit
        files.atomic_torch_save(run.out / f"zo_log_iter{it}.pt", log)
    if it + 1 < cfg.iterations:
        begin_iteration(run, it + 1)
    else:
        snapshot(run, "final")
        run.progress.phase = "evaluate"
        run.updater = None
        run.save()


def snapshot(run, kind: str, mode: str | None = None) -> None:
    """The adapters for ``python -m zopro.train.visualize`` (:mod:`zopro.train.snapshots`); the reward adapter
    only at iteration boundaries, the only place it changes."""
    if not run.ranks.writes:
        return
    reward = reward_tensors(run.bundle) if kind != "step" and run.bundle.shares_parameter_space else None
    snapshots.take(run.out, run.cfg.snapshot_every, run.progress, mode or run.updater.mode,
                   run.bundle.policy_parameters(), reward, kind)


def finish(run):
    """Phase 'evaluate': the held-out evaluation of the final policy, checkpointed as phase 'done'. Then, in
    either phase, the evaluation samples and the adapters, written from the 'done' state alone: a resume after a
    kill at any of these writes rewrites them all, equal to an uninterrupted run's."""
    ev = run.progress.evaluation
    prompts = [r.prompt for r in run.eval_records]
    if run.progress.phase == "evaluate":
        after = held_out(run, prompts, "held-out evaluation of the trained policy", reference_texts=ev.before.texts)
        if not run.ranks.writes:  # rank 0 scores the answers and writes every output
            return
        ev.after = after
        ev.change, ev.change_se = paired_change(ev.before.values, after.values)
        ev.held_out = summarise(after, ev.before) if after.values else {}
        run.progress.phase = "done"
        run.save()
    assert run.progress.phase == "done", run.progress.phase
    samples = [{"prompt": p, "before": b, "after": a, "before_score": bs, "after_score": as_}
               for p, b, a, bs, as_ in zip(prompts, ev.before.texts, ev.after.texts, ev.before.values,
                                           ev.after.values)]
    files.atomic_write_text(run.out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    write_curve(run.out, run.progress.curve)
    base_name = None
    if run.cfg.model == "tiny":  # built in code from the seed: nowhere else to load it from
        base_name = str(save_tiny_base(run.tokenizer, run.seeds.tiny_base, run.out / "base").resolve())
    save_adapters(run.bundle, run.out, base_name)
    if run.code_space is not None:  # --zo-target scales/codes trained the base itself: its quantised storage
        files.atomic_torch_save(run.out / "base_quantised.pt", run.code_space.state())


def write_curve(out: Path, curve: list[dict]) -> None:
    """``eval_curve.jsonl``: the in-run evaluations so far, one line each (rewritten whole from the run's state)."""
    if curve:
        files.atomic_write_text(out / "eval_curve.jsonl", "".join(json.dumps(p) + "\n" for p in curve))


def save_adapters(bundle, out: Path, base_model_name_or_path: str | None = None):
    """The trained adapters, twice: zopro's flat files (``policy_adapter.safetensors``; ``reward_adapter.safetensors``
    with the score head), which zopro's tools read, and the standard PEFT folders ``policy/`` and ``reward/``
    (:func:`zopro.train.peft_folders.save`), each written whole to a scratch folder and then renamed into place,
    so a kill never leaves a half folder and a resume rewrites them."""
    for name, params in (("policy_adapter", bundle.policy_parameters()),
                         ("reward_adapter", reward_tensors(bundle) if bundle.shares_parameter_space else {})):
        if params:
            files.atomic_save_tensors(out / f"{name}.safetensors", params)
    with files.scratch_folder(out / ".adapters.tmp") as scratch:
        for name in peft_folders.save(bundle, scratch, base_model_name_or_path):
            files.atomic_publish_dir(scratch / name, out / name)
    shutil.rmtree(scratch)
