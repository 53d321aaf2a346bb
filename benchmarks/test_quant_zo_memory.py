"""issue 16's memory comparison at a tiny shape: every arm builds, steps once and reports its figures; the quantised
arms hold fewer weight bytes than the float ones (the full shape: ``python -m benchmarks.quant_zo_memory``)."""

import json

import pytest

pytest.importorskip("bitsandbytes", reason="the quantised arms need bitsandbytes")

from benchmarks import quant_zo_memory  # noqa: E402


def test_every_arm_reports_and_quantised_weights_are_smaller(tmp_path):
    table = quant_zo_memory.main(["--shape", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16",
                                  "--results-dir", str(tmp_path)])
    rows = {r["arm"]: r for r in table["results"]}
    assert set(rows) == set(quant_zo_memory.ARMS)
    for r in rows.values():
        assert r["weight_bytes"] > 0 and r["peak_step"] >= 0 and r["step_seconds"] > 0
    w = {a: r["weight_bytes"] for a, r in rows.items()}
    assert w["nf4-codes"] < w["int8-codes"] < w["fp32+lora"] and w["bf16+lora"] < w["fp32+lora"]
    assert rows["int8-codes"]["saturated"] is not None and rows["fp32+lora"]["saturated"] is None
    saved = json.loads((tmp_path / "quant_zo_memory-cpu-tiny.json").read_text())
    assert saved["results"] == table["results"]
    assert "| nf4-codes |" in (tmp_path / "quant_zo_memory-cpu-tiny.md").read_text()
