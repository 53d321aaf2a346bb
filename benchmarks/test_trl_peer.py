"""TRL's RLOOTrainer as an external peer (``benchmarks/trl_peer.py``), in a fresh process: step time and peak memory
of the default job's step under TRL. Skipped without ``trl`` (``pip install -e ".[trl]"``) or the offline SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks.common import DEVICE, RESULTS_DIR, environment


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the peer mirrors the CPU default job")
def test_trl_rloo_trainer_peer():
    from zopro.train.loading import find_smollm2_gguf

    try:
        find_smollm2_gguf()
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 GGUF not available: {err}")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.trl_peer", "--steps", "4"], check=True,
                          capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 4 and result["median_step_s"] > 0 and result["peak_mib"] > 0
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "trl_peer-cpu.json").write_text(json.dumps({**environment(), **result}, indent=1) + "\n")
