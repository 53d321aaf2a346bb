"""The reward adapter: preference pairs (a dataset's, or policy samples ordered by the judge), its Bradley–Terry
training, and the merge with the previous iteration's reward model.

Data-parallel (``ranks``, a :class:`~zopro.train.distributed.Ranks` with several data shards): the pairs are cut
into the job's data shards (contiguous, sizes differing by at most one); a rank samples and judges only its own
shards' pairs (shard ``j`` from ``derive_seed(seed, j)``), and each training step's gradient is every shard's share
of the batch, summed over shards in order and over ranks by one all-reduce, as the first-order policy steps do. One
process with the same ``--data-shards`` takes the same path, so two ranks reproduce it bit for bit."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from zopro.seeds import derive_seed
from zopro.train.config import RewardConfig, SamplingConfig
from zopro.train.distributed import ShardGradients
from zopro.train.losses import bradley_terry_loss
from zopro.train.rollout import left_pad, prompt_ids, sample_completions


def encode_completions(tokenizer, prompts, completions, max_prompt_len, pad_id, eos_id):
    """Left-padded ``(input_ids, attention_mask)`` of prompt (as in rollouts) + completion + EOS."""
    return left_pad([prompt_ids(tokenizer, p, max_prompt_len) + tokenizer(c, add_special_tokens=False)["input_ids"]
                     + [eos_id] for p, c in zip(prompts, completions)], pad_id)


@dataclass
class ShardedPairs:
    """This rank's data shards of the pairs: ``local[j]`` holds rows ``bounds[j]:bounds[j + 1]`` of the whole set."""

    bounds: list[int]  # shard j's first row, for every shard of the job, then the number of rows
    local: dict[int, tuple]  # shard -> (chosen ids, mask, rejected ids, mask, q), shard order


def shard_bounds(n: int, shards: int) -> list[int]:
    """The first row of each of ``shards`` contiguous pieces of ``n`` rows (sizes differ by at most one), then ``n``."""
    q, r = divmod(n, shards)
    return [j * q + min(j, r) for j in range(shards + 1)]


def _sharded(items: list, ranks, make) -> ShardedPairs:
    bounds = shard_bounds(len(items), ranks.shards)
    return ShardedPairs(bounds, {j: make(items[bounds[j]:bounds[j + 1]], j) for j in ranks.local_shards
                                 if bounds[j + 1] > bounds[j]})


def judged_pairs(bundle, tokenizer, judge, prompts, sampling: SamplingConfig, seed: int, ranks=None):
    """Two policy samples per prompt, ordered by the judge: ``(chosen ids, mask, rejected ids, mask, q)`` with
    ``q`` the judge's probability that "chosen" is preferred (>= 0.5; the soft label of the reward loss); with
    ``ranks`` sharded, this rank's :class:`ShardedPairs`."""
    if ranks is not None and ranks.sharded:
        return _sharded(prompts, ranks,
                        lambda part, j: judged_pairs(bundle, tokenizer, judge, part, sampling, derive_seed(seed, j)))
    gen, texts = sample_completions(bundle, tokenizer, prompts, 2, sampling.max_new_tokens, sampling.temperature, seed,
                                    sampling.max_prompt_len)
    p_first = judge.prefer(prompts, texts[0::2], texts[1::2])
    first = (p_first >= 0.5).to(gen.sequences.device)
    rows = torch.arange(len(prompts), device=gen.sequences.device) * 2
    chosen, rejected = rows + (~first).long(), rows + first.long()
    s, a = gen.sequences.clone(), gen.attention_mask.clone()
    return s[chosen], a[chosen], s[rejected], a[rejected], torch.maximum(p_first, 1 - p_first)


def dataset_pairs(bundle, tokenizer, records, rc: RewardConfig, ranks=None):
    """Pairs straight from a preference dataset (records with chosen and rejected), at most ``8 * rc.pairs``; with
    ``ranks`` sharded, this rank's :class:`ShardedPairs`."""
    records = [r for r in records if r.chosen is not None and r.rejected is not None][:rc.pairs * 8]
    if ranks is not None and ranks.sharded:
        return _sharded(records, ranks, lambda part, j: dataset_pairs(bundle, tokenizer, part, rc))
    max_prompt_len = rc.sampling.max_prompt_len
    prompts = [r.prompt for r in records]
    eos = bundle.eos_token_ids[0]
    c_ids, c_mask = encode_completions(tokenizer, prompts, [r.chosen for r in records], max_prompt_len,
                                       bundle.pad_token_id, eos)
    r_ids, r_mask = encode_completions(tokenizer, prompts, [r.rejected for r in records], max_prompt_len,
                                       bundle.pad_token_id, eos)
    d = bundle.device
    return c_ids.to(d), c_mask.to(d), r_ids.to(d), r_mask.to(d), torch.ones(len(records))


def train_reward(bundle, pairs, rc: RewardConfig, steps: int, seed: int, ranks=None) -> float:
    """Bradley–Terry training of the reward adapter and score head (AdamW, first order); returns the last loss.

    Judged pairs train against the judge's probability (soft labels, ``--reward-soft-labels``), dataset pairs
    against 1. :class:`ShardedPairs` need the job's ``ranks``."""
    if isinstance(pairs, ShardedPairs):
        return _train_reward_sharded(bundle, pairs, rc, steps, seed, ranks)
    opt = torch.optim.AdamW(list(reward_tensors(bundle).values()), lr=rc.lr, weight_decay=0.0)
    n = len(pairs[0])
    order = random.Random(seed)
    loss = float("nan")
    for _ in range(steps):
        idx = torch.tensor(order.sample(range(n), min(rc.batch, n)))
        loss_t = _rows_loss(bundle, pairs, idx, rc)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        loss = loss_t.item()  # a log line needs it
    return loss


def _train_reward_sharded(bundle, pairs: ShardedPairs, rc: RewardConfig, steps: int, seed: int, ranks) -> float:
    """:func:`train_reward` on sharded pairs: each step draws the same global batch as one process would, each shard
    adds the gradient of its rows' share of the batch loss, and one all-reduce sums the ranks' parts."""
    params = list(reward_tensors(bundle).values())
    opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=0.0)
    order, n = random.Random(seed), pairs.bounds[-1]
    loss = float("nan")
    for _ in range(steps):
        idx = order.sample(range(n), min(rc.batch, n))
        sums = ShardGradients(params)
        for j, part in pairs.local.items():
            lo, hi = pairs.bounds[j], pairs.bounds[j + 1]
            rows = torch.tensor([i - lo for i in idx if lo <= i < hi], dtype=torch.long)
            if not len(rows):
                continue
            opt.zero_grad(set_to_none=True)
            sums.backward(_rows_loss(bundle, part, rows, rc) * (len(rows) / len(idx)))  # the batch's mean, in shares
            sums.take()
        loss = sums.reduce_(ranks, "the reward model's gradient")  # a log line needs it
        opt.step()
    return loss


def _rows_loss(bundle, pairs: tuple, rows: torch.Tensor, rc: RewardConfig) -> torch.Tensor:
    """The Bradley–Terry loss (mean) of ``rows`` of ``(chosen ids, mask, rejected ids, mask, q)``, with grad."""
    c_ids, c_mask, r_ids, r_mask, q = pairs
    chosen = bundle.reward_scores(c_ids[rows], c_mask[rows], grad=True)
    rejected = bundle.reward_scores(r_ids[rows], r_mask[rows], grad=True)
    return bradley_terry_loss(chosen, rejected, q[rows].to(chosen.device) if rc.soft_labels else None)


def reward_tensors(bundle) -> dict[str, torch.nn.Parameter]:
    """The reward model's trainable tensors: its LoRA adapter and its score head."""
    return {**bundle.reward_parameters(), **bundle.score_head_parameters()}


def reward_state(bundle) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in reward_tensors(bundle).items()}


def merge_reward_(bundle, previous: dict[str, torch.Tensor], alpha: float) -> None:
    """``new = alpha * new + (1 - alpha) * previous`` over the reward adapter and head (paper: alpha 0.5)."""
    with torch.no_grad():
        for n, p in reward_tensors(bundle).items():
            p.mul_(alpha).add_(previous[n].to(p.device), alpha=1 - alpha)
