"""Pluggable pairwise judges: which of two completions of the same prompt is better.

Every judge has ``prefer(prompts, completions_a, completions_b) -> Tensor[N]``, the probability in [0, 1] that
``completions_a[i]`` is preferred over ``completions_b[i]`` as a continuation of ``prompts[i]``. Judges that give a
scalar quality per completion also have ``score(prompts, completions) -> Tensor[N]``. Outputs are float32 CPU
tensors, whatever the device the judge runs on.

* :class:`CallableJudge` wraps a Python function.
* :class:`VaderJudge` scores a completion's sentiment with VADER (Hutto & Gilbert 2014; the ``vaderSentiment``
  package, MIT, its lexicon shipped inside it): an external gold scorer that needs no download, the default job's.
* :class:`FunctionJudge` wraps a user's ``score(prompt, completion) -> float`` (``--judge python:MODULE:FUNCTION``).
* :class:`HeuristicJudge` is a deterministic rule-based stand-in for a real judge, used by the ``assistant`` preset.
  It is our own code and not a model of human preference.

The judges that run a model (a reward model, an LLM asked "A or B?") are in :mod:`zopro.train.model_judges`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "CallableJudge",
    "FunctionJudge",
    "HeuristicJudge",
    "Judge",
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


def check_text_batch(**named: object) -> list[list[str]]:
    lists = [_check_texts(name, texts) for name, texts in named.items()]
    lengths = {name: len(texts) for name, texts in zip(named, lists, strict=True)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return lists


def check_positive_int(name: str, value: object) -> None:
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


class ScoreJudge:
    """Base for judges with a per-completion score: ``prefer = sigmoid((score_a - score_b) / temperature)``."""

    temperature: float = 1.0

    def score(self, prompts: list[str], completions: list[str]) -> Tensor:
        raise NotImplementedError

    def prefer(self, prompts: list[str], completions_a: list[str], completions_b: list[str]) -> Tensor:
        """``P(a > b) = sigmoid((score(a) - score(b)) / temperature)``, ``[N]`` float32."""
        prompts, completions_a, completions_b = check_text_batch(
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
        prompts, completions_a, completions_b = check_text_batch(
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


class FunctionJudge(ScoreJudge):
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
        prompts, completions = check_text_batch(prompts=prompts, completions=completions)
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


class HeuristicJudge(ScoreJudge):
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
        check_positive_int("min_words", min_words)
        check_positive_int("max_words", max_words)
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
        prompts, completions = check_text_batch(prompts=prompts, completions=completions)
        out = []
        for p, c in zip(prompts, completions, strict=True):
            feats = self.features(p, c)
            out.append(self.empty_score if feats is None else sum(self.weights[k] * v for k, v in feats.items()))
        return torch.tensor(out, dtype=torch.float32)
