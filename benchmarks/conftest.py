"""Shared machinery of the benchmark suite: device, timing, the copy-bandwidth reference, and the result files.

Run with ``python -m pytest benchmarks/``. Every measured configuration becomes one JSON record in
``<history>/<suite>-<device-kind>.json`` (merged with earlier runs) and a row of the markdown tables in
``<history>/<suite>-<device-kind>.md``, both written at the end of the session. ``<suite>`` is the test module's name
without ``test_``; ``<device-kind>`` is ``cpu`` or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``), so runs on
different cards never overwrite each other.

``<history>`` (``RESULTS_DIR``) is ``$ZOPRO_BENCH_HISTORY`` or, by default, ``benchmarks/results/history/``, which
git ignores: a benchmark run leaves ``git status`` clean. The curated tables live in ``benchmarks/RESULTS.md`` (with
the figures it cites, copied from the history into ``benchmarks/results/`` on purpose).

Timing. CPU: pytest-benchmark's own timer (``time.perf_counter``), median of ``CPU_ROUNDS`` rounds after
``CPU_WARMUP``. CUDA: what ``triton.testing.do_bench`` does, written out so that it reads the same on every Triton
version: warm up, synchronize, then time each call between two CUDA events with calls queued back to back, median.
Host-side launch cost is hidden only where the GPU work is longer, which is what a training loop sees. No L2 flush:
every CUDA list is at least 172 MB, over three times the H100's 50 MB L2, so a pass cannot find last pass's data
there. (pytest-benchmark still times CUDA runs, one synchronize per round, for its own terminal table; the figures
in the result files are the CUDA-event medians.)

Figures. Every pass reads and writes each weight once, so its GB/s counts ``2 * bytes of the list`` (the MeZO
baseline moves more, a temporary ``z``; its GB/s is the same effective figure). The copy reference is
``dst.copy_(src)`` between two flat buffers of the list's byte size, measured in the same run: the device's
achievable read+write bandwidth, against which each pass is reported as a fraction.
"""

from __future__ import annotations

import os
import statistics
import sys

import pytest
import torch

# The benchmarks time compiled kernels. tests/conftest.py turns the Triton interpreter on for CPU-only machines; it
# is irrelevant to the CPU path here (impl="auto" runs the torch reference), but on a GPU machine kernels defined
# under it would run interpreted. triton.jit reads the variable when a kernel is defined, so dropping it works only
# if zokernels is not imported yet (run `pytest benchmarks/` on its own).
_INTERPRETER_ON = os.environ.pop("TRITON_INTERPRET", "0") == "1"
_KERNELS_INTERPRETED = _INTERPRETER_ON and "zokernels" in sys.modules

from benchmarks import shapes  # noqa: E402
from benchmarks.common import (  # noqa: E402,F401 (the suite's fixtures and result files use them)
    DEVICE,
    RESULTS_DIR,
    copy_pass,
    device_kind,
    device_name,
    environment,
    merge_json,
)

# CPU: on a quiet 2-core machine the slowest pass (perturb2_ Gaussian over the 4 M list) measured 51 ms at commit
# b7a66ae and the whole suite 2.5 s with 10 rounds (4.3 s with 20), medians within 7 % of minima. Beside other
# engineers' test runs, 10-round runs took 32 s and 137 s: 5 rounds halve that exposure.
CPU_ROUNDS, CPU_WARMUP = 5, 1
# CUDA: the slowest configuration, MeZO over 1.24 B bf16, moves ~10 GB a pass (weights read and written, z written
# and read): milliseconds at HBM bandwidth, so 55 timed calls stay near a second. The first warm-up call compiles.
CUDA_REPS, CUDA_WARMUP = 50, 5
# pytest-benchmark's own rounds on CUDA (each ends in a synchronize); they are also the first warm-up.
CUDA_PYTEST_ROUNDS = 5


def pytest_configure(config):
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)  # the suites' own writers create only the last level


def pytest_generate_tests(metafunc):
    """A test that takes ``tensor_list`` runs once per list of this device (module-scoped: built once each)."""
    if "tensor_list" in metafunc.fixturenames:
        lists = shapes.LISTS[DEVICE.type]
        metafunc.parametrize("tensor_list", lists, ids=[tl.name for tl in lists], scope="module")


@pytest.fixture(scope="session")
def device() -> torch.device:
    if DEVICE.type == "cuda" and _KERNELS_INTERPRETED:
        pytest.skip("zokernels was imported with TRITON_INTERPRET=1: run `pytest benchmarks/` on its own")
    return DEVICE


@pytest.fixture(scope="module")
def weights(tensor_list, device) -> list[torch.Tensor]:
    return tensor_list.build(device)


# ---------------------------------------------------------------------------------------------------------------------
# Timing
def cuda_event_seconds(fn, warmup: int = CUDA_WARMUP, reps: int = CUDA_REPS) -> tuple[float, float]:
    """Median and minimum seconds of one ``fn()`` by CUDA events, calls queued back to back (``do_bench``
    semantics)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    ms = [start.elapsed_time(end) for start, end in events]
    return statistics.median(ms) / 1e3, min(ms) / 1e3


def cuda_peak_extra_bytes(fn) -> int:
    """Memory ``fn()`` allocates beyond what is already allocated, at its peak (temporaries, launch tables)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


@pytest.fixture
def measure(request):
    """``measure(fn)`` -> ``{"seconds", "min_seconds", "rounds", "timer", "peak_extra_bytes"}`` for one call of
    ``fn``, or ``None`` when pytest-benchmark is disabled (``--benchmark-disable``).

    On CUDA pytest-benchmark is optional (the figures come from CUDA events): a GPU machine without the plugin
    still measures. On CPU it is the timer, so the test is skipped without it.
    """
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        benchmark = None

    def run(fn):
        if DEVICE.type == "cpu":
            if benchmark is None:
                pytest.skip("pytest-benchmark is not installed: it is the CPU timer")
            benchmark.pedantic(fn, rounds=CPU_ROUNDS, warmup_rounds=CPU_WARMUP)
            if benchmark.stats is None:
                return None
            return {"seconds": benchmark.stats.stats.median, "min_seconds": benchmark.stats.stats.min,
                    "rounds": CPU_ROUNDS, "timer": "pytest-benchmark perf_counter, median", "peak_extra_bytes": None}

        def synced():
            fn()
            torch.cuda.synchronize()

        if benchmark is None:
            synced()  # warm-up: Triton compiles, launch tables are built and cached
        else:
            benchmark.pedantic(synced, rounds=CUDA_PYTEST_ROUNDS, warmup_rounds=1)
            if benchmark.stats is None:
                return None
        peak = cuda_peak_extra_bytes(fn)
        seconds, min_seconds = cuda_event_seconds(fn)
        if benchmark is not None:
            benchmark.extra_info.update(cuda_event_median_s=seconds, peak_extra_bytes=peak)
        return {"seconds": seconds, "min_seconds": min_seconds, "rounds": CUDA_REPS,
                "timer": "CUDA events, back to back, median", "peak_extra_bytes": peak}

    return run


# ---------------------------------------------------------------------------------------------------------------------
# Records: collected during the session, derived figures and files written at its end
_RECORDS: list[dict] = []


@pytest.fixture
def record(request):
    """``record(tensor_list, op, timing, **extra)`` keeps one measured configuration for the result files."""
    suite = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")

    def add(tensor_list: shapes.TensorList, op: str, timing: dict | None, **extra) -> None:
        if timing is None:
            return
        _RECORDS.append({"suite": suite, "kind": "pass", "list": tensor_list.name,
                         "dtype": str(tensor_list.dtype).removeprefix("torch."), "tensors": len(tensor_list.shapes),
                         "elements": tensor_list.numel, "bytes_moved": 2 * tensor_list.nbytes, "op": op,
                         **timing, **extra})

    return add


def derive(records: list[dict]) -> list[dict]:
    """Add GB/s, fraction of copy bandwidth and speed-up vs MeZO (same run, same list) to pass records, and append
    one SPSA-step record per (list, distribution): MeZO spends 4 passes a step; ours 3 (two ``perturb_`` and one
    ``perturb2_``) or, back to back, 2 (one of each)."""
    by_list: dict = {}
    for r in records:
        by_list.setdefault((r["suite"], r["list"]), {})[r["op"]] = r
    steps = []
    for (suite, name), ops in by_list.items():
        copy, mezo = ops.get("copy"), ops.get("mezo")
        for r in ops.values():
            r["gbps"] = r["bytes_moved"] / r["seconds"] / 1e9
            # bandwidth over the bytes this op must move, as a fraction of the copy's (same bytes for one pass)
            r["copy_fraction"] = (r["gbps"] / (copy["bytes_moved"] / copy["seconds"] / 1e9)) if copy else None
            r["speedup_vs_mezo"] = mezo["seconds"] / r["seconds"] if mezo and r is not copy else None
        for dist in ("gaussian", "rademacher"):
            one, two = ops.get(f"perturb_/{dist}"), ops.get(f"perturb2_/{dist}")
            if not (mezo and one and two):
                continue
            mezo_step = 4 * mezo["seconds"]
            three_pass = 2 * one["seconds"] + two["seconds"]
            two_pass = one["seconds"] + two["seconds"]
            steps.append({"suite": suite, "kind": "step", "list": name, "dtype": mezo["dtype"], "op": f"step/{dist}",
                          "mezo_step_seconds": mezo_step, "three_pass_seconds": three_pass,
                          "two_pass_seconds": two_pass, "speedup_three_pass": mezo_step / three_pass,
                          "speedup_two_pass": mezo_step / two_pass})
    return records + steps


def _fmt(x, spec: str, scale: float = 1.0) -> str:
    return "–" if x is None else format(x * scale, spec)


def markdown(suite: str, records: list[dict]) -> str:
    """One section per run (newest first): a table of passes and one of SPSA steps."""
    runs: dict = {}
    for r in records:
        runs.setdefault((r["date"], r["device"], r["torch"], r["triton"], r["python"]), []).append(r)
    lines = [f"# `{suite}` benchmarks: {records[0]['device_kind']}", "",
             "Written by `pytest benchmarks/` (see `benchmarks/conftest.py`). GB/s counts each weight read and "
             "written once; % of copy is against `dst.copy_(src)` over the same bytes in the same run; × MeZO is "
             "the MeZO-style baseline's time over this one (`benchmarks/baselines.py`).", ""]
    for (date, device, torch_v, triton_v, python_v), rs in sorted(runs.items(), reverse=True):
        threads = f" ({rs[0]['cpu_threads']} threads)" if rs[0]["device_kind"] == "cpu" else ""
        timers = ", ".join(sorted({r["timer"] for r in rs if r["kind"] == "pass"}))
        load = rs[0].get("load_avg_at_start")
        load = f"; 1-minute load average at start {load:.2f}" if load is not None else ""
        commit = rs[0].get("commit") or "unknown commit"
        commit += " with uncommitted zokernels edits" if rs[0].get("zokernels_dirty") else ""
        lines += [f"## {date}: {device}{threads}", "",
                  f"{commit}; torch {torch_v}, triton {triton_v}, python {python_v}; timer: {timers}{load}.", "",
                  "| list | op | impl | ms | min ms | GB/s | % of copy | × MeZO | peak extra MiB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rs if r["kind"] == "pass"):
            lines.append(f"| {r['list']} | {r['op']} | {r.get('impl', '–')} | {_fmt(r['seconds'], '.3f', 1e3)} "
                         f"| {_fmt(r.get('min_seconds'), '.3f', 1e3)} | {_fmt(r['gbps'], '.3g')} "
                         f"| {_fmt(r['copy_fraction'], '.1f', 100)} | {_fmt(r['speedup_vs_mezo'], '.2f')} "
                         f"| {_fmt(r['peak_extra_bytes'], '.1f', 2**-20)} |")
        step_rows = [r for r in rs if r["kind"] == "step"]
        if step_rows:
            lines += ["", "| list | noise | MeZO ms / step (4 passes) | ours 3 passes | × | ours 2 passes | × |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for r in step_rows:
                lines.append(f"| {r['list']} | {r['op'].split('/')[1]} | {r['mezo_step_seconds'] * 1e3:.3f} "
                             f"| {r['three_pass_seconds'] * 1e3:.3f} | {r['speedup_three_pass']:.2f} "
                             f"| {r['two_pass_seconds'] * 1e3:.3f} | {r['speedup_two_pass']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def pytest_sessionfinish(session, exitstatus):
    if not _RECORDS:
        return
    env = environment()
    records = [{**env, **r} for r in derive(_RECORDS)]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for suite in sorted({r["suite"] for r in records}):
        stem = RESULTS_DIR / f"{suite}-{env['device_kind']}"
        merged = merge_json(stem.with_suffix(".json"), [r for r in records if r["suite"] == suite])
        stem.with_suffix(".md").write_text(markdown(suite, merged), encoding="utf-8")
