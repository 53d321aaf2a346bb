"""Losses and reward shaping for ZOPrO (RLOO + PPO-clip) and reward-model training.

Pure torch functions: no module state, no randomness, no device syncs. Each docstring gives the formula and the
shapes. Shape checks raise ``ValueError`` naming the bad argument before anything is computed; value checks that
would need a device sync (for example "the mask is not all zero") are not made, and the docstring says what
happens instead.

Notation: ``P`` prompts, ``k`` completions per prompt, ``B`` sequences, ``T`` response tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "bradley_terry_loss",
    "kl_penalised_rewards",
    "masked_mean",
    "ppo_clip_loss_sequence",
    "ppo_clip_loss_token",
    "ppo_clip_terms",
    "reduce_ppo_terms",
    "rloo_advantages",
]


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_same_shape(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    for name, value in others.items():
        _check_tensor(name, value)
        if value.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(ref.shape)} like {ref_name}")


def _check_clip(clip: float) -> None:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)):
        raise TypeError(f"clip must be a float, got {type(clip).__name__}")
    if not 0.0 < clip < 1.0:
        raise ValueError(f"clip must be in (0, 1), got {clip}")


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out advantages.

    ``A[p, i] = r[p, i] - (1 / (k - 1)) * sum_{j != i} r[p, j]``,
    which equals ``k / (k - 1) * (r[p, i] - mean_j r[p, j])``.

    Args:
        rewards: ``[P, k]`` rewards, one row per prompt, ``k >= 2`` completions per prompt.

    Returns:
        ``[P, k]`` advantages, same dtype and device as ``rewards``. Each row sums to zero.
    """
    _check_tensor("rewards", rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be 2-D [num_prompts, k], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if k < 2:
        raise ValueError(f"rewards must have k >= 2 completions per prompt (dim 1), got k={k}")
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others_mean


def kl_penalised_rewards(
    scores: Tensor, policy_logprob_sums: Tensor, ref_logprob_sums: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Reward-model scores minus a sequence-level KL penalty to the reference policy.

    ``kl = policy_logprob_sums - ref_logprob_sums`` (the sum over response tokens of
    ``log pi(y_t | ...) - log pi_ref(y_t | ...)``, a single-sample KL estimate), and
    ``rewards = scores - kl_coef * kl``.

    Args:
        scores: ``[P, k]`` (or any shape) reward-model scores.
        policy_logprob_sums: same shape as ``scores``, summed response log-probs under the policy.
        ref_logprob_sums: same shape as ``scores``, summed response log-probs under the reference.
        kl_coef: non-negative penalty weight (0.05 in the paper's code).

    Returns:
        ``(rewards, kl)``, both with the shape of ``scores``.
    """
    _check_tensor("scores", scores)
    _check_same_shape("scores", scores, policy_logprob_sums=policy_logprob_sums, ref_logprob_sums=ref_logprob_sums)
    if isinstance(kl_coef, bool) or not isinstance(kl_coef, (int, float)):
        raise TypeError(f"kl_coef must be a float, got {type(kl_coef).__name__}")
    if not kl_coef >= 0.0:  # also rejects NaN
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    kl = policy_logprob_sums - ref_logprob_sums
    return scores - kl_coef * kl, kl


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask`` (bool or 0/1); 0 if the mask is empty (no device sync to check it). Masked
    positions are excluded with ``torch.where``, so NaN or inf there does not leak into the mean."""
    m = mask.bool()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / m.sum().clamp(min=1)


def clipped_terms(log_ratio: Tensor, advantages: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """The PPO surrogate's two terms, elementwise: ``(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))`` with
    ``ratio = exp(log_ratio)``; the loss is their maximum (PPO's loss also reports where the clipped one wins)."""
    ratio = torch.exp(log_ratio)
    return -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)


def _clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """Elementwise ``max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))`` with ``ratio = exp(log_ratio)``."""
    return torch.maximum(*clipped_terms(log_ratio, advantages, clip))


def ppo_clip_loss_sequence(new_logp_sum: Tensor, old_logp_sum: Tensor, advantages: Tensor, clip: float = 0.2) -> Tensor:
    """Sequence-level PPO clipped surrogate, as in the ZOPrO code (log-probs summed over the response).

    ``ratio = exp(new - old)``;
    ``loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)))``.

    Args:
        new_logp_sum: ``[B]`` (or any shape) summed response log-probs under the current parameters.
        old_logp_sum: same shape, under the parameters that generated the samples (no gradient expected).
        advantages: same shape, e.g. ``rloo_advantages(...)`` flattened.
        clip: clip range, in (0, 1).

    Returns:
        Scalar (0-D) loss.
    """
    _check_tensor("new_logp_sum", new_logp_sum)
    _check_same_shape("new_logp_sum", new_logp_sum, old_logp_sum=old_logp_sum, advantages=advantages)
    _check_clip(clip)
    return _clipped_surrogate(new_logp_sum - old_logp_sum, advantages, clip).mean()


def _check_token_args(new_logp, old_logp, advantages, mask) -> None:
    """The token loss's shapes: ``new_logp``, ``old_logp``, ``mask`` ``[B, T]``, ``advantages`` ``[B]``."""
    _check_tensor("new_logp", new_logp)
    if new_logp.dim() != 2:
        raise ValueError(f"new_logp must be 2-D [B, T] for the token loss, got shape {tuple(new_logp.shape)}")
    _check_same_shape("new_logp", new_logp, old_logp=old_logp, mask=mask)
    _check_tensor("advantages", advantages)
    if advantages.shape != new_logp.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({new_logp.shape[0]},) [B]")


def ppo_clip_loss_token(
    new_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> Tensor:
    """Token-level PPO clipped surrogate with the sequence advantage broadcast over tokens.

    ``ratio[b, t] = exp(new[b, t] - old[b, t])``;
    ``l[b, t] = max(-A[b] * ratio[b, t], -A[b] * clamp(ratio[b, t], 1 - clip, 1 + clip))``;
    ``loss = sum_{b,t} mask[b, t] * l[b, t] / sum_{b,t} mask[b, t]`` (mean over all valid tokens of the batch).

    Masked positions are excluded with ``torch.where``, so NaN or inf there (e.g. ``-inf`` log-probs of padding)
    does not leak into the loss. If the mask has no valid token the denominator is clamped to 1 and the loss is 0
    (checking for it would need a device sync).

    Args:
        new_logp: ``[B, T]`` per-token log-probs under the current parameters.
        old_logp: ``[B, T]`` per-token log-probs under the sampling parameters.
        advantages: ``[B]`` one advantage per sequence.
        mask: ``[B, T]`` bool or 0/1 tensor, true for response tokens.
        clip: clip range, in (0, 1).

    Returns:
        Scalar (0-D) loss.
    """
    _check_token_args(new_logp, old_logp, advantages, mask)
    _check_clip(clip)
    return masked_mean(_clipped_surrogate(new_logp - old_logp, advantages.unsqueeze(1), clip), mask)


def ppo_clip_terms(new_logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor | None = None,
                   clip: float = 0.2) -> Tensor:
    """The PPO clipped surrogate as per-row terms, so that rows evaluated apart (data shards, ranks) reduce to the
    loss of the whole batch with :func:`reduce_ppo_terms`.

    Sequence loss (``mask`` None; ``new_logp``, ``old_logp``, ``advantages`` ``[B]``): ``[B, 1]``, each row's
    ``max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip))``, whose mean is :func:`ppo_clip_loss_sequence`.
    Token loss (``new_logp``, ``old_logp``, ``mask`` ``[B, T]``, ``advantages`` ``[B]``): ``[B, 2]``, each row's
    sum of its masked token terms and its token count; the sum of the first column over the sum of the second is
    :func:`ppo_clip_loss_token` (up to float summation order). float32, whatever the log-probs' type.
    """
    _check_tensor("new_logp", new_logp)
    _check_clip(clip)
    if mask is None:
        _check_same_shape("new_logp", new_logp, old_logp=old_logp, advantages=advantages)
        if new_logp.dim() != 1:
            raise ValueError(f"new_logp must be 1-D [B] for the sequence loss, got shape {tuple(new_logp.shape)}")
        return _clipped_surrogate(new_logp - old_logp, advantages, clip).float().unsqueeze(1)
    _check_token_args(new_logp, old_logp, advantages, mask)
    m = mask.bool()
    terms = _clipped_surrogate(new_logp - old_logp, advantages.unsqueeze(1), clip)
    sums = torch.where(m, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(1)
    return torch.stack([sums.float(), m.sum(1).float()], dim=1)


def reduce_ppo_terms(terms: Tensor) -> Tensor:
    """The loss of a batch from its :func:`ppo_clip_terms` rows (concatenated in row order): the mean of a ``[B, 1]``
    sequence batch, the token-weighted mean of a ``[B, 2]`` token batch (0 when it has no token)."""
    _check_tensor("terms", terms)
    if terms.dim() != 2 or terms.shape[1] not in (1, 2):
        raise ValueError(f"terms must be [B, 1] or [B, 2], got shape {tuple(terms.shape)}")
    if terms.shape[1] == 1:
        return terms[:, 0].mean()
    return terms[:, 0].sum() / terms[:, 1].sum().clamp(min=1)


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, target: Tensor | None = None) -> Tensor:
    """Bradley-Terry pairwise loss for reward-model training, with hard or soft labels.

    ``d = chosen - rejected``; hard labels: ``loss = mean(-log sigmoid(d))``; soft labels (``target`` = the judge's
    probability ``q`` that "chosen" is preferred): ``loss = mean(-q log sigmoid(d) - (1 - q) log sigmoid(-d))``, the
    cross-entropy against the judge's probability, minimised at ``sigmoid(d) = q``. A tie (``q = 0.5``) pulls the
    two scores together instead of teaching an arbitrary order. Computed with ``softplus`` (stable for large
    margins): ``-log sigmoid(x) = softplus(-x)``.

    Args:
        chosen_scores: ``[N]`` (or any shape) scores of the preferred completions.
        rejected_scores: same shape, scores of the rejected completions.
        target: optional, same shape, probabilities in [0, 1]; None means 1 (hard labels).

    Returns:
        Scalar (0-D) loss.
    """
    _check_tensor("chosen_scores", chosen_scores)
    _check_same_shape("chosen_scores", chosen_scores, rejected_scores=rejected_scores)
    d = chosen_scores - rejected_scores
    if target is None:
        return F.softplus(-d).mean()
    _check_same_shape("chosen_scores", chosen_scores, target=target)
    if not bool(((target >= 0) & (target <= 1)).all()):
        raise ValueError("target must hold probabilities in [0, 1]")
    target = target.to(d.dtype)
    return (target * F.softplus(-d) + (1 - target) * F.softplus(d)).mean()
