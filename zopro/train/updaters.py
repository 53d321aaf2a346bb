"""The policy updates of one training step: first-order RLOO (backprop through the policy adapter, AdamW) and
ZO-RLOO (:class:`~zopro.ZOOptimizer` on the same surrogate); PPO's lives in :mod:`zopro.train.ppo`. Both use the
PPO-clip loss of :mod:`zopro.train.losses` on rollout rows under the current policy weights.

There is one step function of each kind (:func:`first_order_step`, :func:`zo_step`). A step works on its data
shards' rollouts (:class:`~zopro.train.rollout.StepRollout`) and a :class:`~zopro.train.distributed.Ranks`: one
process is rank 0 of 1 holding the step's one shard, and a data-parallel job's ranks take the same path, exchanging
per-row loss terms (ZO) or summed gradients (first order), so its result is that of one process with as many shards.

The training program picks one updater per iteration (:class:`FirstOrderRLOO`, :class:`ZORLOO` or
:class:`~zopro.train.ppo.PPOUpdater`); each steps on a rollout and returns an :class:`Update` for the metrics line,
and saves and restores its optimiser's state under its ``checkpoint_key``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from zopro.optim import ZOOptimizer
from zopro.samplers import Core, Isotropic, RankGuided, Targeted
from zopro.seeds import RunSeeds
from zopro.train.config import ZOConfig
from zopro.train.distributed import SOLO, Ranks, ShardGradients
from zopro.train.losses import ppo_clip_loss_sequence, ppo_clip_loss_token, reduce_ppo_terms
from zopro.train.members import member_losses
from zopro.train.rollout import rows_terms, sample_completions

LOSSES = ("sequence", "token")


def logprob_temperature(cfg) -> float:
    """The temperature of every log-prob in the ratio, the KL and the losses: the sampling one unless set."""
    return cfg.logprob_temperature or cfg.temperature


def rollout_options(cfg) -> dict:
    """The job's arguments of :func:`~zopro.train.rollout.collect_rollout` (and ``collect_step``) besides the
    prompts, the seed and the scorer: answers a prompt, sampling, the KL coefficient, the log-prob temperature."""
    return dict(k=cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, kl_coef=cfg.kl_coef,
                max_prompt_len=cfg.max_prompt_len, logprob_temperature=logprob_temperature(cfg))


def surrogate(bundle, rollout, rows, *, loss: str = "sequence", clip: float = 0.2, grad=False):
    """The PPO-clip surrogate of ``rows`` of a rollout under the current policy weights, at the rollout's log-prob
    temperature (so the ratio is exactly 1 at the weights that sampled). ``loss``: ``"sequence"`` (summed log-probs,
    the paper) or ``"token"`` (against the sampling policy's token log-probs)."""
    args = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows])
    sums, tok = bundle.policy_logprobs(*args, grad=grad, temperature=rollout.logprob_temperature)
    if loss == "sequence":
        return ppo_clip_loss_sequence(sums, rollout.policy_logps[rows], rollout.advantages[rows], clip)
    mask = rollout.response_mask[rows]
    return ppo_clip_loss_token(tok, rollout.policy_token_logps[rows], rollout.advantages[rows], mask, clip)


def surrogate_terms(bundle, rollout, rows, *, loss: str = "sequence", clip: float = 0.2) -> torch.Tensor:
    """:func:`surrogate` as per-row terms (:func:`~zopro.train.losses.ppo_clip_terms`, on the CPU), without
    gradient: rows evaluated by several shards or ranks reduce to the whole batch's loss."""
    args = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows])
    sums, tok = bundle.policy_logprobs(*args, temperature=rollout.logprob_temperature)
    return rows_terms(rollout, rows, sums, tok, loss=loss, clip=clip).cpu()


def _rows(rollout, chunks: int, m: int) -> torch.Tensor:
    """Chunk ``m`` of ``chunks`` near-equal, contiguous chunks of a rollout's rows."""
    return torch.arange(len(rollout.sequences), device=rollout.sequences.device).chunk(chunks)[m]


# ---------------------------------------------------------------------------------------------------------------------
# The two policy steps. ``shards``: this process's data shards of the step (one rollout in one process); ``ranks``:
# the job (:class:`~zopro.train.distributed.Ranks`; one process by default). A step's result is a function of its
# shards, not of the ranks that hold them.
def first_order_step(bundle, shards: list, optimizer, ranks: Ranks = SOLO, *, loss: str = "sequence",
                     clip: float = 0.2, microbatch: int = 0) -> tuple[float, float]:
    """One AdamW step on the surrogate of the whole step (every shard's rows, the loss's mean over all of them),
    then clipping at 1.0. Each shard's gradient is accumulated on its own over chunks of ``microbatch`` rows (0: one
    chunk), each weighted by its share of the loss's mean, so activation memory is one chunk's; the shards are
    summed in order and the ranks by one all-reduce (:class:`~zopro.train.distributed.ShardGradients`). Returns
    ``(loss, grad norm before clipping)``."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # what the loss averages over, per row: the row itself (sequence loss) or its response tokens (token loss; an
    # empty mask makes that loss 0, see ppo_clip_loss_token). One host sync here, none per chunk.
    per_shard = [[1] * len(r.sequences) if loss == "sequence" else r.response_mask.sum(1).tolist() for r in shards]
    count = torch.tensor([float(sum(map(sum, per_shard)))])
    ranks.all_reduce_sum_([count], "the token count")
    count = max(float(count), 1.0)
    sums = ShardGradients(params)
    for r, per_row in zip(shards, per_shard, strict=True):
        optimizer.zero_grad(set_to_none=True)
        n = len(r.sequences)
        size = microbatch or n
        for start in range(0, n, size):
            rows = torch.arange(start, min(start + size, n), device=r.sequences.device)
            value = surrogate(bundle, r, rows, loss=loss, clip=clip, grad=True)
            sums.backward(value * (sum(per_row[start:start + size]) / count))
        sums.take()
    total = sums.reduce_(ranks, "the first-order gradient")
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return total, norm.item()  # log line values


def zo_step(bundle, shards: list, optimizer: ZOOptimizer, ranks: Ranks = SOLO, *, loss: str = "sequence",
            clip: float = 0.2, minibatches: int = 1, epochs: int = 1) -> tuple[float, float, int]:
    """``epochs`` passes of ``minibatches`` ZO steps over the step's rows, back to back (two weight passes each;
    every step a fresh direction). Minibatch ``m`` is chunk ``m`` of every shard's rows; each closure all-gathers
    the per-row terms of the ranks' rows and reduces them in global row order, so every rank holds the same loss bit
    for bit and applies the same update (the weights stay identical without being sent). The surrogate's ratio is
    to the weights that sampled, so its clip stops steps that move a row's probability too far from them. Returns
    the mean loss and projected gradient and the skipped count."""
    def closure_for(m: int):
        def closure():
            local = torch.cat([surrogate_terms(bundle, r, _rows(r, minibatches, m), loss=loss, clip=clip)
                               for r in shards])
            return reduce_ppo_terms(ranks.gather_rows(local))
        return closure

    return mean_results(optimizer.step_many([closure_for(m) for m in range(minibatches)] * epochs))


def mean_results(results) -> tuple[float, float, int]:
    """The mean loss and projected gradient of ZO steps' :class:`~zopro.optim.StepResult` and their skipped count."""
    n = len(results)
    return sum(r.loss for r in results) / n, sum(r.grad for r in results) / n, sum(r.skipped for r in results)


def core_bases(bundle) -> dict[str, torch.Tensor]:
    """For each policy LoRA ``B [out, r]``: the top-``r`` left singular vectors of its module's base weight (LoRA-XS's
    frozen factor), the basis of ``--zo-space core``. A function of the base weights alone, so a resume rebuilds the
    same bases: an SVD in float64 (thread-count rounding stays below float32's) with each vector's sign fixed so its
    largest entry is positive."""
    bases = {}
    for name, p in bundle.policy_parameters().items():
        if ".lora_B." not in name:
            continue
        module = bundle.model.get_submodule(name.split(".lora_B.")[0])
        weight = getattr(getattr(module, "base_layer", None), "weight", None)
        if weight is None or not weight.dtype.is_floating_point or weight.dim() != 2:
            raise ValueError(f"--zo-space core: the base weight under {name!r} is not a float matrix (a quantised base "
                             "has no singular vectors to take: use --zo-space lora)")
        u, _, _ = torch.linalg.svd(weight.detach().double().cpu(), full_matrices=False)
        u = u[:, :p.shape[1]]
        signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
        bases[name] = (u * signs).to(device=p.device, dtype=torch.float32)
    return bases


def make_zo_optimizer(bundle, zo: ZOConfig, iteration: int, guides, seeds: RunSeeds) -> ZOOptimizer:
    """The ZO optimiser of ``iteration`` over the policy adapter: with ``--zo-space core`` / ``singular`` isotropic in
    the LoRA cores or their diagonals (:class:`~zopro.samplers.Core` over :func:`core_bases`); else isotropic in
    iteration 0 (or with ``--sampler isotropic``, or without guides), else targeted / rank-guided from ``guides``
    (:class:`~zopro.train.state.Guides`). Its seed and the SVD's from ``seeds``. Schedules span ``zo.updates``, the
    iteration's ZO updates."""
    params = bundle.policy_parameters()
    total = zo.updates
    if zo.space in ("core", "singular"):
        sampler = Core(core_bases(bundle), diagonal=zo.space == "singular")
    elif iteration == 0 or zo.sampler == "isotropic" or guides is None:
        sampler = Isotropic(zo.noise)
    else:
        kind = RankGuided if zo.sampler == "rank_guided" else Targeted
        extra = {"rank": zo.rank, "svd_seed": seeds.svd} if kind is RankGuided else {}
        sampler = kind(guides.prev, guides.delta, d0=zo.d0, schedule=zo.d_schedule, tau=zo.d_tau,
                       total_steps=total, scale=zo.scale, blocks=zo.blocks, dist=zo.noise, **extra)
    decay = (lambda t: max(0.0, 1.0 - t / total)) if zo.lr_decay == "linear" else None
    return ZOOptimizer(params, lr=zo.lr, eps=zo.eps, weight_decay=zo.weight_decay, sampler=sampler,
                       seed=seeds.zo(iteration), lr_schedule=decay, q=zo.population, fitness=zo.fitness)


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

    def step(self, rollout, ranks: Ranks, seed: int) -> Update:
        """One update on a :class:`~zopro.train.rollout.StepRollout` (``seed`` is unused: the step draws nothing)."""
        loss, grad = first_order_step(self.bundle, rollout.local, self.optimizer, ranks, loss=self.loss,
                                      clip=self.clip, microbatch=self.microbatch)
        return Update(self.mode, loss, grad, self.lr, None, 0)


@dataclass
class GenerationFitness:
    """ES-style fitness (``--zo-objective generation``): a member's loss is minus the mean reward of greedy answers to
    the step's prompts at its weights, the same prompts for every member; ``score`` the judge's ``score(prompts,
    completions)``, or None for the bundle's reward model."""

    tokenizer: object
    score: Callable | None
    max_new_tokens: int
    max_prompt_len: int

    def closure(self, bundle, prompts: list[str], ranks: Ranks) -> Callable[[], torch.Tensor]:
        def closure():
            gen, texts = sample_completions(bundle, self.tokenizer, prompts, 1, self.max_new_tokens, 0.0, 0,
                                            self.max_prompt_len)
            if self.score is not None:
                scores = self.score(prompts, texts)
            else:
                scores = bundle.reward_scores(gen.sequences, gen.attention_mask, prompts=prompts, completions=texts)
            return -ranks.gather_rows(scores.float().cpu(), "the members' rewards").mean()
        return closure


class ZORLOO:
    """ZO-RLOO: ``epochs x minibatches`` SPSA steps of ``optimizer`` per rollout (:func:`zo_step`), or with
    ``generation`` ``epochs`` steps whose members are scored by the reward of their greedy answers."""

    checkpoint_key = "zo_optimizer"
    first_order_optimizer = None

    def __init__(self, bundle, optimizer: ZOOptimizer, *, loss: str, clip: float, minibatches: int, epochs: int,
                 generation: GenerationFitness | None = None, batch_members: int = 0):
        self.bundle, self.optimizer = bundle, optimizer
        self.loss, self.clip, self.minibatches, self.epochs = loss, clip, minibatches, epochs
        self.generation = generation
        self.batch_members = batch_members  # members a forward (zopro.train.members); 0: perturb-forward-restore

    @property
    def mode(self) -> str:
        return "zo-" + self.optimizer.sampler.name

    def step(self, rollout, ranks: Ranks, seed: int) -> Update:
        """The steps on a :class:`~zopro.train.rollout.StepRollout` (``seed`` is unused: the optimiser derives its
        directions from its own seed)."""
        lr, eps = self.optimizer.current_lr(), self.optimizer.eps  # those of the first step, as logged
        if self.generation is not None:
            closure = self.generation.closure(self.bundle, [p for r in rollout.local for p in r.prompts], ranks)
            loss, grad, skipped = mean_results(self.optimizer.step_many([closure] * self.epochs))
        elif self.batch_members:
            loss, grad, skipped = mean_results([self.optimizer.step_members(self._members(rollout.local, ranks, m))
                                                for _ in range(self.epochs) for m in range(self.minibatches)])
        else:
            loss, grad, skipped = zo_step(self.bundle, rollout.local, self.optimizer, ranks, loss=self.loss,
                                          clip=self.clip, minibatches=self.minibatches, epochs=self.epochs)
        return Update(self.mode, loss, grad, lr, eps, skipped)

    def _members(self, shards, ranks: Ranks, m: int):
        """``evaluate(seeds, eps)`` of minibatch ``m``: its members' surrogates, ``batch_members`` a forward."""
        return lambda seeds, eps: member_losses(self.bundle, self.optimizer, shards, ranks, seeds, eps,
                                                rows_of=lambda r: _rows(r, self.minibatches, m), loss=self.loss,
                                                clip=self.clip, per_forward=self.batch_members)

    def iteration_log(self) -> dict | None:
        """The optimiser's state with its log: replays the iteration's ZO updates bit for bit."""
        return self.optimizer.state_dict()

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
