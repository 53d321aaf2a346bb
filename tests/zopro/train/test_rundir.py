"""Run directories: no code runs on load, one run at a time, outputs complete after a kill anywhere, damaged files
named and refused (or the previous checkpoint used), all before anything is written."""

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zopro.train import checkpoint, files, main, program, run
from zopro.train.config import preset
from zopro.train.evaluate import main as evaluate_main

VOLATILE = {"step_time", "peak_rollout", "peak_update", "wall_seconds", "resumed", "output_dir"}


def _cfg(out, **overrides):
    # two iterations of one step: a first-order iteration, then a ZO one (which writes a zo_log)
    return dataclasses.replace(preset("smoke"), output_dir=str(out), threads=1, iterations=2, steps_per_iteration=1,
                               seed=1, **overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run, never modified: tests copy it."""
    out = tmp_path_factory.mktemp("rundir") / "finished"
    run(_cfg(out), progress=False)
    return out


def _copy(finished, tmp_path, name="run") -> Path:
    return Path(shutil.copytree(finished, tmp_path / name))


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _outputs(out: Path) -> dict:
    """Every output file a user reads, with the values that legitimately differ between runs (timings) dropped."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.is_dir() or p.name == "LATEST":
            continue
        if p.name == "metrics.jsonl":
            files[p.name] = [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
                             for line in p.read_text().splitlines()]
        elif p.name in ("summary.json", "config.json"):
            files[p.name] = {k: v for k, v in json.loads(p.read_text()).items() if k not in VOLATILE}
        elif p.name == "summary.md":  # without the columns of step time and peak memory
            files[p.name] = [line.split("|")[:-3] for line in p.read_text().splitlines()]
        else:
            files[p.name] = p.read_bytes()
    return files


def _newest(out: Path) -> Path:
    return out / (out / "LATEST").read_text().split()[0]


def _plant(ckpt: Path, name: str, data: bytes) -> None:
    """Write ``name`` into a checkpoint and list it in the manifest with its true sum, as an attacker could."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())
    manifest["files"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / checkpoint.MANIFEST).write_text(json.dumps(manifest))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling with weights_only=False would create the marker file
        return open, (str(self.marker), "w")


def test_a_malicious_pickle_is_refused_by_resume_and_evaluate_without_running(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    marker = tmp_path / "pwned"
    for name in (out / "LATEST").read_text().split():  # in both checkpoints, so that no fallback is left
        _plant(out / name, "zo_optimizer.pt", pickle.dumps(_Evil(marker)))
    before = _snapshot(out)
    assert main(["--resume", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "zo_optimizer.pt: not a safe torch file" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(out), "--eval-samples", "1"])
    assert exit_info.value.code == 2 and "zo_optimizer.pt: not a safe torch file" in capsys.readouterr().err
    assert not marker.exists()
    assert _snapshot(out) == before


def test_a_second_run_or_resume_on_a_live_directory_stops_at_once(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
              "print('locked', flush=True); time.sleep(60)")  # a live run's lock, in another process
    live = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert live.stdout.readline().strip() == "locked"
        for argv in (["--resume"], []):
            assert main(argv + ["--preset", "smoke", "--output-dir", str(out)]) == 2
            assert "another run is using it" in capsys.readouterr().err
    finally:
        live.kill()
        live.wait()
    assert _snapshot(out) == before


def test_a_kill_at_any_output_write_then_resume_gives_the_uninterrupted_outputs(finished, tmp_path, monkeypatch):
    """Kill (raise) just before each write that publishes an output file of the run's last stretch (and of its
    first checkpoint), resume each time, then resume the finished run once more: the outputs equal the
    uninterrupted run's throughout."""
    def key(tmp, final):
        if final.name == "LATEST":
            return "LATEST->" + Path(tmp).read_text().split()[0].rsplit("-", 1)[1]
        return "ckpt->" + final.name.rsplit("-", 1)[1] if final.name.startswith("ckpt-") else final.name

    kills = ["ckpt->train", "LATEST->train", "zo_log_iter1.pt", "ckpt->evaluate", "LATEST->evaluate", "ckpt->done",
             "LATEST->done", "eval_samples.jsonl", "policy_adapter.safetensors", "reward_adapter.safetensors",
             "summary.md", "summary.json"]
    publish, seen = files.publish, []

    def killing_publish(tmp, final):
        seen.append(key(tmp, final))
        if seen[-1] == target:
            raise KeyboardInterrupt(f"killed before writing {final}")
        publish(tmp, final)

    monkeypatch.setattr(files, "publish", killing_publish)
    # the plot (written straight, not published; rewritten by every resume) cost ~0.3 s a call: 12 calls here
    monkeypatch.setattr(program, "plot_rewards", lambda records, path: None)
    out = tmp_path / "killed"
    for i, target in enumerate(kills):  # noqa: B007 (killing_publish reads it)
        with pytest.raises(KeyboardInterrupt, match="killed before writing"):
            run(_cfg(out), resume=i > 0, progress=False)
    target = None
    run(_cfg(out), resume=True, progress=False)
    assert set(kills) <= set(seen)  # every kill point was reached
    expected = {k: v for k, v in _outputs(finished).items() if k != "reward_curve.png"}
    assert _outputs(out) == expected
    run(_cfg(out), resume=True, progress=False)  # phase 'done': rewrites the same outputs
    assert _outputs(out) == expected


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_a_message(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    damaged = _newest(out) / "trainable.safetensors"
    _flip_a_bit(damaged)  # one data bit: only the checksum can tell
    run(_cfg(out), resume=True, progress=False)  # redoes the evaluation from the 'evaluate' checkpoint
    assert f"warning: {damaged}: damaged" in capsys.readouterr().err
    assert _outputs(out) == _outputs(finished)


def _both_checkpoints(out):
    for name in (out / "LATEST").read_text().split():
        _flip_a_bit(out / name / "trainable.safetensors")
    return "trainable.safetensors: damaged"


def _latest_outside(out):
    (out / "LATEST").write_text("../elsewhere\n")
    return "LATEST: damaged"


def _latest_lost(out):
    (out / "LATEST").unlink()
    return "LATEST: missing, but"


def _no_checkpoint_dirs(out):
    for p in out.glob("ckpt-*"):
        shutil.rmtree(p)
    return "missing or not a directory of this run"


def _everything_but_metrics_lost(out):
    for p in out.glob("ckpt-*"):
        shutil.rmtree(p)
    (out / "LATEST").unlink()
    return "LATEST: missing, but"


def _manifest_lost(out):
    for name in (out / "LATEST").read_text().split():
        (out / name / checkpoint.MANIFEST).unlink()
    return "manifest.json: missing or damaged"


def _metrics_truncated(out):
    data = (out / "metrics.jsonl").read_bytes()
    (out / "metrics.jsonl").write_bytes(data[:len(data) // 2])
    return "metrics.jsonl: damaged"


def _metrics_edited(out):
    _flip_a_bit(out / "metrics.jsonl")
    return "metrics.jsonl: damaged"


def _config_edited(out):
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "zo_lr": "fast"}))
    return "config.json: --zo-lr: expected a number"


def _latest_and_metrics_lost(out):  # issue 31: two valid checkpoints were once deleted by a silent restart
    (out / "LATEST").unlink()
    (out / "metrics.jsonl").unlink()
    return "LATEST: missing, but the directory holds checkpoints"


def _latest_lost_metrics_emptied(out):
    (out / "LATEST").unlink()
    (out / "metrics.jsonl").write_bytes(b"")
    return "LATEST: missing, but the directory holds checkpoints"


def _config_field(name, value):
    def edit(out):  # a valid setting a resume would otherwise take silently (the checkpoint does not store it)
        saved = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**saved, name: value}, indent=1))
        return "config.json: differs from the copy in checkpoint ckpt-"
    edit.__name__ = f"_config_{name}_edited"
    return edit


def _config_bit_flipped(out):
    text = (out / "config.json").read_bytes()
    at = text.index(b'"seed": 1') + len(b'"seed": ')
    (out / "config.json").write_bytes(text[:at] + bytes([text[at] ^ 1]) + text[at + 1:])  # seed 1 -> 0
    return "(--seed 0, checkpoint: 1)"


@pytest.mark.parametrize("damage", [_config_field("steps_per_iteration", 2), _config_field("zo_lr", 11.0),
                                    _config_bit_flipped, _both_checkpoints, _latest_outside, _latest_lost,
                                    _no_checkpoint_dirs,
                                    _everything_but_metrics_lost, _latest_and_metrics_lost,
                                    _latest_lost_metrics_emptied,
                                    _manifest_lost, _metrics_truncated, _metrics_edited, _config_edited])
def test_a_damaged_run_directory_is_named_in_one_line_and_left_unchanged(finished, tmp_path, capsys, damage):
    out = _copy(finished, tmp_path)
    message = damage(out)
    before = _snapshot(out)
    assert main(["--resume", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert _snapshot(out) == before


def _as_before_checksums(out: Path) -> Path:
    """The newest checkpoint as a zopro before checksums wrote it (no manifest, no config copy, no metrics sum), and
    no other checkpoint."""
    newest = _newest(out)
    for other in out.glob("ckpt-*"):
        if other != newest:
            shutil.rmtree(other)
    for name in (checkpoint.MANIFEST, checkpoint.CONFIG):
        (newest / name).unlink()
    meta = json.loads((newest / "meta.json").read_text())
    del meta["metrics_sha256"]
    (newest / "meta.json").write_text(json.dumps(meta, indent=1))
    (out / "LATEST").write_text(newest.name + "\n")
    return newest


def test_runs_made_before_checksums_load_only_for_reading(finished, tmp_path):
    out = _copy(finished, tmp_path)
    _as_before_checksums(out)
    with pytest.raises(ValueError, match="manifest.json: missing or damaged"):
        checkpoint.load(out)  # what --resume uses
    assert checkpoint.load(out, unverified_legacy=True).meta["phase"] == "done"  # what zopro.train.evaluate uses


def test_a_checkpoint_that_lost_its_manifest_is_no_legacy_one(finished, tmp_path, capsys):
    # issue 31: weights changed and the manifest removed; meta.json (metrics_sha256) shows a zopro with manifests
    out = _copy(finished, tmp_path)
    newest = _newest(out)
    _flip_a_bit(newest / "trainable.safetensors")
    (newest / checkpoint.MANIFEST).unlink()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(out), "--eval-samples", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{newest / checkpoint.MANIFEST}: missing" in err, err


def test_output_dir_that_is_a_file_and_resume_of_a_missing_dir_change_nothing(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["--preset", "smoke", "--output-dir", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err and a_file.read_text() == "x"
    missing = tmp_path / "missing"
    assert main(["--resume", "--preset", "smoke", "--output-dir", str(missing)]) == 2
    assert "no such directory" in capsys.readouterr().err and not missing.exists()
    assert main(["--preset", "smoke", "--judge", "llm:missing/x", "--output-dir", str(missing)]) == 2
    assert "--judge llm:missing/x: cannot load 'missing/x'" in capsys.readouterr().err and not missing.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Issue 31: every input checked before the first byte is written
_BAD_ROWS = {  # a --dataset file with one bad row of each kind load_local refuses
    "not_an_object.jsonl": b'{"prompt": "a"}\n["a list"]\n',
    "no_prompt.jsonl": b'{"prompt": "a"}\n{"chosen": "x", "rejected": "y"}\n',
    "prompt_not_text.jsonl": b'{"prompt": "a"}\n{"prompt": 3}\n',
    "half_a_pair.jsonl": b'{"prompt": "a"}\n{"prompt": "b", "chosen": "x"}\n',
    "score_not_a_number.jsonl": b'{"prompt": "a"}\n{"prompt": "b", "score": "high"}\n',
    "bad_json.jsonl": b'{"prompt": "a"}\n{"prompt": \n',
    "not_a_list.json": b'{"prompt": "a"}',
    "latin1.jsonl": '{"prompt": "caf\u00e9"}\n'.encode("latin-1"),
}


@pytest.mark.parametrize("name", sorted(_BAD_ROWS))
def test_a_bad_dataset_row_is_refused_before_the_run_directory_exists(tmp_path, capsys, name):
    bad = tmp_path / name
    bad.write_bytes(_BAD_ROWS[name])
    out = tmp_path / "new" / "run"
    assert main(["--preset", "smoke", "--threads", "1", "--dataset", str(bad), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new").exists()  # the run made both folders: both are gone again


@pytest.mark.parametrize("argv, message", [
    (["--n-eval-prompts", "1000000000"], "not more than --n-eval-prompts 1000000000"),
    (["--lora-r", "1000000000"], "--lora-r 1000000000: the 2 LoRA adapters alone need at least"),
    (["--k", "1000000000"], "--k 1000000000: a rollout of"),
    (["--eval-samples", "1000000000"], "--eval-samples 1000000000: an evaluation call of"),
    (["--threads", "1" + "0" * 29], "--threads 1" + "0" * 29 + ": more than"),
])
def test_a_size_the_machine_cannot_hold_is_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["--preset", "smoke", "--threads", "1", "--output-dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(out.iterdir()) == []


def test_threads_from_a_config_file_are_checked_before_anything_is_written(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text('{"threads": 1e29}')
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--config", str(config), "--output-dir", str(out)]) == 2
    assert f"--threads {int(1e29)}: more than" in capsys.readouterr().err
    assert not out.exists()


def test_a_resume_with_too_many_threads_changes_nothing(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    assert main(["--resume", "--output-dir", str(out), "--threads", "100000000"]) == 2
    assert "--threads 100000000: more than" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_run_refused_at_load_leaves_no_file(tmp_path, capsys):
    # a base that cannot be loaded is found when the run loads it, still before config.json is written
    out = tmp_path / "run"
    broken = tmp_path / "model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(Exception):  # noqa: B017,PT011 (transformers' own error: the point is what is left behind)
        run(dataclasses.replace(_cfg(out), model=str(broken)), progress=False)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# Issue 31: a folder that is not a run is refused, never cleaned
def _foreign(tmp_path) -> Path:
    """Someone's folder with entries named like a run's outputs."""
    out = tmp_path / "mine"
    for name in ("policy", "reward", "base"):
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text(f"my own {name}")
    (out / "summary.md").write_text("my summary")
    return out


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(tmp_path, capsys):
    out = _foreign(tmp_path)
    before = _snapshot(out)
    assert main(["--preset", "smoke", "--threads", "1", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty and holds no zopro run" in err and len(err.splitlines()) == 1, err
    assert main(["--resume", "--threads", "1", "--output-dir", str(out)]) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_run_with_a_foreign_file_is_not_resumed(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / "ckpt-mine").mkdir()  # a name the checkpoint cleaner would once have removed
    before = _snapshot(out)
    assert main(["--resume", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "which no zopro run writes" in err and "ckpt-mine" in err and len(err.splitlines()) == 1, err
    assert _snapshot(out) == before and (out / "ckpt-mine").is_dir()


def test_every_entry_of_a_finished_run_is_a_run_entry(finished):
    assert checkpoint.foreign_entries(finished) == []


def test_a_resume_removes_checkpoints_a_kill_left_behind(finished, tmp_path):
    # killed just after LATEST moved to 'done', before the older checkpoints were removed
    out = _copy(finished, tmp_path)
    names = (out / "LATEST").read_text().split()
    shutil.copytree(out / names[1], out / "ckpt-000001-000002-train")
    (out / ".ckpt-000009-000002-train.tmp").mkdir()
    run(_cfg(out), resume=True, progress=False)
    assert sorted(p.name for p in out.glob("*ckpt-*")) == sorted(names)
    assert _outputs(out) == _outputs(finished)


def test_an_edited_config_is_refused_by_evaluate_too(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    message = _config_field("zo_lr", 11.0)(out)
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(out), "--eval-samples", "1"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Issue 31: the outputs carry checksums, and the tools that read them check them
def _export(out, tmp_path, capsys):
    from zopro.train.export import main as export_main

    code = export_main([str(out), "--merged", str(tmp_path / "merged")])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("damage", ["flip", "no_manifest", "extra_file"])
def test_export_refuses_a_policy_or_base_folder_that_fails_its_checksum(finished, tmp_path, capsys, damage):
    out = _copy(finished, tmp_path)
    target = out / "policy" / "adapter_model.safetensors"
    if damage == "flip":
        _flip_a_bit(target)
    elif damage == "no_manifest":
        target = out / "policy" / checkpoint.MANIFEST
        target.unlink()
    else:
        target = out / "base" / "pytorch_model.bin"
        target.write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    code, err = _export(out, tmp_path, capsys)
    assert code == 2 and str(target) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "pwned").exists()


def _visualize(out, tmp_path, capsys):
    from zopro.train import visualize

    code = visualize.main([str(out), "--out", str(tmp_path / "report")])
    return code, capsys.readouterr().err.strip()


def test_visualize_refuses_a_damaged_snapshot_or_one_without_its_header(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    snap = sorted((out / "snapshots").iterdir())[-1]
    original = snap.read_bytes()
    _flip_a_bit(snap)
    code, err = _visualize(out, tmp_path, capsys)
    assert code == 2 and f"{snap}: damaged" in err and len(err.splitlines()) == 1, err
    snap.write_bytes(original)
    tensors, meta = files.load_tensors(snap)
    files.atomic_save_tensors(snap, tensors, {k: v for k, v in meta.items() if k != "kind"})
    code, err = _visualize(out, tmp_path, capsys)
    assert code == 2 and f"{snap}: not a snapshot of this run (no 'kind'" in err and len(err.splitlines()) == 1, err


def test_flat_outputs_carry_checksums_their_readers_check(finished, tmp_path):
    out = _copy(finished, tmp_path)
    adapter = out / "policy_adapter.safetensors"
    tensors, _ = files.load_tensors(adapter)
    assert tensors.keys() == load_file(str(finished / "policy_adapter.safetensors")).keys()
    _flip_a_bit(adapter)
    with pytest.raises(ValueError, match=f"{adapter}: damaged"):
        files.load_tensors(adapter)
    log = out / "zo_log_iter1.pt"  # every atomic_torch_save output (base_quantised.pt too) has a .sha256
    assert files.torch_load(log).keys() == torch.load(log, weights_only=True).keys()
    _flip_a_bit(log)
    with pytest.raises(ValueError, match=f"{log}: damaged"):
        files.torch_load(log)


# ---------------------------------------------------------------------------------------------------------------------
# Issue 31: a full disk, a read-only mount or a refused payload is one line, never a traceback
def _failing_writes(monkeypatch, code, when=lambda path: True):
    real = files.atomic_file

    def failing(path, write):
        if when(Path(path)):
            raise OSError(code, os.strerror(code))  # as a write() reports it: no file name
        real(path, write)

    monkeypatch.setattr(files, "atomic_file", failing)


def _error_line(err: str) -> str:
    """The one error line of a stderr that may also hold progress bars; no traceback."""
    assert "Traceback" not in err and err.count("error:") == 1, err
    return next(line for line in err.splitlines() if "error:" in line)


def test_a_full_disk_mid_run_is_one_line_and_the_resume_is_exact(finished, tmp_path, monkeypatch, capsys):
    out = tmp_path / "full"
    latest = []
    _failing_writes(monkeypatch, errno.ENOSPC, lambda path: path.name == "LATEST" and len(latest.append(1) or latest)
                    == 3)  # the third checkpoint's pointer
    assert main(["--preset", "smoke", "--threads", "1", "--iterations", "2", "--steps-per-iteration", "1", "--seed",
                 "1", "--output-dir", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert f"error: {out / 'LATEST'}: no space left on the device" in _error_line(err)
    monkeypatch.undo()
    run(_cfg(out), resume=True, progress=False)
    assert _outputs(out) == _outputs(finished)


def test_a_read_only_finished_run_resumes_in_one_line(finished, tmp_path, monkeypatch, capsys):
    out = _copy(finished, tmp_path)
    _failing_writes(monkeypatch, errno.EROFS)
    assert main(["--resume", "--output-dir", str(out)]) == 3
    err = capsys.readouterr().err.strip()
    assert f"error: {out / 'eval_samples.jsonl'}: read-only file system" in _error_line(err)
    monkeypatch.undo()
    run(_cfg(out), resume=True, progress=False)
    assert _outputs(out) == _outputs(finished)


def test_export_refuses_a_pickle_its_manifest_vouches_for_in_one_line(finished, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    (out / "base" / "model.safetensors").unlink()
    (out / "base" / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(tmp_path / "pwned")))
    files.write_folder_manifest(out / "base")  # sums are no signature: whoever can write can re-sum
    code, err = _export(out, tmp_path, capsys)
    assert code == 2 and f"{out / 'base'}: refused to load" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "merged").exists()


def test_export_on_a_full_disk_is_one_line(finished, tmp_path, monkeypatch, capsys):
    out = _copy(finished, tmp_path)

    def full(tmp, final):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "atomic_publish_dir", full)
    code, err = _export(out, tmp_path, capsys)
    assert code == 3 and f"error: {tmp_path / 'merged'}: no space left on the device" in _error_line(err)
    assert not (tmp_path / "merged").exists()


def test_evaluate_refuses_a_thread_count_the_machine_cannot_start(finished, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(finished), "--threads", "1" + "0" * 29])
    assert exit_info.value.code == 2 and "--threads 1" + "0" * 29 + ": more than" in capsys.readouterr().err


def test_evaluate_refuses_a_sample_count_the_machine_cannot_hold(finished, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([str(finished), "--eval-samples", "1000000000"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--eval-samples 1000000000: an evaluation call of" in err, err


# ---------------------------------------------------------------------------------------------------------------------
# Found by the adversarial test of the merged fixes
def test_a_resume_refuses_a_file_added_inside_a_published_folder(finished, tmp_path, capsys):
    for folder in ("policy", "reward", "base"):
        out = _copy(finished, tmp_path, folder)
        (out / folder / "mine.txt").write_text("notes")
        assert main(["--output-dir", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"holds {out / folder / 'mine.txt'}, which no zopro run writes" in err and err.count("\n") == 1
        assert (out / folder / "mine.txt").read_text() == "notes"


def test_a_full_disk_inside_safetensors_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", full)
    with pytest.raises(OSError) as caught:
        files.atomic_save_tensors(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    assert caught.value.errno == errno.ENOSPC and caught.value.filename.endswith("a.safetensors.tmp")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone
    with pytest.raises(OSError) as caught, files.scratch_folder(tmp_path / ".out.tmp") as scratch:
        scratch.mkdir()  # as save_pretrained makes it
        (scratch / "part").write_text("half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC and not (tmp_path / ".out.tmp").exists()


def test_a_run_full_of_disk_in_a_safetensors_write_is_one_line_exit_3(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    real = files.save_file

    def full_at_the_checkpoint(tensors, filename, metadata=None):
        if "ckpt-" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", full_at_the_checkpoint)
    out = tmp_path / "run"
    assert main(["--preset", "smoke", "--threads", "1", "--output-dir", str(out)]) == 3
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and len(errors) == 1
    assert "no space left on the device" in errors[0] and "trainable.safetensors" in errors[0]


def test_a_read_only_parent_is_the_machine_exit_3(tmp_path, monkeypatch, capsys):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert main(["--preset", "smoke", "--threads", "1", "--output-dir", str(tmp_path / "new")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0]
