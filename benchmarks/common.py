"""What the benchmark scripts and the suite share: the device, the result-file folder, the environment record of a
measurement, the copy-bandwidth reference and the merging of result files. A library module (the pytest machinery is
``benchmarks/conftest.py``)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# history, not record: untracked by default (see the module docstring); the scripts' --results-dir defaults to it
RESULTS_DIR = Path(os.environ.get("ZOPRO_BENCH_HISTORY") or Path(__file__).with_name("results") / "history")

# ---------------------------------------------------------------------------------------------------------------------
# Device and environment
def device_name() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return models[0] if models else (platform.processor() or platform.machine())


def device_kind() -> str:
    """``cpu``, or the GPU name as a file-name slug."""
    if DEVICE.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def source_state() -> dict:
    """The commit measured, and whether the kernel layer had uncommitted edits (``None`` outside a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "zokernels")
    return {"commit": git("rev-parse", "--short", "HEAD"), "zokernels_dirty": None if status is None else bool(status)}


def environment() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(), "device_kind": device_kind(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "load_avg_at_start": _LOAD_AT_START, **source_state(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# Other jobs on a shared CPU stall the two-thread parallel loops by whole scheduler ticks (a 16 MB copy took 0.15 ms
# in one run on the 2-core machine, 8 ms in another beside a test run): the load average before the suite ran
# tells a reader which kind of run a table comes from.
_LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def copy_pass(nbytes: int, device) -> Callable[[], torch.Tensor]:
    """The copy-bandwidth reference: ``dst.copy_(src)`` over ``nbytes`` (read ``nbytes``, write ``nbytes``)."""
    src = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


_KEY_FIELDS = ("kind", "list", "op", "device", "torch", "triton", "python", "commit", "zokernels_dirty")


def merge_json(path: Path, new: list[dict]) -> list[dict]:
    """Earlier records plus ``new``; a new record replaces an earlier one of the same configuration, versions,
    commit and cleanliness, so the file keeps the latest run of each source state to compare across commits."""
    old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    keys = {tuple(r.get(k) for k in _KEY_FIELDS) for r in new}
    merged = [r for r in old if tuple(r.get(k) for k in _KEY_FIELDS) not in keys] + new
    path.write_text(json.dumps(merged, indent=1) + "\n", encoding="utf-8")
    return merged
