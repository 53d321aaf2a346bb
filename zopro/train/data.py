"""Prompt and preference data for ZOPrO.

Everything is turned into a list of :class:`PromptRecord`: a prompt, optionally a preference pair
(``chosen``/``rejected``), optionally a reference output and its human quality score.

Sources:

* local files (:func:`load_local`): ``.json`` (a list of objects), ``.jsonl`` (one object per line), ``.parquet``,
  with records ``{"prompt"}`` or ``{"prompt", "chosen", "rejected"}`` (optionally ``"reference"``, ``"score"``);
* the paper's three hub datasets, read through ``datasets.load_dataset`` with their real ids, configs and
  schemas (:func:`load_hh_rlhf`, :func:`load_tldr`, :func:`load_wmt20`). Each takes ``path=`` to read a local
  ``.json``/``.jsonl``/``.parquet`` file of the same schema instead of the hub (how the tests run, offline);
* the project's own prompt sets: the ``describe`` task (:func:`load_describe`: short descriptions, reviews and story
  openings of 216 everyday subjects, 608 training and 256 held-out prompts whose subjects never meet, a fixed split)
  and the ``assistant`` prompts (:func:`load_default_prompts`, ``zopro/train/assets/prompts.jsonl``).

Nothing here touches the global random generator: :func:`split_prompts` uses its own ``random.Random(seed)``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HH_RLHF_ID",
    "PROMPTS_PATH",
    "TLDR_CONFIG",
    "TLDR_ID",
    "TLDR_PROMPT",
    "WMT20_CONFIG",
    "WMT20_ID",
    "WMT20_PROMPT",
    "PromptRecord",
    "load_default_prompts",
    "load_describe",
    "load_hh_rlhf",
    "load_local",
    "load_tldr",
    "load_wmt20",
    "split_hh_dialogue",
    "split_prompts",
]

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
PROMPTS_PATH = ASSETS / "prompts.jsonl"
DESCRIBE_PATHS = (ASSETS / "describe_train.jsonl", ASSETS / "describe_heldout.jsonl")

HH_RLHF_ID = "Anthropic/hh-rlhf"
HH_ASSISTANT = "\n\nAssistant:"

TLDR_ID = "openai/summarize_from_feedback"
TLDR_CONFIG = "comparisons"
TLDR_PROMPT = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"

WMT20_ID = "wmt/wmt20_mlqe_task1"
WMT20_CONFIG = "en-de"
WMT20_PROMPT = "Translate the following English text into German.\nEnglish: {en}\nGerman:"


@dataclass(frozen=True)
class PromptRecord:
    """One prompt, with an optional preference pair and an optional scored reference output.

    Attributes:
        prompt: text the policy is conditioned on.
        chosen: preferred continuation of ``prompt`` (``prompt + chosen`` is the full text), or None.
        rejected: dispreferred continuation, or None; set exactly when ``chosen`` is.
        reference: a reference output (e.g. the WMT20 translation), or None.
        score: a human quality score of ``reference`` (WMT20's direct-assessment ``mean``), or None.
    """

    prompt: str
    chosen: str | None = None
    rejected: str | None = None
    reference: str | None = None
    score: float | None = None

    @property
    def has_pair(self) -> bool:
        """True when the record carries a preference pair."""
        return self.chosen is not None and self.rejected is not None


# --------------------------------------------------------------------------------------------------------------------
# Local files


_OPTIONAL_STR_FIELDS = ("chosen", "rejected", "reference")


def _check_file(path: str | Path, suffixes: Sequence[str]) -> Path:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"path {str(p)!r} does not exist or is not a file")
    if p.suffix.lower() not in suffixes:
        raise ValueError(f"path {str(p)!r} has unsupported extension {p.suffix!r}; expected one of {list(suffixes)}")
    return p


def _read_rows(p: Path) -> list[Any]:
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: invalid JSON ({e})") from e
        if not isinstance(rows, list):
            raise ValueError(f"{p}: a .json file must hold a list of objects, got {type(rows).__name__}")
        return rows
    if suffix == ".jsonl":
        rows = []
        with p.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: invalid JSON ({e})") from e
        return rows
    import pyarrow.parquet as pq  # a dependency of `datasets`; imported lazily as only parquet needs it

    return pq.read_table(p).to_pylist()


def _record_from_row(row: Any, where: str) -> PromptRecord:
    if not isinstance(row, dict):
        # Malformed file content is a ValueError (as json's own errors are), not a wrong argument type.
        raise ValueError(f"{where}: record must be an object, got {type(row).__name__}")  # noqa: TRY004
    if "prompt" not in row or row["prompt"] is None:
        raise ValueError(f"{where}: missing field 'prompt'")
    fields: dict[str, Any] = {"prompt": row["prompt"]}
    for name in _OPTIONAL_STR_FIELDS:
        if row.get(name) is not None:
            fields[name] = row[name]
    for name, value in fields.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")  # noqa: TRY004
    if not fields["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    has_chosen, has_rejected = "chosen" in fields, "rejected" in fields
    if has_chosen != has_rejected:
        missing = "rejected" if has_chosen else "chosen"
        raise ValueError(f"{where}: missing field {missing!r} (a preference record needs both 'chosen' and 'rejected')")
    score = row.get("score")
    if score is not None:
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise ValueError(f"{where}: field 'score' must be a number, got {type(score).__name__}")
        fields["score"] = float(score)
    return PromptRecord(**fields)


def load_local(path: str | Path) -> list[PromptRecord]:
    """Read prompt or preference records from a local ``.json``, ``.jsonl`` or ``.parquet`` file.

    Each record is an object with a string ``prompt`` and, for preference data, string ``chosen`` and
    ``rejected`` (both or neither); ``reference`` (string) and ``score`` (number) are optional. Other keys are
    ignored. A ``.json`` file holds a list of such objects; a ``.jsonl`` file one object per non-empty line.

    Args:
        path: the file.

    Returns:
        The records, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unsupported extension, malformed file, or a record with a missing or mistyped field
            (the message names the file, the record index or line, and the field).
    """
    p = _check_file(path, (".json", ".jsonl", ".parquet"))
    rows = _read_rows(p)
    return [_record_from_row(row, f"{p} record {i}") for i, row in enumerate(rows)]


def load_default_prompts() -> list[PromptRecord]:
    """The project's own instruction prompts (``zopro/train/assets/prompts.jsonl``), prompt-only records."""
    return load_local(PROMPTS_PATH)


def load_describe() -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The ``describe`` task's ``(train, held-out)`` prompts, a fixed split: 152 subjects x 4 instructions ("Write two
    sentences about", "Describe ... in a few words", "Write a short review of", "Write the opening line of a story
    about") for training and 64 other subjects x the same 4 held out, 608 and 256 prompt-only records."""
    train, held_out = (load_local(path) for path in DESCRIBE_PATHS)
    return train, held_out


def split_prompts(
    records: Sequence[PromptRecord], n_eval: int, seed: int
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """Deterministic train/eval split.

    ``n_eval`` indices are drawn without replacement by ``random.Random(seed).sample`` (never the global
    generator); both parts keep the original order of ``records``.

    Args:
        records: the records to split (any sequence).
        n_eval: size of the eval part, ``0 <= n_eval <= len(records)``.
        seed: seed of the local generator.

    Returns:
        ``(train, eval)`` lists with ``len(records) - n_eval`` and ``n_eval`` records.
    """
    if isinstance(n_eval, bool) or not isinstance(n_eval, int):
        raise TypeError(f"n_eval must be an int, got {type(n_eval).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    records = list(records)
    if not 0 <= n_eval <= len(records):
        raise ValueError(f"n_eval must be in [0, {len(records)}] (the number of records), got {n_eval}")
    eval_idx = set(random.Random(seed).sample(range(len(records)), n_eval))
    train = [r for i, r in enumerate(records) if i not in eval_idx]
    evals = [r for i, r in enumerate(records) if i in eval_idx]
    return train, evals


# --------------------------------------------------------------------------------------------------------------------
# Hub datasets


def _load_rows(
    hub_id: str,
    config: str | None,
    split: str,
    path: str | Path | None,
    required: Sequence[str],
    cache_dir: str | Path | None,
    **hub_kwargs: Any,
) -> Iterable[dict[str, Any]]:
    """Rows of ``hub_id``/``config`` from the hub, or of the local file ``path`` with the same schema."""
    import datasets  # imported lazily: heavy, and only these loaders need it

    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    cache = None if cache_dir is None else str(cache_dir)
    if path is None:
        ds = datasets.load_dataset(hub_id, config, split=split, cache_dir=cache, **hub_kwargs)
        source = f"{hub_id}" + (f" ({config})" if config else "") + f" split {split!r}"
    else:
        p = _check_file(path, (".json", ".jsonl", ".parquet"))
        builder = "parquet" if p.suffix.lower() == ".parquet" else "json"
        ds = datasets.load_dataset(builder, data_files={split: str(p)}, split=split, cache_dir=cache)
        source = str(p)
    missing = [name for name in required if name not in ds.column_names]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing} (found {ds.column_names})")
    return ds


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split an Anthropic/hh-rlhf pair into ``(prompt, chosen_continuation, rejected_continuation)``.

    Both dialogues are ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``. The prompt is their longest common prefix cut
    just after its last ``"\\n\\nAssistant:"``; the continuations are the rest of each dialogue (usually starting
    with a space), so ``prompt + continuation`` gives back the original text exactly.

    Raises:
        ValueError: the common prefix contains no ``"\\n\\nAssistant:"``.
    """
    n = 0
    for x, y in zip(chosen, rejected, strict=False):
        if x != y:
            break
        n += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, n)  # only matches that lie wholly inside chosen[:n]
    if cut == -1:
        raise ValueError("chosen and rejected share no prefix ending in '\\n\\nAssistant:'")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def load_hh_rlhf(
    split: str = "train",
    path: str | Path | None = None,
    *,
    data_dir: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[PromptRecord]:
    """Anthropic/hh-rlhf as preference records (the paper's assistant task).

    Rows have ``chosen`` and ``rejected`` full dialogues; see :func:`split_hh_dialogue` for how the prompt and
    the two continuations are cut. Rows whose dialogues share no assistant turn are skipped, with one logged
    warning giving the count.

    Args:
        split: dataset split (``"train"``, ``"test"``).
        path: local ``.json``/``.jsonl``/``.parquet`` file with the same schema, read instead of the hub.
        data_dir: hub subset, e.g. ``"helpful-base"`` (ignored with ``path``).
        cache_dir: ``datasets`` cache directory (default: ``datasets``' own).
    """
    hub_kwargs = {} if data_dir is None else {"data_dir": data_dir}
    rows = _load_rows(HH_RLHF_ID, None, split, path, ("chosen", "rejected"), cache_dir, **hub_kwargs)
    records, skipped = [], 0
    for row in rows:
        try:
            prompt, chosen, rejected = split_hh_dialogue(row["chosen"], row["rejected"])
        except ValueError:
            skipped += 1
            continue
        records.append(PromptRecord(prompt=prompt, chosen=chosen, rejected=rejected))
    if skipped:
        logger.warning("hh-rlhf: skipped %d of %d rows with no shared assistant turn", skipped, skipped + len(records))
    return records


def load_tldr(
    split: str = "train", path: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> list[PromptRecord]:
    """openai/summarize_from_feedback ("comparisons") as preference records (the paper's summarisation task).

    Rows have ``info`` ``{post, title, subreddit, ...}``, ``summaries`` ``[{text}, {text}]`` and ``choice``
    (index of the preferred summary). The prompt is ``TLDR_PROMPT`` filled from ``info``; chosen/rejected are
    ``" " + text.strip()`` of the chosen/other summary, so they read as a continuation of ``"TL;DR:"``.
    Rows without a Reddit post (the CNN/DM rows of the validation split have ``post`` None) are skipped, with
    one logged warning giving the count.

    Args:
        split: dataset split (``"train"``, ``"validation"``).
        path: local ``.json``/``.jsonl``/``.parquet`` file with the same schema, read instead of the hub.
        cache_dir: ``datasets`` cache directory.
    """
    rows = _load_rows(TLDR_ID, TLDR_CONFIG, split, path, ("info", "summaries", "choice"), cache_dir)
    records, skipped = [], 0
    for i, row in enumerate(rows):
        info, summaries, choice = row["info"], row["summaries"], row["choice"]
        if not info or info.get("post") is None:
            skipped += 1
            continue
        if choice not in (0, 1) or len(summaries) != 2:
            raise ValueError(f"tldr row {i}: expected 2 summaries and choice in (0, 1), got {len(summaries)}, {choice}")
        prompt = TLDR_PROMPT.format(subreddit=info.get("subreddit"), title=info.get("title"), post=info["post"])
        chosen, rejected = summaries[choice]["text"], summaries[1 - choice]["text"]
        records.append(PromptRecord(prompt=prompt, chosen=" " + chosen.strip(), rejected=" " + rejected.strip()))
    if skipped:
        logger.warning("tldr: skipped %d of %d rows without a post", skipped, skipped + len(records))
    return records


def load_wmt20(
    split: str = "train", path: str | Path | None = None, *, cache_dir: str | Path | None = None
) -> list[PromptRecord]:
    """wmt/wmt20_mlqe_task1 ("en-de") as scored records (the paper's translation task; no preference pairs).

    Rows have ``translation`` ``{en, de}`` and ``mean`` (the mean human direct-assessment score of the German
    text). The prompt is ``WMT20_PROMPT`` filled with the English source; ``reference`` is the German text and
    ``score`` its ``mean``. Note that in this dataset the German side is a machine translation rated by humans,
    not a gold reference.

    Args:
        split: dataset split (``"train"``, ``"validation"``, ``"test"``).
        path: local ``.json``/``.jsonl``/``.parquet`` file with the same schema, read instead of the hub.
        cache_dir: ``datasets`` cache directory.
    """
    rows = _load_rows(WMT20_ID, WMT20_CONFIG, split, path, ("translation", "mean"), cache_dir)
    records = []
    for row in rows:
        translation = row["translation"]
        score = row["mean"]
        records.append(
            PromptRecord(
                prompt=WMT20_PROMPT.format(en=translation["en"]),
                reference=translation["de"],
                score=None if score is None else float(score),
            )
        )
    return records
