"""The training program (``python -m zopro.train``): preference-tune a causal LM with ZOPrO at inference-level memory.

Reads straight through: setup (config, data, models, judge, checkpoint), helpers (pairs and reward training,
evaluation, one step of each kind), then the loop over iterations:

* before iteration 0: the reward adapter is trained on preference pairs (the dataset's, or judge-labelled samples
  of the base policy when the dataset has none);
* iteration 0: first-order RLOO (backprop through the policy adapter, AdamW), or isotropic ZO when
  ``--first-order-iteration0 false``;
* iterations >= 1: ZO-RLOO with targeted (or rank-guided) sampling from the previous iteration's policy update and
  reward-model update;
* after each iteration: judge-labelled pairs from the iteration's prompts refine the reward adapter (Bradley–Terry),
  merged with the previous one (``--reward-merge-alpha``).

Every step writes a metrics line and an atomic checkpoint, so ``--resume`` after a kill loses at most that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from zopro.seeds import RunSeeds, derive_seed
from zopro.train import checkpoint, distributed, files, memory, peft_folders, quant_target, rundir, snapshots
from zopro.train.config import (
    TrainConfig,
    eval_config,
    from_args,
    reward_config,
    sampling_config,
    validate,
    zo_config,
)
from zopro.train.heldout import HeldOut, evaluate, paired_change, summarise
from zopro.train.loading import evenly_spaced, load_judge, load_models, load_prompts, resolve_device, save_tiny_base
from zopro.train.next_guide import next_guide
from zopro.train.ppo import PPOConfig, PPOUpdater, ValueModel
from zopro.train.report import MetricsLog, Phases, plot_rewards, summary_table
from zopro.train.reward_adapter import (
    dataset_pairs,
    judged_pairs,
    merge_reward_,
    reward_state,
    reward_tensors,
    train_reward,
)
from zopro.train.rollout import collect_step
from zopro.train.state import Guides, LiveState, Progress, RunState
from zopro.train.updaters import ZORLOO, FirstOrderRLOO, GenerationFitness, logprob_temperature, make_zo_optimizer

# the merge's rounding seed: derive_seed(ZO seed of the iteration, MERGE_STEP), a step no optimiser reaches
MERGE_STEP = 1 << 40


# ---------------------------------------------------------------------------------------------------------------------
# The run
class Run:
    """State of one run: what the checkpoint holds, plus the live models and optimisers."""

    def __init__(self, cfg: TrainConfig, out: Path, ranks: distributed.Ranks | None = None, show: bool = False):
        self.cfg, self.out = cfg, out
        self.ranks = ranks or distributed.Ranks()  # data-parallel: only rank 0 writes (zopro.train.distributed)
        self.phases = Phases(show and self.ranks.writes)  # a line per phase on stderr, progress bars inside
        self.seeds = RunSeeds.of(cfg)
        self.device = resolve_device(cfg)
        self.train_records, self.eval_records = load_prompts(cfg)
        self.bundle, self.tokenizer = load_models(cfg, self.device)
        # --zo-target scales/codes: the base's quantised layers as ZO's parameter space, for the whole run
        self.code_space = quant_target.code_space(self.bundle) if cfg.zo_target != "lora" else None
        self.merged_guide = None  # --zo-merge-adapter: the policy updates merged into the base codes (the guides)
        self.judge = load_judge(cfg, self.device)
        # --reward judge: the rollouts are scored by the judge itself instead of the learned reward model
        self.score_fn = self.judge.score if cfg.reward == "judge" else None
        self.curve_prompts = evenly_spaced([r.prompt for r in self.eval_records], cfg.eval_curve_prompts)
        self._passes_seen = 0  # the bundle's token_passes already added to progress.token_passes
        self.metrics = MetricsLog(out / "metrics.jsonl") if self.ranks.writes else distributed.NullLog()
        self.state = RunState()  # what the checkpoint holds besides the live models' and optimiser's state
        self.updater = None  # the iteration's (FirstOrderRLOO, ZORLOO or PPOUpdater); None outside phase 'train'
        self.value_model = self.ppo_cfg = None
        self.checkpoint_name: str | None = None  # the verified checkpoint the run holds: the next one's fallback
        if cfg.algorithm == "ppo":  # the critic: a value adapter on the shared base plus a head, kept for the run
            self.ppo_cfg = PPOConfig(kl_coef=cfg.kl_coef, ppo_epochs=cfg.ppo_epochs, lr=cfg.fo_lr,
                                     seed=self.seeds.critic, logprob_temperature=logprob_temperature(cfg))
            self.value_model = ValueModel(self.bundle, seed=self.seeds.critic)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property
    def progress(self) -> Progress:
        return self.state.progress

    def save(self):
        if not self.ranks.writes:
            return
        progress = self.progress
        progress.metrics_bytes = self.metrics.size()
        # the metrics lines this checkpoint vouches for: a resume checks them before cutting the file back to them
        progress.metrics_sha256 = files.sha256_prefix(self.metrics.path, progress.metrics_bytes)
        live = LiveState(trainable=self.bundle.trainable_state())
        if self.value_model is not None:
            live.value = {n: p.detach().clone() for n, p in self.value_model.trainable_parameters().items()}
        if self.updater is not None:
            live.objects[self.updater.checkpoint_key] = self.updater.state_dict()
        if self.code_space is not None:  # the base is loaded anew on a resume: its moved codes and scales go here
            live.objects["base_quantised"] = self.code_space.state()
        if self.merged_guide is not None:
            live.objects["merged_guide"] = quant_target.lowrank_tensors(self.merged_guide)
        name = f"{progress.global_step:06d}-{progress.phase}"
        self.checkpoint_name = checkpoint.save(self.out, name, **self.state.to_checkpoint(live),
                                               previous=self.checkpoint_name)

    def restore(self, loaded: checkpoint.Loaded) -> None:
        """Continue from a verified checkpoint (``checkpoint.load``); the metrics file is cut back to its lines."""
        self.state, live = RunState.from_checkpoint(loaded)
        self.bundle.load_trainable_state_(live.trainable)
        if self.code_space is not None:
            if "base_quantised" in live.objects:
                self.code_space.load_state_(live.objects["base_quantised"])
            elif self.progress.iteration > 0:  # codes move (and --zo-merge-adapter merges) from iteration 1 on only
                raise ValueError(f"checkpoint {loaded.name}: no quantised base to restore for --zo-target "
                                 f"{self.cfg.zo_target} past iteration 0")
            # else a checkpoint of iteration 0 from a run that kept no code space (benchmarks.zo_ablation's arms
            # share one iteration 0): the base as loaded is the base the codes start from
        if "merged_guide" in live.objects:
            self.merged_guide = quant_target.lowrank_from_tensors(live.objects["merged_guide"])
        if self.value_model is not None:
            with torch.no_grad():
                for n, p in self.value_model.trainable_parameters().items():
                    p.copy_(live.value[n])
        if self.progress.phase == "train":
            self.updater = self._updater(self.progress.iteration)
            self.updater.load_state_dict(live.objects[self.updater.checkpoint_key])
        self.metrics.truncate(self.progress.metrics_bytes)  # rundir.open_run_dir checked that these bytes are intact
        if self.ranks.writes:
            snapshots.prune_after(self.out, self.progress.global_step)  # steps after the checkpoint are redone
        self.checkpoint_name = loaded.name

    def _updater(self, it: int):
        """Iteration ``it``'s updater: PPO, first-order RLOO (``--algorithm rloo``, and zopro's iteration 0 unless
        ``--first-order-iteration0 false``) or ZO-RLOO from the current guides."""
        cfg = self.cfg
        if cfg.algorithm == "ppo":
            return PPOUpdater(self.bundle, self.value_model, self.ppo_cfg)
        if cfg.algorithm == "rloo" or (it == 0 and cfg.first_order_iteration0):
            return FirstOrderRLOO(self.bundle, lr=cfg.fo_lr, loss=cfg.loss, clip=cfg.clip, microbatch=cfg.fo_microbatch)
        if self.code_space is not None:
            zo = quant_target.make_quant_optimizer(self.bundle, self.code_space, cfg.zo_target, zo_config(cfg), it,
                                                   self.state.guides, self.seeds, self.merged_guide)
        else:
            zo = make_zo_optimizer(self.bundle, zo_config(cfg), it, self.state.guides, self.seeds)
        generation = GenerationFitness(self.tokenizer, self.score_fn, cfg.max_new_tokens, cfg.max_prompt_len) \
            if cfg.zo_objective == "generation" else None
        return ZORLOO(self.bundle, zo, loss=cfg.loss, clip=cfg.clip, minibatches=cfg.minibatches, epochs=cfg.zo_epochs,
                      generation=generation, batch_members=cfg.zo_batch_members)

    # -- phases ---------------------------------------------------------------------------------------------------
    def reward_init(self):
        """Before iteration 0: the reward model (unless ``--reward judge``), then the base policy's held-out
        evaluation and the learning curve's first point."""
        cfg = self.cfg
        if cfg.reward == "model":
            has_pairs = any(r.chosen is not None and r.rejected is not None for r in self.train_records)
            if has_pairs:
                with self.phases("reward model: the dataset's preference pairs"):
                    pairs = dataset_pairs(self.bundle, self.tokenizer, self.train_records, reward_config(cfg),
                                          self.ranks)
            else:
                prompts = random.Random(self.seeds.pairs(0)).sample([r.prompt for r in self.train_records],
                                                                     min(cfg.reward_pairs, len(self.train_records)))
                with self.phases(f"reward model: {len(prompts)} pairs of the base policy's answers, judged by "
                                 f"--judge {cfg.judge}"):
                    pairs = judged_pairs(self.bundle, self.tokenizer, self.judge, prompts, sampling_config(cfg),
                                         self.seeds.pairs(1), self.ranks)
            with self.phases(f"reward model: {cfg.reward_init_steps} Bradley-Terry steps"):
                loss = train_reward(self.bundle, pairs, reward_config(cfg), cfg.reward_init_steps,
                                    self.seeds.reward(0), self.ranks)
            distributed.sync_trainable_(self.bundle, self.ranks)
            self.progress.reward_losses.append(loss)
        before = self.held_out([r.prompt for r in self.eval_records], "held-out evaluation of the base policy")
        # the answers themselves are kept: a pairwise judge scores "after" against them, and users read them
        self.progress.evaluation = {"metric": before.metric,
                                    "before": statistics.fmean(before.values) if before.values else None,
                                    "n": len(self.eval_records), "samples": cfg.eval_samples,
                                    "before_per_prompt": before.values, "before_texts": before.texts,
                                    "before_kl": before.kl, "before_tokens": before.tokens}
        self.curve_point()
        self.begin_iteration(0)

    def held_out(self, prompts: list[str], what: str, reference_texts=None, samples: int | None = None) -> HeldOut:
        """:func:`evaluate` on ``prompts``, shown as the phase ``what``; its forward passes are not the training's, so
        they are not counted in ``token_passes``."""
        ev = eval_config(self.cfg)
        if samples is not None:
            ev = dataclasses.replace(ev, samples=samples)
        passes = self.bundle.token_passes
        with self.phases(what):
            result = evaluate(self.bundle, self.tokenizer, self.judge, prompts, ev, self.seeds,
                              reference_texts=reference_texts, ranks=self.ranks, progress=self.phases.show)
        self.bundle.token_passes = passes
        return result

    def count_passes(self) -> int:
        """The forward token-passes of the policy's training so far, every rank's (a collective: every rank calls it
        at the same points), kept in the checkpoint's progress."""
        local = self.bundle.token_passes - self._passes_seen
        self._passes_seen = self.bundle.token_passes
        self.progress.token_passes += sum(self.ranks.gather_json(local, "the step's token-passes"))
        return self.progress.token_passes

    def curve_point(self) -> None:
        """The in-run evaluation (``--eval-every``): one answer to each of ``--eval-curve-prompts`` held-out prompts,
        sampled with the evaluation's seeds, so every point and every run with the same ``--seed`` draws alike."""
        if not self.cfg.eval_every:
            return
        result = self.held_out(self.curve_prompts, f"in-run evaluation at step {self.progress.global_step}",
                               samples=1)
        passes = self.count_passes()
        if not self.ranks.writes:
            return
        point = {"global_step": self.progress.global_step, "iteration": self.progress.iteration,
                 "token_passes": passes,
                 "train_seconds": sum(r["step_time"] for r in self.metrics.read()), **summarise(result),
                 # the same prompts and sampling seeds at every point: any two points compare prompt by prompt
                 "score_per_prompt": result.values, "kl_per_prompt": result.kl}
        self.progress.curve.append(point)
        write_curve(self.out, self.progress.curve)

    def begin_iteration(self, it: int):
        self.progress.phase, self.progress.iteration, self.progress.step = "train", it, 0
        if self.cfg.zo_merge_adapter and it >= 1 and self.merged_guide is None:  # before iter_start: B is zeroed
            self.merged_guide = quant_target.merge_adapter_(self.bundle, self.code_space,
                                                             derive_seed(self.seeds.zo(it), MERGE_STEP))
        policy = self.bundle.policy_parameters()
        self.state.iter_start = {**{f"policy.{n}": p.detach().clone() for n, p in policy.items()},
                                 **({f"reward.{n}": p for n, p in reward_state(self.bundle).items()}
                                    if self.bundle.shares_parameter_space else {})}
        self.updater = self._updater(it)
        self._snapshot("iteration")  # before the checkpoint that moves past it
        self.count_passes()  # the reward model's passes before it: a resume from this checkpoint must not lose them
        self.save()

    def step_prompts(self, it: int, step: int) -> list[str]:
        prompts = [r.prompt for r in self.train_records]
        return random.Random(self.seeds.batch(it, step)).sample(prompts, min(self.cfg.prompts_per_step,
                                                                                    len(prompts)))

    def train_step(self):
        cfg, it, step = self.cfg, self.progress.iteration, self.progress.step
        t0 = time.perf_counter()
        memory.reset_peak(self.device)
        rollout = collect_step(self.bundle, self.tokenizer, self.step_prompts(it, step), self.ranks, k=cfg.k,
                               max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               kl_coef=cfg.kl_coef, seed=self.seeds.rollout(it, step),
                               max_prompt_len=cfg.max_prompt_len, logprob_temperature=logprob_temperature(cfg),
                               score_fn=self.score_fn)
        peak_rollout = memory.peak_bytes(self.device)
        memory.reset_peak(self.device)
        zo = self.updater.optimizer if isinstance(self.updater, ZORLOO) else None
        probe = snapshots.StepProbe(self.bundle.policy_parameters(), zo)
        saturated = dict(self.code_space.saturated) if self.code_space is not None else None
        update = self.updater.step(rollout, self.ranks, self.seeds.batch(it, step, 1))
        peak_update = memory.peak_bytes(self.device)
        judge_score = None
        if cfg.reward == "judge":  # the rollout's scores are the judge's
            judge_score = float(rollout.scores.mean())
        elif cfg.log_judge_score and hasattr(self.judge, "score"):  # the gold judge on the policy's own samples
            judge_score = float(rollout.judge_scores(self.judge, self.ranks).mean())
        record = {"iteration": it, "step": step, "global_step": self.progress.global_step, "mode": update.mode,
                  "reward": float(rollout.scores.mean()), "reward_total": float(rollout.rewards.mean()),
                  "judge_score": judge_score, "kl": float(rollout.kl.mean()), "loss": update.loss,
                  "grad": update.grad, "lr": update.lr, "eps": update.eps, "skipped": update.skipped,
                  "step_time": time.perf_counter() - t0, "peak_rollout": peak_rollout, "peak_update": peak_update,
                  "token_passes": self.count_passes(),
                  **probe.stats()}
        if saturated is not None:  # codes pushed past the code book's ends in this step (int8 probes: undo inexact)
            record |= {f"saturated_{k}": v - saturated[k] for k, v in self.code_space.saturated.items()}
        self.metrics.write(record)
        self.progress.skipped += update.skipped
        self.progress.step += 1
        self.progress.global_step += 1
        if self.progress.step < cfg.steps_per_iteration:  # the iteration's end gets the boundary snapshot
            self._snapshot("step", update.mode)
        return record

    def end_iteration(self):
        """Refine the reward adapter on judged pairs of this iteration's prompts; compute the next guides."""
        cfg, it = self.cfg, self.progress.iteration
        policy_now = {n: p.detach().clone() for n, p in self.bundle.policy_parameters().items()}
        prev = {n: policy_now[n] - self.state.iter_start[f"policy.{n}"] for n in policy_now}
        delta = {n: torch.zeros_like(p) for n, p in prev.items()}
        # the last refinement would go unused; --reward judge has no reward model to refine
        if self.bundle.shares_parameter_space and cfg.reward == "model" and it + 1 < cfg.iterations:
            seen = sorted({p for s in range(cfg.steps_per_iteration) for p in self.step_prompts(it, s)})
            prompts = random.Random(self.seeds.pairs(it, 2)).sample(seen, min(cfg.reward_pairs, len(seen)))
            previous = reward_state(self.bundle)
            with self.phases(f"reward model: {len(prompts)} judged pairs of iteration {it}'s prompts, "
                             f"{cfg.reward_steps} steps"):
                pairs = judged_pairs(self.bundle, self.tokenizer, self.judge, prompts, sampling_config(cfg),
                                     self.seeds.pairs(it, 3), self.ranks)
                self.progress.reward_losses.append(train_reward(self.bundle, pairs, reward_config(cfg),
                                                                cfg.reward_steps, self.seeds.reward(it + 1),
                                                                self.ranks))
            if cfg.reward_merge_alpha < 1:
                merge_reward_(self.bundle, previous, cfg.reward_merge_alpha)
            distributed.sync_trainable_(self.bundle, self.ranks)
            now = self.bundle.reward_parameters()
            delta = {n: now[n].detach() - self.state.iter_start[f"reward.{n}"] for n in prev}
        previous = self.state.guides.prev if self.state.guides is not None else None
        self.state.guides = Guides(next_guide(cfg.guide, prev, previous, self.updater.first_order_optimizer,
                                              self.bundle.policy_parameters(), self.seeds.placebo(it)), delta)
        log = self.updater.iteration_log()
        if log is not None and self.ranks.writes:  # the ZO optimiser's log: replays the iteration's updates bit for bit
            files.atomic_torch_save(self.out / f"zo_log_iter{it}.pt", log)
        if it + 1 < cfg.iterations:
            self.begin_iteration(it + 1)
        else:
            self._snapshot("final")
            self.progress.phase = "evaluate"
            self.updater = None
            self.save()

    def _snapshot(self, kind: str, mode: str | None = None) -> None:
        """The adapters for ``python -m zopro.train.visualize`` (:mod:`zopro.train.snapshots`); the reward adapter
        only at iteration boundaries, the only place it changes."""
        if not self.ranks.writes:
            return
        reward = reward_tensors(self.bundle) if kind != "step" and self.bundle.shares_parameter_space else None
        snapshots.take(self.out, self.cfg.snapshot_every, self.progress, mode or self.updater.mode,
                       self.bundle.policy_parameters(), reward, kind)

    def finish(self):
        """Phase 'evaluate': the held-out evaluation of the final policy, checkpointed as phase 'done'. Then, in
        either phase, the evaluation samples and the adapters, written from the 'done' state alone: a resume after a
        kill at any of these writes rewrites them all, equal to an uninterrupted run's."""
        ev = self.progress.evaluation
        prompts = [r.prompt for r in self.eval_records]
        if self.progress.phase == "evaluate":
            after = self.held_out(prompts, "held-out evaluation of the trained policy",
                                  reference_texts=ev["before_texts"])
            if not self.ranks.writes:  # rank 0 scores the answers and writes every output
                return
            ev["after"] = statistics.fmean(after.values) if after.values else None
            ev["change"], ev["change_se"] = paired_change(ev["before_per_prompt"], after.values)
            ev["after_per_prompt"], ev["after_texts"] = after.values, after.texts
            ev["after_kl"], ev["after_tokens"] = after.kl, after.tokens
            before = HeldOut(ev["metric"], ev["before_per_prompt"], ev["before_texts"], ev.get("before_kl"),
                             ev.get("before_tokens"))
            ev["held_out"] = summarise(after, before) if after.values else {}
            self.progress.phase = "done"
            self.save()
        assert self.progress.phase == "done", self.progress.phase
        samples = [{"prompt": p, "before": b, "after": a, "before_score": bs, "after_score": as_}
                   for p, b, a, bs, as_ in zip(prompts, ev["before_texts"], ev["after_texts"], ev["before_per_prompt"],
                                               ev["after_per_prompt"])]
        files.atomic_write_text(self.out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        write_curve(self.out, self.progress.curve)
        base_name = None
        if self.cfg.model == "tiny":  # built in code from the seed: nowhere else to load it from
            base_name = str(save_tiny_base(self.tokenizer, self.seeds.tiny_base, self.out / "base").resolve())
        save_adapters(self.bundle, self.out, base_name)
        if self.code_space is not None:  # --zo-target scales/codes trained the base itself: its quantised storage
            files.atomic_torch_save(self.out / "base_quantised.pt", self.code_space.state())


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


def check_judge(cfg: TrainConfig) -> None:
    """A ``vader`` or ``python:`` judge loaded and asked to score one answer, before anything is written: a module
    that cannot be imported, a missing function, a scorer that raises or returns no finite number is one line."""
    kind = cfg.judge.partition(":")[0]
    if cfg.judge != "vader" and kind != "python":
        return  # model judges: their reference is checked with the run directory; the heuristic is ours
    judge = load_judge(cfg, torch.device("cpu"))
    judge.score(["Describe a quiet beach in a few words."], ["Soft sand, calm water and a warm breeze."])


def run(cfg: TrainConfig, resume: bool = False, *, stop_after_steps: int | None = None,
        pause_after_iteration: int | None = None, progress: bool = True):
    """Run (or resume) a ZOPrO job; returns the summary dict (None on ranks other than 0 of a data-parallel job, see
    :mod:`zopro.train.distributed`). ``stop_after_steps`` simulates a kill (tests). ``pause_after_iteration=N``
    returns None once iteration ``N``'s last step is checkpointed, before the iteration ends (its reward refinement
    and guides): a later ``run(cfg, resume=True)`` continues it, or :func:`zopro.train.rundir.branch` copies it to
    continue with settings that act only from there on (``benchmarks/zo_ablation.py``).

    The run directory's lock is held from before the first read of the directory to the end; a resume continues
    from the newest verified checkpoint (or, with a message, the one before it when the newest is damaged), and a
    resume of a finished run rewrites its outputs."""
    started = time.perf_counter()
    cfg = validate(cfg)
    check_judge(cfg)
    ranks = distributed.set_up(cfg, resolve_device(cfg))  # one process unless launched by torchrun
    with contextlib.ExitStack() as cleanup:  # on the way out, whatever happens: the lock, then the process group
        cleanup.callback(distributed.tear_down, ranks)
        cfg, lock, loaded = rundir.open_shared(distributed.resolve(cfg, ranks), resume, ranks)
        if lock is not None:
            cleanup.callback(lock.close)
        out = Path(cfg.output_dir)
        for line in loaded.skipped if loaded and ranks.writes else ():
            print(f"warning: {line}; resuming from the previous checkpoint, {loaded.name}", file=sys.stderr)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        state = _start(cfg, out, ranks, fresh=loaded is None, lock=lock, show=progress)
        if loaded is not None:
            if ranks.writes:
                checkpoint.remove_stale(out)
            state.restore(loaded)
            ranks.barrier("the resume")  # every rank has read the checkpoint before rank 0 writes the next
        else:
            state.reward_init()
        return _train_and_finish(state, cfg, out, resume, stop_after_steps, pause_after_iteration, progress, started)


def _start(cfg: TrainConfig, out: Path, ranks: distributed.Ranks, fresh: bool, lock, show: bool) -> Run:
    """The run's objects (:class:`Run` loads the prompts, the models and the judge), then, for a new run, its
    ``config.json``: the first byte a run writes comes after every load, so a run refused by one leaves the directory
    as it was (the folders :func:`zopro.train.rundir.open_run_dir` created, and the empty metrics file ``Run``
    opens, removed again)."""
    metrics = out / "metrics.jsonl"
    had_metrics = metrics.exists()
    try:
        state = Run(cfg, out, ranks, show=show)
        if fresh and ranks.writes:
            files.atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        return state
    except BaseException:
        if fresh and ranks.writes and lock is not None and not (out / "config.json").exists():
            if not had_metrics and metrics.is_file() and metrics.stat().st_size == 0:
                metrics.unlink()
            lock.remove_created()
        raise


def _train_and_finish(state, cfg, out, resume, stop_after_steps, pause_after_iteration, progress, started):
    total = cfg.iterations * cfg.steps_per_iteration
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.progress.global_step, desc="ZOPrO",
               disable=not progress or not state.ranks.writes, file=sys.stderr)
    done_now = 0
    while state.progress.phase == "train":
        while state.progress.step < cfg.steps_per_iteration:
            if stop_after_steps is not None and done_now >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {done_now} steps (simulated kill)")
            record = state.train_step()
            done_now += 1
            if cfg.eval_every and state.progress.global_step % cfg.eval_every == 0:
                state.curve_point()  # before the checkpoint: a resume redoes both or neither
            if state.progress.step % cfg.checkpoint_every == 0 or state.progress.step == cfg.steps_per_iteration:
                state.save()
            bar.update(1)
            bar.set_postfix(iter=record["iteration"], mode=record["mode"], reward=f"{record['reward']:.3f}",
                            kl=f"{record['kl']:.3f}")
        if state.progress.iteration == pause_after_iteration:  # its last step is checkpointed: a resume goes on
            bar.close()
            return None
        state.end_iteration()
        if state.ranks.writes:
            plot_rewards(state.metrics.read(), out / "reward_curve.png")
    bar.close()
    if not state.ranks.writes:  # the evaluation's generation is split; its scores and every output are rank 0's
        if state.progress.phase == "evaluate":
            state.finish()
        return None
    state.finish()  # phase 'evaluate' or 'done': either way every output below is (re)written from the checkpoint
    records = state.metrics.read()
    plot_rewards(records, out / "reward_curve.png")
    table = summary_table(records, state.progress.evaluation)
    files.atomic_write_text(out / "summary.md", table + "\n")
    evaluation = {k: v for k, v in state.progress.evaluation.items()
                  if not k.startswith(("before_", "after_")) or k == "after"}
    summary = {"evaluation": evaluation, "steps": len(records), "skipped": state.progress.skipped,
               "reward_losses": state.progress.reward_losses, "output_dir": str(out),
               "wall_seconds": time.perf_counter() - started, "resumed": resume}
    files.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    if progress:
        print(table)
        print(f"run directory: {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = None
    try:
        cfg, resume = from_args(argv)
        run(cfg, resume)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    except distributed.RankLost as err:  # another rank of the job died: one line on each survivor
        print(f"error: {err}", file=sys.stderr)
        return 3
    except OSError as err:  # a full disk or a read-only mount: the directory holds the last complete write
        line = files.disk_error(err, cfg.output_dir if cfg is not None else "--output-dir")
        if line is None:
            raise
        print(f"error: {line} (the run directory holds its last complete checkpoint: fix this, then --resume "
              "continues the run exactly)", file=sys.stderr)
        return 3
    return 0
