"""First-order baselines on our rollouts: PPO with a value model (GAE, clipped surrogate, clipped value loss, AdamW)
and RLOO with backprop (the paper's iteration 0).

Both consume the :class:`~zopro.train.rollout.Rollout` that ZOPrO trains on (same sampling, same reward model, same
reference), so in a benchmark only the optimisation differs. PPO follows the TRL ``PPOv2Trainer`` (trl 0.9-0.11,
``trl/trainer/ppov2_trainer.py``) step by step; the defaults are TRL's, with their source next to each field.

The value model is what a user of our shared-base bundle would pick: a "value" LoRA adapter on the same base (its
own LoRA weights, so policy and critic do not share an update) plus a scalar head over every position's hidden
state, like TRL's ``AutoModelForCausalLMWithValueHead`` but without a second copy of the base.

Token alignment follows :meth:`PolicyRewardModel.policy_logprobs`: index ``t`` of every ``[B, T]`` tensor refers to
token ``input_ids[:, t]``; ``values[:, t]`` is the value of the state *before* that token (the hidden state at
``t - 1``), ``mask`` is the rollout's ``response_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zopro.train.losses import clipped_terms, masked_mean
from zopro.train.models import PolicyRewardModel
from zopro.train.rollout import Rollout
from zopro.train.token_batch import last_true_index
from zopro.train.updaters import FirstOrderUpdater, Update, first_order_step

__all__ = [
    "PPOConfig",
    "PPOUpdater",
    "ValueModel",
    "compute_gae",
    "make_ppo",
    "masked_whiten",
    "policy_loss",
    "ppo_step",
    "rloo_step",
    "token_rewards",
    "value_loss",
]

# trl/trainer/utils.py masked_whiten: rsqrt(var + 1e-8).
WHITEN_EPS = 1e-8


@dataclass
class PPOConfig:
    """PPO hyper-parameters. Defaults: TRL ``PPOv2Config`` / ``OnPolicyConfig`` (trl 0.9-0.11), unless noted."""

    gamma: float = 1.0  # PPOv2Config.gamma; OpenRLHF --gamma 1
    lam: float = 0.95  # PPOv2Config.lam; OpenRLHF --lambd 0.95
    cliprange: float = 0.2  # PPOv2Config.cliprange; OpenRLHF --eps_clip 0.2
    cliprange_value: float = 0.2  # PPOv2Config.cliprange_value; OpenRLHF --value_clip 0.2
    vf_coef: float = 0.1  # PPOv2Config.vf_coef
    kl_coef: float = 0.05  # PPOv2Config.kl_coef: per-token -kl_coef*(logp - logp_ref), score at the last token
    whiten_rewards: bool = False  # PPOv2Config.whiten_rewards
    whiten_advantages: bool = True  # PPOv2Trainer always whitens advantages (masked_whiten over response tokens)
    ppo_epochs: int = 4  # PPOv2Config.num_ppo_epochs
    num_mini_batches: int = 1  # OnPolicyConfig.num_mini_batches
    # Configurable; the ZOPrO comparison sets it. TRL's classic PPOConfig used 1.41e-5, OpenRLHF's critic 9e-6.
    lr: float = 1e-5
    weight_decay: float = 0.0  # transformers TrainingArguments.weight_decay; OpenRLHF --l2 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)  # TrainingArguments adam_beta1/2 (OpenRLHF: 0.9, 0.95)
    adam_eps: float = 1e-8  # TrainingArguments.adam_epsilon
    # OpenRLHF --max_norm 1.0 and TrainingArguments.max_grad_norm (PPOv2Trainer's loop does not clip); None: off.
    max_grad_norm: float | None = 1.0
    # 1.0 here (the model's own distribution); python -m zopro.train sets the sampling temperature, as TRL does and
    # as updaters.surrogate and the rollout's KL use (--logprob-temperature).
    logprob_temperature: float = 1.0
    seed: int = 0  # value adapter/head initialisation and minibatch shuffling (ours)

    def __post_init__(self):
        for name, lo, hi in (("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
        for name in ("cliprange", "cliprange_value", "lr", "logprob_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("vf_coef", "kl_coef", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("ppo_epochs", "num_mini_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


# ---------------------------------------------------------------------------------------------------------------------
# The value model
class ValueModel(nn.Module):
    """PPO critic on the bundle's base: the "value" LoRA adapter plus a scalar head ``Linear(H, 1)`` at every position.

    The adapter is added to ``bundle`` (see :meth:`PolicyRewardModel.add_value_adapter`), so the base weights are the
    policy's, held once; only the value LoRA tensors and the head are new. The head has a bias like TRL's
    ``ValueHead``; its weight is drawn like our reward score head (normal, std ``initializer_range``) and the bias is
    0, so initial values are near 0. Initialisation is a function of ``seed``; the global RNG is not touched.
    """

    def __init__(self, bundle: PolicyRewardModel, seed: int = 0):
        if not isinstance(bundle, PolicyRewardModel):
            raise TypeError(f"bundle must be a PolicyRewardModel, got {type(bundle).__name__}")
        super().__init__()
        self.bundle = bundle  # a plain attribute (not an nn.Module): state_dict() holds the head only
        bundle.add_value_adapter(seed)
        config = bundle.base.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = nn.Linear(config.get_text_config().hidden_size, 1)
            nn.init.normal_(self.head.weight, std=getattr(config, "initializer_range", 0.02))
            nn.init.zeros_(self.head.bias)
        self.head.to(device=bundle.device, dtype=bundle.trainable_dtype)

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Value LoRA tensors (``value.<canonical name>``) and the head (``head.weight``, ``head.bias``)."""
        params = {f"value.{n}": p for n, p in self.bundle.value_parameters().items()}
        return params | {f"head.{n}": p for n, p in self.head.named_parameters()}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *, grad: bool = False) -> Tensor:
        """Values ``[B, T]`` fp32: ``values[:, t] = head(hidden[:, t - 1])``, ``values[:, 0] = 0``.

        Runs under ``torch.inference_mode`` unless ``grad=True``.
        """
        with torch.enable_grad() if grad else torch.inference_mode():
            hidden = self.bundle.value_hidden_states(input_ids, attention_mask, grad=grad)
            values = self.head(hidden[:, :-1].to(self.head.weight.dtype)).squeeze(-1).float()
            return nn.functional.pad(values, (1, 0))


# ---------------------------------------------------------------------------------------------------------------------
# Rewards, advantages, losses (pure functions; [B, T] tensors, mask = response tokens)
def _check_bt(ref_name: str, ref: Tensor, **others: Tensor) -> None:
    if not isinstance(ref, Tensor) or ref.dim() != 2:
        raise ValueError(f"{ref_name} must be a 2-D tensor [B, T]")
    for name, value in others.items():
        if not isinstance(value, Tensor) or value.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}")


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """TRL's ``masked_whiten``: ``(x - mean) / sqrt(var + 1e-8)`` over ``mask`` (unbiased variance), plus the mean
    back if ``shift_mean`` is False; 0 outside the mask."""
    m = mask.bool()
    mean = masked_mean(x, m)
    n = m.sum()
    var = masked_mean((x - mean) ** 2, m) * n / (n - 1).clamp(min=1)  # Bessel, as TRL's masked_var
    out = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


def token_rewards(scores: Tensor, policy_token_logps: Tensor, ref_token_logps: Tensor, mask: Tensor,
                  kl_coef: float) -> Tensor:
    """Per-token PPO rewards ``[B, T]``: ``-kl_coef * (logp - logp_ref)`` on response tokens, plus ``scores[b]`` at
    the last response token of row ``b``; 0 elsewhere. A row without response tokens gets no score.

    Summed over tokens this is ``scores - kl_coef * kl``, the rollout's sequence-level reward.
    """
    _check_bt("policy_token_logps", policy_token_logps, ref_token_logps=ref_token_logps, mask=mask)
    if not isinstance(scores, Tensor) or scores.shape != policy_token_logps.shape[:1]:
        raise ValueError(f"scores must have shape ({policy_token_logps.shape[0]},) [B]")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")
    m = mask.bool()
    kl = policy_token_logps.float() - ref_token_logps.float()
    rewards = torch.where(m, -kl_coef * kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    last = last_true_index(m)  # last response token per row (T - 1 for an empty row)
    score = scores.to(rewards) * m.any(-1)
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))


def compute_gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the masked (response) tokens: ``(advantages, returns)``, ``[B, T]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, ``R_t = A_t + V_t``, where
    ``V_{t+1}`` and ``A_{t+1}`` are 0 after the last response token (the episode ends there) and both outputs are 0
    outside the mask. Values and rewards at masked positions are ignored.
    """
    _check_bt("values", values, rewards=rewards, mask=mask)
    m = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    v, r = torch.where(m, values, zero), torch.where(m, rewards.to(values.dtype), zero)
    advantages = torch.zeros_like(v)
    last_gae, next_value = v.new_zeros(v.shape[0]), v.new_zeros(v.shape[0])
    for t in reversed(range(v.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last_gae = torch.where(m[:, t], delta + gamma * lam * last_gae, zero)
        advantages[:, t] = last_gae
        next_value = v[:, t]  # 0 at a masked position: nothing is bootstrapped across the end of a response
    return advantages, torch.where(m, advantages + v, zero)


def policy_loss(new_logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, cliprange: float):
    """Clipped surrogate per token (:func:`~zopro.train.losses.clipped_terms`), masked mean (TRL):
    ``(loss, clip fraction, approx KL)``, all 0-D.

    ``l_t = max(-A_t * ratio_t, -A_t * clamp(ratio_t, 1 - c, 1 + c))``, ``ratio_t = exp(new_t - old_t)``;
    approx KL ``= 0.5 * mean((new - old)^2)`` over the mask.
    """
    _check_bt("new_logps", new_logps, old_logps=old_logps, advantages=advantages, mask=mask)
    log_ratio = new_logps - old_logps
    unclipped, clipped = clipped_terms(log_ratio, advantages, cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask), 0.5 * masked_mean(log_ratio.detach() ** 2, mask)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float):
    """Clipped value loss (TRL): ``(0.5 * masked_mean(max((V - R)^2, (clamp(V, V_old +- c) - R)^2)), clip fraction)``.
    """
    _check_bt("values", values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


# ---------------------------------------------------------------------------------------------------------------------
# Steps
def make_ppo(bundle: PolicyRewardModel, cfg: PPOConfig) -> tuple[ValueModel, torch.optim.Optimizer]:
    """A value model on ``bundle`` and one AdamW over policy LoRA + value LoRA + value head (TRL optimises the
    ``PolicyAndValueWrapper`` with one optimizer). Raises ``ValueError`` if the bundle already has a value adapter."""
    if not isinstance(cfg, PPOConfig):
        raise TypeError(f"cfg must be a PPOConfig, got {type(cfg).__name__}")
    value_model = ValueModel(bundle, seed=cfg.seed)
    params = list(bundle.policy_parameters().values()) + list(value_model.trainable_parameters().values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay)
    return value_model, optimizer


def _token_logps(bundle, rollout, temperature):
    """``(policy, reference)`` token log-probs ``[B, T]`` of the rollout at ``temperature``: the rollout's own when it
    computed them at that temperature (the same function of the same weights and tokens), else computed here."""
    if rollout.logprob_temperature == temperature:
        return rollout.policy_token_logps, rollout.ref_token_logps
    args = (rollout.sequences, rollout.attention_mask, rollout.response_mask)
    with torch.inference_mode():
        policy = bundle.policy_logprobs(*args, temperature=temperature)[1]
        ref = bundle.reference_logprobs(*args, temperature=temperature)[1]
    return policy.clone(), ref.clone()  # out of inference mode: they meet tensors that require grad in the losses


@torch.no_grad()
def _prepare(bundle, value_model, rollout, cfg):
    """Old token log-probs and values, per-token rewards, advantages and returns (TRL's steps 4-6)."""
    mask = rollout.response_mask.to(bundle.device).bool()
    old_logps, ref_logps = _token_logps(bundle, rollout, cfg.logprob_temperature)
    with torch.inference_mode():
        old_values = value_model(rollout.sequences, rollout.attention_mask)
    old_values = old_values.clone()  # out of inference mode, as above
    rewards = token_rewards(rollout.scores.to(mask.device), old_logps, ref_logps, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(old_values, rewards, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    kl = ((old_logps - ref_logps) * mask).sum(-1)
    return mask, old_logps, old_values, advantages, returns, kl


def ppo_step(bundle: PolicyRewardModel, value_model: ValueModel, rollout: Rollout, optimizer: torch.optim.Optimizer,
             cfg: PPOConfig, *, seed: int | None = None) -> dict[str, float]:
    """One PPO update on a rollout: ``cfg.ppo_epochs`` epochs over ``cfg.num_mini_batches`` shuffled minibatches.

    Old values are computed first (no grad), token log-probs taken from the rollout (computed again only at another
    ``cfg.logprob_temperature``), with the rollout's scores as the sequence reward.
    Each minibatch: ``loss = policy_loss + vf_coef * value_loss``, backward, grad-norm clipping over the optimizer's
    parameters, AdamW step. Minibatch order is a function of ``seed`` (default ``cfg.seed``; pass a per-step seed
    for a fresh order each step) through a CPU generator; the global RNG is not touched.

    Returns floats: means over the updates of ``loss``, ``policy_loss``, ``value_loss``, ``approx_kl``,
    ``clip_fraction``, ``value_clip_fraction``, ``grad_norm`` (before clipping); ``loss_first`` and ``loss_last``
    (the first and last update's loss); ``score`` (mean rollout score) and ``kl`` (mean sequence KL to the
    reference).
    """
    n = len(rollout.sequences)
    if cfg.num_mini_batches > n:
        raise ValueError(f"cfg.num_mini_batches ({cfg.num_mini_batches}) exceeds the rollout's {n} sequences")
    mask, old_logps, old_values, advantages, returns, kl = _prepare(bundle, value_model, rollout, cfg)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else float("inf")
    generator = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    stats = []
    for _ in range(cfg.ppo_epochs):
        for rows in torch.randperm(n, generator=generator).to(mask.device).chunk(cfg.num_mini_batches):
            ids, att, resp = rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows]
            new_logps = bundle.policy_logprobs(ids, att, resp, grad=True, temperature=cfg.logprob_temperature)[1]
            values = value_model(ids, att, grad=True)
            pg, clipfrac, approx_kl = policy_loss(new_logps, old_logps[rows], advantages[rows], mask[rows],
                                                  cfg.cliprange)
            vf, vf_clipfrac = value_loss(values, old_values[rows], returns[rows], mask[rows], cfg.cliprange_value)
            loss = pg + cfg.vf_coef * vf
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            optimizer.step()
            stats.append(torch.stack([t.detach() for t in (loss, pg, vf, approx_kl, clipfrac, vf_clipfrac, grad_norm)]))
    stats = torch.stack(stats)
    names = ("loss", "policy_loss", "value_loss", "approx_kl", "clip_fraction", "value_clip_fraction", "grad_norm")
    means = stats.mean(0).tolist()  # one sync for the log line
    metrics = dict(zip(names, means, strict=True))
    metrics["loss_first"], metrics["loss_last"] = stats[0, 0].item(), stats[-1, 0].item()
    metrics["score"] = rollout.scores.float().mean().item()
    metrics["kl"] = kl.mean().item()
    return metrics


def rloo_step(bundle: PolicyRewardModel, rollout: Rollout, optimizer: torch.optim.Optimizer, clip: float = 0.2,
              loss: str = "sequence", microbatch: int = 0) -> dict[str, float]:
    """First-order RLOO with backprop (the paper's iteration 0): :func:`zopro.train.updaters.first_order_step` on the
    rollout's RLOO advantages, so the baseline is the very code ``python -m zopro.train`` runs.

    ``loss``: ``"sequence"`` (PPO-clip on summed log-probs, the paper) or ``"token"``; ``microbatch``: rows per
    backward pass (0: all). Returns ``loss`` and the pre-clipping ``grad_norm`` (first_order_step clips at 1.0).
    """
    if loss not in ("sequence", "token"):
        raise ValueError(f"loss must be 'sequence' or 'token', got {loss!r}")
    if not isinstance(microbatch, int) or microbatch < 0:
        raise ValueError(f"microbatch must be a non-negative int, got {microbatch!r}")
    value, grad_norm = first_order_step(bundle, [rollout], optimizer, loss=loss, clip=clip, microbatch=microbatch)
    return {"loss": value, "grad_norm": grad_norm}


class PPOUpdater(FirstOrderUpdater):
    """The training program's PPO: one :func:`ppo_step` per rollout, with one AdamW over the policy adapter and the
    critic (TRL steps policy and value with one optimiser), made afresh each iteration; the critic lives for the run."""

    mode = "ppo"

    def __init__(self, bundle: PolicyRewardModel, value_model: ValueModel, cfg: PPOConfig):
        self.bundle, self.value_model, self.cfg = bundle, value_model, cfg
        params = list(bundle.policy_parameters().values()) + list(value_model.trainable_parameters().values())
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)

    def step(self, rollout, ranks, seed: int) -> Update:
        """One PPO update on the step's one shard (PPO is not data-parallel: ``distributed.check`` refuses it);
        ``seed`` orders its minibatches."""
        [shard] = rollout.local
        stats = ppo_step(self.bundle, self.value_model, shard, self.optimizer, self.cfg, seed=seed)
        return Update(self.mode, stats["loss"], stats["grad_norm"], self.cfg.lr, None, 0)
