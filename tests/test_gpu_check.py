"""``algm-viz gpu-check`` end to end on the CPU (the same code a GPU runs), and its failure on a mismatch."""

from __future__ import annotations

import json

import pytest

from algm_viz.cli import gpu_check
from algm_viz.cli import main


@pytest.mark.slow
def test_gpu_check_on_the_cpu_writes_json_and_table(tmp_path):
    out = tmp_path / "check"
    code = main(["gpu-check", "--device", "cpu", "--skip-tests", "--skip-app", "--backbones", "vit_tiny_patch16_384",
                 "--batches", "1", "2", "--dtypes", "fp32", "--size", "64", "--repeats", "1", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert {row["method"] for row in report["devices"]} >= {"algm", "tome", "cts"}
    assert all(row["ok"] and row["max_logit_difference"] == 0.0 for row in report["devices"])
    algm = [row for row in report["bench"] if row["method"] == "algm"]
    assert [row["batch"] for row in algm] == [1, 2] and all(row["gflops_ratio"] > 0 for row in algm)
    table = (out / "gpu_check.md").read_text()
    assert "| vit_tiny_patch16_384 | 2 | fp32 |" in table and "| cts | True |" in table


def test_gpu_check_fails_loudly_on_a_device_mismatch(tmp_path, monkeypatch):
    row = {"method": "algm", "value": 0.9, "cpu_tokens": {"local": [5]}, "device_tokens": {"local": [6]},
           "max_logit_difference": 0.5, "pixel_agreement": 0.9, "ok": False}
    monkeypatch.setattr(gpu_check, "compare_devices", lambda *a, **k: [row])
    monkeypatch.setattr(gpu_check, "bench_grid", lambda *a, **k: [])
    code = main(["gpu-check", "--device", "cpu", "--skip-tests", "--skip-app", "--out", str(tmp_path)])
    assert code == 2
    assert "| algm | False |" in (tmp_path / "gpu_check.md").read_text()
