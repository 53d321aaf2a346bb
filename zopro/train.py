"""``python -m zopro.train``: preference-tune a causal LM with ZOPrO at inference-level memory.

Reads straight through: setup (config, data, models, judge, checkpoint), helpers (pairs and reward training,
evaluation, one step of each kind), then the loop over iterations:

* before iteration 0: the reward adapter is trained on preference pairs (the dataset's, or judge-labelled samples
  of the base policy when the dataset has none);
* iteration 0: first-order RLOO (backprop through the policy adapter, AdamW), or isotropic ZO when
  ``--first-order-iteration0 false``;
* iterations >= 1: ZO-RLOO with targeted (or rank-guided) sampling from the previous iteration's policy update and
  reward-model update;
* after each iteration: judge-labelled pairs from the iteration's prompts refine the reward adapter (Bradley–Terry),
  merged with the previous one (``--reward-merge-alpha``).

Every step writes a metrics line and an atomic checkpoint, so ``--resume`` after a kill loses at most that step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from zopro import checkpoint, memory, snapshots
from zopro.config import (RESUME_OVERRIDES, TrainConfig, flag, from_args, load_saved, resume_differences,
                          validate)
from zopro.losses import bradley_terry_loss, ppo_clip_loss_sequence, ppo_clip_loss_token
from zopro.optim import ZOOptimizer, derive_seed
from zopro.report import MetricsLog, plot_rewards, summary_table
from zopro.rollout import collect_rollout, left_pad, prompt_ids, repeat_each, sample_completions
from zopro.samplers import Isotropic, RankGuided, Targeted

# Seed domains, so that rollouts, pair sampling, evaluation and ZO directions never share a seed.
ROLLOUT, PAIRS, EVAL, ZO, REWARD, BATCH, PLACEBO = range(7)


def _seed(cfg: TrainConfig, domain: int, *parts: int) -> int:
    seed = derive_seed(cfg.seed, domain)
    for i, p in enumerate(parts):
        seed = derive_seed(seed, p, i + 1)
    return seed


# ---------------------------------------------------------------------------------------------------------------------
# Setup
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(cfg.device)


def load_prompts(cfg: TrainConfig):
    """(train records, eval records) for the configured dataset."""
    from zopro import data

    if cfg.dataset == "default":
        records = data.load_default_prompts()
    elif cfg.dataset == "hh-rlhf":
        records = data.load_hh_rlhf("train", cfg.dataset_path or None)
    elif cfg.dataset == "tldr":
        records = data.load_tldr("train", cfg.dataset_path or None)
    elif cfg.dataset == "wmt20":
        records = data.load_wmt20("train", cfg.dataset_path or None)
    else:
        records = data.load_local(cfg.dataset)
    if len(records) <= cfg.n_eval_prompts:
        raise ValueError(f"--dataset has {len(records)} records, not more than --n-eval-prompts {cfg.n_eval_prompts}")
    train, held_out = data.split_prompts(records, cfg.n_eval_prompts, cfg.seed)
    if cfg.max_prompts:
        train = train[:cfg.max_prompts]
    return train, held_out


def load_models(cfg: TrainConfig, device: torch.device):
    """(PolicyRewardModel bundle, tokenizer); the base is held once and shared by policy, reference and reward."""
    from zopro import models

    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny":
        tokenizer = models.build_tiny_tokenizer()
        base = models.build_tiny_model(len(tokenizer), seed=cfg.seed).to(device)
    else:
        quant = None
        if cfg.quantize != "none":
            from transformers import BitsAndBytesConfig

            quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
                     if cfg.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True))
        if cfg.model == "smollm2":
            gguf = models.find_smollm2_gguf()
            base, tokenizer = models.load_base(str(gguf.parent), gguf_file=gguf.name, dtype=dtype,
                                               quantization_config=quant, device=device)
        else:
            base, tokenizer = models.load_base(cfg.model, gguf_file=cfg.gguf_file or None, dtype=dtype,
                                               quantization_config=quant, device=device)
    reward = models.AnyRewardModel.from_pretrained(cfg.reward_model, device=device) if cfg.reward_model else None
    bundle = models.PolicyRewardModel(base, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, reward_model=reward,
                                      seed=cfg.seed)
    return bundle, tokenizer


def load_judge(cfg: TrainConfig, device: torch.device):
    from zopro import judges

    if cfg.judge == "heuristic":
        return judges.HeuristicJudge()
    kind, _, name = cfg.judge.partition(":")
    if kind == "llm":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name).to(device)
        return judges.LLMJudge(model, AutoTokenizer.from_pretrained(name))
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1).to(device)
    return judges.RewardModelJudge(model, AutoTokenizer.from_pretrained(name), device=device)


# ---------------------------------------------------------------------------------------------------------------------
# Preference pairs and the reward adapter
def encode_completions(tokenizer, prompts, completions, max_prompt_len, pad_id, eos_id):
    """Left-padded ``(input_ids, attention_mask)`` of prompt (as in rollouts) + completion + EOS."""
    return left_pad([prompt_ids(tokenizer, p, max_prompt_len) + tokenizer(c, add_special_tokens=False)["input_ids"]
                     + [eos_id] for p, c in zip(prompts, completions)], pad_id)


def judged_pairs(bundle, tokenizer, judge, prompts, cfg, seed):
    """Two policy samples per prompt, ordered by the judge: ``(chosen ids, mask, rejected ids, mask, q)`` with
    ``q`` the judge's probability that "chosen" is preferred (>= 0.5; the soft label of the reward loss)."""
    gen, texts = sample_completions(bundle, tokenizer, prompts, 2, cfg.max_new_tokens, cfg.temperature, seed,
                                    cfg.max_prompt_len)
    p_first = judge.prefer(prompts, texts[0::2], texts[1::2])
    first = (p_first >= 0.5).to(gen.sequences.device)
    rows = torch.arange(len(prompts), device=gen.sequences.device) * 2
    chosen, rejected = rows + (~first).long(), rows + first.long()
    s, a = gen.sequences.clone(), gen.attention_mask.clone()
    return s[chosen], a[chosen], s[rejected], a[rejected], torch.maximum(p_first, 1 - p_first)


def dataset_pairs(bundle, tokenizer, records, cfg):
    """Pairs straight from a preference dataset (records with chosen and rejected)."""
    records = [r for r in records if r.chosen is not None and r.rejected is not None][:cfg.reward_pairs * 8]
    prompts = [r.prompt for r in records]
    eos = bundle.eos_token_ids[0]
    c_ids, c_mask = encode_completions(tokenizer, prompts, [r.chosen for r in records], cfg.max_prompt_len,
                                       bundle.pad_token_id, eos)
    r_ids, r_mask = encode_completions(tokenizer, prompts, [r.rejected for r in records], cfg.max_prompt_len,
                                       bundle.pad_token_id, eos)
    d = bundle.device
    return c_ids.to(d), c_mask.to(d), r_ids.to(d), r_mask.to(d), torch.ones(len(records))


def train_reward(bundle, pairs, cfg, steps, seed) -> float:
    """Bradley–Terry training of the reward adapter and score head (AdamW, first order); returns the last loss.

    Judged pairs train against the judge's probability (soft labels, ``--reward-soft-labels``), dataset pairs
    against 1."""
    opt = torch.optim.AdamW(list(reward_tensors(bundle).values()), lr=cfg.reward_lr, weight_decay=0.0)
    c_ids, c_mask, r_ids, r_mask, q = pairs
    order = random.Random(seed)
    loss = float("nan")
    for _ in range(steps):
        idx = torch.tensor(order.sample(range(len(c_ids)), min(cfg.reward_batch, len(c_ids))))
        chosen = bundle.reward_scores(c_ids[idx], c_mask[idx], grad=True)
        rejected = bundle.reward_scores(r_ids[idx], r_mask[idx], grad=True)
        loss_t = bradley_terry_loss(chosen, rejected, q[idx].to(chosen.device) if cfg.reward_soft_labels else None)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        loss = loss_t.item()  # a log line needs it
    return loss


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


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation
def evaluate(bundle, tokenizer, judge, prompts, cfg, reference_texts=None):
    """Held-out evaluation: ``cfg.eval_samples`` sampled completions per prompt.

    Prompts go ``max(1, eval_batch // eval_samples)`` to a generate call; call ``c`` samples from seed
    ``_seed(cfg, EVAL, c)``, so "before" and "after" draw the same random numbers and their difference is not
    blurred by fresh sampling noise. transformers samples a call's rows from one generator, so the answers depend on
    ``eval_batch`` as they do on the seed. Each prompt's value is the mean judge score of its completions, or, for
    pairwise-only judges, the rate at which completion j wins against ``reference_texts[i][j]`` (0.5 with no
    reference). Returns (metric name, per-prompt values, texts ``[prompt][sample]``)."""
    if not prompts:
        return "none", [], []
    n = cfg.eval_samples
    per_call = max(1, cfg.eval_batch // n)
    texts = []
    for c, start in enumerate(range(0, len(prompts), per_call)):
        chunk = prompts[start:start + per_call]
        _, answers = sample_completions(bundle, tokenizer, chunk, n, cfg.max_new_tokens, cfg.temperature,
                                        _seed(cfg, EVAL, c), cfg.max_prompt_len)
        texts += [answers[i * n:(i + 1) * n] for i in range(len(chunk))]
    rows = repeat_each(prompts, n)
    flat = [t for ts in texts for t in ts]
    if hasattr(judge, "score"):
        metric, values = "mean judge score", judge.score(rows, flat).float()
    elif reference_texts is None:
        metric, values = "win rate vs before", torch.full((len(flat),), 0.5)
    else:
        reference = [t for ts in reference_texts for t in ts]
        metric, values = "win rate vs before", judge.prefer(rows, flat, reference).float()
    return metric, values.view(len(prompts), n).mean(1).tolist(), texts


def paired_change(before: list[float], after: list[float]) -> tuple[float | None, float | None]:
    """Mean per-prompt change ``after - before`` and its standard error over prompts; the error is None with fewer
    than two prompts, and both are None with none."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    if len(d) < 2:
        return (d[0] if d else None), None
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d))


# ---------------------------------------------------------------------------------------------------------------------
# One step of each kind
def logprob_temperature(cfg) -> float:
    """The temperature of every log-prob in the ratio, the KL and the losses: the sampling one unless set."""
    return cfg.logprob_temperature or cfg.temperature


def surrogate(bundle, rollout, rows, cfg, old_tok=None, grad=False):
    """The PPO-clip surrogate of ``rows`` of a rollout under the current policy weights, at the rollout's log-prob
    temperature (so the ratio is exactly 1 at the weights that sampled)."""
    args = (rollout.sequences[rows], rollout.attention_mask[rows], rollout.response_mask[rows])
    sums, tok = bundle.policy_logprobs(*args, grad=grad, temperature=rollout.logprob_temperature)
    if cfg.loss == "sequence":
        return ppo_clip_loss_sequence(sums, rollout.policy_logps[rows], rollout.advantages[rows], cfg.clip)
    mask = rollout.response_mask[rows]
    return ppo_clip_loss_token(tok, old_tok[rows], rollout.advantages[rows], mask, cfg.clip)


def first_order_step(bundle, rollout, optimizer, cfg, old_tok):
    """One AdamW step on the surrogate of the whole rollout, its gradient accumulated over chunks of
    ``cfg.fo_microbatch`` rows (0: one chunk), each weighted by its share of the loss's mean: the same gradient up to
    float summation order, with activation memory for one chunk instead of the whole batch."""
    n = len(rollout.sequences)
    size = cfg.fo_microbatch or n
    # what the loss averages over, per row: the row itself (sequence loss) or its response tokens (token loss; an
    # empty mask makes that loss 0, see ppo_clip_loss_token). One host sync here, none per chunk.
    per_row = [1] * n if cfg.loss == "sequence" else rollout.response_mask.sum(1).tolist()
    count = max(sum(per_row), 1)
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for start in range(0, n, size):
        rows = torch.arange(start, min(start + size, n), device=rollout.sequences.device)
        loss = surrogate(bundle, rollout, rows, cfg, old_tok, grad=True) * (sum(per_row[start:start + size]) / count)
        loss.backward()
        total = total + loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    return float(total), norm.item()  # log line values


def zo_step(bundle, rollout, optimizer, cfg, old_tok):
    """``--zo-epochs`` passes of ``--minibatches`` ZO steps over the rollout, back to back (two weight passes each;
    every step a fresh direction). The surrogate's ratio is to the weights that sampled, so its clip stops steps
    that move a row's probability too far from them."""
    n = len(rollout.sequences)
    chunks = torch.arange(n, device=rollout.sequences.device).chunk(cfg.minibatches)
    closures = [lambda rows=rows: surrogate(bundle, rollout, rows, cfg, old_tok) for rows in chunks] * cfg.zo_epochs
    results = optimizer.step_many(closures)
    return (sum(r.loss for r in results) / len(results), sum(r.grad for r in results) / len(results),
            sum(r.skipped for r in results))


def zo_updates(cfg) -> int:
    """ZO updates in one iteration: the span of the mixing schedule and of the lr decay."""
    return cfg.steps_per_iteration * cfg.minibatches * cfg.zo_epochs


def make_zo_optimizer(bundle, cfg, iteration, guides):
    params = bundle.policy_parameters()
    total = zo_updates(cfg)
    if iteration == 0 or cfg.sampler == "isotropic" or guides is None:
        sampler = Isotropic(cfg.noise)
    else:
        kind = RankGuided if cfg.sampler == "rank_guided" else Targeted
        extra = {"rank": cfg.rank, "svd_seed": cfg.seed} if kind is RankGuided else {}
        sampler = kind(guides["prev"], guides["delta"], d0=cfg.d0, schedule=cfg.d_schedule, tau=cfg.d_tau,
                       total_steps=total, scale=cfg.zo_scale, dist=cfg.noise, **extra)
    decay = (lambda t: max(0.0, 1.0 - t / total)) if cfg.zo_lr_decay == "linear" else None
    return ZOOptimizer(params, lr=cfg.zo_lr, eps=cfg.zo_eps, weight_decay=cfg.weight_decay, sampler=sampler,
                       seed=_seed(cfg, ZO, iteration), lr_schedule=decay)


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


def next_guide(cfg, moved, previous, fo_opt, params, seed) -> dict[str, torch.Tensor]:
    """The direction the next ZO iteration targets (``--guide``), from the policy's movement over the iteration
    that ends (``moved``), the current guide (``previous``, None before the first) and the iteration's first-order
    optimiser (None after a ZO iteration).

    ``prev`` is the paper's: after a ZO iteration it is that iteration's (small, noisy) movement. ``adam`` and
    ``cumulative`` keep what a first-order iteration learned: Adam's last step direction, carried through ZO
    iterations, or all movement since the start. ``placebo`` is the control: Gaussian noise with ``moved``'s
    per-tensor norms, from ``seed``."""
    if cfg.guide == "cumulative":
        return moved if previous is None else {n: previous[n] + moved[n] for n in moved}
    if cfg.guide == "adam":
        if fo_opt is None:
            return previous if previous is not None else moved
        return adam_direction(fo_opt, params)
    if cfg.guide == "placebo":
        gen = torch.Generator().manual_seed(seed % 2**63)
        noise = {n: torch.randn(m.shape, generator=gen, dtype=torch.float64) for n, m in moved.items()}
        return {n: (noise[n] * (m.double().norm() / noise[n].norm())).to(m) for n, m in moved.items()}
    return moved


# ---------------------------------------------------------------------------------------------------------------------
# The run
class Run:
    """State of one run: what the checkpoint holds, plus the live models and optimisers."""

    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.device = resolve_device(cfg)
        self.train_records, self.eval_records = load_prompts(cfg)
        self.bundle, self.tokenizer = load_models(cfg, self.device)
        self.judge = load_judge(cfg, self.device)
        self.metrics = MetricsLog(out / "metrics.jsonl")
        self.meta = {"phase": "reward_init", "iteration": 0, "step": 0, "global_step": 0, "evaluation": {},
                     "metrics_bytes": 0, "reward_losses": [], "skipped": 0}
        self.iter_start: dict | None = None  # policy + reward weights at the start of the iteration
        self.guides: dict | None = None
        self.fo_opt = None
        self.zo_opt = None
        self.value_model = self.ppo_cfg = None
        self.checkpoint_name: str | None = None  # the verified checkpoint the run holds: the next one's fallback
        if cfg.algorithm == "ppo":  # the critic: a value adapter on the shared base plus a head, kept for the run
            from zopro.ppo import PPOConfig, ValueModel

            self.ppo_cfg = PPOConfig(kl_coef=cfg.kl_coef, ppo_epochs=cfg.ppo_epochs, lr=cfg.fo_lr, seed=cfg.seed,
                                     logprob_temperature=logprob_temperature(cfg))
            self.value_model = ValueModel(self.bundle, seed=cfg.seed)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def save(self):
        self.meta["metrics_bytes"] = self.metrics.size()
        # the metrics lines this checkpoint vouches for: a resume checks them before cutting the file back to them
        self.meta["metrics_sha256"] = checkpoint.sha256_prefix(self.metrics.path, self.meta["metrics_bytes"])
        tensors = {"trainable": self.bundle.trainable_state()}
        if self.iter_start is not None:
            tensors["iter_start"] = self.iter_start
        if self.guides is not None:
            tensors["guides_prev"], tensors["guides_delta"] = self.guides["prev"], self.guides["delta"]
        if self.value_model is not None:
            tensors["value"] = {n: p.detach().clone() for n, p in self.value_model.trainable_parameters().items()}
        objects = {}
        if self.fo_opt is not None:
            objects["fo_optimizer"] = self.fo_opt.state_dict()
        if self.zo_opt is not None:
            objects["zo_optimizer"] = self.zo_opt.state_dict()
        name = f"{self.meta['global_step']:06d}-{self.meta['phase']}"
        self.checkpoint_name = checkpoint.save(self.out, name, tensors=tensors, objects=objects, meta=self.meta,
                                               previous=self.checkpoint_name)

    def restore(self, loaded: checkpoint.Loaded) -> None:
        """Continue from a verified checkpoint (``checkpoint.load``); the metrics file is cut back to its lines."""
        meta, tensors, objects = loaded.meta, loaded.tensors, loaded.objects
        self.meta = meta
        self.bundle.load_trainable_state_(tensors["trainable"])
        self.iter_start = tensors.get("iter_start")
        if "guides_prev" in tensors:
            self.guides = {"prev": tensors["guides_prev"], "delta": tensors["guides_delta"]}
        if self.value_model is not None:
            with torch.no_grad():
                for n, p in self.value_model.trainable_parameters().items():
                    p.copy_(tensors["value"][n])
        it = self.meta["iteration"]
        if "fo_optimizer" in objects:
            self.fo_opt = self._fo_optimizer()
            self.fo_opt.load_state_dict(objects["fo_optimizer"])
        if "zo_optimizer" in objects:
            self.zo_opt = make_zo_optimizer(self.bundle, self.cfg, it, self.guides)
            self.zo_opt.load_state_dict(objects["zo_optimizer"])
        self.metrics.truncate(meta["metrics_bytes"])  # _open_run_dir checked that these bytes are intact
        snapshots.prune_after(self.out, meta["global_step"])  # issue 15: steps after the checkpoint are redone
        self.checkpoint_name = loaded.name

    def _fo_optimizer(self):
        """AdamW over the policy adapter (and, for PPO, the critic: TRL steps policy and value with one optimiser)."""
        params = list(self.bundle.policy_parameters().values())
        if self.value_model is not None:
            params += list(self.value_model.trainable_parameters().values())
        return torch.optim.AdamW(params, lr=self.cfg.fo_lr, weight_decay=0.0)

    # -- phases ---------------------------------------------------------------------------------------------------
    def reward_init(self):
        cfg = self.cfg
        has_pairs = any(r.chosen is not None and r.rejected is not None for r in self.train_records)
        if has_pairs:
            pairs = dataset_pairs(self.bundle, self.tokenizer, self.train_records, cfg)
        else:
            prompts = random.Random(_seed(cfg, PAIRS, 0)).sample([r.prompt for r in self.train_records],
                                                                 min(cfg.reward_pairs, len(self.train_records)))
            pairs = judged_pairs(self.bundle, self.tokenizer, self.judge, prompts, cfg, _seed(cfg, PAIRS, 1))
        loss = train_reward(self.bundle, pairs, cfg, cfg.reward_init_steps, _seed(cfg, REWARD, 0))
        self.meta["reward_losses"].append(loss)
        metric, before, texts = evaluate(self.bundle, self.tokenizer, self.judge,
                                         [r.prompt for r in self.eval_records], cfg)
        # the answers themselves are kept: a pairwise judge scores "after" against them, and users read them
        self.meta["evaluation"] = {"metric": metric, "before": statistics.fmean(before) if before else None,
                                   "n": len(self.eval_records), "samples": cfg.eval_samples,
                                   "before_per_prompt": before, "before_texts": texts}
        self.begin_iteration(0)

    def begin_iteration(self, it: int):
        self.meta.update(phase="train", iteration=it, step=0)
        self.iter_start = {**{f"policy.{n}": p.detach().clone() for n, p in self.bundle.policy_parameters().items()},
                           **({f"reward.{n}": p for n, p in reward_state(self.bundle).items()}
                              if self.bundle.shares_parameter_space else {})}
        first_order = self.cfg.algorithm != "zopro" or (it == 0 and self.cfg.first_order_iteration0)
        self.fo_opt = self._fo_optimizer() if first_order else None
        self.zo_opt = None if first_order else make_zo_optimizer(self.bundle, self.cfg, it, self.guides)
        self._snapshot("iteration")  # issue 15: before the checkpoint that moves past it
        self.save()

    def step_prompts(self, it: int, step: int) -> list[str]:
        prompts = [r.prompt for r in self.train_records]
        return random.Random(_seed(self.cfg, BATCH, it, step)).sample(prompts, min(self.cfg.prompts_per_step,
                                                                                    len(prompts)))

    def train_step(self):
        cfg, it, step = self.cfg, self.meta["iteration"], self.meta["step"]
        t0 = time.perf_counter()
        memory.reset_peak(self.device)
        rollout = collect_rollout(self.bundle, self.tokenizer, self.step_prompts(it, step), cfg.k, cfg.max_new_tokens,
                                  cfg.temperature, cfg.kl_coef, _seed(cfg, ROLLOUT, it, step), cfg.max_prompt_len,
                                  logprob_temperature=logprob_temperature(cfg))
        old_tok = rollout.policy_token_logps if cfg.loss == "token" else None
        peak_rollout = memory.peak_bytes(self.device)
        memory.reset_peak(self.device)
        skipped = 0
        probe = snapshots.StepProbe(self.bundle.policy_parameters(), self.zo_opt)  # issue 15: reads weights only
        if self.value_model is not None:
            from zopro.ppo import ppo_step

            mode, lr, eps = "ppo", cfg.fo_lr, None
            stats = ppo_step(self.bundle, self.value_model, rollout, self.fo_opt, self.ppo_cfg,
                             seed=_seed(cfg, BATCH, it, step, 1))
            loss, grad = stats["loss"], stats["grad_norm"]
        elif self.fo_opt is not None:
            mode, lr, eps = "first-order", cfg.fo_lr, None
            loss, grad = first_order_step(self.bundle, rollout, self.fo_opt, cfg, old_tok)
        else:
            mode = "zo-" + self.zo_opt.sampler.name
            lr, eps = self.zo_opt.current_lr(), self.zo_opt.eps
            loss, grad, skipped = zo_step(self.bundle, rollout, self.zo_opt, cfg, old_tok)
        peak_update = memory.peak_bytes(self.device)
        judge_score = None
        if cfg.log_judge_score and hasattr(self.judge, "score"):  # the gold judge on the policy's own samples
            rows = repeat_each(rollout.prompts, rollout.k)
            judge_score = float(self.judge.score(rows, rollout.completions).float().mean())
        record = {"iteration": it, "step": step, "global_step": self.meta["global_step"], "mode": mode,
                  "reward": float(rollout.scores.mean()), "reward_total": float(rollout.rewards.mean()),
                  "judge_score": judge_score,
                  "kl": float(rollout.kl.mean()), "loss": loss, "grad": grad, "lr": lr, "eps": eps,
                  "skipped": skipped, "step_time": time.perf_counter() - t0, "peak_rollout": peak_rollout,
                  "peak_update": peak_update}
        record.update(probe.stats())  # issue 15
        self.metrics.write(record)
        self.meta["skipped"] += skipped
        self.meta["step"] += 1
        self.meta["global_step"] += 1
        if self.meta["step"] < cfg.steps_per_iteration:  # issue 15 (the iteration's end gets the boundary snapshot)
            self._snapshot("step", mode)
        return record

    def end_iteration(self):
        """Refine the reward adapter on judged pairs of this iteration's prompts; compute the next guides."""
        cfg, it = self.cfg, self.meta["iteration"]
        policy_now = {n: p.detach().clone() for n, p in self.bundle.policy_parameters().items()}
        prev = {n: policy_now[n] - self.iter_start[f"policy.{n}"] for n in policy_now}
        delta = {n: torch.zeros_like(p) for n, p in prev.items()}
        if self.bundle.shares_parameter_space and it + 1 < cfg.iterations:  # the last refinement would go unused
            seen = sorted({p for s in range(cfg.steps_per_iteration) for p in self.step_prompts(it, s)})
            prompts = random.Random(_seed(cfg, PAIRS, it, 2)).sample(seen, min(cfg.reward_pairs, len(seen)))
            previous = reward_state(self.bundle)
            pairs = judged_pairs(self.bundle, self.tokenizer, self.judge, prompts, cfg, _seed(cfg, PAIRS, it, 3))
            self.meta["reward_losses"].append(train_reward(self.bundle, pairs, cfg, cfg.reward_steps,
                                                           _seed(cfg, REWARD, it + 1)))
            if cfg.reward_merge_alpha < 1:
                merge_reward_(self.bundle, previous, cfg.reward_merge_alpha)
            now = self.bundle.reward_parameters()
            delta = {n: now[n].detach() - self.iter_start[f"reward.{n}"] for n in prev}
        previous = self.guides["prev"] if self.guides is not None else None
        self.guides = {"prev": next_guide(cfg, prev, previous, self.fo_opt, self.bundle.policy_parameters(),
                                          _seed(cfg, PLACEBO, it)),
                       "delta": delta}
        if self.zo_opt is not None:  # the iteration's optimiser log: replays its ZO updates bit for bit
            checkpoint.atomic_torch_save(self.out / f"zo_log_iter{it}.pt", self.zo_opt.state_dict())
        if it + 1 < cfg.iterations:
            self.begin_iteration(it + 1)
        else:
            self._snapshot("final")  # issue 15
            self.meta.update(phase="evaluate")
            self.fo_opt = self.zo_opt = None
            self.save()

    def _snapshot(self, kind: str, mode: str | None = None) -> None:
        """Issue 15: the adapters for ``python -m zopro.visualize`` (``zopro.snapshots``); the reward adapter only at
        iteration boundaries, the only place it changes."""
        if mode is None:
            mode = ("ppo" if self.value_model is not None else "first-order" if self.fo_opt is not None
                    else "zo-" + self.zo_opt.sampler.name)
        reward = reward_tensors(self.bundle) if kind != "step" and self.bundle.shares_parameter_space else None
        snapshots.take(self.out, self.cfg.snapshot_every, self.meta, mode, self.bundle.policy_parameters(), reward,
                       kind)

    def finish(self):
        """Phase 'evaluate': the held-out evaluation of the final policy, checkpointed as phase 'done'. Then, in
        either phase, the evaluation samples and the adapters, written from the 'done' state alone: a resume after a
        kill at any of these writes rewrites them all, equal to an uninterrupted run's."""
        ev = self.meta["evaluation"]
        prompts = [r.prompt for r in self.eval_records]
        if self.meta["phase"] == "evaluate":
            _, after, texts = evaluate(self.bundle, self.tokenizer, self.judge, prompts, self.cfg,
                                       reference_texts=ev["before_texts"])
            ev["after"] = statistics.fmean(after) if after else None
            ev["change"], ev["change_se"] = paired_change(ev["before_per_prompt"], after)
            ev["after_per_prompt"], ev["after_texts"] = after, texts
            self.meta["phase"] = "done"
            self.save()
        assert self.meta["phase"] == "done", self.meta["phase"]
        samples = [{"prompt": p, "before": b, "after": a, "before_score": bs, "after_score": as_}
                   for p, b, a, bs, as_ in zip(prompts, ev["before_texts"], ev["after_texts"], ev["before_per_prompt"],
                                               ev["after_per_prompt"])]
        checkpoint.atomic_write_text(self.out / "eval_samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
        base_name = None
        if self.cfg.model == "tiny":  # built in code from the seed: nowhere else to load it from
            base_name = str(save_tiny_base(self.tokenizer, self.cfg.seed, self.out / "base").resolve())
        save_adapters(self.bundle, self.out, base_name)


def save_tiny_base(tokenizer, seed: int, folder: Path) -> Path:
    """The smoke preset's base (the random tiny Llama of ``seed``, rebuilt: the run never changes it) and its
    tokenizer in ``save_pretrained`` format at ``folder``, published atomically; returns ``folder``."""
    from transformers.utils import logging as hf_logging

    from zopro import models

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar for one 0.1 MB shard, after the run's own bar
    try:
        models.build_tiny_model(len(tokenizer), seed=seed).save_pretrained(tmp)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(tmp)
    checkpoint.atomic_publish_dir(tmp, folder)
    return folder


def save_adapters(bundle, out: Path, base_model_name_or_path: str | None = None):
    """The trained adapters, twice: zopro's flat files (``policy_adapter.safetensors``; ``reward_adapter.safetensors``
    with the score head), which zopro's tools read, and the standard PEFT folders ``policy/`` and ``reward/``
    (:meth:`PolicyRewardModel.save_pretrained`), each written whole to a scratch folder and then renamed into place,
    so a kill never leaves a half folder and a resume rewrites them."""
    for name, params in (("policy_adapter", bundle.policy_parameters()),
                         ("reward_adapter", reward_tensors(bundle) if bundle.shares_parameter_space else {})):
        if params:
            checkpoint.atomic_save_tensors(out / f"{name}.safetensors", params)
    scratch = out / ".adapters.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    for name in bundle.save_pretrained(scratch, base_model_name_or_path):
        checkpoint.atomic_publish_dir(scratch / name, out / name)
    shutil.rmtree(scratch)


def _check_model_reference(name: str, what: str) -> None:
    """Fail in one line, before any model is loaded, when a hub id / path names nothing loadable (a cheap check: a
    local directory, or the model's config from the hub or its cache)."""
    if os.path.isdir(name):
        return
    # HF_HUB_OFFLINE read now, not when huggingface_hub was imported: without it a missing id waited ~20 s on
    # network timeouts in a sandbox that had set the variable after the import
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=offline)
    except Exception as err:  # noqa: BLE001 (OSError, hub and parsing errors alike: the model cannot be loaded)
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{what}: cannot load {name!r} ({type(err).__name__}: {first})") from None


def _check_metrics(path: Path, loaded: checkpoint.Loaded) -> None:
    """The metrics lines a checkpoint recorded must still be there, byte for byte (a resume cuts the file back to
    them; a shorter file would be padded with NUL bytes)."""
    n_bytes = loaded.meta["metrics_bytes"]
    if not path.is_file() or path.stat().st_size < n_bytes or \
            checkpoint.sha256_prefix(path, n_bytes) != loaded.meta.get("metrics_sha256"):
        raise ValueError(f"{path}: damaged or missing (its first {n_bytes} bytes are not the lines checkpoint "
                         f"{loaded.name} recorded)")


def _open_run_dir(cfg: TrainConfig, resume: bool):
    """Check ``cfg.output_dir`` and take its lock. Returns ``(cfg, lock, loaded checkpoint or None)``; ``cfg`` is the
    run's saved config on resume. Raises ValueError, before anything is written, for a directory that is a file,
    holds another run, is in use, or whose files are damaged; nothing is created unless the run can start."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: exists and is not a directory")
    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} holds no run to resume (no such directory)")
    if not resume:
        kind, _, name = cfg.judge.partition(":")
        if kind in ("llm", "reward"):
            _check_model_reference(name, f"--judge {cfg.judge}")
        if cfg.reward_model:
            _check_model_reference(cfg.reward_model, "--reward-model")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--output-dir {out}: cannot create it ({err.strerror or err})") from None
    lock = checkpoint.lock(out)
    try:
        config_path = out / "config.json"
        metrics_path = out / "metrics.jsonl"
        has_metrics = metrics_path.is_file() and metrics_path.stat().st_size > 0
        if not resume:
            if config_path.exists() or has_metrics or checkpoint.has_checkpoints(out):
                raise ValueError(f"--output-dir {out} already holds a run: pass --resume to continue it or pick "
                                 "another dir")
            return cfg, lock, None
        if not config_path.is_file():
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json)")
        saved = load_saved(config_path)
        if "eval_samples" not in saved:
            raise ValueError(f"--resume: {out} was started by an older zopro that scored the held-out prompts with one "
                             "sample each, so its 'before' cannot be compared with this version's evaluation. Start a "
                             "new run (a finished one can be scored again with python -m zopro.evaluate)")
        try:
            saved_cfg = validate(TrainConfig(**{**saved, "output_dir": cfg.output_dir}))
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from None
        changed = resume_differences(saved_cfg, cfg)
        if changed:
            allowed = ", ".join(map(flag, RESUME_OVERRIDES))
            raise ValueError(f"--resume: {out} was started with other settings; drop or restore them: "
                             f"{'; '.join(changed)} (only {allowed} may change on resume)")
        cfg = dataclasses.replace(saved_cfg, **{n: getattr(cfg, n) for n in RESUME_OVERRIDES})
        loaded = checkpoint.load(out)
        # no checkpoint and no metrics (killed before or while publishing the first checkpoint): starting over loses
        # nothing; with metrics it would silently append a new run to an old one's lines
        if loaded is None and has_metrics:
            raise ValueError(f"{out / checkpoint.LATEST}: missing, but {out / 'metrics.jsonl'} holds a run's lines; "
                             "refusing to restart over them (restore the file, or start a new run elsewhere)")
        if loaded is not None:
            _check_metrics(metrics_path, loaded)
        return cfg, lock, loaded
    except BaseException:
        lock.close()
        raise


def run(cfg: TrainConfig, resume: bool = False, *, stop_after_steps: int | None = None, progress: bool = True):
    """Run (or resume) a ZOPrO job; returns the summary dict. ``stop_after_steps`` simulates a kill (tests).

    The run directory's lock is held from before the first read of the directory to the end; a resume continues
    from the newest verified checkpoint (or, with a message, the one before it when the newest is damaged), and a
    resume of a finished run rewrites its outputs."""
    started = time.perf_counter()
    cfg = validate(cfg)
    cfg, lock, loaded = _open_run_dir(cfg, resume)
    try:
        out = Path(cfg.output_dir)
        if loaded is None:
            checkpoint.atomic_write_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1))
        for line in loaded.skipped if loaded else ():
            print(f"warning: {line}; resuming from the previous checkpoint, {loaded.name}", file=sys.stderr)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        state = Run(cfg, out)
        if loaded is not None:
            state.restore(loaded)
        else:
            state.reward_init()
        return _train_and_finish(state, cfg, out, resume, stop_after_steps, progress, started)
    finally:
        lock.close()


def _train_and_finish(state, cfg, out, resume, stop_after_steps, progress, started):
    total = cfg.iterations * cfg.steps_per_iteration
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=state.meta["global_step"], desc="ZOPrO", disable=not progress, file=sys.stderr)
    done_now = 0
    while state.meta["phase"] == "train":
        while state.meta["step"] < cfg.steps_per_iteration:
            if stop_after_steps is not None and done_now >= stop_after_steps:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {done_now} steps (simulated kill)")
            record = state.train_step()
            done_now += 1
            if state.meta["step"] % cfg.checkpoint_every == 0 or state.meta["step"] == cfg.steps_per_iteration:
                state.save()
            bar.update(1)
            bar.set_postfix(iter=record["iteration"], mode=record["mode"], reward=f"{record['reward']:.3f}",
                            kl=f"{record['kl']:.3f}")
        state.end_iteration()
        plot_rewards(state.metrics.read(), out / "reward_curve.png")
    bar.close()
    state.finish()  # phase 'evaluate' or 'done': either way every output below is (re)written from the checkpoint
    records = state.metrics.read()
    plot_rewards(records, out / "reward_curve.png")
    table = summary_table(records, state.meta["evaluation"])
    checkpoint.atomic_write_text(out / "summary.md", table + "\n")
    evaluation = {k: v for k, v in state.meta["evaluation"].items()
                  if k not in ("before_texts", "before_per_prompt", "after_texts", "after_per_prompt")}
    summary = {"evaluation": evaluation, "steps": len(records), "skipped": state.meta["skipped"],
               "reward_losses": state.meta["reward_losses"], "output_dir": str(out),
               "wall_seconds": time.perf_counter() - started, "resumed": resume}
    checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    if progress:
        print(table)
        print(f"run directory: {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, resume = from_args(argv)
        run(cfg, resume)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
