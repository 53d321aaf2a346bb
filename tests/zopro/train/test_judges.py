"""zopro.train.judges: callable, reward-model, LLM and heuristic judges on tiny offline models."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from zopro.train.judges import CallableJudge, HeuristicJudge, Judge
from zopro.train.model_judges import DEFAULT_JUDGE_TEMPLATE, LLMJudge, RewardModelJudge

pytestmark = pytest.mark.usefixtures("hf_home")

PROMPTS = ["Say hello.", "Why is the sky blue?", "Name a colour.", "Say thanks."]
COMPLETIONS_A = [" Hello, nice to meet you!", " Because of light.", " Blue", " Thank you so much, that was nice."]
COMPLETIONS_B = [" no", " The sky is blue because the sun light is blue .", " red red red red", " thanks"]


# --- CallableJudge --------------------------------------------------------------------------------------------------


def test_callable_judge_floats_and_bools():
    judge = CallableJudge(lambda p, a, b: len(a) > len(b))
    out = judge.prefer(["p", "q"], ["long", "x"], ["s", "yy"])
    assert out.dtype == torch.float32
    assert out.tolist() == [1.0, 0.0]
    assert CallableJudge(lambda p, a, b: 0.25).prefer(["p"], ["a"], ["b"]).tolist() == [0.25]
    assert isinstance(judge, Judge)


def test_callable_judge_errors():
    with pytest.raises(TypeError, match="fn"):
        CallableJudge(3)
    with pytest.raises(ValueError, match="probability"):
        CallableJudge(lambda p, a, b: 1.5).prefer(["p"], ["a"], ["b"])
    with pytest.raises(TypeError, match="fn returned str"):
        CallableJudge(lambda p, a, b: "A").prefer(["p"], ["a"], ["b"])
    judge = CallableJudge(lambda p, a, b: 0.5)
    with pytest.raises(ValueError, match="same length"):
        judge.prefer(["p", "q"], ["a"], ["b"])
    with pytest.raises(TypeError, match="prompts"):
        judge.prefer("p", ["a"], ["b"])


# --- RewardModelJudge -----------------------------------------------------------------------------------------------


@pytest.fixture
def reward_model(tiny_llama_config, make_tiny_model):
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(tiny_llama_config)
    config.num_labels = 1
    config.pad_token_id = None  # as for a base checkpoint: the judge must supply one
    config.initializer_range = 0.5  # spread the scores of a random model
    return make_tiny_model(LlamaForSequenceClassification, config, seed=0)


def test_reward_model_judge_scores_match_unbatched(reward_model, tiny_tokenizer_no_pad):
    tok = tiny_tokenizer_no_pad
    judge = RewardModelJudge(reward_model, tok, batch_size=3)  # 3 does not divide 4: a ragged last batch
    assert reward_model.config.pad_token_id == tok.eos_token_id  # no pad token: eos is used
    assert tok.pad_token is None  # the tokenizer is left alone
    scores = judge.score(PROMPTS, COMPLETIONS_A)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS_A, strict=True)):
            ids = torch.tensor([tok(p + c)["input_ids"]])
            expected = reward_model(input_ids=ids).logits[0, 0].item()
            assert scores[i].item() == pytest.approx(expected, abs=1e-5)
    assert scores.std() > 1e-3  # the texts are told apart


def test_reward_model_judge_prefer_is_bradley_terry(reward_model, tiny_tokenizer):
    judge = RewardModelJudge(reward_model, tiny_tokenizer, batch_size=8)
    sa, sb = judge.score(PROMPTS, COMPLETIONS_A), judge.score(PROMPTS, COMPLETIONS_B)
    p = judge.prefer(PROMPTS, COMPLETIONS_A, COMPLETIONS_B)
    torch.testing.assert_close(p, torch.sigmoid(sa.double() - sb.double()).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(judge.prefer(PROMPTS, COMPLETIONS_B, COMPLETIONS_A), 1 - p, rtol=0, atol=1e-6)


def test_reward_model_judge_restores_training_mode(reward_model, tiny_tokenizer):
    reward_model.train()
    RewardModelJudge(reward_model, tiny_tokenizer).score(PROMPTS[:1], COMPLETIONS_A[:1])
    assert reward_model.training


def test_reward_model_judge_errors(tiny_llama_config, make_tiny_model, tiny_tokenizer):
    from transformers import LlamaForSequenceClassification

    config = copy.deepcopy(tiny_llama_config)
    config.num_labels = 2
    with pytest.raises(ValueError, match="num_labels=1"):
        RewardModelJudge(make_tiny_model(LlamaForSequenceClassification, config), tiny_tokenizer)
    config.num_labels = 1
    with pytest.raises(ValueError, match="batch_size"):
        RewardModelJudge(make_tiny_model(LlamaForSequenceClassification, config), tiny_tokenizer, batch_size=0)


# --- LLMJudge -------------------------------------------------------------------------------------------------------


@pytest.fixture
def causal_lm(tiny_llama_config, make_tiny_model):
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(tiny_llama_config)
    config.initializer_range = 0.5
    return make_tiny_model(LlamaForCausalLM, config, seed=1)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _ab_logprobs(model, tok, text):
    """log P(next = "A"), log P(next = "B") after `text`, unbatched."""
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
    return logps[tok.convert_tokens_to_ids("A")].item(), logps[tok.convert_tokens_to_ids("B")].item()


def test_llm_judge_hand_computed(causal_lm, tiny_tokenizer):
    judge = LLMJudge(causal_lm, tiny_tokenizer, batch_size=3)
    p = judge.prefer(PROMPTS, COMPLETIONS_A, COMPLETIONS_B)
    assert p.shape == (4,) and p.dtype == torch.float32
    for i in range(4):
        fmt = DEFAULT_JUDGE_TEMPLATE.format
        la1, lb1 = _ab_logprobs(
            causal_lm, tiny_tokenizer, fmt(prompt=PROMPTS[i], response_a=COMPLETIONS_A[i], response_b=COMPLETIONS_B[i])
        )
        la2, lb2 = _ab_logprobs(
            causal_lm, tiny_tokenizer, fmt(prompt=PROMPTS[i], response_a=COMPLETIONS_B[i], response_b=COMPLETIONS_A[i])
        )
        expected = (_sigmoid(la1 - lb1) + _sigmoid(lb2 - la2)) / 2
        assert p[i].item() == pytest.approx(expected, abs=1e-5)
    assert p.std() > 1e-4  # a random model with wide weights is not indifferent


def test_llm_judge_swap_gives_one_minus_p(causal_lm, tiny_tokenizer_no_pad):
    judge = LLMJudge(causal_lm, tiny_tokenizer_no_pad, batch_size=2)
    p_ab = judge.prefer(PROMPTS, COMPLETIONS_A, COMPLETIONS_B)
    p_ba = judge.prefer(PROMPTS, COMPLETIONS_B, COMPLETIONS_A)
    # Exact up to float32 rounding of the returned probabilities.
    torch.testing.assert_close(p_ba, 1 - p_ab, rtol=0, atol=1e-6)
    # Identical completions: the two orders are the same prompt, so exactly 1/2.
    assert judge.prefer(PROMPTS, COMPLETIONS_A, COMPLETIONS_A).tolist() == [0.5] * 4


class _AlwaysA(torch.nn.Module):
    """A "causal LM" whose next-token distribution always favours token `a_id` by 5 nats over `b_id`."""

    def __init__(self, vocab_size, a_id, b_id):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[a_id], self.bias[b_id] = 5.0, 0.0

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_llm_judge_cancels_position_bias(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _AlwaysA(len(tok), tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B"))
    p = LLMJudge(model, tok).prefer(PROMPTS, COMPLETIONS_A, COMPLETIONS_B)
    # p1 = sigmoid(5), p2 = sigmoid(-5): their mean is 1/2.
    torch.testing.assert_close(p, torch.full((4,), 0.5), rtol=0, atol=1e-7)


def test_llm_judge_errors(causal_lm, tiny_tokenizer):
    with pytest.raises(ValueError, match="response_b"):
        LLMJudge(causal_lm, tiny_tokenizer, template="{prompt} {response_a}")
    with pytest.raises(ValueError, match="batch_size"):
        LLMJudge(causal_lm, tiny_tokenizer, batch_size=0)


# --- HeuristicJudge -------------------------------------------------------------------------------------------------

SKY = "Explain in one sentence why the sky is blue."


def test_heuristic_judge_hand_computed_scores():
    judge = HeuristicJudge()  # band 5..40 words, temperature 0.5
    good = "The sky looks blue because air scatters blue light more than red light. Hope this helps!"
    # 16 words (in band: 1), topic {sky, blue} fully covered (1), polite (0.5), no repeats, finished: 2.5.
    repetitive = "blue blue blue blue blue blue"
    # topic 1/2, length 1 (6 words), repeat 1 - 1/4 = 0.75 (x2), unfinished (-0.5): 0.5 + 1 - 1.5 - 0.5 = -0.5.
    short = "Blue sky."
    # topic 1, length 2/5, no trigram, finished: 1.4.
    role = "The sky is blue.\nUser: and the sea?"
    # topic 1, length 1 (8 words), finished ("?"), invented turn (-1): 1.0.
    long = " ".join(["sky"] + [f"w{i}" for i in range(79)]) + "."
    # 80 words: length 40/80; topic 1/2 (sky): 1.0.
    empty = "  \n "
    scores = judge.score([SKY] * 6, [good, repetitive, short, role, long, empty])
    torch.testing.assert_close(scores, torch.tensor([2.5, -0.5, 1.4, 1.0, 1.0, -4.0]), rtol=0, atol=1e-6)


def test_heuristic_judge_features_documented():
    judge = HeuristicJudge()
    assert judge.features("Name a colour.", "Thanks! Blue is a nice colour") == {
        "topic": 0.5,  # content(prompt) = {name, colour}; "colour" is in the answer
        "length": 1.0,
        "polite": 1.0,
        "repeat": 0.0,
        "truncated": 1.0,
        "role": 0.0,
    }
    assert judge.features("x", "...") is None  # no word: empty


def test_heuristic_judge_prefer_is_sigmoid_of_difference():
    judge = HeuristicJudge(temperature=0.5)
    good = "The sky looks blue because air scatters blue light more than red light. Hope this helps!"
    p = judge.prefer([SKY, SKY], [good, "blue blue blue blue blue blue"], ["blue blue blue blue blue blue", good])
    expected = _sigmoid((2.5 - (-0.5)) / 0.5)
    torch.testing.assert_close(p, torch.tensor([expected, 1 - expected]), rtol=0, atol=1e-6)
    assert HeuristicJudge().prefer([SKY], [good], [""]).item() > 0.999


def test_heuristic_judge_errors():
    with pytest.raises(ValueError, match="max_words"):
        HeuristicJudge(min_words=10, max_words=5)
    with pytest.raises(ValueError, match="temperature"):
        HeuristicJudge(temperature=0.0)
    with pytest.raises(ValueError, match="same length"):
        HeuristicJudge().score(["a"], [])
