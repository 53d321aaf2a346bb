"""Settings from flags, config files and a run's saved config pass one typed check, before anything is written."""

import dataclasses
import json
import math
from dataclasses import fields

import pytest

from zopro.train import main, run
from zopro.train.config import (
    FLAG_GROUPS,
    RANGES,
    SECTIONS,
    TrainConfig,
    coerce,
    from_args,
    preset,
    resume_differences,
    validate,
)


def _fails(argv, out, capsys, message):
    """``main(argv)`` exits 2 with one line containing ``message`` and creates nothing."""
    assert main(argv + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--seed", "1e23"], "--seed: expected an integer, got '1e23'"),
    (["--seed", "-1"], "--seed: must be in [0, 18446744073709551616), got -1"),
    (["--seed", str(2**64)], "--seed: must be in [0, 18446744073709551616)"),
    (["--iterations", "2.5"], "--iterations: expected an integer, got '2.5'"),
    (["--log-judge-score", "maybe"], "--log-judge-score: expected true or false, got 'maybe'"),
    (["--zo-eps", "inf"], "--zo-eps: must be a finite number, got inf"),
    (["--zo-lr", "inf"], "--zo-lr: must be a finite number"),
    (["--fo-lr", "inf"], "--fo-lr: must be a finite number"),
    (["--temperature", "inf"], "--temperature: must be a finite number"),
    (["--kl-coef", "nan"], "--kl-coef: must be a finite number, got nan"),
    (["--d-tau", "0"], "--d-tau: must be positive, got 0.0"),
    (["--zo-lr", "fast"], "--zo-lr: expected a number, got 'fast'"),
    (["--judge", "llm:"], "--judge: 'llm:': use 'vader', 'python:MODULE:FUNCTION', 'heuristic'"),
])
def test_bad_flags_are_named_in_one_line(tmp_path, capsys, argv, message):
    _fails(["--preset", "smoke"] + argv, tmp_path / "never", capsys, message)


def test_flags_cannot_be_abbreviated(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        from_args(["--preset", "smoke", "--steps", "3"])  # --steps-per-iteration, were abbreviations allowed
    assert exit_info.value.code == 2


def test_config_files_are_converted_like_flags(tmp_path):
    yaml_file = tmp_path / "cfg.yaml"  # PyYAML reads 1e-3 (no dot) as a string: converted as a flag's text is
    yaml_file.write_text("preset: smoke\nzo_lr: 1e-3\nd_tau: 2\niterations: '3'\nlog_judge_score: 'false'\n")
    cfg, _ = from_args(["--config", str(yaml_file)])
    assert (cfg.zo_lr, cfg.d_tau, cfg.iterations, cfg.log_judge_score) == (1e-3, 2.0, 3, False)
    assert (type(cfg.zo_lr), type(cfg.d_tau), type(cfg.iterations)) == (float, float, int)


def test_a_config_file_nested_by_section_reads_as_the_flat_one(tmp_path):
    nested, flat = tmp_path / "nested.yaml", tmp_path / "flat.yaml"
    nested.write_text("run: {preset: smoke, seed: 3}\nzo: {lr: 0.5, eps: 0.01}\neval: {samples: 3}\n"
                      "reward_model: {lr: 0.002, init_steps: 4}\nbase: {model: tiny, lora_r: 2}\n"
                      "experimental: {zo_population: 2}\n")
    flat.write_text("preset: smoke\nseed: 3\nzo_lr: 0.5\nzo_eps: 0.01\neval_samples: 3\nlora_r: 2\n"
                    "reward_lr: 0.002\nreward_init_steps: 4\nmodel: tiny\nzo_population: 2\n")
    got, _ = from_args(["--config", str(nested)])
    assert got == from_args(["--config", str(flat)])[0]
    assert (got.zo_lr, got.eval_samples, got.reward_init_steps, got.zo_population, got.seed) == (0.5, 3, 4, 2, 3)
    # every field has exactly one place in a section (the sections are --help's groups)
    placed = [name for title, _ in SECTIONS.values() for name in FLAG_GROUPS[title]]
    assert sorted(placed) == sorted(f.name for f in fields(TrainConfig))


@pytest.mark.parametrize("name, text, message", [
    ("cfg.json", '{"zo": {"rate": 1}}', "--config: unknown setting zo.rate in {path} (the section 'zo' holds "),
    ("cfg.json", '{"zo_lr": 1, "zo": {"lr": 2}}', "--config: zo_lr given twice in {path} (also as zo.lr)"),
    ("cfg.json", '{"eval": {"zo_lr": 1}}', "--config: unknown setting eval.zo_lr in {path}"),
    ("cfg.json", '{"iterations": 2.5}', "--iterations: expected an integer, got 2.5"),
    ("cfg.json", '{"iterations": true}', "--iterations: expected an integer, got True"),
    ("cfg.json", '{"log_judge_score": "maybe"}', "--log-judge-score: expected true or false"),
    ("cfg.json", '{"log_judge_score": 1}', "--log-judge-score: expected true or false, got 1"),
    ("cfg.json", '{"model": 3}', "--model: expected a string, got 3"),
    ("cfg.json", '{"seed": 1e23}', "--seed: must be in [0, 18446744073709551616)"),
    ("cfg.json", '{"zo_lr": NaN}', "--zo-lr: must be a finite number, got nan"),
    ("cfg.json", '{"k": 3,', "{path} is not valid JSON at line 1"),
    ("cfg.yaml", "k: [3\n", "{path} is not valid YAML at line 2"),
    ("cfg.yaml", "- k\n", "{path} must hold a mapping of settings"),
])
def test_bad_config_files_are_named_in_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    _fails(["--preset", "smoke", "--config", str(path)], tmp_path / "never", capsys, message.format(path=path))


def test_every_field_is_checked_by_type_and_every_float_for_finiteness():
    base = preset("smoke")
    for f in fields(TrainConfig):
        value = getattr(base, f.name)
        if isinstance(value, bool):
            bad = "2"
        elif isinstance(value, int):
            bad = 2.5
        elif isinstance(value, float):
            bad = math.nan
        else:
            bad = 7
        with pytest.raises(ValueError, match=f"^--{f.name.replace('_', '-')}: "):
            validate(dataclasses.replace(base, **{f.name: bad}))
    assert set(RANGES) <= {f.name for f in fields(TrainConfig)}
    assert coerce("zo_lr", "1e-3") == 1e-3 and coerce("seed", "7") == 7 and coerce("k", 4.0) == 4


@pytest.fixture
def saved_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = dataclasses.replace(preset("smoke"), output_dir=str(out))
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return out, cfg


def test_resume_refuses_changed_settings_and_lists_them(saved_run, capsys):
    out, cfg = saved_run
    before = sorted(out.iterdir())
    assert main(["--resume", "--output-dir", str(out), "--zo-lr", "0.5", "--seed", "9", "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--zo-lr 0.5 (run: 10.0)" in err and "--seed 9 (run: 0)" in err and "--threads" not in err.split(";")[0]
    assert len(err.splitlines()) == 1 and sorted(out.iterdir()) == before
    with pytest.raises(ValueError, match=r"--k 3 \(run: 2\)"):  # the API checks the same way
        run(dataclasses.replace(cfg, k=3), resume=True, progress=False)


def test_resume_takes_the_saved_settings_and_allows_threads(saved_run):
    out, cfg = saved_run
    resumed, resume = from_args(["--resume", "--output-dir", str(out), "--threads", "3"])  # no --preset smoke
    assert resume and resumed == validate(dataclasses.replace(cfg, threads=3))
    assert resume_differences(validate(cfg), resumed) == []


def test_the_configs_light_copies_of_the_samplers_and_optimisers_choices_agree_with_them():
    from zopro.optim import FITNESS
    from zopro.samplers import BLOCKS
    from zopro.train.config import GUIDE_BLOCKS, ZO_FITNESS

    assert ZO_FITNESS == FITNESS and GUIDE_BLOCKS == BLOCKS
