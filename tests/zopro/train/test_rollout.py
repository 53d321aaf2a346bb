"""Tests of zopro.train.rollout on conftest's tiny tokenizer and tiny Llama (CPU, well under a second each)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from zopro.train.external_reward import AnyRewardModel
from zopro.train.losses import rloo_advantages
from zopro.train.models import PolicyRewardModel
from zopro.train.rollout import Rollout, collect_rollout, tokenize_prompts

PROMPTS = ["hello", "tell me about the blue sea", "why is the sky blue ?"]
K = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/zopro/conftest.py


@pytest.fixture
def make_base(tiny_llama_config, make_tiny_model):
    return lambda: make_tiny_model(LlamaForCausalLM, tiny_llama_config, seed=0)


@pytest.fixture
def bundle(make_base):
    return PolicyRewardModel(make_base(), lora_r=4, seed=0)


def _fill_lora_b_(params, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _collect(bundle, tokenizer, **overrides):
    args = dict(k=K, max_new_tokens=8, temperature=0.7, kl_coef=0.05, seed=3, max_prompt_len=16) | overrides
    return collect_rollout(bundle, tokenizer, PROMPTS, **args)


def test_rloo_known_answer():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]])
    expected = torch.tensor([[-1.5, 0.0, 1.5], [-2.0, -2.0, 4.0]])  # r_i - mean of the other two
    assert torch.equal(rloo_advantages(rewards), expected)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(3, 1))


def test_rollout_rows_match_generate_and_logprob_calls(bundle, tiny_tokenizer):
    _fill_lora_b_(bundle.policy_parameters(), seed=1)
    _fill_lora_b_(bundle.reward_parameters(), seed=2)
    state = torch.random.get_rng_state()
    ro = _collect(bundle, tiny_tokenizer)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert isinstance(ro, Rollout) and ro.k == K and ro.num_prompts == len(PROMPTS)
    n = len(PROMPTS) * K
    assert torch.equal(ro.prompt_index, torch.arange(len(PROMPTS)).repeat_interleave(K))
    assert len(ro.completions) == n and ro.sequences.shape[0] == n
    for t in (ro.policy_logps, ro.ref_logps, ro.scores, ro.kl, ro.rewards, ro.advantages):
        assert t.shape == (n,) and t.dtype == torch.float32 and not t.is_inference()

    ids, mask = tokenize_prompts(tiny_tokenizer, PROMPTS, 16, bundle.pad_token_id)
    gen = bundle.generate(ids, mask, K, 8, 0.7, generator_seed=3)
    assert torch.equal(ro.sequences, gen.sequences) and ro.prompt_length == gen.prompt_length
    assert torch.equal(ro.attention_mask, gen.attention_mask) and torch.equal(ro.response_mask, gen.response_mask)
    batch = (gen.sequences, gen.attention_mask, gen.response_mask)
    assert torch.equal(ro.policy_logps, bundle.policy_logprobs(*batch)[0])
    assert torch.equal(ro.ref_logps, bundle.reference_logprobs(*batch)[0])
    # the per-token terms are kept, so PPO and the token-level loss need not run these forwards again
    assert torch.equal(ro.policy_token_logps, bundle.policy_logprobs(*batch)[1])
    assert torch.equal(ro.ref_token_logps, bundle.reference_logprobs(*batch)[1]) and ro.logprob_temperature == 1.0
    assert not ro.policy_token_logps.is_inference() and not ro.ref_token_logps.is_inference()
    assert torch.equal(ro.scores, bundle.reward_scores(gen.sequences, gen.attention_mask))
    for text, row, m in zip(ro.completions, gen.sequences, gen.response_mask, strict=True):
        assert text == tiny_tokenizer.decode(row[m.bool()], skip_special_tokens=True)


def test_rewards_are_kl_penalised_and_advantages_leave_one_out(bundle, tiny_tokenizer):
    _fill_lora_b_(bundle.policy_parameters(), seed=1)
    ro = _collect(bundle, tiny_tokenizer, kl_coef=0.25)
    assert torch.equal(ro.kl, ro.policy_logps - ro.ref_logps) and torch.all(ro.kl != 0)
    assert torch.equal(ro.rewards, ro.scores - 0.25 * ro.kl)
    r = ro.rewards.view(len(PROMPTS), K).double()
    expected = r - (r.sum(1, keepdim=True) - r) / (K - 1)
    torch.testing.assert_close(ro.advantages.view(len(PROMPTS), K).double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ro.advantages.view(len(PROMPTS), K).sum(1), torch.zeros(len(PROMPTS)), rtol=0, atol=1e-5)


def test_untrained_policy_has_zero_kl(bundle, tiny_tokenizer):
    ro = _collect(bundle, tiny_tokenizer)  # LoRA B = 0: policy == reference exactly
    assert torch.equal(ro.kl, torch.zeros_like(ro.kl)) and torch.equal(ro.rewards, ro.scores)


def test_rollout_is_reproducible_per_seed(bundle, tiny_tokenizer):
    a, b, c = (
        _collect(bundle, tiny_tokenizer),
        _collect(bundle, tiny_tokenizer),
        _collect(bundle, tiny_tokenizer, seed=4),
    )
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.advantages, b.advantages)
    assert a.completions == b.completions and not torch.equal(a.sequences, c.sequences)


def test_tokenize_prompts_raw_text_left_pads_and_keeps_the_end(tiny_tokenizer):
    ids, mask = tokenize_prompts(tiny_tokenizer, ["hello", "why is the sky blue ?"], 4, pad_token_id=0)
    full = tiny_tokenizer("why is the sky blue ?")["input_ids"]
    assert ids.tolist() == [[0, 0, 0, *tiny_tokenizer("hello")["input_ids"]], full[-4:]]
    assert mask.tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]


def test_tokenize_prompts_applies_the_chat_template(tiny_tokenizer):
    tiny_tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
        "{% if add_generation_prompt %}answer :{% endif %}"
    )
    ids, mask = tokenize_prompts(tiny_tokenizer, ["hello"], 32, pad_token_id=0)
    assert ids[0].tolist() == tiny_tokenizer("user : hello . answer :", add_special_tokens=False)["input_ids"]
    assert mask.all() and tiny_tokenizer.unk_token_id not in ids[0].tolist()


def test_rollout_with_external_reward_model_scores_texts(make_base, tiny_llama_config, make_tiny_model, tiny_tokenizer):
    from transformers import LlamaForSequenceClassification

    config = tiny_llama_config.__class__(**{**tiny_llama_config.to_dict(), "num_labels": 1})
    reward = AnyRewardModel(make_tiny_model(LlamaForSequenceClassification, config, seed=5), tiny_tokenizer)
    bundle = PolicyRewardModel(make_base(), lora_r=4, reward_model=reward)
    ro = _collect(bundle, tiny_tokenizer)
    row_prompts = [p for p in PROMPTS for _ in range(K)]
    with torch.no_grad():
        expected = reward.scores(None, None, row_prompts, ro.completions)
    assert torch.equal(ro.scores, expected)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"k": 1}, ValueError, "k must"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"kl_coef": -0.1}, ValueError, "kl_coef"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"max_prompt_len": 0}, ValueError, "max_prompt_len"),
    ],
)
def test_collect_rollout_rejects_bad_args(bundle, tiny_tokenizer, overrides, error, match):
    with pytest.raises(error, match=match):
        _collect(bundle, tiny_tokenizer, **overrides)


def test_collect_rollout_rejects_bad_prompts(bundle, tiny_tokenizer):
    with pytest.raises(TypeError, match="prompts"):
        collect_rollout(bundle, tiny_tokenizer, [], K, 4, 1.0, 0.0, 0, 8)
    with pytest.raises(TypeError, match="prompts"):
        collect_rollout(bundle, tiny_tokenizer, "hello", K, 4, 1.0, 0.0, 0, 8)
