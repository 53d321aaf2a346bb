"""The kernels compile for real NVIDIA targets (sm_80, sm_90) on this CPU-only machine, without spills and without
fused multiply-adds where the reference rounds twice.

The interpreter (which runs every other Triton test here) accepts code the compiler rejects: a plain module global
read inside @triton.jit once made every LowRank guide fail to compile. So a representative subset of the variants the
launchers produce (``benchmarks.aot --ci``: each kernel, aligned and unaligned, stochastic rounding, rank-64 LowRank,
int8, nested NF4) is compiled here in a subprocess without TRITON_INTERPRET, from launches captured at the real
launch sites. The full matrix is ``python -m benchmarks.aot``, with SASS statistics ``python -m benchmarks.sass``.
Measured: 65 s wall (37 s CPU) on the 2-core CI machine shared with other jobs (load average 6.5), cold cache.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(ok  |FAIL) sm_(\d+) (\w+)\s+(.+?)\s+(?:regs=|\w+Error|\w+Exception)", re.M)


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    from triton.backends.nvidia import compiler as nvc

    if not Path(nvc.get_ptxas(90).path).exists():
        pytest.skip("this triton wheel ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))  # a cold compile, as CI sees it
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--ci", "--cc", "80,90"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def test_ci_subset_compiles_without_spills_or_fused_roundings(aot_run):
    assert aot_run.returncode == 0, aot_run.stdout + aot_run.stderr


def test_ci_subset_covers_every_kernel_on_both_targets(aot_run):
    from benchmarks import aot

    rows = LINE.findall(aot_run.stdout)
    for cc in ("80", "90"):
        compiled = {kernel for _, c, kernel, _ in rows if c == cc}
        assert compiled == set(aot.kernels()), (cc, aot_run.stdout)
    expected = {name for name, ci, _, _ in aot.variants() if ci}
    assert {variant for _, _, _, variant in rows} == expected, aot_run.stdout
