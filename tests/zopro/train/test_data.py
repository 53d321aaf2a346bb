"""zopro.train.data: local files, the three hub loaders on local files of the real schema, splitting, default
prompts."""

import json
import random

import pytest

from zopro.train import data
from zopro.train.data import (
    PROMPTS_PATH,
    PromptRecord,
    load_default_prompts,
    load_hh_rlhf,
    load_local,
    load_tldr,
    load_wmt20,
    split_hh_dialogue,
    split_prompts,
)

pytestmark = pytest.mark.usefixtures("hf_home")

ROWS = [
    {"prompt": "Say hi.", "chosen": " Hi there!", "rejected": " no"},
    {"prompt": "Name a colour.", "chosen": " Blue.", "rejected": " blue blue blue", "extra": 1},
]
RECORDS = [
    PromptRecord(prompt="Say hi.", chosen=" Hi there!", rejected=" no"),
    PromptRecord(prompt="Name a colour.", chosen=" Blue.", rejected=" blue blue blue"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# --- load_local -----------------------------------------------------------------------------------------------------


def test_load_local_json(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(ROWS), encoding="utf-8")
    assert load_local(path) == RECORDS


def test_load_local_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert load_local(str(path)) == RECORDS


def test_load_local_parquet(tmp_path):
    rows = [{"prompt": "a"}, {"prompt": "b"}]
    assert load_local(_write_parquet(tmp_path / "p.parquet", rows)) == [PromptRecord("a"), PromptRecord("b")]


def test_load_local_prompt_only_with_reference_and_score(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "reference": "y", "score": 3}])
    (record,) = load_local(path)
    assert record == PromptRecord(prompt="x", reference="y", score=3.0)
    assert not record.has_pair


def test_load_local_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_local(tmp_path / "nope.jsonl")


def test_load_local_missing_prompt_names_file_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"text": "no prompt"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl record 1: missing field 'prompt'"):
        load_local(path)


def test_load_local_half_pair_names_missing_field(tmp_path):
    path = _write_jsonl(tmp_path / "half.jsonl", [{"prompt": "p", "chosen": "c"}])
    with pytest.raises(ValueError, match=r"half\.jsonl.*missing field 'rejected'"):
        load_local(path)


def test_load_local_bad_inputs(tmp_path):
    (tmp_path / "x.csv").write_text("prompt\nhi\n")
    with pytest.raises(ValueError, match="extension"):
        load_local(tmp_path / "x.csv")
    (tmp_path / "obj.json").write_text(json.dumps({"prompt": "hi"}))
    with pytest.raises(ValueError, match="list of objects"):
        load_local(tmp_path / "obj.json")
    (tmp_path / "num.jsonl").write_text(json.dumps({"prompt": 3}) + "\n")
    with pytest.raises(ValueError, match="'prompt' must be a string"):
        load_local(tmp_path / "num.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2"):
        load_local(tmp_path / "broken.jsonl")
    with pytest.raises(TypeError, match="path"):
        load_local(3)


# --- hh-rlhf --------------------------------------------------------------------------------------------------------

HH_ROWS = [
    {
        "chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
        "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: I don't know.",
    },
    {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A car.",
    },
    # Responses that share a first word: the prompt still ends at the last shared "\n\nAssistant:".
    {
        "chosen": "\n\nHuman: Colour of grass?\n\nAssistant: Green, usually.",
        "rejected": "\n\nHuman: Colour of grass?\n\nAssistant: Green? No idea.",
    },
    # Dialogues that diverge inside the human turn: no shared assistant turn, skipped.
    {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
]
HH_EXPECTED = [
    PromptRecord("\n\nHuman: What is 2+2?\n\nAssistant:", " 4.", " I don't know."),
    PromptRecord("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant:", " An apple.", " A car."),
    PromptRecord("\n\nHuman: Colour of grass?\n\nAssistant:", " Green, usually.", " Green? No idea."),
]


def test_split_hh_dialogue_roundtrips():
    for row in HH_ROWS[:3]:
        prompt, chosen, rejected = split_hh_dialogue(row["chosen"], row["rejected"])
        assert prompt.endswith("\n\nAssistant:")
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"]
    with pytest.raises(ValueError, match="Assistant"):
        split_hh_dialogue(HH_ROWS[3]["chosen"], HH_ROWS[3]["rejected"])


def test_load_hh_rlhf_local_jsonl(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with caplog.at_level("WARNING", logger="zopro.train.data"):
        records = load_hh_rlhf("test", path=path, cache_dir=tmp_path / "cache")
    assert records == HH_EXPECTED
    assert "skipped 1 of 4" in caplog.text


def test_load_hh_rlhf_local_parquet(tmp_path):
    path = _write_parquet(tmp_path / "hh.parquet", HH_ROWS[:3])
    assert load_hh_rlhf("train", path=path, cache_dir=tmp_path / "cache") == HH_EXPECTED


# --- TL;DR ----------------------------------------------------------------------------------------------------------

TLDR_INFO = {"id": "t1", "post": "I adopted a cat.", "title": "New pet", "subreddit": "cats", "site": None}
TLDR_ROWS = [
    {"info": TLDR_INFO, "summaries": [{"text": " Got a cat."}, {"text": "Cats exist"}], "choice": 0},
    {"info": TLDR_INFO, "summaries": [{"text": "worse"}, {"text": "  better "}], "choice": 1},
    # A CNN/DM row of the validation split: no Reddit post, skipped.
    {
        "info": {"id": "c1", "post": None, "title": "News", "subreddit": None, "site": "cnn"},
        "summaries": [{"text": "a"}, {"text": "b"}],
        "choice": 0,
    },
]


def test_load_tldr_local(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "tldr.jsonl", TLDR_ROWS)
    with caplog.at_level("WARNING", logger="zopro.train.data"):
        records = load_tldr("validation", path=path, cache_dir=tmp_path / "cache")
    prompt = "SUBREDDIT: r/cats\nTITLE: New pet\nPOST: I adopted a cat.\nTL;DR:"
    assert records == [
        PromptRecord(prompt, chosen=" Got a cat.", rejected=" Cats exist"),
        PromptRecord(prompt, chosen=" better", rejected=" worse"),
    ]
    assert "skipped 1 of 3" in caplog.text


# --- WMT20 ----------------------------------------------------------------------------------------------------------


def test_load_wmt20_local(tmp_path):
    rows = [
        {
            "segid": 0,
            "translation": {"en": "The cat sleeps.", "de": "Die Katze schläft."},
            "scores": [90.0, 80.0],
            "mean": 85.0,
            "z_scores": [0.5, 0.3],
            "z_mean": 0.4,
            "model_score": -0.1,
            "doc_id": "d",
            "nmt_output": "Die Katze schläft.",
            "word_probas": [-0.1],
        }
    ]
    path = _write_jsonl(tmp_path / "wmt.jsonl", rows)
    (record,) = load_wmt20("validation", path=path, cache_dir=tmp_path / "cache")
    assert record == PromptRecord(
        prompt="Translate the following English text into German.\nEnglish: The cat sleeps.\nGerman:",
        reference="Die Katze schläft.",
        score=85.0,
    )


def test_hub_loader_missing_column(tmp_path):
    path = _write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"wrong\.jsonl: missing field\(s\) \['translation', 'mean'\]"):
        load_wmt20("train", path=path, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        load_tldr("train", path=tmp_path / "absent.jsonl")


def test_hub_loaders_use_real_ids_without_network(monkeypatch):
    """With no path, the loaders ask `datasets.load_dataset` for the paper's ids and configs (stubbed here)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split, cache_dir=None, **kwargs):
        calls.append((name, config, split, kwargs))
        rows = {"Anthropic/hh-rlhf": HH_ROWS[:1], "openai/summarize_from_feedback": TLDR_ROWS[:1]}
        return datasets.Dataset.from_list(rows[name])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_hh_rlhf("test", data_dir="helpful-base") == HH_EXPECTED[:1]
    assert len(load_tldr("train")) == 1
    assert calls == [
        ("Anthropic/hh-rlhf", None, "test", {"data_dir": "helpful-base"}),
        ("openai/summarize_from_feedback", "comparisons", "train", {}),
    ]
    assert (data.WMT20_ID, data.WMT20_CONFIG) == ("wmt/wmt20_mlqe_task1", "en-de")


# --- split_prompts and default prompts ------------------------------------------------------------------------------


def test_split_prompts_deterministic_and_local_rng():
    records = [PromptRecord(f"p{i}") for i in range(20)]
    state = random.getstate()
    train, evals = split_prompts(records, n_eval=5, seed=7)
    assert random.getstate() == state  # the global generator is untouched
    eval_idx = set(random.Random(7).sample(range(20), 5))
    assert evals == [records[i] for i in sorted(eval_idx)]
    assert train == [records[i] for i in range(20) if i not in eval_idx]
    assert split_prompts(records, 5, 7) == (train, evals)
    assert split_prompts(records, 5, 8) != (train, evals)


def test_split_prompts_edges_and_errors():
    records = [PromptRecord("a"), PromptRecord("b")]
    assert split_prompts(records, 0, 0) == (records, [])
    assert split_prompts(records, 2, 0) == ([], records)
    with pytest.raises(ValueError, match="n_eval"):
        split_prompts(records, 3, 0)
    with pytest.raises(TypeError, match="n_eval"):
        split_prompts(records, 1.0, 0)


def test_default_prompts():
    assert PROMPTS_PATH.name == "prompts.jsonl" and PROMPTS_PATH.parent.name == "assets"
    records = load_default_prompts()
    assert 150 <= len(records) <= 200
    prompts = [r.prompt for r in records]
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() == p and 10 <= len(p) <= 200 for p in prompts)
    assert not any(r.has_pair or r.reference is not None for r in records)


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_a_blank_prompt_is_a_bad_row(tmp_path, prompt):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": prompt}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl record 1: field 'prompt' is empty"):
        data.load_local(path)
