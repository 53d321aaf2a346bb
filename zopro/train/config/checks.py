"""Checking a configuration: every value converted strictly to its field's type (:func:`coerce`, one code path for
flags, config files and Python), its range or choices, and the combinations that cannot run (:func:`validate`); what
a ``--resume`` may change (:data:`RESUME_OVERRIDES`). Every refusal is one ``ValueError`` line naming the flag.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import fields

from zopro.train.config.schema import CHOICES, DATASETS, DEFAULTS, PRESETS, RANGES, TrainConfig

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
    kind = type(DEFAULTS[name])
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
