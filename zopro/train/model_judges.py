"""Judges that run a model: :class:`RewardModelJudge` (a sequence classifier with one label, a "gold" reward model)
and :class:`LLMJudge` (a causal LM asked "A or B?", read from its next-token log-probabilities, in both orders). The
judges' protocol and the judges without a model are in :mod:`zopro.train.judges`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from zopro.train.judges import ScoreJudge, check_positive_int, check_text_batch

__all__ = ["DEFAULT_JUDGE_TEMPLATE", "LLMJudge", "RewardModelJudge"]


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration, restoring the model's training flag after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _pad_right(sequences: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-pad token id lists into ``(input_ids, attention_mask)``, both ``[B, max_len]`` int64.

    Right padding keeps every real token at the position it has unpadded, so a causal model gives the same
    values for it (causal attention never sees the padding that follows).
    """
    if any(len(s) == 0 for s in sequences):
        raise ValueError("a text tokenised to zero tokens; the judge needs at least one token per text")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


def _fallback_pad_id(tokenizer: Any) -> int | None:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


class RewardModelJudge(ScoreJudge):
    """A scalar reward model: ``AutoModelForSequenceClassification`` with ``num_labels == 1``.

    ``score(prompt, completion) = model(tokenizer(prompt + completion)).logits[:, 0]``; ``prefer`` is
    ``sigmoid(score_a - score_b)`` (Bradley-Terry).

    Texts are right-padded with the model's ``pad_token_id``. If the model's config has none, it is set (a
    mutation of ``model.config``) to the tokenizer's pad token, or its eos token when the tokenizer has no pad
    token, because HF sequence-classification models pool at the last non-pad token and refuse batches > 1
    without a pad id. The tokenizer is not modified.

    Args:
        model: the reward model; moved to ``device`` if one is given.
        tokenizer: its tokenizer (``tokenizer(list_of_texts)`` must return ``input_ids``).
        batch_size: texts per forward pass.
        device: where to run; default: the model's device.
        max_length: truncate tokenised texts to this many tokens (default: no truncation).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        max_length: int | None = None,
    ):
        check_positive_int("batch_size", batch_size)
        if max_length is not None:
            check_positive_int("max_length", max_length)
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        if num_labels != 1:
            raise ValueError(f"model must be a sequence-classification model with num_labels=1, got {num_labels}")
        text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if text_config.pad_token_id is None:
            pad_id = _fallback_pad_id(tokenizer)
            if pad_id is None:
                raise ValueError("tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
            text_config.pad_token_id = pad_id
        self.pad_id: int = text_config.pad_token_id
        if device is not None:
            model.to(device)
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.temperature = 1.0

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        """``[N]`` float32 reward of each ``prompts[i] + completions[i]``."""
        prompts, completions = check_text_batch(prompts=prompts, completions=completions)
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        device = _model_device(self.model)
        out = []
        with _eval_mode(self.model):
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                truncate = {} if self.max_length is None else {"truncation": True, "max_length": self.max_length}
                ids = self.tokenizer(chunk, **truncate)["input_ids"]
                input_ids, attention_mask = _pad_right(ids, self.pad_id, device)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
                out.append(logits[:, 0].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


DEFAULT_JUDGE_TEMPLATE = (
    "You are comparing two responses to the same user request.\n\n"
    "Request:\n{prompt}\n\n"
    "Response A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\n"
    "Which response is more helpful, concise, polite and on-topic? Answer with A or B.\n"
    "Answer:"
)


class LLMJudge:
    """Pairwise judge from a causal LM's next-token log-probabilities of "A" and "B".

    For each item the template is filled twice: (A = a, B = b) and (A = b, B = a). With ``l_X`` the log-prob of
    label X as the next token (log-sum-exp over the label's single-token spellings, "A" and " A"),

        ``p1 = sigmoid(l_A - l_B)`` on the first prompt (a shown as A),
        ``p2 = sigmoid(l_B - l_A)`` on the second prompt (a shown as B),
        ``P(a > b) = (p1 + p2) / 2``.

    A constant preference for a position cancels: a model that always answers "A" gives 0.5, and swapping a and
    b gives exactly ``1 - P`` up to float rounding (both orders of an item run in the same forward pass).

    Args:
        model: any causal LM returning ``.logits`` ``[B, L, V]``.
        tokenizer: its tokenizer.
        template: judge prompt with ``{prompt}``, ``{response_a}``, ``{response_b}`` placeholders, ending where
            the answer token is expected.
        batch_size: items per forward pass (each item is two sequences).
        use_chat_template: wrap the filled template as a user turn with ``tokenizer.apply_chat_template``
            (for instruct judges).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        template: str = DEFAULT_JUDGE_TEMPLATE,
        batch_size: int = 4,
        use_chat_template: bool = False,
    ):
        check_positive_int("batch_size", batch_size)
        if not isinstance(template, str):
            raise TypeError(f"template must be a str, got {type(template).__name__}")
        for field in ("{prompt}", "{response_a}", "{response_b}"):
            if field not in template:
                raise ValueError(f"template must contain the placeholder {field}")
        self.model, self.tokenizer = model, tokenizer
        self.template, self.batch_size, self.use_chat_template = template, batch_size, use_chat_template
        self.label_ids = (self._label_ids("A"), self._label_ids("B"))
        if set(self.label_ids[0]) & set(self.label_ids[1]):
            raise ValueError("tokenizer maps 'A' and 'B' to a shared token; the judge cannot tell them apart")
        pad_id = _fallback_pad_id(tokenizer)
        # Padding sits after the last real token and is never attended to, so any id works.
        self.pad_id: int = 0 if pad_id is None else pad_id

    def _label_ids(self, label: str) -> list[int]:
        ids = set()
        for spelling in (label, " " + label):
            encoded = self.tokenizer.encode(spelling, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        if not ids:
            raise ValueError(f"tokenizer cannot encode {label!r} or ' {label}' as a single token")
        return sorted(ids)

    def _render(self, prompt: str, first: str, second: str) -> str:
        text = self.template.format(prompt=prompt, response_a=first, response_b=second)
        if self.use_chat_template:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return text

    def _label_logits(self, texts: list[str]) -> Tensor:
        """``[len(texts), 2]`` float64: log-prob of "A" and of "B" as the token after each text."""
        # A chat template already writes its own special tokens.
        ids = self.tokenizer(texts, add_special_tokens=not self.use_chat_template)["input_ids"]
        input_ids, attention_mask = _pad_right(ids, self.pad_id, _model_device(self.model))
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        last = attention_mask.sum(dim=1) - 1
        logps = torch.log_softmax(logits[torch.arange(len(texts), device=logits.device), last].float(), dim=-1)
        a_ids, b_ids = (torch.tensor(x, device=logps.device) for x in self.label_ids)
        return torch.stack([logps[:, a_ids].logsumexp(-1), logps[:, b_ids].logsumexp(-1)], dim=1).double().cpu()

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> Tensor:
        """``[N]`` float32 ``P(a > b)``, averaged over both presentation orders."""
        prompts, completions_a, completions_b = check_text_batch(
            prompts=prompts, completions_a=completions_a, completions_b=completions_b
        )
        out = []
        with _eval_mode(self.model):
            for start in range(0, len(prompts), self.batch_size):
                stop = start + self.batch_size
                texts = []
                items = zip(prompts[start:stop], completions_a[start:stop], completions_b[start:stop], strict=True)
                for p, a, b in items:
                    texts += [self._render(p, a, b), self._render(p, b, a)]
                lab = self._label_logits(texts)
                p1 = torch.sigmoid(lab[0::2, 0] - lab[0::2, 1])  # a shown as A
                p2 = torch.sigmoid(lab[1::2, 1] - lab[1::2, 0])  # a shown as B
                out.append(((p1 + p2) / 2).float())
        return torch.cat(out) if out else torch.zeros(0)
