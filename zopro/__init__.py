"""zopro: zeroth-order preference optimisation (ZOPrO) of LLMs on the fused kernels of zokernels."""

from zopro.optim import StepResult, ZOOptimizer
from zopro.samplers import Core, Isotropic, RankGuided, Targeted
from zopro.seeds import derive_seed

__all__ = ["ZOOptimizer", "StepResult", "derive_seed", "Isotropic", "Targeted", "RankGuided", "Core"]
