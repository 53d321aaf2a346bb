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



def scale_guide(weight: NF4Weight | Int8Weight, guide) -> torch.Tensor:
    """A weight-space guide (dense, of the weight's shape, or a :class:`~zokernels.guided.LowRank`) carried into
    scale space: the direction of :func:`scale_params` along which the dequantised weight moves most like ``guide``
    to first order, ``J^T guide`` with ``J = dW/ds`` (``W`` is linear in the scales):

    * NF4 absmax: ``g[b] = sum_{i in block b} guide_i * code[c_i]``;
    * nested absmax: ``g[k] = sum_{b in nested block k} nested_code[q_b] * (sum_{i in b} guide_i * code[c_i])``;
    * int8 SCB: ``g[r] = sum_j guide[r, j] * codes[r, j] / 127`` (with bitsandbytes' reciprocal of 127).

    Float32, the scale tensor's shape; computed in chunks (a LowRank guide rank by rank), never a dense copy of the
    weight. A reduction run once per ZO iteration, so it has no Triton kernel."""
    from zokernels.guided import LowRank
    from zokernels.quant.formats import INV127, unpack_nibbles
    from zokernels.quant.guides import check_guide_terms, guide_chunk, shadow

    if not isinstance(weight, (NF4Weight, Int8Weight)):
        raise TypeError(f"weight must be an NF4Weight or Int8Weight, got {type(weight).__name__}")
    device = weight.codes.device
    check_guide_terms([([guide], torch.ones(1))], [shadow(weight.shape, device)])
    if not isinstance(guide, (torch.Tensor, LowRank)):
        raise TypeError(f"guide must be a tensor or a LowRank, got {type(guide).__name__}")
    cols = weight.shape[-1]
    with torch.no_grad():
        if isinstance(weight, Int8Weight):
            rows = max(1, (1 << 18) // max(cols, 1))
            out = torch.empty(weight.shape[0], dtype=torch.float32, device=device)
            for r0 in range(0, weight.shape[0], rows):
                r1 = min(weight.shape[0], r0 + rows)
                g = guide_chunk(guide, cols, r0 * cols, r1 * cols).reshape(r1 - r0, cols)
                out[r0:r1] = (g * weight.codes[r0:r1].float()).sum(1) * INV127
            return out
        per_block = torch.empty(weight.n_blocks, dtype=torch.float32, device=device)
        blocks = max(1, (1 << 18) // weight.blocksize)
        for b0 in range(0, weight.n_blocks, blocks):
            b1 = min(weight.n_blocks, b0 + blocks)
            s, e = b0 * weight.blocksize, min(b1 * weight.blocksize, weight.numel)
            values = weight.code[unpack_nibbles(weight.codes[s // 2:(e + 1) // 2])[:e - s]]
            prod = guide_chunk(guide, cols, s, e) * values
            pad = (b1 - b0) * weight.blocksize - (e - s)  # the last block may be short
            per_block[b0:b1] = torch.nn.functional.pad(prod, (0, pad)).reshape(b1 - b0, weight.blocksize).sum(1)
        if not weight.nested:
            return per_block
        weighted = per_block * weight.nested_code[weight.absmax.long()]
        out = torch.zeros_like(weight.nested_absmax)
        idx = torch.arange(weight.n_blocks, device=device) // weight.nested_blocksize
        return out.index_add_(0, idx, weighted)
