"""Atomic run checkpoints: a crash or kill at any moment leaves the previous checkpoint or the new one, never a mix.

A checkpoint is a directory of files written under a temporary name, fsynced, renamed into place, and then
published by atomically replacing the ``LATEST`` pointer file. Older checkpoint directories are removed only after
the pointer moved.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, name: str, *, tensors: dict[str, dict[str, torch.Tensor]], objects: dict[str, object],
         meta: dict) -> Path:
    """Write checkpoint ``name``: each ``tensors`` entry as safetensors, each ``objects`` entry with torch.save,
    ``meta`` as JSON; then point ``LATEST`` at it and drop older checkpoints."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{name}"
    tmp = run_dir / f".ckpt-{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for key, group in tensors.items():
        save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{key}.safetensors"))
    for key, obj in objects.items():
        torch.save(obj, tmp / f"{key}.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    for f in tmp.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(run_dir / "LATEST", final.name)
    for old in run_dir.glob("ckpt-*"):
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(run_dir: Path) -> tuple[dict, dict, dict] | None:
    """``(meta, tensors, objects)`` of the latest checkpoint, or None if the run has none."""
    pointer = Path(run_dir) / "LATEST"
    if not pointer.is_file():
        return None
    ckpt = Path(run_dir) / pointer.read_text(encoding="utf-8").strip()
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    tensors = {f.stem: load_file(str(f)) for f in ckpt.glob("*.safetensors")}
    objects = {f.stem: torch.load(f, weights_only=False) for f in ckpt.glob("*.pt")}
    return meta, tensors, objects
