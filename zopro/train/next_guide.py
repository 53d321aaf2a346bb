"""The direction the next ZO iteration targets (``kind``, ``--guide``), computed when an iteration ends."""

from __future__ import annotations

import torch


def adam_direction(optimizer, params: dict) -> dict[str, torch.Tensor]:
    """The direction of an Adam(W) optimiser's next step, ``-m_hat / (sqrt(v_hat) + eps)``, per named parameter
    (weight decay aside): the first-order iteration's own estimate of where the loss falls."""
    group = optimizer.param_groups[0]
    (b1, b2), eps = group["betas"], group["eps"]
    out = {}
    for name, p in params.items():
        state = optimizer.state[p]
        t = float(state["step"])
        m, v = state["exp_avg"] / (1 - b1 ** t), state["exp_avg_sq"] / (1 - b2 ** t)
        out[name] = -(m / (v.sqrt() + eps))
    return out


def next_guide(kind: str, moved, previous, fo_opt, params, seed) -> dict[str, torch.Tensor]:
    """The direction the next ZO iteration targets (``kind``: ``--guide``), from the policy's movement over the
    iteration that ends (``moved``), the current guide (``previous``, None before the first) and the iteration's
    first-order optimiser (None after a ZO iteration).

    ``prev`` is the paper's: after a ZO iteration it is that iteration's (small, noisy) movement. ``adam`` and
    ``cumulative`` keep what a first-order iteration learned: Adam's last step direction, carried through ZO
    iterations, or all movement since the start. ``placebo`` is the control: Gaussian noise with ``moved``'s
    per-tensor norms, from ``seed``."""
    if kind == "cumulative":
        return moved if previous is None else {n: previous[n] + moved[n] for n in moved}
    if kind == "adam":
        if fo_opt is None:
            return previous if previous is not None else moved
        return adam_direction(fo_opt, params)
    if kind == "placebo":
        gen = torch.Generator().manual_seed(seed % 2**63)
        noise = {n: torch.randn(m.shape, generator=gen, dtype=torch.float64) for n, m in moved.items()}
        return {n: (noise[n] * (m.double().norm() / noise[n].norm())).to(m) for n, m in moved.items()}
    return moved
