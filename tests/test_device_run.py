"""The prepared device script (`benchmarks/device_run.py`): it refuses clearly without CUDA, and its code runs on the
CPU in a tiny configuration, writing the files the dry run reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sweeps.estimate import step_cost
from sweeps.measurements import TRIAL_RATIO_KEY, load_measurements

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_exits_2_with_a_message():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "device_run.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert "device_run: no CUDA device is visible" in result.stderr and "--device cpu --out-dir" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_the_cpu_path_writes_what_the_dry_run_reads(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import device_run

    assert device_run.main(["--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp_step-cpu.json", "trial_step-cpu.json"]
    records = json.loads((tmp_path / "trial_step-cpu.json").read_text())["records"]
    assert sorted(r["precision"] for r in records) == ["bf16", "fp32"]  # this version has speed.precision
    (record,) = [r for r in records if r["precision"] == "fp32"]
    assert (record["model"], record["image_size"], record["mode"], record["precision"]) == (
        "test_convnext",
        32,
        "bk",
        "fp32",
    )
    assert record[TRIAL_RATIO_KEY] == record["trial_step_s"] / record["benchmark_step_s"] > 0
    assert len(record["trial_step_s_epochs"]) == 2 and record["trial_step_s"] == record["trial_step_s_epochs"][1]
    assert record["epsilon_spent"] <= 8.0 and record["model_device"] == "cpu" and record["peak_memory_mib"] is None
    measured = load_measurements("cpu", tmp_path)
    assert {s.mode for s in measured.steps} == {"nonprivate", "bk"}
    cost = step_cost(measured, "test_convnext", 32, "bk")
    bench = measured.benchmark_step("test_convnext", 32, "bk")
    assert cost.ratio is not None and cost.seconds_per_image == pytest.approx(
        bench.seconds_per_image * cost.ratio.ratio
    )


def _dies(queue) -> None:
    raise SystemExit(7)


def test_a_benchmark_worker_that_dies_fails_the_run_instead_of_hanging_it(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_trial_step

    with pytest.raises(RuntimeError, match=r"benchmark worker _dies died \(exit code 7\) without a result"):
        bench_trial_step.in_fresh_process(_dies, ())
