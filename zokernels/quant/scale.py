"""Scale space: the continuous fp32 scales of a quantised weight, moved by :func:`zokernels.perturb_` (codes stay)."""

from __future__ import annotations

import torch

from zokernels.perturb import perturb_
from zokernels.quant.formats import Int8Weight, NF4Weight


def scale_params(weight: NF4Weight | Int8Weight) -> list[torch.Tensor]:
    """The continuous fp32 tensors a ZO optimiser perturbs to move ``weight`` in scale space (codes untouched).

    * NF4: ``absmax`` (one per block); when double-quantised, the **nested absmax** (``state2.absmax``, one per 256
      blocks). That keeps the bitsandbytes format valid and in place (its forward re-dequantises absmax from the
      nested state on every call), at the price of a coarse parameterisation: a nested scale moves
      ``absmax_b - offset`` of 256 blocks proportionally. The offset and the uint8 absmax codes stay fixed.
    * int8: ``SCB`` (one per row).

    The tensors are the bnb storage itself: modifying them modifies the model.
    """
    if isinstance(weight, NF4Weight):
        return [weight.nested_absmax if weight.nested else weight.absmax]
    if isinstance(weight, Int8Weight):
        return [weight.scb]
    raise TypeError(f"weight must be an NF4Weight or Int8Weight, got {type(weight).__name__}")


def scale_perturb_(weights, seed: int, scale: float, *, dist: str = "gaussian", streams=None,
                   impl: str = "auto") -> None:
    """In place: ``s += scale * z(seed, stream, index)`` on the scale tensors of each weight (:func:`scale_params`).

    ``weights``: one NF4Weight/Int8Weight or a list; ``streams``: one per weight (default ``0 .. n-1``). A thin
    wrapper over :func:`zokernels.perturb_`, so ``scale_perturb_(w, seed, -scale)`` undoes a call up to one fp32
    rounding per scale.
    """
    weights = list(weights) if isinstance(weights, (list, tuple)) else [weights]
    tensors = [t for w in weights for t in scale_params(w)]
    perturb_(tensors, seed, scale, dist=dist, streams=streams, impl=impl)

