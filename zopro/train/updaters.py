"""The policy updates of one training step, on a :class:`~zopro.train.rollout.Rollout`: first-order RLOO (backprop
through the policy adapter, AdamW) and ZO-RLOO (:class:`~zopro.ZOOptimizer` on the same surrogate); PPO's lives in
:mod:`zopro.train.ppo`. Both use :func:`surrogate`, the PPO-clip loss of rollout rows under the current policy weights.

The training program picks one updater per iteration (:class:`FirstOrderRLOO`, :class:`ZORLOO` or
:class:`~zopro.train.ppo.PPOUpdater`); each steps on a rollout and returns an :class:`Update` for the metrics line,
and saves and restores its optimiser's state under its ``checkpoint_key``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zopro.optim import ZOOptimizer
from zopro.samplers import Isotropic, RankGuided, Targeted
from zopro.seeds import RunSeeds
from zopro.train.config import ZOConfig
from zopro.train.losses import ppo_clip_loss_sequence, ppo_clip_loss_token

LOSSES = ("sequence", "token")


def logprob_temperature(cfg) -> float:
    """The temperature of every log-prob in the ratio, the KL and the losses: the sampling one unless set."""
    return cfg.logprob_temperature or cfg.temperature


def surrogate(bundle, rollout, rows, *, loss: str = "sequence", clip: float = 0.2, old_tok=None, grad=False):
    """The PPO-clip surrogate of ``rows`` of a rollout under the current policy weights, at the rollout's log-prob
    temperature (so the ratio is exactly 1 at the weights that sampled). ``loss``: ``"sequence"`` (summed log-probs,
    the paper) or ``"token"`` (against ``old_tok``, the sampling policy's token log-probs ``[N, T]``)."""
    args = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows])
    sums, tok = bundle.policy_logprobs(*args, grad=grad, temperature=rollout.logprob_temperature)
    if loss == "sequence":
        return ppo_clip_loss_sequence(sums, rollout.policy_logps[rows], rollout.advantages[rows], clip)
    mask = rollout.response_mask[rows]
    return ppo_clip_loss_token(tok, old_tok[rows], rollout.advantages[rows], mask, clip)


def old_token_logps(rollout, loss: str):
    """What the token loss compares with: the sampling policy's token log-probs (None for the sequence loss)."""
    return rollout.policy_token_logps if loss == "token" else None


# ---------------------------------------------------------------------------------------------------------------------
# First-order RLOO
def first_order_step(bundle, rollout, optimizer, *, loss: str = "sequence", clip: float = 0.2, microbatch: int = 0,
                     old_tok=None) -> tuple[float, float]:
    """One AdamW step on the surrogate of the whole rollout, its gradient accumulated over chunks of ``microbatch``
    rows (0: one chunk), each weighted by its share of the loss's mean: the same gradient up to float summation
    order, with activation memory for one chunk instead of the whole batch. Returns ``(loss, grad norm before
    clipping at 1.0)``."""
    n = len(rollout.sequences)
    size = microbatch or n
    # what the loss averages over, per row: the row itself (sequence loss) or its response tokens (token loss; an
    # empty mask makes that loss 0, see ppo_clip_loss_token). One host sync here, none per chunk.
    per_row = [1] * n if loss == "sequence" else rollout.response_mask.sum(1).tolist()
    count = max(sum(per_row), 1)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, n, size):
        rows = torch.arange(start, min(start + size, n), device=rollout.sequences.device)
        value = surrogate(bundle, rollout, rows, loss=loss, clip=clip, old_tok=old_tok, grad=True)
        value = value * (sum(per_row[start:start + size]) / count)
        value.backward()
        total = total + value.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(total), norm.item()  # log line values


# ---------------------------------------------------------------------------------------------------------------------
# ZO-RLOO
def zo_step(bundle, rollout, optimizer, *, loss: str = "sequence", clip: float = 0.2, minibatches: int = 1,
            epochs: int = 1, old_tok=None) -> tuple[float, float, int]:
    """``epochs`` passes of ``minibatches`` ZO steps over the rollout, back to back (two weight passes each; every
    step a fresh direction). The surrogate's ratio is to the weights that sampled, so its clip stops steps that move
    a row's probability too far from them. Returns the mean loss and projected gradient and the skipped count."""
    n = len(rollout.sequences)
    chunks = torch.arange(n, device=rollout.sequences.device).chunk(minibatches)
    closures = [lambda rows=rows: surrogate(bundle, rollout, rows, loss=loss, clip=clip, old_tok=old_tok)
                for rows in chunks] * epochs
    results = optimizer.step_many(closures)
    return (sum(r.loss for r in results) / len(results), sum(r.grad for r in results) / len(results),
            sum(r.skipped for r in results))


def make_zo_optimizer(bundle, zo: ZOConfig, iteration: int, guides, seeds: RunSeeds) -> ZOOptimizer:
    """The ZO optimiser of ``iteration`` over the policy adapter: isotropic in iteration 0 (or with ``--sampler
    isotropic``, or without guides), else targeted / rank-guided from ``guides`` (``{"prev", "delta"}``); its seed and
    the SVD's from ``seeds``. Schedules span ``zo.updates``, the iteration's ZO updates."""
    params = bundle.policy_parameters()
    total = zo.updates
    if iteration == 0 or zo.sampler == "isotropic" or guides is None:
        sampler = Isotropic(zo.noise)
    else:
        kind = RankGuided if zo.sampler == "rank_guided" else Targeted
        extra = {"rank": zo.rank, "svd_seed": seeds.svd} if kind is RankGuided else {}
        sampler = kind(guides["prev"], guides["delta"], d0=zo.d0, schedule=zo.d_schedule, tau=zo.d_tau,
                       total_steps=total, scale=zo.scale, blocks=zo.blocks, dist=zo.noise, **extra)
    decay = (lambda t: max(0.0, 1.0 - t / total)) if zo.lr_decay == "linear" else None
    return ZOOptimizer(params, lr=zo.lr, eps=zo.eps, weight_decay=zo.weight_decay, sampler=sampler,
                       seed=seeds.zo(iteration), lr_schedule=decay)


# ---------------------------------------------------------------------------------------------------------------------
# One updater per algorithm, chosen once per iteration
@dataclass
class Update:
    """What one step's update did, for the metrics line: the mode, the mean loss and gradient (first order: the norm
    before clipping; ZO: the projected gradient), the lr and eps in use (eps None for first order), skipped ZO steps."""

    mode: str
    loss: float
    grad: float
    lr: float
    eps: float | None
    skipped: int


class FirstOrderUpdater:
    """What the first-order updaters share: an AdamW in ``self.optimizer``, checkpointed under ``fo_optimizer``, read
    by ``--guide adam``, and no log to replay."""

    checkpoint_key = "fo_optimizer"
    optimizer: torch.optim.Optimizer

    @property
    def first_order_optimizer(self):
        """The optimiser whose moments ``--guide adam`` reads when the iteration ends."""
        return self.optimizer

    def iteration_log(self) -> dict | None:
        """What the iteration leaves besides the weights: nothing to replay for a first-order iteration."""
        return None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


class FirstOrderRLOO(FirstOrderUpdater):
    """First-order RLOO: one AdamW step over the policy adapter per rollout (:func:`first_order_step`)."""

    mode = "first-order"

    def __init__(self, bundle, *, lr: float, loss: str, clip: float, microbatch: int):
        self.bundle, self.lr, self.loss, self.clip, self.microbatch = bundle, lr, loss, clip, microbatch
        self.optimizer = torch.optim.AdamW(list(bundle.policy_parameters().values()), lr=lr, weight_decay=0.0)

    def step(self, rollout, seed: int) -> Update:
        """One update on ``rollout`` (``seed`` is unused: the step draws nothing)."""
        loss, grad = first_order_step(self.bundle, rollout, self.optimizer, loss=self.loss, clip=self.clip,
                                      microbatch=self.microbatch, old_tok=old_token_logps(rollout, self.loss))
        return Update(self.mode, loss, grad, self.lr, None, 0)


class ZORLOO:
    """ZO-RLOO: ``epochs x minibatches`` SPSA steps of ``optimizer`` per rollout (:func:`zo_step`)."""

    checkpoint_key = "zo_optimizer"
    first_order_optimizer = None

    def __init__(self, bundle, optimizer: ZOOptimizer, *, loss: str, clip: float, minibatches: int, epochs: int):
        self.bundle, self.optimizer = bundle, optimizer
        self.loss, self.clip, self.minibatches, self.epochs = loss, clip, minibatches, epochs

    @property
    def mode(self) -> str:
        return "zo-" + self.optimizer.sampler.name

    def step(self, rollout, seed: int) -> Update:
        """The steps on ``rollout`` (``seed`` is unused: the optimiser derives its directions from its own seed)."""
        lr, eps = self.optimizer.current_lr(), self.optimizer.eps  # those of the first step, as logged
        loss, grad, skipped = zo_step(self.bundle, rollout, self.optimizer, loss=self.loss, clip=self.clip,
                                      minibatches=self.minibatches, epochs=self.epochs,
                                      old_tok=old_token_logps(rollout, self.loss))
        return Update(self.mode, loss, grad, lr, eps, skipped)

    def iteration_log(self) -> dict | None:
        """The optimiser's state with its log: replays the iteration's ZO updates bit for bit."""
        return self.optimizer.state_dict()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
