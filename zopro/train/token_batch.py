"""Token batches as the bundle reads them: checks of a ``[B, T]`` batch and its masks, the position ids transformers'
``generate`` uses, the last true index of a mask, and :class:`Generation`, what sampling returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


def grad_context(grad: bool):
    return torch.enable_grad() if grad else torch.inference_mode()


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    # Same rule as transformers' generate (cumsum - 1, 0 on pads): with left padding the default arange positions
    # would shift every prompt, and log-probs would not be those of the distribution we sampled from.
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def last_true_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last nonzero position of ``mask [B, T]`` per row (left and/or right padding; ``T - 1`` for an
    empty row): the last token of an attention mask, the last response token of a response mask."""
    t = mask.shape[-1]
    return t - 1 - mask.flip(-1).long().argmax(-1)


def rng_devices(module: nn.Module) -> list[int]:
    dev = next(module.parameters()).device
    return [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []


def check_token_batch(input_ids, attention_mask, response_mask=None) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError("input_ids must be a 2-D tensor [B, T]")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}")
    if response_mask is not None:
        if not isinstance(response_mask, torch.Tensor) or response_mask.shape != input_ids.shape:
            raise ValueError(f"response_mask must have the shape of input_ids {tuple(input_ids.shape)}")
        if bool(response_mask[:, 0].any()):
            raise ValueError("response_mask must be 0 at position 0 (the first token has no log-prob)")


class Generation(NamedTuple):
    """Output of :meth:`PolicyRewardModel.generate`; rows ``i*k .. i*k+k-1`` belong to prompt ``i``."""

    sequences: torch.Tensor  # [P*k, T] long, prompt (left-padded) + completion (padded after EOS)
    attention_mask: torch.Tensor  # [P*k, T] long, 1 on prompt tokens and on response tokens
    response_mask: torch.Tensor  # [P*k, T] long, 1 on generated tokens up to and including the first EOS
    prompt_length: int  # sequences[:, :prompt_length] is the (padded) prompt
