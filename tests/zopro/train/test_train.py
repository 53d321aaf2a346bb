"""The training program end to end on the tiny smoke preset: outputs, kill-and-resume, configuration errors."""

import dataclasses
import json
import statistics

import pytest
import torch
from safetensors.torch import load_file

from zopro.seeds import RunSeeds
from zopro.train import main, run, rundir
from zopro.train.config import TrainConfig, eval_config, from_args, preset
from zopro.train.evaluate import main as evaluate_main
from zopro.train.heldout import paired_change, reevaluate, since_step
from zopro.train.judges import HeuristicJudge

VOLATILE = {"step_time", "peak_rollout", "peak_update"}


def _smoke(tmp_path, name="run", **overrides):
    return dataclasses.replace(preset("smoke"), output_dir=str(tmp_path / name), threads=1, **overrides)


def _records(out):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_smoke_run_writes_everything_a_user_reads(tmp_path):
    cfg = _smoke(tmp_path)
    summary = run(cfg, progress=False)
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text()) == dataclasses.asdict(cfg)
    records = _records(out)
    assert len(records) == cfg.iterations * cfg.steps_per_iteration
    assert [r["mode"] for r in records] == ["first-order"] * 2 + ["zo-targeted"] * 2
    for r in records:
        assert set(r) >= {"reward", "kl", "loss", "grad", "lr", "eps", "iteration", "global_step", "skipped"}
        # lists: the per-update ZO fields (issue 15)
        assert all(v is None or isinstance(v, str) or torch.isfinite(torch.tensor(v, dtype=torch.float64)).all()
                   for v in r.values())
    assert records[-1]["eps"] == cfg.zo_eps and records[0]["eps"] is None
    policy = load_file(str(out / "policy_adapter.safetensors"))
    assert policy and all(t.dtype == torch.float32 for t in policy.values())
    assert "score.weight" in load_file(str(out / "reward_adapter.safetensors"))
    log = torch.load(out / "zo_log_iter1.pt")
    assert log["step_count"] == cfg.steps_per_iteration and len(log["log"]["losses"]) == 2 * cfg.steps_per_iteration
    assert (out / "reward_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 1 | zo-targeted | 2 |" in (out / "summary.md").read_text()
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == cfg.n_eval_prompts
    assert set(samples[0]) == {"prompt", "before", "after", "before_score", "after_score"}
    judge = HeuristicJudge()  # the smoke preset's judge: each prompt's score is the mean over its samples
    for s in samples:
        for when in ("before", "after"):
            assert len(s[when]) == cfg.eval_samples
            scores = judge.score([s["prompt"]] * cfg.eval_samples, s[when])
            assert s[f"{when}_score"] == pytest.approx(scores.mean().item(), abs=1e-6)
    ev = summary["evaluation"]
    assert summary["steps"] == 4 and ev["n"] == cfg.n_eval_prompts and ev["samples"] == cfg.eval_samples
    assert ev["before"] == pytest.approx(statistics.fmean(s["before_score"] for s in samples))
    assert ev["after"] == pytest.approx(statistics.fmean(s["after_score"] for s in samples))
    d = [s["after_score"] - s["before_score"] for s in samples]
    assert ev["change"] == pytest.approx(statistics.fmean(d))
    assert ev["change_se"] == pytest.approx(statistics.stdev(d) / len(d) ** 0.5)
    assert f"({ev['change']:+.4f} ± {ev['change_se']:.4f} paired standard error)" in (out / "summary.md").read_text()


def test_reevaluate_reproduces_a_runs_own_evaluation_and_refuses_unfinished_runs(tmp_path, capsys):
    cfg = _smoke(tmp_path, eval_samples=3)
    ev = run(cfg, progress=False)["evaluation"]
    (again,) = evaluate_main([str(tmp_path / "run"), "--eval-samples", "3"])
    # same seeds, same weights: the very numbers the job reported, from its config and final checkpoint alone
    assert (again["before"], again["after"], again["change"], again["change_se"]) == (
        ev["before"], ev["after"], ev["change"], ev["change_se"])
    assert f"| run | {cfg.n_eval_prompts} x 3 |" in capsys.readouterr().out
    with pytest.raises(KeyboardInterrupt):
        run(_smoke(tmp_path, "cut"), progress=False, stop_after_steps=1)
    with pytest.raises(ValueError, match="not a finished run"):
        reevaluate(tmp_path / "cut", 3)
    with pytest.raises(ValueError, match="no config.json"):
        reevaluate(tmp_path / "nothing", 3)


def test_since_step_scores_a_snapshot_against_the_final_policy(tmp_path, capsys):
    cfg = _smoke(tmp_path, eval_samples=2)
    run(cfg, progress=False)
    steps = cfg.iterations * cfg.steps_per_iteration
    base = reevaluate(tmp_path / "run", 2)
    # step 0's snapshot is the adapter as initialised, i.e. the base: the run's whole change, number for number (the
    # final policy's numbers read from the run's own evaluation, 2 samples a prompt as the run: reevaluate's anew)
    (first,) = evaluate_main([str(tmp_path / "run"), "--eval-samples", "2", "--since-step", "0"])
    assert (first["before"], first["after"], first["change"], first["change_se"]) == (
        base["before"], base["after"], base["change"], base["change_se"])
    assert first["kl_before"] == 0.0 and first["kl"] == base["kl"]
    last = since_step(tmp_path / "run", steps, 3)  # the final snapshot, both evaluated: same weights, same seeds
    assert last["change"] == 0.0 and last["change_se"] == 0.0 and last["kl_before"] == last["kl"]
    assert f"| run | {cfg.n_eval_prompts} x 2 | 0 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match=f"no snapshot of step {steps + 1}"):
        since_step(tmp_path / "run", steps + 1, 2)


def test_resuming_a_run_of_an_older_version_fails_before_touching_it(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    saved = {k: v for k, v in dataclasses.asdict(_smoke(tmp_path, "old")).items() if k not in ("eval_samples",
                                                                                                "eval_batch")}
    (out / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="older zopro"):
        run(_smoke(tmp_path, "old"), resume=True, progress=False)
    assert json.loads((out / "config.json").read_text()) == saved


def test_evaluation_groups_samples_by_prompt_across_generate_calls(tmp_path, monkeypatch):
    from zopro.train import heldout

    calls = []

    def fake_sample(bundle, tokenizer, prompts, k, max_new_tokens, temperature, seed, max_prompt_len):
        calls.append((list(prompts), k, seed))
        return None, [f"{p}|{seed}|{j}" for p in prompts for j in range(k)]

    class IndexJudge:  # score: the sample index j, so each prompt's mean is known exactly
        def score(self, prompts, completions):
            assert all(c.startswith(p + "|") for p, c in zip(prompts, completions, strict=True))
            return torch.tensor([float(c.rsplit("|", 1)[1]) for c in completions])

    monkeypatch.setattr(heldout, "sample_completions", fake_sample)
    cfg = _smoke(tmp_path, eval_samples=3, eval_batch=7)  # 7 // 3 = 2 prompts a call: chunks of 2, 2 and 1
    prompts = [f"p{i}" for i in range(5)]
    ev, run_seeds = eval_config(cfg), RunSeeds.of(cfg)
    metric, values, texts, kl, _ = heldout.evaluate(None, None, IndexJudge(), prompts, ev, run_seeds)
    assert kl is None  # the stand-in sampler returns no generation to take log-probs of
    assert [c[0] for c in calls] == [["p0", "p1"], ["p2", "p3"], ["p4"]] and {c[1] for c in calls} == {3}
    seeds = [c[2] for c in calls]
    assert len(set(seeds)) == 3
    assert metric == "mean judge score" and values == [1.0] * 5  # mean of sample indices 0, 1, 2
    assert texts[3] == [f"p3|{seeds[1]}|{j}" for j in range(3)]
    calls.clear()
    heldout.evaluate(None, None, IndexJudge(), prompts, ev, run_seeds)
    assert [c[2] for c in calls] == seeds  # the same seeds every time: "before" and "after" share them


def test_paired_change_against_hand_computed_values():
    mean, se = paired_change([1.0, 2.0, 3.0], [2.0, 2.0, 5.0])  # differences 1, 0, 2: mean 1, sample std 1
    assert mean == pytest.approx(1.0) and se == pytest.approx(1 / 3**0.5)
    assert paired_change([1.0], [1.5]) == (0.5, None)  # one prompt: no spread to estimate
    assert paired_change([], []) == (None, None)


# the paper's job, and ZO alone in the LoRA cores with a shaped population (a resume rebuilds the cores' bases)
@pytest.mark.parametrize("job", [{}, dict(first_order_iteration0=False, sampler="isotropic", zo_space="core",
                                          zo_population=3, zo_fitness="zscore"),
                                 dict(first_order_iteration0=False, sampler="isotropic", zo_space="singular",
                                      zo_population=3, zo_batch_members=4)],
                         ids=["paper", "core-population", "singular-batched-members"])
def test_kill_and_resume_reproduces_the_uninterrupted_run(tmp_path, job):
    whole = _smoke(tmp_path, "whole", seed=3, **job)
    evaluation = run(whole, progress=False)["evaluation"]
    parts = _smoke(tmp_path, "parts", seed=3, **job)
    with pytest.raises(KeyboardInterrupt):
        run(parts, progress=False, stop_after_steps=1)
    with pytest.raises(KeyboardInterrupt):  # crosses the iteration boundary (reward refinement, guides)
        run(parts, resume=True, progress=False, stop_after_steps=2)
    # a step that wrote its metrics line but died before its checkpoint is redone, not duplicated
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 9, "orphan": True}) + "\n")
    assert run(parts, resume=True, progress=False)["evaluation"] == evaluation  # "before" kept in the checkpoint
    for name in ("policy_adapter", "reward_adapter"):
        a = load_file(str(tmp_path / "whole" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "parts" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _records(tmp_path / "whole") == _records(tmp_path / "parts")


def test_a_paused_run_resumes_to_the_uninterrupted_run_and_branches_are_checked(tmp_path):
    whole = _smoke(tmp_path, "whole", seed=4)
    evaluation = run(whole, progress=False)["evaluation"]
    paused = _smoke(tmp_path, "paused", seed=4)
    assert run(paused, progress=False, pause_after_iteration=0) is None
    assert [r["iteration"] for r in _records(tmp_path / "paused")] == [0] * paused.steps_per_iteration
    with pytest.raises(ValueError, match="is a new run directory"):
        rundir.branch(tmp_path / "paused", whole)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        rundir.branch(tmp_path / "nothing", _smoke(tmp_path, "copy"))
    assert not (tmp_path / "copy").exists()
    assert run(paused, resume=True, progress=False)["evaluation"] == evaluation
    assert _records(tmp_path / "paused") == _records(tmp_path / "whole")


@pytest.mark.parametrize("argv, message", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--preset", "smoke", "--k", "1"], "--k: RLOO needs at least 2"),
    (["--preset", "smoke", "--dataset", "missing.jsonl"], "--dataset: file not found"),
    (["--preset", "smoke", "--reward-model", "some/classifier"], "--sampler: targeted sampling needs"),
    (["--preset", "smoke", "--sampler", "random"], "--sampler: 'random' is not one of"),
    (["--preset", "smoke", "--minibatches", "3"], "--minibatches: must divide"),
    (["--preset", "smoke", "--eval-samples", "0"], "--eval-samples: must be at least 1"),
    (["--preset", "smoke", "--eval-batch", "0"], "--eval-batch: must be at least 1"),
    (["--preset", "smoke", "--zo-space", "core"], "--zo-space: core directions are isotropic in the LoRA cores"),
    (["--preset", "smoke", "--zo-space", "singular", "--sampler", "isotropic", "--quantize", "nf4"],
     "--zo-space: singular takes its factors from a float base"),
    (["--preset", "smoke", "--zo-population", "0"], "--zo-population"),
    (["--preset", "smoke", "--zo-fitness", "softmax"], "--zo-fitness: 'softmax' is not one of"),
])
def test_bad_configurations_fail_before_any_work(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    assert main(argv + ["--output-dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_config_file_then_flags(tmp_path):
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("preset: smoke\nk: 3\nzo_lr: 0.01\n")
    cfg, resume = from_args(["--config", str(cfg_file), "--k", "4", "--first-order-iteration0", "false"])
    assert (cfg.preset, cfg.k, cfg.zo_lr, cfg.first_order_iteration0, resume) == ("smoke", 4, 0.01, False, False)
    assert cfg.model == "tiny"  # from the preset
    cfg_file.write_text("kk: 3\n")
    with pytest.raises(ValueError, match="unknown settings in .*: kk"):
        from_args(["--config", str(cfg_file)])


def test_existing_run_needs_resume_and_resume_needs_a_run(tmp_path):
    with pytest.raises(ValueError, match="holds no run to resume"):
        run(_smoke(tmp_path, "empty"), resume=True, progress=False)
    cfg = _smoke(tmp_path, "once", iterations=1, steps_per_iteration=1)
    run(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        run(cfg, progress=False)


def test_first_order_free_run_uses_isotropic_zo_first(tmp_path):
    cfg = _smoke(tmp_path, first_order_iteration0=False, sampler="rank_guided", rank=1)
    run(cfg, progress=False)
    modes = [r["mode"] for r in _records(tmp_path / "run")]
    assert modes == ["zo-isotropic"] * 2 + ["zo-rank_guided"] * 2


@pytest.mark.parametrize("algorithm, mode", [("rloo", "first-order"), ("ppo", "ppo")])
def test_first_order_baselines_train_every_iteration_and_resume(tmp_path, algorithm, mode):
    whole = _smoke(tmp_path, "whole", algorithm=algorithm, seed=5)
    run(whole, progress=False)
    records = _records(tmp_path / "whole")
    assert [r["mode"] for r in records] == [mode] * 4 and all(r["eps"] is None for r in records)
    assert not list((tmp_path / "whole").glob("zo_log_iter*.pt"))
    parts = _smoke(tmp_path, "parts", algorithm=algorithm, seed=5)
    with pytest.raises(KeyboardInterrupt):  # the kill lands in iteration 1: PPO's critic must come back too
        run(parts, progress=False, stop_after_steps=3)
    run(parts, resume=True, progress=False)
    assert _records(tmp_path / "parts") == records
    a = load_file(str(tmp_path / "whole" / "policy_adapter.safetensors"))
    b = load_file(str(tmp_path / "parts" / "policy_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_judge_score_of_each_rollout_is_logged_unless_turned_off(tmp_path):
    run(_smoke(tmp_path, "on", iterations=1), progress=False)
    run(_smoke(tmp_path, "off", iterations=1, log_judge_score=False), progress=False)
    on, off = _records(tmp_path / "on"), _records(tmp_path / "off")
    # the heuristic judge's scores lie in [-4, 2.5] (an empty completion scores -4, the best 1+1+0.5)
    assert all(-4 <= r["judge_score"] <= 2.5 for r in on) and all(r["judge_score"] is None for r in off)
    assert [r["reward"] for r in on] == [r["reward"] for r in off]  # logging does not change the run


def test_default_config_is_valid_and_documented():
    cfg = TrainConfig()
    assert cfg.model == "smollm2" and cfg.judge == "vader" and cfg.dataset == "describe" and cfg.iterations >= 2


@pytest.mark.parametrize("quantize, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_quantized_base_trains_fp32_adapters(tmp_path, quantize, layer):
    from zopro.train.loading import build_tiny_model, build_tiny_tokenizer, load_models

    tok = build_tiny_tokenizer()
    build_tiny_model(len(tok), seed=0, hidden=64, layers=2, heads=4).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = _smoke(tmp_path, model=str(tmp_path / "tiny"), quantize=quantize)
    bundle, _ = load_models(cfg, torch.device("cpu"))
    kinds = {type(m).__name__ for m in bundle.base.modules()}
    assert layer in kinds  # the frozen base really is bitsandbytes-quantised, shared by policy and reward
    assert all(p.dtype == torch.float32 for p in bundle.policy_parameters().values())
    run(cfg, progress=False)
    assert [r["mode"] for r in _records(tmp_path / "run")][-1] == "zo-targeted"


def test_pairwise_judge_scores_after_against_before(tmp_path):
    from zopro.train.heldout import evaluate
    from zopro.train.judges import CallableJudge
    from zopro.train.loading import load_models

    cfg = _smoke(tmp_path, eval_samples=3, eval_batch=3)  # one prompt per generate call
    bundle, tokenizer = load_models(cfg, torch.device("cpu"))
    prompts = ["hello there", "say something nice"]
    judge = CallableJudge(lambda prompt, a, b: len(a) >= len(b))  # no score(): only pairwise preferences
    ev, seeds = eval_config(cfg), RunSeeds.of(cfg)
    metric, first, texts, kl, tokens = evaluate(bundle, tokenizer, judge, prompts, ev, seeds)
    assert kl == [0.0, 0.0] and all(t >= 1 for t in tokens)  # the base policy is the reference
    assert metric == "win rate vs before" and first == [0.5, 0.5]  # nothing to compare with yet
    assert [len(t) for t in texts] == [3, 3]
    _, again, same, _, _ = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=texts)
    assert same == texts and again == [1.0, 1.0]  # same seeds, same weights: identical answers, ties go to "after"
    longer = [[t + "!" for t in ts] for ts in texts]
    longer[1][0] = ""  # sample 0 of prompt 1 now loses to nothing: that prompt wins 1 of its 3 comparisons
    _, never, _, _, _ = evaluate(bundle, tokenizer, judge, prompts, ev, seeds, reference_texts=longer)
    assert never == pytest.approx([0.0, 1 / 3])
