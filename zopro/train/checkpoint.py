"""Run directories: checksummed checkpoints with one fallback, and one run per directory.

A checkpoint is a directory ``ckpt-<serial>-<name>`` of files written under a temporary name with a
``manifest.json`` of their SHA-256 sums, fsynced, renamed into place, and then published by atomically replacing
the ``LATEST`` pointer file, which names the new checkpoint and the previous one. Older checkpoints are removed only
after the pointer moved, so a kill at any moment leaves two complete checkpoints or one plus a stray temporary
directory. Loading verifies every file's sum and falls back to the previous checkpoint when the newest is damaged.
Every file is written and read through :mod:`zopro.train.files` (atomic, checksummed, no pickle that runs code).

Around the checkpoints: each holds a copy of the run's ``config.json`` (a resume refuses an edited one), a run
directory may hold only the entries a run writes (:data:`RUN_ENTRY`), and one process at a time holds a run
(:class:`RunLock`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from zopro.train import files
from zopro.train.config import TrainConfig, flag, load_saved, validate
from zopro.train.files import MANIFEST

LATEST = "LATEST"
CONFIG = "config.json"
_NAME = re.compile(r"ckpt-(\d{6,})-[A-Za-z0-9_-]+")

def made_before_output_checksums(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` proves it was made before outputs carried checksums: it has checkpoints and
    none holds a copy of ``config.json`` (which every checkpoint has held since). A run without checkpoints proves
    nothing, so its outputs are checked."""
    ckpts = [p for p in Path(run_dir).glob("ckpt-*") if _NAME.fullmatch(p.name) and p.is_dir()]
    return bool(ckpts) and not any((p / CONFIG).is_file() for p in ckpts)


# ---------------------------------------------------------------------------------------------------------------------
# The lock
class RunLock:
    """An exclusive ``flock`` on the run directory itself, held until :meth:`close` (or the process ends: the
    kernel releases it, so a killed run never leaves a stale lock). Locking the directory rather than a lock file
    inside it means taking the lock writes nothing, and a refused run leaves the directory exactly as it was."""

    def __init__(self, run_dir: Path, created: tuple[Path, ...] = ()):
        self.created = created  # the folders make_and_lock created, deepest first
        self.fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ValueError(f"--output-dir {run_dir}: another run is using it (it holds the directory's lock); "
                             "wait for that run to end, or pick another directory") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def remove_created(self) -> None:
        """Remove the folders :func:`make_and_lock` created, where they are still empty (a run refused before its
        first write leaves no trace)."""
        _remove_empty(self.created)


def lock(run_dir: Path) -> RunLock:
    """Take ``run_dir``'s exclusive lock, or raise ValueError at once if another run holds it."""
    return RunLock(Path(run_dir))


def make_and_lock(run_dir: Path) -> RunLock:
    """Create ``run_dir`` (and missing parents) and take its lock; the lock remembers what it created, so that a run
    refused before writing can remove it again (:meth:`RunLock.remove_created`)."""
    run_dir = Path(run_dir)
    created = tuple(p for p in (run_dir, *run_dir.parents) if not p.exists())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno in files.DISK_ERRORS:  # the machine (a read-only mount, a full disk): exit 3, as for any write
            raise OSError(err.errno, err.strerror, str(run_dir)) from None
        raise ValueError(f"--output-dir {run_dir}: cannot create it ({err.strerror or err})") from None
    try:
        return RunLock(run_dir, created)
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(folders) -> None:
    """rmdir each of ``folders`` in turn, stopping at the first that is not empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# ---------------------------------------------------------------------------------------------------------------------
# What a run directory may hold
# Every entry a run writes, and what a kill can leave of one: an atomic file's "<name>.tmp", a checkpoint's
# ".ckpt-….tmp", a published folder's ".<name>.tmp" / ".<name>.old" (files.atomic_publish_dir), save_adapters' scratch
# ".adapters.tmp" and the plot's "reward_curve.tmp.png". A run refuses a directory holding anything else: it would
# write over, or remove, files that are not its own.
_FILES = r"config\.json|metrics\.jsonl|LATEST|summary\.md|summary\.json|eval_samples\.jsonl|eval_curve\.jsonl|" \
         r"(policy|reward)_adapter\.safetensors|(base_quantised|zo_log_iter\d+)\.pt(\.sha256)?"
_FOLDERS = r"snapshots|policy|reward|base|report"  # report: python -m zopro.train.visualize's default --out
RUN_ENTRY = re.compile(rf"({_FILES})(\.tmp)?|{_NAME.pattern}|\.{_NAME.pattern}\.tmp|({_FOLDERS})|"
                       rf"\.({_FOLDERS}|adapters)\.(tmp|old)|reward_curve(\.tmp)?\.png")
# what a new run may find (and write over): what a run killed before its config.json was published leaves
_START_LEFTOVERS = ("metrics.jsonl", "config.json.tmp")


def foreign_entries(run_dir: Path) -> list[str]:
    """The names in ``run_dir`` that no zopro run writes (:data:`RUN_ENTRY`), sorted."""
    return sorted(p.name for p in Path(run_dir).iterdir() if not RUN_ENTRY.fullmatch(p.name))


def check_new_run_dir(run_dir: Path) -> None:
    """A new run's directory must be empty, or hold only what a start killed before its config.json left (an empty
    ``metrics.jsonl``); ValueError otherwise, before anything is written."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "config.json").exists() or has_checkpoints(run_dir) or (metrics.is_file() and
                                                                        metrics.stat().st_size > 0):
        raise ValueError(f"--output-dir {run_dir} already holds a run: pass --resume to continue it or pick "
                         "another dir")
    other = sorted(p.name for p in run_dir.iterdir() if p.name not in _START_LEFTOVERS or p.is_dir())
    if other:
        raise ValueError(f"--output-dir {run_dir}: not empty and holds no zopro run ({', '.join(other[:3])}"
                         f"{', ...' if len(other) > 3 else ''}); pick a new or empty directory")


def check_run_entries(run_dir: Path) -> None:
    """Every entry of the run directory ``run_dir`` is one a run writes; ValueError naming the first that is not."""
    foreign = foreign_entries(run_dir) + _foreign_in_outputs(run_dir)
    if foreign:
        raise ValueError(f"--output-dir {run_dir}: holds {run_dir / foreign[0]}, which no zopro run writes; move it "
                         "away (a run writes over and removes its own files, never anyone else's)")


def _foreign_in_outputs(run_dir: Path) -> list[str]:
    """The files inside the published folders (``policy/``, ``reward/``, ``base/``, which a resume replaces whole)
    that their manifest does not list; a folder without a readable manifest (a run from before manifests) is not
    looked into."""
    extra = []
    for name in ("policy", "reward", "base"):
        folder = Path(run_dir) / name
        try:
            listed = set(files.manifest_sums(folder / MANIFEST))
        except ValueError:
            continue
        extra += sorted(f"{name}/{f.relative_to(folder).as_posix()}" for f in folder.rglob("*")
                        if not f.is_dir() and f.name != MANIFEST and f.relative_to(folder).as_posix() not in listed)
    return extra


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
def save(run_dir: Path, name: str, *, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, object],
         meta: dict, previous: str | None = None) -> str:
    """Write checkpoint ``name``: each ``tensors`` entry as safetensors, each ``objects`` entry with torch.save (it
    must load with ``weights_only=True``), ``meta`` as JSON, and the manifest of their sums; then point ``LATEST`` at
    it, with ``previous`` (the checkpoint the run holds now, verified) as its fallback, and drop all others.
    Returns the new checkpoint's directory name."""
    run_dir = Path(run_dir)
    serial = 1 + max((int(m.group(1)) for p in run_dir.glob("ckpt-*") if (m := _NAME.fullmatch(p.name))), default=0)
    final = run_dir / f"ckpt-{serial:06d}-{name}"
    assert _NAME.fullmatch(final.name), final.name
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with files.naming(final):
            _write_checkpoint(run_dir, tmp, final, tensors, objects, meta)
    except Exception:  # a full disk: the space back, the run as its last checkpoint left it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files.atomic_write_text(run_dir / LATEST, "\n".join([final.name] + ([previous] if previous else [])) + "\n")
    for old in list(run_dir.glob("ckpt-*")) + list(run_dir.glob(".ckpt-*.tmp")):
        if old.name not in (final.name, previous):
            shutil.rmtree(old, ignore_errors=True)
    return final.name


def _write_checkpoint(run_dir: Path, tmp: Path, final: Path, tensors, objects, meta) -> None:
    """:func:`save`'s files into ``tmp``, with the run's config copy and the manifest, published as ``final``."""
    tmp.mkdir(parents=True)
    for key, group in tensors.items():
        cpu = {k: v.detach().contiguous().cpu() for k, v in group.items()}
        files.save_tensors_file(cpu, tmp / f"{key}.safetensors")
    for key, obj in objects.items():
        torch.save(obj, tmp / f"{key}.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if (run_dir / CONFIG).is_file():  # the run's settings as they were: a resume refuses an edited config.json
        shutil.copyfile(run_dir / CONFIG, tmp / CONFIG)
    sums = {f.name: files.sha256(f) for f in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"files": sums}, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        files.fsync_file(f)
    files.publish(tmp, final)


@dataclass
class Loaded:
    """A verified checkpoint: ``meta``, ``tensors`` (per file), ``objects`` (per file), its directory ``name``, and
    one line per newer checkpoint that was damaged and skipped (``skipped``)."""

    meta: dict
    tensors: dict[str, dict[str, torch.Tensor]]
    objects: dict[str, object]
    name: str
    skipped: list[str] = field(default_factory=list)

    def __iter__(self):  # ``meta, tensors, objects = load(...)`` as before the checkpoint had a name
        return iter((self.meta, self.tensors, self.objects))

    def __getitem__(self, i: int):
        return (self.meta, self.tensors, self.objects)[i]


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a pointer or any checkpoint directory (complete or not)."""
    run_dir = Path(run_dir)
    return (run_dir / LATEST).exists() or any(run_dir.glob("ckpt-*"))


def remove_stale(run_dir: Path) -> None:
    """Remove the checkpoint directories ``LATEST`` does not name, and stray temporary ones: what a kill between
    moving the pointer and removing the older checkpoints leaves (:func:`save`). For a resume, after every check."""
    run_dir = Path(run_dir)
    keep = set(_read_pointer(run_dir / LATEST))
    for old in sorted(run_dir.glob("ckpt-*")) + sorted(run_dir.glob(".ckpt-*.tmp")):
        if old.name not in keep and (_NAME.fullmatch(old.name) or old.name.startswith(".")) and old.is_dir():
            shutil.rmtree(old)


def unpointed_checkpoints(run_dir: Path) -> list[str]:
    """The checkpoint directories of ``run_dir`` that a run without ``LATEST`` must not start over: all of them,
    except a lone first checkpoint (``ckpt-000001-000000-train``, step 0), which is what a kill leaves between
    publishing the first checkpoint and the first pointer (starting over loses nothing then). Empty when ``LATEST``
    exists."""
    run_dir = Path(run_dir)
    if (run_dir / LATEST).exists():
        return []
    names = sorted(p.name for p in run_dir.glob("ckpt-*") if _NAME.fullmatch(p.name))
    return [] if names == ["ckpt-000001-000000-train"] else names


def load(run_dir: Path, *, fallback: bool = True, unverified_legacy: bool = False) -> Loaded | None:
    """The newest verified checkpoint named by ``LATEST`` (with ``fallback``, the previous one when the newest is
    damaged), or None when the run has no ``LATEST``. Raises ValueError naming the damaged file otherwise.

    ``unverified_legacy``: also accept a checkpoint without a manifest (written before checksums existed), loaded
    as safely but unverified; for read-only uses such as re-scoring old finished runs, never for resuming."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.exists():
        return None
    names = _read_pointer(pointer)
    if unverified_legacy and any((p / MANIFEST).exists() or (p / CONFIG).exists()
                                 for p in run_dir.glob("ckpt-*") if _NAME.fullmatch(p.name)):
        unverified_legacy = False  # a run with any checksummed checkpoint is no legacy run: every one is checked
    skipped = []
    for name in names if fallback else names[:1]:
        try:
            return Loaded(*_load_one(run_dir / name, unverified_legacy), name=name, skipped=skipped)
        except ValueError as err:
            skipped.append(str(err))
    if len(skipped) > 1:
        raise ValueError(f"{skipped[0]}; its fallback is damaged too: {skipped[1]}")
    raise ValueError(skipped[0])


def _read_pointer(pointer: Path) -> list[str]:
    try:
        names = pointer.read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{pointer}: unreadable ({files.first_line(err)})") from None
    # a bare directory name of this run: no separator, no '..', so LATEST cannot point outside the run directory
    if not 1 <= len(names) <= 2 or not all(_NAME.fullmatch(n) for n in names):
        raise ValueError(f"{pointer}: damaged (expected one or two checkpoint names like ckpt-000001-train, got "
                         f"{pointer.read_text(encoding='utf-8', errors='replace')[:80]!r})")
    return names


def _load_one(ckpt: Path, unverified_legacy: bool = False) -> tuple[dict, dict, dict]:
    if ckpt.is_symlink() or not ckpt.is_dir():
        raise ValueError(f"{ckpt}: missing or not a directory of this run")
    manifest = ckpt / MANIFEST
    legacy = unverified_legacy and not manifest.exists()
    if not legacy:
        _verify(ckpt, manifest)
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{ckpt / 'meta.json'}: unreadable ({files.first_line(err)})") from None
    # the zopro that wrote manifests also wrote 'metrics_sha256' (and later a config copy): such a checkpoint
    # without its manifest is a damaged one, never a legacy one
    if legacy and (not isinstance(meta, dict) or "metrics_sha256" in meta or (ckpt / CONFIG).exists()):
        raise ValueError(f"{manifest}: missing (its meta.json shows a zopro that writes manifests made it)")
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        try:
            tensors[f.stem] = load_file(str(f))
        except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
            raise ValueError(f"{f}: unreadable ({files.first_line(err)})") from None
    objects = {f.stem: files.safe_torch_load(f) for f in sorted(ckpt.glob("*.pt"))}
    return meta, tensors, objects


def _verify(ckpt: Path, manifest: Path) -> None:
    """Every file of ``ckpt`` listed in its manifest, none missing, each with its recorded SHA-256."""
    sums = files.manifest_sums(manifest)
    present = {f.name for f in ckpt.iterdir()} - {MANIFEST}
    if present != set(sums):
        extra, missing = sorted(present - set(sums)), sorted(set(sums) - present)
        what = f"unlisted file {ckpt / extra[0]}" if extra else f"missing file {ckpt / missing[0]}"
        raise ValueError(f"{ckpt}: damaged checkpoint ({what})")
    for fname, expected in sums.items():
        if (ckpt / fname).is_symlink() or files.sha256(ckpt / fname) != expected:
            raise ValueError(f"{ckpt / fname}: damaged (its SHA-256 does not match {manifest})")


def check_config(run_dir: Path, loaded: Loaded) -> None:
    """``run_dir``'s ``config.json`` must be byte for byte the copy its checkpoint ``loaded`` holds (the settings the
    run was made with; a checkpoint stores only part of them, so an edited field would change the run silently).
    ValueError naming the changed fields otherwise. Checkpoints written before they held a copy are not checked."""
    run_dir = Path(run_dir)
    kept = run_dir / loaded.name / CONFIG
    if not kept.is_file():
        return
    now = (run_dir / CONFIG).read_bytes()
    if now == kept.read_bytes():
        return
    try:
        old, new = json.loads(kept.read_bytes()), json.loads(now)
        changed = [f"{flag(k)} {new.get(k, '(none)')!r}, checkpoint: {old.get(k, '(none)')!r}"
                   for k in sorted(set(old) | set(new)) if k not in old or k not in new or old[k] != new[k]]
    except (ValueError, AttributeError):
        changed = []
    raise ValueError(f"{run_dir / CONFIG}: differs from the copy in checkpoint {loaded.name} "
                     f"({'; '.join(changed) or 'its bytes only'}); restore it: a run keeps the settings it began with")


def rewrite_config(run_dir: Path, text: str) -> None:
    """Give the run in ``run_dir`` other settings on purpose: ``text`` as its ``config.json`` and as the copy in each
    checkpoint ``LATEST`` names (each verified first, its manifest updated), so that a resume takes them as the run's
    own. For tools that fork a run (``benchmarks.zo_ablation``'s arms continue one shared iteration 0); a kill
    half way leaves a checkpoint that fails its check, never one that passes with the wrong settings."""
    run_dir = Path(run_dir)
    files.atomic_write_text(run_dir / CONFIG, text)
    for name in _read_pointer(run_dir / LATEST) if (run_dir / LATEST).exists() else ():
        ckpt = run_dir / name
        if not (ckpt / CONFIG).is_file():
            continue
        _verify(ckpt, ckpt / MANIFEST)
        sums = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["files"]
        files.atomic_write_text(ckpt / CONFIG, text)
        sums[CONFIG] = files.sha256(ckpt / CONFIG)
        files.atomic_write_text(ckpt / MANIFEST, json.dumps({"files": sums}, indent=1))


def load_finished(run_dir: Path, *, unverified_legacy: bool = False):
    """``(typed config, final checkpoint)`` of the finished run in ``run_dir``: the config checked as flags are, the
    checkpoint in phase 'done' (never an earlier one). ValueError naming the file otherwise."""
    config_path = Path(run_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{run_dir}: not a run directory (no config.json)")
    try:
        cfg = validate(TrainConfig(**load_saved(config_path)))
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    loaded = load(run_dir, fallback=False, unverified_legacy=unverified_legacy)
    if loaded is None or loaded.meta["phase"] != "done":
        raise ValueError(f"{run_dir}: not a finished run (no checkpoint in phase 'done')")
    check_config(run_dir, loaded)
    return cfg, loaded
