"""The training program (``python -m zopro.train``): preference-tune a causal LM with ZOPrO at inference-level memory.

Reads top to bottom: :class:`Run` (the run's state: config, prompts, models, judge, the iteration's updater, and what
the checkpoint holds, with :meth:`Run.save` and :meth:`Run.restore`), then :func:`run`, which opens the run directory
(:mod:`zopro.train.rundir`) and drives the phases (:mod:`zopro.train.phases`):

* before iteration 0: the reward model (the paper's loop: trained on preference pairs, the dataset's or judge-labelled
  samples of the base policy; none with ``--reward judge``), and the base policy's held-out evaluation;
* iteration 0: first-order RLOO (backprop through the policy adapter, AdamW), or ZO when
  ``--first-order-iteration0 false``;
* iterations >= 1: ZO-RLOO with targeted (or rank-guided) directions from the previous iteration's policy update and
  reward-model update (``--algorithm rloo`` and ``ppo``: first order throughout);
* after each iteration: judge-labelled pairs from the iteration's prompts refine the reward adapter (Bradley–Terry),
  merged with the previous one (``--reward-merge-alpha``);
* at the end: the trained policy's held-out evaluation and every output.

Every step writes a metrics line and an atomic checkpoint, so ``--resume`` after a kill loses at most that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from zopro.seeds import RunSeeds
from zopro.train import checkpoint, distributed, files, phases, quant_target, rundir, snapshots
from zopro.train.config import (
    TrainConfig,
    from_args,
    validate,
    zo_config,
)
from zopro.train.loading import evenly_spaced, load_judge, load_models, load_prompts, resolve_device
from zopro.train.ppo import PPOConfig, PPOUpdater, ValueModel
from zopro.train.report import MetricsLog, Phases, plot_rewards, summary_table
from zopro.train.state import LiveState, Progress, RunState
from zopro.train.updaters import ZORLOO, FirstOrderRLOO, GenerationFitness, logprob_temperature, make_zo_optimizer


# ---------------------------------------------------------------------------------------------------------------------
# The run
class Run:
    """State of one run: what the checkpoint holds, plus the live models and optimisers."""

    def __init__(self, cfg: TrainConfig, out: Path, ranks: distributed.Ranks | None = None, show: bool = False):
        self.cfg, self.out = cfg, out
        self.ranks = ranks or distributed.Ranks()  # data-parallel: only rank 0 writes (zopro.train.distributed)
        self.announce = Phases(show and self.ranks.writes)  # a line per phase on stderr, progress bars inside
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
        self.passes_seen = 0  # the bundle's token_passes already added to progress.token_passes
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
            self.updater = self.make_updater(self.progress.iteration)
            self.updater.load_state_dict(live.objects[self.updater.checkpoint_key])
        self.metrics.truncate(self.progress.metrics_bytes)  # rundir.open_run_dir checked that these bytes are intact
        if self.ranks.writes:
            snapshots.prune_after(self.out, self.progress.global_step)  # steps after the checkpoint are redone
        self.checkpoint_name = loaded.name

    def make_updater(self, it: int):
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
        job = _start(cfg, out, ranks, fresh=loaded is None, lock=lock, show=progress)
        if loaded is not None:
            if ranks.writes:
                checkpoint.remove_stale(out)
            job.restore(loaded)
            ranks.barrier("the resume")  # every rank has read the checkpoint before rank 0 writes the next
        else:
            phases.reward_init(job)
        return _train_and_finish(job, cfg, out, resume, stop_after_steps, pause_after_iteration, progress, started)


def _start(cfg: TrainConfig, out: Path, ranks: distributed.Ranks, fresh: bool, lock, show: bool) -> Run:
    """The run's objects (:class:`Run` loads the prompts, the models and the judge), then, for a new run, its
    ``config.json``: the first byte a run writes comes after every load, so a run refused by one leaves the directory
    as it was (the folders :func:`zopro.train.rundir.open_run_dir` created, and the empty metrics file ``Run``
    opens, removed again)."""
    metrics = out / "metrics.jsonl"
    had_metrics = metrics.exists()
    try:
        job = Run(cfg, out, ranks, show=show)
        if fresh and ranks.writes:
            files.atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        return job
    except BaseException:
        if fresh and ranks.writes and lock is not None and not (out / "config.json").exists():
            if not had_metrics and metrics.is_file() and metrics.stat().st_size == 0:
                metrics.unlink()
            lock.remove_created()
        raise


def _train_and_finish(job: Run, cfg, out, resume, stop_after_steps, pause_after_iteration, progress, started):
    total = cfg.iterations * cfg.steps_per_iteration
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=job.progress.global_step, desc="ZOPrO",
               disable=not progress or not job.ranks.writes, file=sys.stderr)
    done_now = 0
    while job.progress.phase == "train":
        while job.progress.step < cfg.steps_per_iteration:
            if stop_after_steps is not None and done_now >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {done_now} steps (simulated kill)")
            record = phases.train_step(job)
            done_now += 1
            if cfg.eval_every and job.progress.global_step % cfg.eval_every == 0:
                phases.curve_point(job)  # before the checkpoint: a resume redoes both or neither
            if job.progress.step % cfg.checkpoint_every == 0 or job.progress.step == cfg.steps_per_iteration:
                job.save()
            bar.update(1)
            bar.set_postfix(iter=record["iteration"], mode=record["mode"], reward=f"{record['reward']:.3f}",
                            kl=f"{record['kl']:.3f}")
        if job.progress.iteration == pause_after_iteration:  # its last step is checkpointed: a resume goes on
            bar.close()
            return None
        phases.end_iteration(job)
        if job.ranks.writes:
            plot_rewards(job.metrics.read(), out / "reward_curve.png")
    bar.close()
    if not job.ranks.writes:  # the evaluation's generation is split; its scores and every output are rank 0's
        if job.progress.phase == "evaluate":
            phases.finish(job)
        return None
    phases.finish(job)  # phase 'evaluate' or 'done': either way every output below is (re)written from the checkpoint
    records = job.metrics.read()
    plot_rewards(records, out / "reward_curve.png")
    evaluation = job.progress.evaluation.summary()
    table = summary_table(records, evaluation)
    files.atomic_write_text(out / "summary.md", table + "\n")
    summary = {"evaluation": evaluation, "steps": len(records), "skipped": job.progress.skipped,
               "reward_losses": job.progress.reward_losses, "output_dir": str(out),
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
