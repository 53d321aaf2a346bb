"""zopro: zeroth-order preference optimisation (ZOPrO) of LLMs on the fused kernels of zokernels."""

from zopro.optim import StepResult, ZOOptimizer, derive_seed
from zopro.samplers import Isotropic, RankGuided, Targeted

__all__ = ["ZOOptimizer", "StepResult", "derive_seed", "Isotropic", "Targeted", "RankGuided"]
