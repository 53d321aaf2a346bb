"""One RLOO rollout: tokenize prompts, sample k completions each, score them, shape rewards, compute advantages.

Everything runs under ``torch.inference_mode``; the returned tensors are cloned out of it, so callers may use them
in autograd or modify them in place. Rows ``i*k .. i*k+k-1`` belong to prompt ``i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zopro.seeds import derive_seed
from zopro.train.losses import kl_penalised_rewards, ppo_clip_terms, rloo_advantages
from zopro.train.models import PolicyRewardModel


@dataclass
class Rollout:
    """A batch of ``N = P * k`` sampled sequences and everything RLOO needs about them.

    The log-prob sums are over response tokens, at ``logprob_temperature`` (the training program passes the
    sampling temperature, so the PPO ratio that ``updaters.surrogate`` forms at the same temperature is the importance
    ratio of the policy that sampled; ``collect_rollout``'s own default is 1.0, the model's own distribution).
    """

    prompts: list[str]  # [P] the prompt texts as given
    completions: list[str]  # [N] decoded completions (special tokens removed), for judges
    prompt_index: torch.Tensor  # [N] long, which prompt each row came from
    sequences: torch.Tensor  # [N, T] long, left-padded prompt + completion
    attention_mask: torch.Tensor  # [N, T] long
    response_mask: torch.Tensor  # [N, T] long, 1 on generated tokens up to and including the first EOS
    prompt_length: int  # sequences[:, :prompt_length] is the padded prompt
    policy_logps: torch.Tensor  # [N] fp32, summed response log-probs under the policy that sampled
    ref_logps: torch.Tensor  # [N] fp32, same under the reference policy
    policy_token_logps: torch.Tensor  # [N, T] fp32, the per-token terms of policy_logps (0 off the response)
    ref_token_logps: torch.Tensor  # [N, T] fp32, same under the reference policy
    logprob_temperature: float  # the temperature all four log-prob tensors were computed at
    scores: torch.Tensor  # [N] fp32, reward-model scores
    kl: torch.Tensor  # [N] fp32, policy_logps - ref_logps
    rewards: torch.Tensor  # [N] fp32, scores - kl_coef * kl
    advantages: torch.Tensor  # [N] fp32, RLOO: reward minus the mean reward of the other k-1 samples of its prompt
    k: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)


def prompt_text(tokenizer, prompt: str) -> tuple[str, bool]:
    """The text to tokenize and whether the tokenizer should add its special tokens."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return prompt, True


def prompt_ids(tokenizer, prompt: str, max_prompt_len: int) -> list[int]:
    """Token ids of one prompt as rollouts see it; a prompt longer than ``max_prompt_len`` keeps its last tokens
    (the end of a chat prompt holds the assistant header the completion must follow)."""
    text, special = prompt_text(tokenizer, prompt)
    return tokenizer(text, add_special_tokens=special)["input_ids"][-max_prompt_len:]


def left_pad(rows: list[list[int]], pad_token_id: int):
    """``(input_ids [N, L], attention_mask [N, L])`` of token-id rows, padded on the left."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, length - len(row) :] = 1
    return ids, mask


def tokenize_prompts(tokenizer, prompts: list[str], max_prompt_len: int, pad_token_id: int):
    """Left-padded ``(input_ids [P, L], attention_mask [P, L])`` of the prompts (see :func:`prompt_ids`)."""
    return left_pad([prompt_ids(tokenizer, p, max_prompt_len) for p in prompts], pad_token_id)


def sample_completions(bundle: PolicyRewardModel, tokenizer, prompts: list[str], k: int, max_new_tokens: int,
                       temperature: float, seed: int, max_prompt_len: int):
    """``k`` policy samples per prompt under inference mode: ``(Generation, decoded completion texts)``; rows
    ``i*k .. i*k+k-1`` belong to prompt ``i``."""
    with torch.inference_mode():
        ids, mask = tokenize_prompts(tokenizer, prompts, max_prompt_len, bundle.pad_token_id)
        gen = bundle.generate(ids, mask, k, max_new_tokens, temperature, seed)
        texts = [
            tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(gen.sequences.cpu(), gen.response_mask.cpu(), strict=True)
        ]
    return gen, texts


def repeat_each(prompts: list[str], k: int) -> list[str]:
    """Each prompt ``k`` times, in row order (rows ``i*k .. i*k+k-1`` belong to prompt ``i``)."""
    return [p for p in prompts for _ in range(k)]


def _check_args(prompts, k, max_new_tokens, temperature, kl_coef, max_prompt_len) -> None:
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a non-empty list of str")
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2 (RLOO needs other samples of the same prompt), got {k!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be a positive int, got {max_prompt_len!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef!r}")


def collect_rollout(
    bundle: PolicyRewardModel,
    tokenizer,
    prompts: list[str],
    k: int,
    max_new_tokens: int,
    temperature: float,
    kl_coef: float,
    seed: int,
    max_prompt_len: int,
    *,
    logprob_temperature: float = 1.0,
    score_fn=None,
) -> Rollout:
    """Sample ``k`` completions per prompt from the policy and compute RLOO advantages of the KL-penalised rewards.

    Prompts go through the tokenizer's chat template (one user turn + generation prompt) when it has one, else they
    are tokenized as raw text with the tokenizer's special tokens. ``seed`` seeds sampling only (the global RNG is
    left unchanged). ``rewards = scores - kl_coef * (policy_logps - ref_logps)``; the scores are the bundle's reward
    model's, or ``score_fn(prompts, completions)`` (one text per row, ``[N]`` tensor) when given (``--reward judge``).
    """
    _check_args(prompts, k, max_new_tokens, temperature, kl_coef, max_prompt_len)
    gen, completions = sample_completions(bundle, tokenizer, prompts, k, max_new_tokens, temperature, seed,
                                          max_prompt_len)
    with torch.inference_mode():
        args = (gen.sequences, gen.attention_mask, gen.response_mask)
        policy_logps, policy_tok = bundle.policy_logprobs(*args, temperature=logprob_temperature)
        ref_logps, ref_tok = bundle.reference_logprobs(*args, temperature=logprob_temperature)
        if score_fn is not None:
            scores = score_fn(repeat_each(prompts, k), completions).float()
        else:
            scores = bundle.reward_scores(gen.sequences, gen.attention_mask, prompts=repeat_each(prompts, k),
                                          completions=completions)
        scores = scores.to(policy_logps.device)
        rewards, kl = kl_penalised_rewards(scores, policy_logps, ref_logps, float(kl_coef))
        advantages = rloo_advantages(rewards.view(len(prompts), k)).reshape(-1)
    # Clone outside inference mode: inference tensors cannot be modified in place or saved for backward later.
    return Rollout(
        prompts=list(prompts),
        completions=completions,
        prompt_index=torch.arange(len(prompts), device=gen.sequences.device).repeat_interleave(k),
        sequences=gen.sequences.clone(),
        attention_mask=gen.attention_mask.clone(),
        response_mask=gen.response_mask.clone(),
        prompt_length=gen.prompt_length,
        policy_logps=policy_logps.clone(),
        ref_logps=ref_logps.clone(),
        policy_token_logps=policy_tok.clone(),
        ref_token_logps=ref_tok.clone(),
        logprob_temperature=float(logprob_temperature),
        scores=scores.clone(),
        kl=kl.clone(),
        rewards=rewards.clone(),
        advantages=advantages.clone(),
        k=k,
    )


# ---------------------------------------------------------------------------------------------------------------------
# A step's rollout, by data shard
@dataclass
class StepRollout:
    """A training step's rollout as this process holds it: its data shards' rollouts, and the per-row values of the
    whole step (every rank's rows, in shard order) for the metrics line. One process without ``--data-shards`` holds
    the step's one shard."""

    local: list[Rollout]  # this rank's shards, in shard order
    scores: torch.Tensor  # [N] every shard's rows, in shard order (all ranks), CPU
    rewards: torch.Tensor  # [N]
    kl: torch.Tensor  # [N]
    k: int

    def judge_scores(self, judge, ranks) -> torch.Tensor:
        """The judge's score of every row of the step, each rank scoring its own rows."""
        local = torch.cat([judge.score(repeat_each(r.prompts, r.k), r.completions).float().cpu() for r in self.local])
        return ranks.gather_rows(local, "the judge's scores")


def shard_seed(seed: int, shard: int, shards: int) -> int:
    """The sampling seed of data shard ``shard`` of ``shards``: the step's own seed when it has one shard, else
    ``derive_seed(seed, shard)``, so a step's rows are a function of its shards, not of the ranks that hold them."""
    return seed if shards == 1 else derive_seed(seed, shard)


def collect_step(bundle: PolicyRewardModel, tokenizer, prompts: list[str], ranks, *, seed: int, **kw) -> StepRollout:
    """This rank's shards of a step's ``prompts`` (``ranks``: a :class:`~zopro.train.distributed.Ranks`; shard
    ``j`` holds the ``j``-th equal, contiguous part, sampled with :func:`shard_seed`); ``kw``:
    :func:`collect_rollout`'s other arguments."""
    per = len(prompts) // ranks.shards
    local = [collect_rollout(bundle, tokenizer, prompts[j * per:(j + 1) * per], seed=shard_seed(seed, j, ranks.shards),
                             **kw) for j in ranks.local_shards]
    rows = torch.stack([torch.cat([getattr(r, name).float().cpu() for r in local])
                        for name in ("scores", "rewards", "kl")], dim=1)
    scores, rewards, kl = ranks.gather_rows(rows, "the rollout's rewards").unbind(1)
    return StepRollout(local, scores, rewards, kl, local[0].k)


def rows_terms(rollout, rows, sums, tok, *, loss: str, clip: float, repeat: int = 1) -> torch.Tensor:
    """:func:`~zopro.train.losses.ppo_clip_terms` of ``rows`` of a rollout, given their current log-probs (``sums``
    ``[R]``, ``tok`` ``[R, T]``) for the rows repeated ``repeat`` times in a row (one copy per population member)."""
    advantages = rollout.advantages[rows].repeat(repeat)
    if loss == "sequence":
        return ppo_clip_terms(sums, rollout.policy_logps[rows].repeat(repeat), advantages, clip=clip)
    return ppo_clip_terms(tok, rollout.policy_token_logps[rows].repeat(repeat, 1), advantages,
                          rollout.response_mask[rows].repeat(repeat, 1), clip=clip)
