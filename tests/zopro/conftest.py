"""Shared fixtures for zopro tests: a tiny word-level tokenizer and a tiny Llama config, built offline.

``tiny_tokenizer`` is a ``PreTrainedTokenizerFast`` over a fixed word list (a ``tokenizers`` WordLevel model with
a whitespace/punctuation pre-tokenizer; unknown words map to ``<unk>``). ``tiny_llama_config`` matches its
vocabulary: hidden 32, 2 layers, 4 heads (2 KV heads). ``make_tiny_model`` builds a model from a config with a
fixed seed without disturbing the global torch generator.
"""

from __future__ import annotations

import pytest
import torch

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]
# Words of the LLM-judge template, the test texts, and a few common ones; order fixes the ids.
WORDS = """A B a an and are as at be because blue but can cat comparing day do dog for good hello help helpful
helps hope how i in is it light more morning nice no not of on one or polite please request response responses
same say sea sky sun sure thank thanks that the this to two user was what which why with word yes you your
concise answer explain sentence short two user request tell me about colour red green water tea
Which Answer Request Response You Explain Say Hello Thanks Please The It""".split()  # noqa: SIM905 (prose reads better)
PUNCTUATION = list(".,:;!?'\"()-")


def build_tiny_tokenizer(with_pad: bool = True):
    """A word-level fast tokenizer; ``with_pad=False`` leaves ``pad_token`` unset (eos is ``</s>``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + WORDS + PUNCTUATION:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
    if with_pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """Point HF_HOME at a temporary directory and force offline mode; yields the directory."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return home


@pytest.fixture
def tiny_tokenizer(hf_home):
    """Word-level ``PreTrainedTokenizerFast`` with ``<pad>``, ``<unk>``, ``<s>``, ``</s>``."""
    return build_tiny_tokenizer(with_pad=True)


@pytest.fixture
def tiny_tokenizer_no_pad(hf_home):
    """The same tokenizer without a pad token."""
    return build_tiny_tokenizer(with_pad=False)


@pytest.fixture
def tiny_llama_config(tiny_tokenizer):
    """``LlamaConfig`` for ``tiny_tokenizer``: hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tiny_tokenizer.pad_token_id,
        bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


@pytest.fixture
def make_tiny_model():
    """``make_tiny_model(model_cls, config, seed=0)``: a randomly initialised model in eval mode.

    The seed is applied inside ``torch.random.fork_rng`` so the global generator is left as it was.
    """

    def make(model_cls, config, seed: int = 0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config)
        return model.eval()

    return make


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny models: on a busy 2-core machine the OpenMP barrier made each tiny 32x32 matmul
    ~10 ms with 2 threads (a 12-token generate took 5.7 s, 0.013 s with 1 thread). Restores the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
