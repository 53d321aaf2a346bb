"""Reading settings: the command line (:func:`build_parser`, its flags grouped by concern as :data:`FLAG_GROUPS`),
JSON or YAML config files (:func:`load_file`) and a run's saved ``config.json`` (:func:`load_saved`), resolved as
preset -> config file -> flags (:func:`from_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import fields
from pathlib import Path

from zopro.train.config.checks import RESUME_OVERRIDES, coerce, flag, validate
from zopro.train.config.schema import DEFAULTS, TrainConfig, preset

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

# Each group as a section of a nested config file: its key, and the prefix its fields drop inside it (``{"zo": {"lr":
# 1.0}}`` is ``{"zo_lr": 1.0}``). A section is a mapping; a field's value never is, so a key that names both (model,
# reward_model) reads as the section only when its value is a mapping.
SECTIONS: dict[str, tuple[str, str]] = dict(zip(
    ("run", "task", "eval", "base", "rollout", "schedule", "first_order", "zo", "reward_model", "quantised",
     "distributed", "experimental"),
    zip(FLAG_GROUPS, ("", "", "eval_", "", "", "", "fo_", "zo_", "reward_", "", "", "")), strict=True))


def _section_names(section: str) -> dict[str, str]:
    """The names a section accepts (a field's short name, and its flat name too) -> the field."""
    title, prefix = SECTIONS[section]
    group = FLAG_GROUPS[title]
    return {name.removeprefix(prefix): name for name in group} | {name: name for name in group}


def _flatten(data: dict, path: Path, what: str) -> dict:
    """A config file's mapping with its sections (:data:`SECTIONS`) read into flat field names; a section's unknown
    name or a setting given twice (flat and in its section) is one line naming the file."""
    flat = {k: v for k, v in data.items() if not (k in SECTIONS and isinstance(v, dict))}
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            continue
        names = _section_names(section)
        for key, value in values.items():
            if key not in names:
                short = sorted({name.removeprefix(SECTIONS[section][1]) for name in names.values()})
                raise ValueError(f"{what}: unknown setting {section}.{key} in {path} (the section {section!r} holds "
                                 f"{', '.join(short)})")
            if names[key] in flat:
                raise ValueError(f"{what}: {names[key]} given twice in {path} (also as {section}.{key})")
            flat[names[key]] = value
    return flat


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
    data = _flatten(_read_mapping(path, what), path, what)
    unknown = sorted(set(data) - set(DEFAULTS))
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
    saved_path = Path(given.get("output_dir", from_file.get("output_dir", DEFAULTS["output_dir"]))) / "config.json"
    if args.resume and saved_path.is_file():
        cfg = TrainConfig(**load_saved(saved_path))
    else:
        cfg = preset(given.get("preset", from_file.get("preset", "default")))
    cfg = dataclasses.replace(cfg, **{**from_file, **given})
    return validate(cfg), args.resume
