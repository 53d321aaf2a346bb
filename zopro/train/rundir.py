"""The run directory: checking and opening it before anything is written, for a new run or a resume.

:func:`open_run_dir` takes the directory's lock and refuses, in one line and before any byte is written, a path that
is a file, a directory that holds another run or foreign files, one in use, damaged files, a resume with changed
settings, and settings this machine cannot run (:mod:`zopro.train.preflight`). :func:`open_shared` does it on rank 0
of a data-parallel job and hands its verdict, the run's config and checkpoint name to the other ranks. The files a
run writes and how they are checked are :mod:`zopro.train.checkpoint`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from zopro.train import checkpoint, distributed, files, preflight
from zopro.train.config import RESUME_OVERRIDES, TrainConfig, flag, load_saved, resume_differences, validate
from zopro.train.loading import resolve_device


def _check_model_reference(name: str, what: str) -> None:
    """Fail in one line, before any model is loaded, when a hub id / path names nothing loadable (a cheap check: a
    local directory, or the model's config from the hub or its cache)."""
    if os.path.isdir(name):
        return
    # HF_HUB_OFFLINE read now, not when huggingface_hub was imported: without it a missing id waited ~20 s on
    # network timeouts in a sandbox that had set the variable after the import
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, local_files_only=offline)
    except Exception as err:  # noqa: BLE001 (OSError, hub and parsing errors alike: the model cannot be loaded)
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(f"{what}: cannot load {name!r} ({type(err).__name__}: {first})") from None


def _check_metrics(path: Path, loaded: checkpoint.Loaded) -> None:
    """The metrics lines a checkpoint recorded must still be there, byte for byte (a resume cuts the file back to
    them; a shorter file would be padded with NUL bytes)."""
    n_bytes = loaded.meta["metrics_bytes"]
    if not path.is_file() or path.stat().st_size < n_bytes or \
            files.sha256_prefix(path, n_bytes) != loaded.meta.get("metrics_sha256"):
        raise ValueError(f"{path}: damaged or missing (its first {n_bytes} bytes are not the lines checkpoint "
                         f"{loaded.name} recorded)")


def open_run_dir(cfg: TrainConfig, resume: bool):
    """Check ``cfg.output_dir`` and take its lock. Returns ``(cfg, lock, loaded checkpoint or None)``; ``cfg`` is the
    run's saved config on resume. Raises ValueError, before anything is written, for a directory that is a file,
    holds another run, is in use, or whose files are damaged, and for settings this machine cannot run
    (:mod:`zopro.train.preflight`); nothing is created unless those checks pass (the run's own loads may still fail:
    :func:`zopro.train.program.run` removes the folders again)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out}: exists and is not a directory")
    if resume and not out.is_dir():
        raise ValueError(f"--resume: {out} holds no run to resume (no such directory)")
    if not resume:
        kind, _, name = cfg.judge.partition(":")
        if kind in ("llm", "reward"):
            _check_model_reference(name, f"--judge {cfg.judge}")
        if cfg.reward_model:
            _check_model_reference(cfg.reward_model, "--reward-model")
        preflight.check(cfg, resolve_device(cfg))
    lock = checkpoint.make_and_lock(out)
    try:
        config_path = out / "config.json"
        metrics_path = out / "metrics.jsonl"
        has_metrics = metrics_path.is_file() and metrics_path.stat().st_size > 0
        if not resume:
            checkpoint.check_new_run_dir(out)
            return cfg, lock, None
        if not config_path.is_file():
            raise ValueError(f"--resume: {out} holds no run to resume (no config.json)")
        checkpoint.check_run_entries(out)
        saved = load_saved(config_path)
        if "eval_samples" not in saved:
            raise ValueError(f"--resume: {out} was started by an older zopro that scored the held-out prompts with one "
                             "sample each, so its 'before' cannot be compared with this version's evaluation. Start a "
                             "new run (a finished one can be scored again with python -m zopro.train.evaluate)")
        try:
            saved_cfg = validate(TrainConfig(**{**saved, "output_dir": cfg.output_dir}))
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from None
        changed = resume_differences(saved_cfg, cfg)
        if changed:
            allowed = ", ".join(map(flag, RESUME_OVERRIDES))
            raise ValueError(f"--resume: {out} was started with other settings; drop or restore them: "
                             f"{'; '.join(changed)} (only {allowed} may change on resume)")
        cfg = dataclasses.replace(saved_cfg, **{n: getattr(cfg, n) for n in RESUME_OVERRIDES})
        loaded = checkpoint.load(out)
        if loaded is not None:
            checkpoint.check_config(out, loaded)
        # no checkpoint and no metrics (killed before or while publishing the first checkpoint): starting over loses
        # nothing; with metrics it would silently append a new run to an old one's lines
        if loaded is None and has_metrics:
            raise ValueError(f"{out / checkpoint.LATEST}: missing, but {out / 'metrics.jsonl'} holds a run's lines; "
                             "refusing to restart over them (restore the file, or start a new run elsewhere)")
        unpointed = checkpoint.unpointed_checkpoints(out)
        if unpointed:  # a restart would delete them
            raise ValueError(f"{out / checkpoint.LATEST}: missing, but the directory holds checkpoints "
                             f"({', '.join(unpointed)}); refusing to restart over them (restore LATEST naming the "
                             "newest and its fallback, or start a new run elsewhere)")
        if loaded is not None:
            _check_metrics(metrics_path, loaded)
        preflight.check(cfg, resolve_device(cfg))  # the threads may have changed, or the machine
        return cfg, lock, loaded
    except BaseException:
        lock.close()
        raise


def open_shared(cfg: TrainConfig, resume: bool, ranks: distributed.Ranks):
    """:func:`open_run_dir` on rank 0; its error, or the run's config and checkpoint name, broadcast to the other
    ranks, which read the same checkpoint from the shared run directory (they take no lock and write nothing).
    Returns ``(cfg, lock or None, loaded checkpoint or None)``."""
    if ranks.world == 1:
        return open_run_dir(cfg, resume)
    opened, error, failure = (None, None, None), None, None
    if ranks.writes:
        try:
            opened = open_run_dir(cfg, resume)
        except ValueError as err:
            error = str(err)
        except Exception as err:  # noqa: BLE001 (an OSError, say: the other ranks must not wait for rank 0 forever)
            error, failure = f"rank 0 could not open {cfg.output_dir}: {type(err).__name__}: {err}", err
    try:  # from here on any failure (a lost rank included) releases rank 0's lock
        error = ranks.broadcast_text(error, "the run directory's checks")
        if failure is not None:
            raise failure
        if error is not None:
            raise ValueError(error)
        shared = json.dumps({"cfg": dataclasses.asdict(opened[0]), "checkpoint": opened[2] and opened[2].name}) \
            if ranks.writes else None
        shared = json.loads(ranks.broadcast_text(shared, "the run's config"))
        if ranks.writes:
            return opened
        cfg = validate(TrainConfig(**shared["cfg"]))
        loaded = checkpoint.load(Path(cfg.output_dir)) if shared["checkpoint"] else None
        if (loaded and loaded.name) != shared["checkpoint"]:
            raise ValueError(f"--resume: rank {ranks.rank} reads checkpoint {loaded and loaded.name} of "
                             f"{cfg.output_dir}, rank 0 {shared['checkpoint']}: the run directory must be on a file "
                             "system every rank sees")
        return cfg, None, loaded
    except BaseException:
        if opened[1] is not None:
            opened[1].close()
        raise


def branch(src: Path, cfg: TrainConfig) -> None:
    """Copy the run in ``src`` (paused by ``run(..., pause_after_iteration=N)``, or stopped anywhere) to
    ``cfg.output_dir`` with ``cfg``'s settings, for ``run(cfg, resume=True)`` to continue. The copy's config.json and
    its checkpoints' copies of it are rewritten, so the resume accepts them; whether the changed settings act only
    after the point the run stopped (so the branch is the run a fresh start with ``cfg`` would be) is the caller's
    to know: ``--iterations``, the algorithm, guide and ZO settings of later iterations do, the model, data, seeds
    and iteration 0's settings do not. Refuses an existing destination and a source without a checkpoint."""
    src, dst = Path(src), Path(cfg.output_dir)
    if dst.exists():
        raise ValueError(f"branch: {dst} exists; a branch is a new run directory")
    if checkpoint.load(src) is None:
        raise ValueError(f"branch: {src} holds no checkpoint to continue from")
    validate(cfg)
    shutil.copytree(src, dst)
    # with the copies its checkpoints hold: a resume refuses a config.json edited behind the run's back
    checkpoint.rewrite_config(dst, json.dumps(dataclasses.asdict(cfg), indent=1))
