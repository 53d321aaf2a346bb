"""The reference task: the gold judges (VADER, a user's Python scorer), the describe prompts, the two reward settings,
the held-out statistics and the in-run learning curve."""

import dataclasses
import json
import math
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from zopro.train import main, run
from zopro.train.config import LEGACY, TrainConfig, from_args, load_saved, preset
from zopro.train.data import load_describe
from zopro.train.heldout import summarise, text_stats
from zopro.train.judges import FunctionJudge, VaderJudge
from zopro.train.loading import evenly_spaced, load_judge, load_models, load_prompts
from zopro.train.reward_adapter import reward_tensors
from zopro.train.state import HeldOut


def _smoke(tmp_path, name="run", **overrides):
    return dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / name), threads=1, **overrides)


# -- judges ----------------------------------------------------------------------------------------------------------
def test_vader_judge_is_vaders_compound_score_of_the_answer_alone():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    answers = ["What a wonderful, lovely day!", "This is a terrible, awful mess.", "The bus leaves at nine.", ""]
    expected = [SentimentIntensityAnalyzer().polarity_scores(a)["compound"] for a in answers]
    assert expected[0] > 0.5 and expected[1] < -0.5 and expected[2] == 0.0 and expected[3] == 0.0
    judge = VaderJudge()
    got = judge.score(["Describe a day."] * 4, answers)
    assert got.dtype == torch.float32 and got.tolist() == torch.tensor(expected, dtype=torch.float32).tolist()
    assert judge.score(["An entirely different prompt: sad, awful."] * 4, answers).tolist() == got.tolist()
    p = judge.prefer(["x", "x"], answers[:2], answers[1::-1])  # sigmoid of the score difference over 0.25
    assert p[0].item() == pytest.approx(1 / (1 + math.exp(-(expected[0] - expected[1]) / 0.25)), abs=1e-6)
    assert p[1].item() == pytest.approx(1 - p[0].item(), abs=1e-6)


def test_function_judge_names_a_scorer_that_raises_or_returns_no_finite_number():
    def scorer(prompt, completion):
        if completion == "boom":
            raise KeyError("no such word")
        return {"nan": math.nan, "inf": math.inf, "text": "0.5", "bool": True}.get(completion, len(completion))

    judge = FunctionJudge(scorer, name="--judge python:mine:scorer")
    assert judge.score(["p", "p"], ["ab", "abcd"]).tolist() == [2.0, 4.0]
    for bad, why in (("boom", "raised KeyError"), ("nan", "returned nan"), ("inf", "returned inf"),
                     ("text", "returned '0.5'"), ("bool", "returned True")):
        with pytest.raises(ValueError, match=f"--judge python:mine:scorer {why}.*completion 1"):
            judge.score(["p", "p"], ["ok", bad])


@pytest.fixture
def scorer_module(tmp_path, monkeypatch):
    """A module ``my_scorers`` on sys.path with a good scorer, one returning NaN and one raising."""
    (tmp_path / "my_scorers.py").write_text(textwrap.dedent("""
        def length(prompt, completion):
            return float(len(completion.split()))

        def nan(prompt, completion):
            return float("nan")

        def broken(prompt, completion):
            raise RuntimeError("model file missing")
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scorers"
    sys.modules.pop("my_scorers", None)


def test_python_judge_loads_a_users_scorer(scorer_module):
    cfg = TrainConfig(judge=f"python:{scorer_module}:length")
    judge = load_judge(cfg, torch.device("cpu"))
    assert judge.score(["p", "p"], ["one two three", ""]).tolist() == [3.0, 0.0]


@pytest.mark.parametrize("judge, message", [
    ("python:no_such_module_zz:f", "cannot import 'no_such_module_zz'"),
    ("python:my_scorers:missing", "module 'my_scorers' has no function 'missing'"),
    ("python:my_scorers:nan", "returned nan"),
    ("python:my_scorers:broken", "raised RuntimeError on completion 0"),
    ("python:my_scorers", "use 'vader', 'python:MODULE:FUNCTION'"),
])
def test_a_bad_judge_is_one_line_before_anything_is_written(tmp_path, scorer_module, capsys, judge, message):
    out = tmp_path / "run"
    code = main(["--preset", "smoke", "--judge", judge, "--output-dir", str(out), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not out.exists()


# -- the describe task -------------------------------------------------------------------------------------------------
def test_the_describe_task_is_a_fixed_disjoint_split_over_subjects():
    train, held_out = load_describe()
    assert len(train) == 608 and len(held_out) == 256
    prompts = [r.prompt for r in train + held_out]
    assert len(set(prompts)) == len(prompts) and all(r.chosen is None for r in train + held_out)

    def subject(prompt):
        for head, tail in (("Write two sentences about ", "."), ("Describe ", " in a few words."),
                           ("Write a short review of ", "."), ("Write the opening line of a story about ", ".")):
            if prompt.startswith(head) and prompt.endswith(tail):
                return prompt[len(head):-len(tail)]
        raise AssertionError(prompt)

    train_subjects = {subject(r.prompt) for r in train}
    held_subjects = {subject(r.prompt) for r in held_out}
    assert len(train_subjects) == 152 and len(held_subjects) == 64 and not train_subjects & held_subjects
    cfg = TrainConfig()  # the default job: the whole fixed split, whatever the seed
    assert [r.prompt for r in load_prompts(cfg)[1]] == [r.prompt for r in held_out]
    assert load_prompts(dataclasses.replace(cfg, seed=5)) == load_prompts(cfg)
    small = load_prompts(dataclasses.replace(cfg, n_eval_prompts=32))[1]
    assert small == [held_out[i * 8] for i in range(32)]


def test_evenly_spaced():
    assert evenly_spaced(list(range(10)), 3) == [0, 3, 6] and evenly_spaced([1, 2], 5) == [1, 2]


def test_the_describe_task_refuses_more_held_out_prompts_than_it_has(capsys):
    with pytest.raises(ValueError, match="--n-eval-prompts: the describe task holds out 256 prompts, got 300"):
        from_args(["--n-eval-prompts", "300"])


# -- held-out statistics -----------------------------------------------------------------------------------------------
def test_text_stats_by_hand():
    texts = [["the cat the cat the cat", "good day"], ["good day", ""]]
    stats = text_stats(texts)
    # bigrams: "the cat" x3, "cat the" x2, "good day" x2: 3 distinct of 7
    assert stats["distinct_2"] == pytest.approx(3 / 7)
    # trigrams of answer 1: the-cat-the, cat-the-cat, the-cat-the, cat-the-cat: 2 distinct of 4 -> repeat 0.5
    assert stats["repeat_3"] == [pytest.approx(0.25), 0.0]
    assert stats["words"] == [4.0, 1.0]


def test_summarise_pairs_every_change_by_prompt():
    base = HeldOut("mean judge score", [0.0, 0.5, 1.0], [["a b"], ["a b"], ["a b"]], [0.0, 0.0, 0.0], [2, 2, 2])
    after = HeldOut("mean judge score", [0.5, 0.5, 1.5], [["a b"], ["c d"], ["a b c"]], [1.0, 2.0, 3.0], [2, 2, 3])
    s = summarise(after, base)
    assert s["score"] == pytest.approx(2.5 / 3) and s["score_change"] == pytest.approx(1 / 3)
    assert s["score_change_se"] == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))  # stdev of (0.5, 0, 0.5)
    assert s["kl_change"] == pytest.approx(2.0) and s["kl_change_se"] == pytest.approx(1 / math.sqrt(3))
    assert s["tokens_change"] == pytest.approx(1 / 3)
    # bigrams after: "a b" twice, "c d", "b c": 3 distinct of 4
    assert s["distinct_2_before"] == pytest.approx(1 / 3) and s["distinct_2"] == pytest.approx(3 / 4)


# -- the two reward settings ----------------------------------------------------------------------------------------
def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_reward_judge_optimises_the_judges_score_and_trains_no_reward_model(tmp_path):
    cfg = _smoke(tmp_path, reward="judge")
    summary = run(cfg, progress=False)
    assert summary["reward_losses"] == []  # no pairs judged, no Bradley-Terry step
    records = _metrics(tmp_path / "run")
    for r in records:  # the rollout's reward is the judge's score of the same answers
        assert r["reward"] == r["judge_score"]
    # the reward adapter is saved as initialised: no step moved it
    head = load_file(str(tmp_path / "run" / "reward_adapter.safetensors"))
    bundle, _ = load_models(cfg, torch.device("cpu"))
    init = {n: p.detach() for n, p in reward_tensors(bundle).items()}
    assert set(init) == set(head) and all(torch.equal(init[n], head[n]) for n in init)


def test_reward_model_never_lets_the_judge_score_the_training_rollouts(tmp_path, monkeypatch):
    from zopro.train import rollout

    seen = []
    original = rollout.collect_rollout

    def spy(*args, **kwargs):
        seen.append(kwargs.get("score_fn"))
        return original(*args, **kwargs)

    monkeypatch.setattr("zopro.train.rollout.collect_rollout", spy)
    run(_smoke(tmp_path, reward="model"), progress=False)
    assert len(seen) == 4 and all(fn is None for fn in seen)  # scored by the reward adapter's head


@pytest.mark.parametrize("flags, message", [
    (["--reward", "judge", "--judge", "llm:some/model"], "--reward: judge needs a judge with a score per answer"),
    (["--reward", "policy"], "--reward: 'policy' is not one of model, judge"),
])
def test_reward_settings_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        from_args(flags)


# -- the learning curve --------------------------------------------------------------------------------------------
def test_the_in_run_curve_has_a_point_every_n_steps_and_resumes_exactly(tmp_path):
    cfg = _smoke(tmp_path, eval_every=1, eval_curve_prompts=2, n_eval_prompts=2)
    run(cfg, progress=False)
    curve = [json.loads(line) for line in (tmp_path / "run" / "eval_curve.jsonl").read_text().splitlines()]
    assert [p["global_step"] for p in curve] == [0, 1, 2, 3, 4]
    assert curve[0]["kl"] == 0.0  # the base policy is the reference: its answers' log-ratio is exactly 0
    for p in curve:  # per prompt, so that two points' difference has a paired standard error
        assert len(p["score_per_prompt"]) == 2 and p["score"] == pytest.approx(sum(p["score_per_prompt"]) / 2)
    passes = [p["token_passes"] for p in curve]
    assert all(b > a for a, b in zip(passes, passes[1:], strict=False))
    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        run(killed, stop_after_steps=3, progress=False)
    run(killed, resume=True, progress=False)
    again = [json.loads(line) for line in (tmp_path / "killed" / "eval_curve.jsonl").read_text().splitlines()]
    volatile = {"train_seconds"}
    assert [{k: v for k, v in p.items() if k not in volatile} for p in again] == \
        [{k: v for k, v in p.items() if k not in volatile} for p in curve]


def test_a_saved_config_without_the_new_settings_resumes_as_it_ran(tmp_path):
    saved = dataclasses.asdict(preset("smoke"))
    for name in LEGACY:
        del saved[name]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    loaded = load_saved(path)
    assert {n: loaded[n] for n in LEGACY} == {"reward": "model", "eval_every": 0, "eval_curve_prompts": 32}


def test_token_passes_resume_exactly_from_an_iteration_boundary(tmp_path):
    # smoke: the reward model's passes come before iteration 0 and between iterations; a resume from the checkpoint
    # at an iteration's start must count them as the uninterrupted run did
    cfg = _smoke(tmp_path)
    run(cfg, progress=False)
    killed = dataclasses.replace(cfg, output_dir=str(tmp_path / "killed"))
    with pytest.raises(KeyboardInterrupt):
        run(killed, stop_after_steps=2, progress=False)  # LATEST: iteration 1's start, after a refinement
    run(killed, resume=True, progress=False)
    passes = [[r["token_passes"] for r in _metrics(tmp_path / name)] for name in ("run", "killed")]
    assert passes[0] == passes[1] and passes[0] == sorted(passes[0])


def test_a_scorer_that_exits_is_one_line_not_a_silent_exit():
    def leaves(prompt, completion):
        raise SystemExit(0)

    with pytest.raises(ValueError, match="raised SystemExit on completion 0"):
        FunctionJudge(leaves, name="--judge python:m:leaves").score(["p"], ["a"])
