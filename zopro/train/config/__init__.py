"""The training configuration: one flat dataclass with its presets (:mod:`.schema`), the checks every value passes
(:mod:`.checks`), and the command line and config files that fill it (:mod:`.parsing`).

Config files may be flat (``{"zo_lr": 1.0}``, as every ``config.json`` a run writes) or nested by the sections of
``--help`` (:data:`SECTIONS`, e.g. ``{"zo": {"lr": 1.0}}``; a field's name inside its section drops the section's
prefix where it has one); both read the same.
"""

from zopro.train.config.checks import RESUME_OVERRIDES, coerce, flag, resume_differences, validate
from zopro.train.config.parsing import FLAG_GROUPS, LEGACY, SECTIONS, build_parser, from_args, load_file, load_saved
from zopro.train.config.schema import (
    ALGORITHMS,
    CHOICES,
    DATASETS,
    DEFAULTS,
    GUIDE_BLOCKS,
    GUIDES,
    LOSSES,
    PRESETS,
    QUANTIZE,
    RANGES,
    REWARDS,
    SAMPLERS,
    ZO_FITNESS,
    ZO_TARGETS,
    EvalConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    ZOConfig,
    eval_config,
    preset,
    reward_config,
    sampling_config,
    zo_config,
)

__all__ = [
    "ALGORITHMS", "CHOICES", "DATASETS", "DEFAULTS", "FLAG_GROUPS", "GUIDES", "GUIDE_BLOCKS", "LEGACY", "LOSSES",
    "PRESETS", "QUANTIZE", "RANGES", "RESUME_OVERRIDES", "REWARDS", "SAMPLERS", "SECTIONS", "ZO_FITNESS",
    "ZO_TARGETS", "EvalConfig", "RewardConfig", "SamplingConfig", "TrainConfig", "ZOConfig", "build_parser", "coerce",
    "eval_config", "flag", "from_args", "load_file", "load_saved", "preset", "resume_differences", "reward_config",
    "sampling_config", "validate", "zo_config",
]
