"""Safe files: every output of a run is written atomically (a temporary name, fsynced, renamed into place) and
carries its SHA-256, and every file is read safely: tensors with safetensors, other objects with
``torch.load(weights_only=True)``, which refuses any pickle that would run code. A damaged file raises a one-line
``ValueError`` naming it; a full disk or read-only mount is reported in one line naming the file
(:func:`disk_error`). The checkpoints (:mod:`zopro.train.checkpoint`), snapshots and exports are built on these.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MANIFEST = "manifest.json"



# ---------------------------------------------------------------------------------------------------------------------
# Atomic writes: every output file of a run is published by one of these (tests count them to simulate kills)
def publish(tmp: Path, final: Path) -> None:
    """Rename a complete, fsynced ``tmp`` over ``final`` and fsync the directory, so the rename survives a crash."""
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_file(path: Path, write) -> None:
    """``write(tmp)`` to ``path.tmp``, fsync it, then publish it as ``path``: every file's tmp-then-replace write. A
    write that fails (a full disk) removes its ``tmp``, and ``path`` stays as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync_file(tmp)
        publish(tmp, path)
    except Exception:
        tmp.unlink(missing_ok=True)
        raise


# The file-system errors a run reports in one line (exit 3) instead of a traceback: the run directory stays as its
# last complete write left it, so a --resume once the cause is fixed continues exactly
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def disk_error(err: OSError, where) -> str | None:
    """``"<file>: <reason>"`` for a file-system error of :data:`DISK_ERRORS` (``where`` when the error names no
    file); None for any other error."""
    why = DISK_ERRORS.get(err.errno)
    return None if why is None else f"{err.filename or where}: {why}"


@contextlib.contextmanager
def naming(path: Path):
    """Give an OSError raised inside the file name ``path`` when it has none (``write`` and ``fsync`` name none)."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
        raise


@contextlib.contextmanager
def _safetensors_io(path: Path):
    """safetensors' I/O failures inside, raised as the ``OSError`` they are: safetensors reports a full disk as
    ``SafetensorError("... (os error 28)")``, which no ``except OSError`` sees."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


@contextlib.contextmanager
def scratch_folder(path: Path):
    """A fresh scratch folder at ``path`` for a writer that fills it (``save_pretrained``), removed again when the
    writing fails; safetensors' I/O failures come out as OSErrors (:func:`_safetensors_io`)."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    try:
        with _safetensors_io(path):
            yield path
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise


def save_tensors_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file``, a full disk raised as an OSError naming ``path``."""
    with _safetensors_io(path):
        save_file(tensors, str(path), metadata=metadata)


def atomic_write_text(path: Path, text: str) -> None:
    with naming(path):
        atomic_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` as a safetensors file at ``path`` (on the CPU, contiguous; ``metadata`` in its header, with the
    SHA-256 of both under ``DIGEST_KEY``: :func:`load_tensors` checks it), published atomically."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), DIGEST_KEY: _tensors_digest(cpu, metadata or {})}
    with naming(path):
        atomic_file(path, lambda tmp: save_tensors_file(cpu, tmp, metadata=metadata))


def atomic_torch_save(path: Path, obj) -> None:
    """``torch.save(obj)`` at ``path``, published atomically; ``obj`` must load with ``weights_only=True``. Then its
    SHA-256 in ``<path>.sha256`` (``sha256sum -c`` reads it; :func:`torch_load` checks it)."""
    path = Path(path)
    with naming(path):
        atomic_file(path, lambda tmp: torch.save(obj, tmp))
    atomic_write_text(_sidecar(path), f"{sha256(path)}  {path.name}\n")


def atomic_publish_dir(tmp: Path, final: Path) -> None:
    """Publish ``tmp``, a directory the caller has filled completely, as ``final``, replacing an earlier ``final``.

    A ``manifest.json`` of its files' SHA-256 sums is added (:func:`verify_folder` checks it), its files are
    fsynced, the earlier ``final`` is renamed aside, ``tmp`` is renamed into place, then the earlier one is removed.
    A kill at any moment leaves ``final`` complete (old or new) or, between the two renames, absent (the caller
    rewrites it on resume), never half written; the next call removes a stray aside folder."""
    tmp, final = Path(tmp), Path(final)
    aside = final.with_name(f".{final.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    with naming(final):
        write_folder_manifest(tmp)
        fsync_tree(tmp)
        if final.exists():
            os.replace(final, aside)
        publish(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder`` (before a rename publishes it)."""
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            fsync_file(f)


def safe_torch_load(path: Path):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only, never code."""
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle's protocol before refusing it
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 (pickle, zip and torch errors alike: the file is unusable)
        raise ValueError(f"{path}: not a safe torch file (refused to load: {first_line(err)})") from None


def first_line(err: BaseException) -> str:
    """``"<error type>: <first sentence of its message>"``: an error in one line."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text.split('. ')[0]}"  # torch's messages run on for several sentences


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_prefix(path: Path, n_bytes: int) -> str:
    """SHA-256 of the first ``n_bytes`` of ``path`` (all of them if it is shorter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while n_bytes > 0:
            block = f.read(min(n_bytes, 1 << 20))
            if not block:
                break
            digest.update(block)
            n_bytes -= len(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Output checksums: every output file is written with its SHA-256 (safetensors files in their own header, other
# files in a "<name>.sha256" beside them, a published folder in its manifest.json), and the tools that read a run's
# outputs check it. A run whose checkpoints show it was made before outputs carried sums is read unchecked.
DIGEST_KEY = "zopro_sha256"


def _tensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 of a safetensors file's contents: its metadata, then each tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(sorted(metadata.items())).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_tensors(path: Path, *, unchecked_legacy: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file written by :func:`atomic_save_tensors`, its SHA-256 checked.
    ValueError naming the file when it is unreadable, damaged, or carries no sum (unless ``unchecked_legacy``: a
    file of a run made before outputs carried sums)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no mapping)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise ValueError(f"{path}: unreadable ({first_line(err)})") from None
    expected = metadata.pop(DIGEST_KEY, None)
    if expected is None and not unchecked_legacy:
        raise ValueError(f"{path}: carries no checksum ('{DIGEST_KEY}' missing from its header; this run's zopro "
                         "writes one)")
    if expected is not None and _tensors_digest(tensors, metadata) != expected:
        raise ValueError(f"{path}: damaged (its contents do not match the SHA-256 in its header)")
    return tensors, metadata


def _sidecar(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".sha256")


def torch_load(path: Path, *, unchecked_legacy: bool = False):
    """:func:`safe_torch_load` of a file written by :func:`atomic_torch_save`, its ``.sha256`` checked first."""
    path, sidecar = Path(path), _sidecar(path)
    if sidecar.is_file() or not unchecked_legacy:
        try:
            expected = sidecar.read_text(encoding="utf-8").split()[0]
        except (OSError, UnicodeDecodeError, IndexError) as err:
            raise ValueError(f"{sidecar}: missing or damaged ({first_line(err)})") from None
        if not path.is_file() or sha256(path) != expected:
            raise ValueError(f"{path}: damaged or missing (its SHA-256 does not match {sidecar})")
    return safe_torch_load(path)


def write_folder_manifest(folder: Path) -> None:
    """``folder/manifest.json``: the SHA-256 of every file below ``folder`` (paths relative to it)."""
    folder = Path(folder)
    sums = {f.relative_to(folder).as_posix(): sha256(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": sums}, indent=1), encoding="utf-8")


def verify_folder(folder: Path, *, unchecked_legacy: bool = False) -> None:
    """Every file below ``folder`` listed in its ``manifest.json`` with its SHA-256, none missing, none added;
    ValueError naming the first that is not (a folder without a manifest passes only with ``unchecked_legacy``)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if unchecked_legacy and not manifest.exists():
        return
    sums = manifest_sums(manifest)
    present = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if not f.is_dir()} - {MANIFEST}
    if present != set(sums):
        extra, missing = sorted(present - set(sums)), sorted(set(sums) - present)
        raise ValueError(f"{folder / (extra or missing)[0]}: {'not listed in' if extra else 'missing, but listed in'} "
                         f"{manifest}")
    for name, expected in sorted(sums.items()):
        if (folder / name).is_symlink() or sha256(folder / name) != expected:
            raise ValueError(f"{folder / name}: damaged (its SHA-256 does not match {manifest})")


def manifest_sums(manifest: Path) -> dict:
    """The ``files`` mapping (name -> SHA-256) of a manifest; one-line ValueError naming it when it is unreadable."""
    try:
        sums = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if not isinstance(sums, dict):
            raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest}: missing or damaged ({first_line(err)})") from None
    return sums
