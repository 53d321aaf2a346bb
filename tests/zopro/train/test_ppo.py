"""Tests of zopro.train.ppo: hand-computed GAE, rewards and losses; the value model on the shared base; PPO learning a
synthetic reward on a tiny Llama; rloo_step is one clipped gradient step on the hand-written RLOO objective (CPU,
seconds)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from zopro.train.ppo import (
    PPOConfig,
    compute_gae,
    make_ppo,
    masked_whiten,
    policy_loss,
    ppo_step,
    rloo_step,
    token_rewards,
    value_loss,
)
from zopro.train.rollout import collect_rollout

SEED = 0
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/zopro/conftest.py


@pytest.fixture
def make_bundle(tiny_llama_config, make_tiny_model):
    from zopro.train.models import PolicyRewardModel

    def make(seed=SEED, lm_head_scale=1.0):
        base = make_tiny_model(LlamaForCausalLM, tiny_llama_config, seed)
        with torch.no_grad():
            base.lm_head.weight.mul_(lm_head_scale)
        return PolicyRewardModel(base, lora_r=4, lora_alpha=8, seed=seed)

    return make


# -- pure functions against hand computation -------------------------------------------------------------------------


def test_compute_gae_hand_example():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    # Masked entries (9, 5, 7, 4) must be ignored.
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0], [7.0, 0.5, -1.0, 2.0]], dtype=torch.float64)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [4.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    adv, ret = compute_gae(values, rewards, mask, gamma, lam)
    # Row 0, backwards from the last response token t=2 (nothing to bootstrap from after it):
    #   t=2: delta = 1 + 0.9*0 - 3 = -2                A = -2
    #   t=1: delta = 0 + 0.9*3 - 2 = 0.7               A = 0.7 + 0.45*(-2) = -0.2
    #   t=0: delta = 0 + 0.9*2 - 1 = 0.8               A = 0.8 + 0.45*(-0.2) = 0.71
    # Row 1 (t=0 is prompt):
    #   t=3: delta = 2 + 0 - 2 = 0                     A = 0
    #   t=2: delta = 0 + 0.9*2 + 1 = 2.8               A = 2.8
    #   t=1: delta = 1 + 0.9*(-1) - 0.5 = -0.4         A = -0.4 + 0.45*2.8 = 0.86
    expected_adv = torch.tensor([[0.71, -0.2, -2.0, 0.0], [0.0, 0.86, 2.8, 0.0]], dtype=torch.float64)
    expected_ret = torch.tensor([[1.71, 1.8, 1.0, 0.0], [0.0, 1.36, 1.8, 2.0]], dtype=torch.float64)  # A + V
    torch.testing.assert_close(adv, expected_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, expected_ret, rtol=0, atol=1e-12)


def test_compute_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    adv, ret = compute_gae(values, rewards, mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(adv, (to_go - values) * mask)
    torch.testing.assert_close(ret, to_go * mask)


def test_token_rewards_hand_example():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    logp = torch.tensor([[NAN, -1.0, -2.0, NAN], [NAN, -0.5, -0.5, -3.0], [NAN] * 4])  # NaN where masked
    ref = torch.tensor([[NAN, -1.5, -1.0, NAN], [NAN, -0.5, -1.0, -2.0], [NAN] * 4])
    scores = torch.tensor([2.0, -1.0, 5.0])
    rewards = token_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # Row 0: kl = (0.5, -1.0) -> -0.1*kl = (-0.05, 0.1); score 2 at the last response token t=2.
    # Row 1: kl = (0, 0.5, -1.0) -> (0, -0.05, 0.1); score -1 at t=3. Row 2 has no response: all 0.
    expected = torch.tensor([[0.0, -0.05, 2.1, 0.0], [0.0, 0.0, -0.05, -0.9], [0.0] * 4])
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-6)
    # Summed, the per-token rewards are the rollout's sequence reward: scores - kl_coef * sum(kl).
    torch.testing.assert_close(rewards[:2].sum(-1), torch.tensor([2.0 - 0.1 * -0.5, -1.0 - 0.1 * -0.5]))


def test_value_loss_hand_example():
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, -0.1, 0.3, 50.0]])
    returns = torch.tensor([[1.0, 1.0, -1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t=0: V=0.5 clipped to 0.2: max((0.5-1)^2, (0.2-1)^2) = max(0.25, 0.64) = 0.64 (the clipped term wins)
    # t=1: V=-0.1 inside the range: (-1.1)^2 = 1.21
    # t=2: V=0.3 clipped to 0.2: max((1.3)^2, (1.2)^2) = 1.69
    # loss = 0.5 * (0.64 + 1.21 + 1.69) / 3 = 0.59; t=3 is masked
    torch.testing.assert_close(loss, torch.tensor(0.59), rtol=0, atol=1e-6)
    torch.testing.assert_close(clipfrac, torch.tensor(1 / 3))


def test_policy_loss_hand_example():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1, 100.0]]))
    adv = torch.tensor([[1.0, -1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, clipfrac, approx_kl = policy_loss(new, old, adv, mask, cliprange=0.2)
    # t=0: max(-1.5, -1.2) = -1.2 (clipped); t=1: max(0.5, 0.8) = 0.8 (clipped); t=2: -2.2 (inside the range)
    torch.testing.assert_close(loss, torch.tensor(-2.6 / 3))
    torch.testing.assert_close(clipfrac, torch.tensor(2 / 3))
    kl = 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3
    torch.testing.assert_close(approx_kl, torch.tensor(kl))


def test_masked_whiten_is_trls():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    # mean 2, unbiased variance ((-1)^2 + 0 + 1^2) / 2 = 1
    scale = 1 / math.sqrt(1 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-scale, 0.0, scale, 0.0]]))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False),
                               torch.tensor([[2 - scale, 2.0, 2 + scale, 0.0]]))


def test_ppo_config_defaults_and_validation():
    cfg = PPOConfig()
    assert (cfg.gamma, cfg.lam, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.kl_coef) == (
        1.0, 0.95, 0.2, 0.2, 0.1, 0.05)
    assert (cfg.whiten_rewards, cfg.whiten_advantages, cfg.ppo_epochs, cfg.num_mini_batches) == (False, True, 4, 1)
    assert (cfg.lr, cfg.max_grad_norm) == (1e-5, 1.0)
    for name, bad in (("gamma", 1.5), ("lam", -0.1), ("cliprange", 0.0), ("ppo_epochs", 0), ("max_grad_norm", 0.0)):
        with pytest.raises(ValueError, match=name):
            PPOConfig(**{name: bad})


# -- the value model on the shared base ------------------------------------------------------------------------------


def _batch(tokenizer):
    enc = tokenizer(["hello", "tell me about the blue sea"], return_tensors="pt", padding=True, padding_side="left")
    resp = torch.tensor([[20, 21, 22, 0], [30, 31, 32, 33]])
    resp_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    ids = torch.cat([enc.input_ids, resp * resp_mask], 1)
    attention = torch.cat([enc.attention_mask, resp_mask], 1)
    response = torch.cat([torch.zeros_like(enc.input_ids), resp_mask], 1)
    return ids, attention, response


def test_value_model_shares_base_and_is_independent_of_policy(make_bundle, tiny_tokenizer):
    bundle = make_bundle()
    non_lora = {n: p for n, p in bundle.model.named_parameters() if "lora_" not in n}
    base_ptrs = {p.data_ptr() for p in non_lora.values()}
    value_model, _ = make_ppo(bundle, PPOConfig())
    after = {n: p for n, p in bundle.model.named_parameters() if "lora_" not in n}
    assert set(after) == set(non_lora) and {p.data_ptr() for p in after.values()} == base_ptrs  # base held once
    value_lora = bundle.value_parameters()
    assert value_lora.keys() == bundle.policy_parameters().keys()  # same canonical names and shapes ...
    policy_ptrs = {p.data_ptr() for p in bundle.policy_parameters().values()}
    assert not policy_ptrs & {p.data_ptr() for p in value_lora.values()}  # ... but its own tensors

    # The value forward reads the very base tensors the policy forward reads.
    seen = {}
    layer = bundle.base.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, a, o: seen.setdefault(bundle.model.active_adapter, []).append(
        m.base_layer.weight.data_ptr()))
    ids, attention, response = _batch(tiny_tokenizer)
    policy_before = bundle.policy_logprobs(ids, attention, response)[1].clone()
    reward_before = bundle.reward_scores(ids, attention).clone()
    values_before = value_model(ids, attention).clone()
    hook.remove()
    assert seen["value"] == seen["policy"] == [layer.base_layer.weight.data_ptr()]

    # Changing the value adapter and head changes the values and nothing else.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in value_model.trainable_parameters().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    assert torch.equal(bundle.policy_logprobs(ids, attention, response)[1], policy_before)
    assert torch.equal(bundle.reward_scores(ids, attention), reward_before)
    values_after = value_model(ids, attention)
    assert values_after.shape == ids.shape and torch.all(values_after[:, 0] == 0)
    assert not torch.allclose(values_after[:, 1:], values_before[:, 1:])

    # Gradients of the values reach the value adapter and head only.
    value_model(ids, attention, grad=True)[response.bool()].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in value_model.trainable_parameters().values())
    assert all(p.grad is None for p in bundle.policy_parameters().values())


def test_make_ppo_optimises_policy_value_and_head_only(make_bundle):
    bundle = make_bundle()
    value_model, opt = make_ppo(bundle, PPOConfig(lr=3e-4))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    expected = list(bundle.policy_parameters().values()) + list(value_model.trainable_parameters().values())
    assert in_opt == {id(p) for p in expected} and len(in_opt) == len(expected)
    assert {"head.weight", "head.bias"} <= value_model.trainable_parameters().keys()
    assert opt.param_groups[0]["lr"] == 3e-4 and opt.param_groups[0]["weight_decay"] == 0.0
    assert "value.weight" not in bundle.trainable_state()  # checkpoints of the ZOPrO loop are unchanged
    with pytest.raises(ValueError, match="value"):
        make_ppo(bundle, PPOConfig())


# -- PPO and RLOO steps on rollouts ----------------------------------------------------------------------------------

PROMPTS = ["tell me about the sea", "hello", "the sky is", "what colour is water"]


def _target_fraction_scorer(tokenizer):
    """Synthetic reward: the fraction of completion words that are in a fixed half of the vocabulary."""
    target = {t for t, i in tokenizer.get_vocab().items() if i >= 4 and i % 2 == 0}

    def scores(input_ids, attention_mask, *, grad=False, prompts=None, completions=None):
        words = [c.split() for c in completions]
        return torch.tensor([sum(w in target for w in ws) / max(len(ws), 1) for ws in words])

    return scores


def test_ppo_steps_increase_a_synthetic_reward(make_bundle, tiny_tokenizer):
    # A random tiny Llama has logits of std ~0.1 (init std 0.02): no change of its hidden states moves much
    # probability, and neither PPO nor RLOO moved the reward in 20 steps. Scaled by 30 (logit std ~3, like a
    # trained LM), the same 12 steps raised it by 0.14, 0.42, 0.23 for model seeds 0, 1, 2.
    bundle = make_bundle(lm_head_scale=30.0)
    bundle.reward_scores = _target_fraction_scorer(tiny_tokenizer)  # instance attribute: the rollout calls it
    cfg = PPOConfig(lr=5e-3, seed=SEED)
    value_model, opt = make_ppo(bundle, cfg)

    def rollout(prompts, k, seed):
        return collect_rollout(bundle, tiny_tokenizer, prompts, k, 10, 1.0, cfg.kl_coef, seed, 32)

    before = rollout(PROMPTS * 4, 4, 12345).scores.mean().item()  # 64 samples; the score's std is ~0.02 here
    first = None
    for step in range(12):
        r = rollout(PROMPTS * 2, 4, step)
        if first is None:  # per-token rewards sum to the rollout's KL-penalised sequence reward
            _, policy_tok = bundle.policy_logprobs(r.sequences, r.attention_mask, r.response_mask)
            _, ref_tok = bundle.reference_logprobs(r.sequences, r.attention_mask, r.response_mask)
            summed = token_rewards(r.scores, policy_tok, ref_tok, r.response_mask, cfg.kl_coef).sum(-1)
            torch.testing.assert_close(summed, r.rewards, rtol=0, atol=1e-5)
        metrics = ppo_step(bundle, value_model, r, opt, cfg)
        first = first or metrics
        assert all(math.isfinite(v) for v in metrics.values())
    after = rollout(PROMPTS * 4, 4, 12345).scores.mean().item()
    assert after > before + 0.08, (before, after)
    # Within one step the four epochs lower the PPO objective: at the first update the ratio is 1 and the whitened
    # advantages have mean 0, so the policy loss starts at ~0 and must go negative.
    assert first["loss_last"] < first["loss_first"] - 0.01
    assert first["approx_kl"] > 0 and 0 <= first["clip_fraction"] <= 1 and first["grad_norm"] > 0


def test_ppo_takes_token_logprobs_from_the_rollout_at_its_temperature(make_bundle, tiny_tokenizer):
    from zopro.train.ppo import _token_logps

    bundle = make_bundle(lm_head_scale=30.0)
    r = collect_rollout(bundle, tiny_tokenizer, PROMPTS, 2, 6, 1.0, 0.05, 7, 32)
    policy, ref = _token_logps(bundle, r, 1.0)
    assert policy is r.policy_token_logps and ref is r.ref_token_logps
    policy, ref = _token_logps(bundle, r, 0.7)  # another temperature: computed, as the rollout would have
    batch = (r.sequences, r.attention_mask, r.response_mask)
    assert torch.equal(policy, bundle.policy_logprobs(*batch, temperature=0.7)[1]) and not policy.is_inference()
    assert torch.equal(ref, bundle.reference_logprobs(*batch, temperature=0.7)[1]) and not ref.is_inference()
    assert not torch.equal(policy, r.policy_token_logps)


@pytest.mark.parametrize("loss", ["sequence", "token"])
def test_rloo_step_is_one_clipped_sgd_step_on_the_hand_written_objective(make_bundle, tiny_tokenizer, loss):
    # At the first update the policy is the one that sampled, so every ratio is 1 (inside the clip range) and the
    # PPO-clip surrogate is the REINFORCE objective: sequence loss -mean_b A_b ratio_b, value -mean(A), gradient
    # -mean_b A_b grad(log p_b); token loss -sum_{b,t} A_b ratio_bt / n_tokens. Written out here from the log-probs
    # alone (no zopro loss function), with SGD so that the step is -lr * the gradient clipped to norm 1.
    bundle = make_bundle()
    r = collect_rollout(bundle, tiny_tokenizer, PROMPTS, 2, 6, 1.0, 0.05, 7, 32)
    r.advantages = torch.linspace(-1.5, 3.0, len(r.advantages))  # known advantages that do not sum to 0
    params = bundle.policy_parameters()
    start = {n: p.detach().clone() for n, p in params.items()}
    sums, tok = bundle.policy_logprobs(r.sequences, r.attention_mask, r.response_mask, grad=True)
    if loss == "sequence":
        objective = -(r.advantages * sums).mean()
        value = -r.advantages.mean().item()
    else:
        mask = r.response_mask.float()
        objective = -(r.advantages[:, None] * tok * mask).sum() / mask.sum()
        value = -(r.advantages[:, None] * mask).sum().item() / mask.sum().item()
    grads = dict(zip(params, torch.autograd.grad(objective, list(params.values()))))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()
    assert (norm > 1.0) == (loss == "sequence")  # one case is clipped to norm 1, the other not
    factor = min(1.0, 1.0 / (norm + 1e-6))  # clip_grad_norm_(max_norm=1)

    lr = 0.1
    metrics = rloo_step(bundle, r, torch.optim.SGD(list(params.values()), lr=lr), clip=0.2, loss=loss)
    assert metrics["loss"] == pytest.approx(value, rel=1e-5, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-4)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), start[n] - lr * factor * grads[n], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="loss"):
        rloo_step(bundle, r, torch.optim.SGD(list(params.values()), lr=lr), loss="tokens")
    with pytest.raises(ValueError, match="microbatch"):
        rloo_step(bundle, r, torch.optim.SGD(list(params.values()), lr=lr), microbatch=-1)


@pytest.mark.parametrize("loss", ["sequence", "token"])
@pytest.mark.parametrize("microbatch", [1, 3])
def test_microbatched_first_order_step_accumulates_the_whole_batch_gradient(make_bundle, tiny_tokenizer, loss,
                                                                            microbatch):
    bundles = make_bundle(), make_bundle()
    r = collect_rollout(bundles[0], tiny_tokenizer, PROMPTS, 2, 6, 1.0, 0.05, 7, 32)
    r.advantages = torch.linspace(-1.0, 1.0, len(r.advantages))  # every row pulls its own way
    first = r.response_mask.argmax(1)[0]
    r.response_mask[0, first + 2:] = 0  # row 0 answers 2 tokens: chunks hold unequal token counts
    results = []
    for bundle, mb in zip(bundles, (0, microbatch), strict=True):
        opt = torch.optim.SGD(list(bundle.policy_parameters().values()), lr=0.0)  # keep the weights: compare grads
        results.append(rloo_step(bundle, r, opt, loss=loss, microbatch=mb))
    assert results[1]["loss"] == pytest.approx(results[0]["loss"], rel=1e-5, abs=1e-7)
    assert results[1]["grad_norm"] == pytest.approx(results[0]["grad_norm"], rel=1e-5)
    grads = [{n: p.grad for n, p in b.policy_parameters().items()} for b in bundles]
    assert all(torch.allclose(grads[1][n], g, rtol=1e-4, atol=1e-8) for n, g in grads[0].items())
