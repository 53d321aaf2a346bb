"""What a run leaves is usable without zopro: standard PEFT folders for the policy and the reward model, a merged
model from ``python -m zopro.train.export``, both loaded by transformers + peft alone in a fresh process and checked
against the run's own bundle; and a plain run prints no misleading warnings."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zopro.train import checkpoint, files, run
from zopro.train.config import TrainConfig, load_saved
from zopro.train.export import main as export_main
from zopro.train.loading import load_models

ROOT = Path(__file__).resolve().parents[3]
FLAGS = ["--preset", "smoke", "--threads", "1", "--iterations", "2", "--steps-per-iteration", "1"]
PROMPT = "Say hello to the sea."
NEW_TOKENS = 12
# fp32 throughout: the bundle and peft compute the same ops (0 difference measured); merging folds B @ A into each
# weight, which reorders the sums (max |difference| measured 1.0e-7 on logits up to 0.42 in size). The trained
# adapter moves the logits by 1.1e-2 (more than 100 x MERGED_ATOL), so a dropped adapter cannot pass.
SAME_OPS_ATOL, MERGED_ATOL = 1e-6, 1e-5


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A plain smoke run of the command line, never modified (tests copy it): ``(run dir, its stderr)``."""
    out = tmp_path_factory.mktemp("export") / "run"
    proc = subprocess.run([sys.executable, "-m", "zopro.train", *FLAGS, "--output-dir", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stderr


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------------
# Warnings
def test_a_plain_run_prints_no_warnings(finished):
    _, stderr = finished
    # not the progress bars (training steps, generate calls) nor the line each phase prints as it starts and ends
    lines = [line for line in stderr.splitlines() if line.strip() and "ZOPrO" not in line and "generate:" not in line
             and not re.fullmatch(r".+( \.\.\.|: done in \d+ s)", line.strip())]
    assert not [line for line in lines if "Warning" in line or "warn" in line or "gemm_4bit" in line], lines
    assert lines == [], lines


def test_only_the_bitsandbytes_cpu_kernel_messages_are_dropped(caplog):
    import zopro.train.models  # noqa: F401 (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no network")
        logger.warning("another message")
    assert [r.getMessage() for r in caplog.records] == ["another message"]
    caplog.clear()
    logger = logging.getLogger("kernels._internals.hf_hub")  # kernels >= 0.19 offline, asked by bitsandbytes
    with caplog.at_level(logging.WARNING):
        logger.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                       "Hugging Face Hub is in offline mode.")
        logger.warning("Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode.")
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping publisher trust check for 'someone/else' because Hugging Face Hub is in offline mode."]


# ---------------------------------------------------------------------------------------------------------------------
# The run directory's standard folders
def test_the_run_directory_holds_standard_peft_folders(finished):
    out, _ = finished
    for name in ("policy", "reward"):
        assert sorted(p.name for p in (out / name).iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                                  checkpoint.MANIFEST]  # zopro's SHA-256 sums
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((out / "base").resolve())
        assert config["task_type"] == {"policy": "CAUSAL_LM", "reward": "SEQ_CLS"}[name]
    flat = load_file(str(out / "policy_adapter.safetensors"))
    folder = load_file(str(out / "policy" / "adapter_model.safetensors"))
    assert sorted(flat) == sorted(folder) and all(torch.equal(flat[k], folder[k]) for k in flat)
    reward = load_file(str(out / "reward" / "adapter_model.safetensors"))
    assert torch.equal(reward["base_model.model.score.weight"], load_file(str(out / "reward_adapter.safetensors"))
                       ["score.weight"])
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no scratch folder left


# Runs in a fresh interpreter: transformers + peft only. Prints one JSON line.
STANDALONE = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

run, merged_dir, prompt, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(f"{run}/base")
ids = tokenizer(prompt, return_tensors="pt")
policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(f"{run}/base"), f"{run}/policy").eval()
with torch.no_grad():
    sequence = policy.generate(**ids, do_sample=False, max_new_tokens=new_tokens)
    mask = torch.ones_like(sequence)
    logits = policy(input_ids=sequence, attention_mask=mask).logits[0]
    with policy.disable_adapter():
        base_logits = policy(input_ids=sequence, attention_mask=mask).logits[0]
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    merged_logits = merged(input_ids=sequence, attention_mask=mask).logits[0]
    merged_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    scorer = AutoModelForSequenceClassification.from_pretrained(f"{run}/base", num_labels=1)
    reward = PeftModel.from_pretrained(scorer, f"{run}/reward").eval()
    score = reward(input_ids=sequence, attention_mask=mask).logits[0, 0]
print(json.dumps({"zopro_imported": any(m.split(".")[0] == "zopro" for m in sys.modules),
                  "sequence": sequence[0].tolist(), "prompt_ids": ids.input_ids[0].tolist(),
                  "merged_prompt_ids": merged_tokenizer(prompt).input_ids,
                  "logits": logits.tolist(), "base_logits": base_logits.tolist(),
                  "merged_logits": merged_logits.tolist(), "score": score.item()}))
"""


def _bundle(run_dir: Path):
    """The run's own bundle, its trainable weights from the final checkpoint."""
    cfg = TrainConfig(**load_saved(run_dir / "config.json"))
    bundle, tokenizer = load_models(cfg, torch.device("cpu"))
    bundle.load_trainable_state_(checkpoint.load(run_dir, fallback=False).tensors["trainable"])
    return bundle, tokenizer


def test_standard_loaders_in_a_fresh_process_reproduce_the_runs_policy_and_reward(finished, tmp_path, one_thread):
    out, _ = finished
    merged = tmp_path / "merged"
    assert export_main([str(out), "--merged", str(merged)]) == 0
    assert (merged / "model.safetensors").is_file() and (merged / "tokenizer.json").is_file()
    proc = subprocess.run([sys.executable, "-c", STANDALONE, str(out), str(merged), PROMPT, str(NEW_TOKENS)],
                          cwd=tmp_path, env={**_env(), "PYTHONPATH": ""}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["zopro_imported"] is False

    bundle, tokenizer = _bundle(out)
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert got["prompt_ids"] == got["merged_prompt_ids"] == ids.input_ids[0].tolist()
    bundle.use_policy()
    with torch.no_grad():
        sequence = bundle.model.generate(**ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    assert got["sequence"] == sequence[0].tolist()  # the same greedy continuation
    assert len(got["sequence"]) > len(got["prompt_ids"])
    mask = torch.ones_like(sequence)
    with torch.no_grad():
        own = bundle.model(input_ids=sequence, attention_mask=mask).logits[0]
    logits, base, merged_logits = (torch.tensor(got[k]) for k in ("logits", "base_logits", "merged_logits"))
    torch.testing.assert_close(logits, own, rtol=0, atol=SAME_OPS_ATOL)
    torch.testing.assert_close(merged_logits, own, rtol=0, atol=MERGED_ATOL)
    # the adapter is not the identity: a loader that dropped it would fail the checks above
    assert (logits - base).abs().max() > 100 * MERGED_ATOL
    torch.testing.assert_close(torch.tensor(got["score"]), bundle.reward_scores(sequence, mask)[0], rtol=0,
                               atol=SAME_OPS_ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# Export errors: one line, exit 2, nothing written
def _no_run(tmp_path, finished):
    empty = tmp_path / "empty"
    empty.mkdir()
    return empty, tmp_path / "new", "not a run directory (no config.json)"


def _unfinished(tmp_path, finished):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    for p in run_dir.glob("ckpt-*"):  # the 'done' checkpoint's pointer now names the 'evaluate' one
        if p.name.endswith("-evaluate"):
            (run_dir / "LATEST").write_text(p.name + "\n")
    return run_dir, tmp_path / "new", "not a finished run"


def _no_policy_folder(tmp_path, finished):
    run_dir = Path(shutil.copytree(finished, tmp_path / "run"))
    shutil.rmtree(run_dir / "policy")
    return run_dir, tmp_path / "new", "adapter_config.json: missing (a run finished by an older zopro"


def _out_not_empty(tmp_path, finished):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    return finished, out, "exists and is not an empty directory"


@pytest.mark.parametrize("case", [_no_run, _unfinished, _no_policy_folder, _out_not_empty])
def test_export_errors_are_one_line_before_anything_is_written(finished, tmp_path, capsys, case):
    run_dir, out, message = case(tmp_path, finished[0])
    before = _snapshot(tmp_path)
    assert export_main([str(run_dir), "--merged", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert _snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.iterdir()
                                                                 if not p.name.startswith("."))


def test_export_into_an_empty_directory(finished, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert export_main([str(finished[0]), "--merged", str(out)]) == 0
    assert (out / "config.json").is_file() and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------------------------------------------------------------
# Kills
def _folders(out: Path) -> dict:
    """The bytes of ``base/``, ``policy/`` and ``reward/``, the adapters' configs parsed and without the base's
    path (a copied run's configs name the original's base)."""
    folders = {name: _snapshot(out / name) for name in ("base", "policy", "reward")}
    for name in ("policy", "reward"):
        config = json.loads(folders[name]["adapter_config.json"])
        config.pop("base_model_name_or_path")
        folders[name]["adapter_config.json"] = config
        folders[name].pop(checkpoint.MANIFEST)  # holds the config's sum: the other files' bytes decide it
    return folders


def test_a_kill_while_peft_writes_the_policy_keeps_the_old_folder_and_resume_rewrites_it(finished, tmp_path,
                                                                                          monkeypatch):
    import peft.peft_model

    out = Path(shutil.copytree(finished[0], tmp_path / "run"))
    folders = _folders(out)
    real_save = peft.peft_model.safe_save_file

    def half_then_kill(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt("killed while writing")

    cfg = TrainConfig(**{**load_saved(out / "config.json"), "output_dir": str(out)})
    monkeypatch.setattr(peft.peft_model, "safe_save_file", half_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, resume=True, progress=False)
    assert _folders(out) == folders  # the old folders, whole

    publish = files.publish

    def kill_at_reward(tmp, final):
        if Path(final).name == "reward":
            raise KeyboardInterrupt("killed before publishing reward/")
        publish(tmp, final)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save)
    monkeypatch.setattr(files, "publish", kill_at_reward)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, resume=True, progress=False)
    assert not (out / "reward").exists()  # between the two renames: absent, never half written
    monkeypatch.setattr(files, "publish", publish)
    run(cfg, resume=True, progress=False)
    assert _folders(out) == folders  # the same bytes, but for the base's path:
    for name in ("policy", "reward"):
        config = json.loads((out / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark history
def test_benchmark_history_goes_where_git_ignores_it(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    # in a subprocess: importing benchmarks.conftest drops TRITON_INTERPRET, which this test session relies on
    code = "from benchmarks.conftest import RESULTS_DIR; print(RESULTS_DIR)"
    env = {k: v for k, v in _env().items() if k != "ZOPRO_BENCH_HISTORY"}
    default = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert default.returncode == 0, default.stderr[-2000:]
    history = Path(default.stdout.strip().splitlines()[-1])
    probe = history / "kernels-cpu.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(probe)], cwd=ROOT)
    assert ignored.returncode == 0, f"{probe} is not ignored by git"
    chosen = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "ZOPRO_BENCH_HISTORY": str(tmp_path)},
                            capture_output=True, text=True, timeout=120)
    assert Path(chosen.stdout.strip().splitlines()[-1]) == tmp_path
