"""Pluggable pairwise judges: which of two completions of the same prompt is better.

Every judge has ``prefer(prompts, completions_a, completions_b) -> Tensor[N]``, the probability in [0, 1] that
``completions_a[i]`` is preferred over ``completions_b[i]`` as a continuation of ``prompts[i]``. Judges that give a
scalar quality per completion also have ``score(prompts, completions) -> Tensor[N]``. Outputs are float32 CPU
tensors, whatever the device the judge runs on.

* :class:`CallableJudge` wraps a Python function.
* :class:`RewardModelJudge` uses a sequence-classification model with one label (a "gold" reward model).
* :class:`LLMJudge` asks a causal LM "A or B?" and reads the next-token log-probabilities, in both orders.
* :class:`VaderJudge` scores a completion's sentiment with VADER (Hutto & Gilbert 2014; the ``vaderSentiment``
  package, MIT, its lexicon shipped inside it): an external gold scorer that needs no download, the default job's.
* :class:`FunctionJudge` wraps a user's ``score(prompt, completion) -> float`` (``--judge python:MODULE:FUNCTION``).
* :class:`HeuristicJudge` is a deterministic rule-based stand-in for a real judge, used by the ``assistant`` preset.
  It is our own code and not a model of human preference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE",
    "CallableJudge",
    "FunctionJudge",
    "HeuristicJudge",
    "Judge",
    "LLMJudge",
    "RewardModelJudge",
    "VaderJudge",
]


@runtime_checkable
class Judge(Protocol):
    """Anything with a pairwise ``prefer``; see the module docstring."""

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> Tensor: ...


def _check_texts(name: str, texts: object) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name} must be a list of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a str, got {type(t).__name__}")
    return list(texts)


def _check_text_batch(**named: object) -> list[list[str]]:
    lists = [_check_texts(name, texts) for name, texts in named.items()]
    lengths = {name: len(texts) for name, texts in zip(named, lists, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return lists


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class _ScoreJudge:
    """Base for judges with a per-completion score: ``prefer = sigmoid((score_a - score_b) / temperature)``."""

    temperature: float = 1.0

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        raise NotImplementedError

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> Tensor:
        """``P(a > b) = sigmoid((score(a) - score(b)) / temperature)``, ``[N]`` float32."""
        prompts, completions_a, completions_b = _check_text_batch(
            prompts=prompts, completions_a=completions_a, completions_b=completions_b
        )
        n = len(prompts)
        # One call scores both sides, so a model judge batches them together.
        scores = self.score(prompts + prompts, completions_a + completions_b).double()
        return torch.sigmoid((scores[:n] - scores[n:]) / self.temperature).float()


class CallableJudge:
    """Wraps ``fn(prompt, completion_a, completion_b) -> float | bool``, the probability that a is preferred.

    A bool is read as 1.0 (a preferred) or 0.0. Values outside [0, 1] raise ``ValueError``. No ``score``: the
    function is pairwise only.
    """

    def __init__(self, fn: Callable[[str, str, str], float | bool]):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> Tensor:
        """``[N]`` float32: ``fn(prompts[i], completions_a[i], completions_b[i])`` for each i."""
        prompts, completions_a, completions_b = _check_text_batch(
            prompts=prompts, completions_a=completions_a, completions_b=completions_b
        )
        out = []
        for i, (p, a, b) in enumerate(zip(prompts, completions_a, completions_b, strict=True)):
            value = self.fn(p, a, b)
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, (bool, int, float)):
                raise TypeError(f"fn returned {type(value).__name__} for item {i}; expected float or bool")
            value = float(value)
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"fn returned {value} for item {i}; expected a probability in [0, 1]")
            out.append(value)
        return torch.tensor(out, dtype=torch.float32)


class FunctionJudge(_ScoreJudge):
    """Wraps ``fn(prompt, completion) -> float``, a per-completion score (higher is better), for ``score``; ``prefer``
    is ``sigmoid((score_a - score_b) / temperature)``.

    A call that raises, or returns anything but a finite real number, raises ``ValueError`` naming ``name``, the item
    and what went wrong (the training program turns it into one line on stderr)."""

    def __init__(self, fn: Callable[[str, str], float], name: str = "the judge", temperature: float = 1.0):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.name = fn, name
        self.temperature = _check_positive_float("temperature", temperature)

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        """``[N]`` float32: ``fn(prompts[i], completions[i])`` for each i."""
        prompts, completions = _check_text_batch(prompts=prompts, completions=completions)
        out = []
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            try:
                value = self.fn(p, c)
            except (Exception, SystemExit) as err:  # noqa: BLE001 (a user's scorer: reported in one line; a
                # SystemExit would end an unfinished run with its exit status, and only Ctrl-C should stop a run)
                raise ValueError(f"{self.name} raised {type(err).__name__} on completion {i} ({c[:40]!r}): "
                                 f"{err}") from None
            if isinstance(value, Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{self.name} returned {value!r} for completion {i} ({c[:40]!r}); expected a "
                                 "finite number")
            out.append(float(value))
        return torch.tensor(out, dtype=torch.float32)


class VaderJudge(FunctionJudge):
    """VADER's compound sentiment score of the completion alone, in [-1, 1] (the prompt is not read): the gold judge
    of the default job, as the sentiment classifiers of DPO's and Ziegler et al.'s controlled sentiment tasks are.

    ``temperature`` 0.25 makes a pair 0.5 apart (about one standard deviation of SmolLM2-135M-Instruct's answers on
    the default task) a 0.88 preference, so judged pairs carry graded soft labels rather than near-certain ones."""

    def __init__(self, temperature: float = 0.25):
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise ValueError("--judge vader: the vaderSentiment package is not installed (pip install "
                             "vaderSentiment)") from None
        analyzer = SentimentIntensityAnalyzer()
        super().__init__(lambda prompt, completion: analyzer.polarity_scores(completion)["compound"],
                         name="--judge vader", temperature=temperature)


# --------------------------------------------------------------------------------------------------------------------
# Model-based judges


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


class RewardModelJudge(_ScoreJudge):
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
        _check_positive_int("batch_size", batch_size)
        if max_length is not None:
            _check_positive_int("max_length", max_length)
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
        prompts, completions = _check_text_batch(prompts=prompts, completions=completions)
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
        _check_positive_int("batch_size", batch_size)
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
        prompts, completions_a, completions_b = _check_text_batch(
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


# --------------------------------------------------------------------------------------------------------------------
# Rule-based judge

_WORD = re.compile(r"[a-z0-9']+")
_STOPWORDS = frozenset(
    """a an and are as at be but by can could did do does for from give had has have how i if in into is it its
    me my no not of on or our please say short she should so some tell than that the their them then there these
    they this to up us was we were what when where which who why will with would write you your one sentence
    answer explain list brief briefly describe""".split()  # noqa: SIM905 (a word list reads better as prose)
)
_POLITE = re.compile(
    r"\b(please|thank you|thanks|you're welcome|you are welcome|happy to help|glad to|hope this helps|"
    r"of course|certainly|hello|hi there|good luck|kindly)\b"
)
_ROLE_MARKER = re.compile(r"(?im)^\s*(human|user|assistant|system)\s*:")
_FINAL_PUNCT = (".", "!", "?", '"', "'", ")", "*")


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``: runs of ``a-z``, ``0-9`` and ``'`` (the heuristic judge's and the held-out
    statistics' unit)."""
    return _WORD.findall(text.lower())


def _content_words(text: str) -> set[str]:
    """Lower-cased words of 3+ characters minus stop words, with a plural "s" dropped ("rainbows" -> "rainbow")."""
    out = set()
    for w in words(text):
        if len(w) < 3 or w in _STOPWORDS:
            continue
        if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.add(w)
    return out


class HeuristicJudge(_ScoreJudge):
    """Deterministic rule-based judge: a stand-in for a real judge, for offline CPU runs.

    It rewards answers that are on-topic, inside a length band, polite and finished, and penalises repetition,
    invented dialogue turns and empty output. It knows nothing about correctness. For a completion ``c`` of
    prompt ``p``, with ``W(c)`` the words of ``c`` (lower-cased runs of ``a-z``, ``0-9`` and ``'``):

    * ``topic``  = |content(p) & content(c)| / |content(p)|, in [0, 1]; content words are words of 3+ characters
      minus a fixed stop-word list, plural "s" dropped; 0 if the prompt has no content word.
    * ``length`` = 1 if ``min_words <= |W(c)| <= max_words``, else ``|W(c)| / min_words`` below the band and
      ``max_words / |W(c)|`` above it, in (0, 1].
    * ``polite`` = 1 if ``c`` contains one of: please, thank you, thanks, you're/you are welcome, happy to help,
      glad to, hope this helps, of course, certainly, hello, hi there, good luck, kindly; else 0
      (not "sure": "I'm not sure" is not politeness).
    * ``repeat`` = 1 - (distinct word trigrams / word trigrams), in [0, 1); 0 below 3 words.
    * ``truncated`` = 1 if ``c.rstrip()`` does not end with one of ``. ! ? " ' ) *``, else 0.
    * ``role`` = 1 if a line of ``c`` starts with "Human:", "User:", "Assistant:" or "System:", else 0.

    ``score = w_topic*topic + w_length*length + w_polite*polite - w_repeat*repeat - w_truncated*truncated
    - w_role*role``, and ``score = empty_score`` (default -4, below any non-empty score with the default
    weights, whose minimum is above -3.5) when ``c`` has no word. ``prefer`` is
    ``sigmoid((score_a - score_b) / temperature)``.

    Args:
        min_words, max_words: the length band (default 5 to 40 words: a sentence or a short list).
        temperature: divides the score difference in ``prefer``.
        weights: ``w_topic=1.0, w_length=1.0, w_polite=0.5, w_repeat=2.0, w_truncated=0.5, w_role=1.0``.
        empty_score: the score of a completion with no word.
    """

    def __init__(
        self,
        min_words: int = 5,
        max_words: int = 40,
        temperature: float = 0.5,
        *,
        w_topic: float = 1.0,
        w_length: float = 1.0,
        w_polite: float = 0.5,
        w_repeat: float = 2.0,
        w_truncated: float = 0.5,
        w_role: float = 1.0,
        empty_score: float = -4.0,
    ):
        _check_positive_int("min_words", min_words)
        _check_positive_int("max_words", max_words)
        if max_words < min_words:
            raise ValueError(f"max_words ({max_words}) must be >= min_words ({min_words})")
        self.temperature = _check_positive_float("temperature", temperature)
        self.min_words, self.max_words = min_words, max_words
        self.weights = {
            "topic": w_topic,
            "length": w_length,
            "polite": w_polite,
            "repeat": -w_repeat,
            "truncated": -w_truncated,
            "role": -w_role,
        }
        self.empty_score = float(empty_score)

    def features(self, prompt: str, completion: str) -> dict[str, float] | None:
        """The six feature values of the class docstring, or None for a completion with no word."""
        tokens = words(completion)
        n = len(tokens)
        if n == 0:
            return None
        prompt_content = _content_words(prompt)
        topic = len(prompt_content & _content_words(completion)) / len(prompt_content) if prompt_content else 0.0
        if n < self.min_words:
            length = n / self.min_words
        elif n > self.max_words:
            length = self.max_words / n
        else:
            length = 1.0
        trigrams = list(zip(tokens, tokens[1:], tokens[2:], strict=False))
        repeat = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
        return {
            "topic": topic,
            "length": length,
            "polite": float(_POLITE.search(completion.lower()) is not None),
            "repeat": repeat,
            "truncated": float(not completion.rstrip().endswith(_FINAL_PUNCT)),
            "role": float(_ROLE_MARKER.search(completion) is not None),
        }

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        """``[N]`` float32 heuristic score of each completion (formula in the class docstring)."""
        prompts, completions = _check_text_batch(prompts=prompts, completions=completions)
        out = []
        for p, c in zip(prompts, completions, strict=True):
            feats = self.features(p, c)
            out.append(self.empty_score if feats is None else sum(self.weights[k] * v for k, v in feats.items()))
        return torch.tensor(out, dtype=torch.float32)
