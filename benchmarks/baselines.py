"""Baselines the kernel benchmarks compare against. Benchmarks import them; they are never copied inline."""

from __future__ import annotations

import torch


@torch.no_grad()
def mezo_perturb_(tensors: list[torch.Tensor], seed: int, scale: float) -> None:
    """In place: ``p += scale * z`` with ``z ~ N(0, 1)`` drawn by torch, one tensor at a time.

    The original MeZO trainer's perturbation pass (``zo_perturb_parameters``): seed torch's global generator once,
    then for each parameter draw a full-size ``z`` with ``torch.normal`` and add it. Written in place
    (``p.add_(z, alpha=scale)``) rather than MeZO's ``param.data = param.data + scale * z``, which allocates two
    more temporaries: the baseline is the loop's best case, not its worst. Each pass writes and re-reads a
    temporary as large as the largest tensor, and launches two kernels per tensor.
    """
    torch.manual_seed(seed)  # global generator, as MeZO does (library code never does this: see STYLE.md)
    for p in tensors:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)
        p.add_(z, alpha=scale)
