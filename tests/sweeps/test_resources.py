"""Trials per accelerator and GPU-hours from measurements: `resources.gpu` validation, the committed measurement
files the dry run reads (`sweeps.measurements`, `sweeps.estimate`), and two trials sharing one (declared) GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps.estimate import describe_gpu_hours, describe_trials_per_gpu, fit_share, step_cost, trial_gpu_seconds
from sweeps.measurements import RESULTS_DIR, load_measurements
from sweeps.spec import SpecError, parse_spec
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.refusals import paper_dry_run_status
from tests.sweeps.tiny import tiny_spec, tiny_yaml
from trainables import names as M

ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------
# resources.gpu


@pytest.mark.parametrize("gpu", [0, 0.25, 0.5, 0.3333, 1, 2, 8])
def test_gpu_shares_and_whole_gpus_are_accepted(gpu):
    assert parse_spec(tiny_spec(resources={"gpu": gpu}), source="tiny.yaml").resources.gpu == gpu


@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        (-0.5, r"resources\.gpu = -0\.5 must be a finite number >= 0; give 0 for CPU trials, a share"),
        (math.inf, r"resources\.gpu = inf must be a finite number >= 0"),
        (math.nan, r"resources\.gpu = nan must be a finite number >= 0"),
        (1.5, r"resources\.gpu = 1\.5: more than one GPU per trial must be a whole number .* such as 0\.5 or 0\.25"),
        (1 / 3, r"resources\.gpu = 0\.333333.* has more than 4 decimals, which Ray rounds; give 0\.3333"),
        ("half", r"`resources\.gpu` = 'half' is not a valid float"),
    ],
)
def test_bad_gpu_shares_name_field_value_and_fix(gpu, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(tiny_spec(resources={"gpu": gpu}), source="tiny.yaml")


@pytest.mark.parametrize("trials", range(1, 65))
def test_the_advised_share_packs_exactly_that_many_trials(trials):
    share = fit_share(trials)
    steps = round(share * 10_000)  # Ray's fixed point: 0.0001 units
    assert share == steps / 10_000 and trials * steps <= 10_000 < (trials + 1) * steps


# ----------------------------------------------------------------------------------------------------
# Measurements and the estimate (hand-made files, known numbers)


def write_results(folder: Path, with_trials: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    steps = [  # bench_dp_step.py's layout: 0.01 s per image (bk), 0.004 (nonprivate), at 224 px
        {"model": "convnext_small", "image_size": 224, "device": "cuda", "mode": "bk", "batch": 32, "step_s": 0.32},
        {
            "model": "convnext_small",
            "image_size": 224,
            "device": "cuda",
            "mode": "nonprivate",
            "batch": 32,
            "step_s": 0.128,
        },
        {"model": "convnext_small", "image_size": 128, "device": "cuda", "mode": "bk", "batch": 32, "step_s": 0.16},
    ]
    (folder / "dp_step-cuda-x.json").write_text(json.dumps({"machine": {"gpu": "Fake GPU X"}, "records": steps}))
    if with_trials:
        trial = {
            "model": "convnext_small",
            "image_size": 224,
            "mode": "bk",
            "precision": "fp32",
            "expected_batch_size": 32,
            "physical_batch": 64,
            "trial_step_s": 0.4,
            "benchmark_step_s": 0.32,
            "trial_step_over_benchmark_step": 1.25,
            "peak_memory_mib": 10_000.0,
        }
        machine = {"gpu": "Fake GPU X", "gpu_memory_mib": 143_771.0}
        (folder / "trial_step-cuda-x.json").write_text(json.dumps({"machine": machine, "records": [trial]}))
    return folder


def test_step_cost_is_the_benchmark_times_the_ratio_measured_like_with_like(tmp_path):
    measured = load_measurements("cuda-x", write_results(tmp_path))
    own = step_cost(measured, "convnext_small", 224, "bk")
    assert own.seconds_per_image == pytest.approx(0.01 * 1.25) and own.ratio.ratio == 1.25
    assert own.basis == "bk, x1.25 real-trial ratio"
    # measured at 128 px: its own benchmark there, and the 224 px ratio does not apply (not like with like)
    small = step_cost(measured, "convnext_small", 128, "bk")
    assert small.seconds_per_image == pytest.approx(0.005) and small.ratio is None
    assert small.basis == "bk, benchmark step only"
    # a sibling at the same size, by GFLOPs, with the sibling's ratio
    tiny = step_cost(measured, "convnext_tiny", 224, "bk")
    assert tiny.seconds_per_image == pytest.approx(0.0125 * 4.47 / 8.71) and "as convnext_small x GFLOPs" in tiny.basis
    # an unmeasured size: the nearest measured one scaled by pixel area
    assert step_cost(measured, "convnext_small", 256, "bk").seconds_per_image == pytest.approx(
        0.0125 * (256 / 224) ** 2
    )
    assert step_cost(measured, "convnext_small", 224, "hooks") is None
    assert step_cost(measured, "resnet50", 224, "bk") is None


def test_trial_seconds_add_evaluation_at_the_benchmarks_forward_cost(tmp_path):
    measured = load_measurements("cuda-x", write_results(tmp_path))
    seconds, basis = trial_gpu_seconds(measured, "convnext_small", 224, "bk", 1000, 32, 100, 2, private=True)
    forward = 2 * 1000 * 0.4 * 0.004 / 3  # epochs x N x eval images per train image x s/image x forward fraction
    assert seconds == pytest.approx(100 * 32 * 0.0125 + forward) and basis == "bk, x1.25 real-trial ratio"


def test_gpu_hours_cite_the_files_or_say_the_benchmark_step_is_alone(tmp_path):
    with_ratio = load_measurements("cuda-x", write_results(tmp_path / "a"))
    text = describe_gpu_hours(7200.0, [], {"convnext_small: bk, x1.25 real-trial ratio"}, with_ratio)
    assert text.startswith("GPU-hours estimate (one Fake GPU X per trial): 2 h, from the fixed-shape DP-step benchmark")
    assert (
        f"{tmp_path / 'a' / 'dp_step-cuda-x.json'}" in text and f"{tmp_path / 'a' / 'trial_step-cuda-x.json'}" in text
    )
    alone = load_measurements("cuda-x", write_results(tmp_path / "b", with_trials=False))
    text = describe_gpu_hours(7200.0, [], set(), alone)
    assert (
        "no real-trial measurement on this device" in text and "benchmark step alone, with no overhead factor" in text
    )
    assert "x1." not in text and "2.5" not in text
    nothing = load_measurements("cuda-x", tmp_path / "empty")
    assert "GPU-hours estimate: none (no DP-step benchmark for cuda-x" in describe_gpu_hours(0.0, [], set(), nothing)


def test_trials_per_gpu_come_from_a_measured_peak_or_are_said_to_be_unmeasured(tmp_path):
    measured = load_measurements("cuda-x", write_results(tmp_path))
    fits, unmeasured = describe_trials_per_gpu(
        measured, {("convnext_small", 224, "bk", 64, "fp32"), ("convnext_small", 224, "bk", 32, "fp32")}
    )
    assert "physical batch 32: no measured per-trial peak memory in" in fits + unmeasured
    line = unmeasured if "physical batch 64" in unmeasured else fits
    assert (
        "convnext_small 224 px bk fp32, physical batch 64: 14 by memory (peak 10,000 MiB per trial of 143,771" in line
    )
    assert line.endswith("resources.gpu: 0.0714")


def test_the_first_h200_layout_is_read():
    measured = load_measurements("cuda-h200")
    step = measured.benchmark_step("convnext_small", 224, "functorch")
    assert step is not None and step.batch == 32 and step.step_s == pytest.approx(0.24824241749999487)
    assert measured.benchmark_step("convnext_small", 224, "nonprivate").step_s == pytest.approx(0.09350497100000155)
    assert measured.device_name == "NVIDIA H200" and measured.steps_file == RESULTS_DIR / "dp_step-cuda-h200.json"


def test_paper_dry_run_cites_the_measurements_it_uses(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "sweep", "sweeps/paper.yaml", "--dry-run"]
        + ["--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == paper_dry_run_status(), result.stderr  # 2: no GPU here, refused after the plan
    text = " ".join(result.stdout.split())  # the dry run wraps its lines at 100 characters
    (line,) = [part for part in text.split("GPU-hours estimate")[1:2]]
    assert "from the fixed-shape DP-step benchmark benchmarks/results/dp_step-cuda-h200.json" in line
    measured = load_measurements("cuda-h200")
    if measured.trials:  # once the device script's results are committed, they are cited
        assert "benchmarks/results/trial_step-cuda-h200.json" in line
    else:
        assert "no real-trial measurement on this device" in line and "x2.5" not in line
    advice = text.split("trials per NVIDIA H200")[1:]
    assert len(advice) == 2 and all(a.lstrip(": ").startswith("convnext_") and "224 px functorch" in a for a in advice)
    assert max(len(line) for line in result.stdout.splitlines() if "GPU" in line) <= 100


# ----------------------------------------------------------------------------------------------------
# Two trials on one (declared) GPU


@pytest.fixture(scope="module")
def shared_gpu(tmp_path_factory):
    """The tiny sweep's two trials, each asking for half of the cluster's one GPU (declared to Ray, not real: the
    trials train on the CPU)."""
    text = tiny_yaml(name="shared-gpu", resources={"cpu": 1, "gpu": 0.5}, speed={"device": "cpu"})
    with local_sweep(tmp_path_factory, text, "shared-gpu.yaml", num_gpus=1) as sweep:
        yield sweep


def ran_at_once(intervals: list[tuple[float, float]]) -> bool:
    """Whether every (start, end) interval overlaps all the others: the last start precedes the first end."""
    return max(start for start, _ in intervals) < min(end for _, end in intervals)


def test_ran_at_once_tells_overlap_from_sequence():
    assert ran_at_once([(0.0, 10.0), (1.0, 5.0)])
    assert not ran_at_once([(0.0, 5.0), (5.5, 9.0)])


@pytest.mark.slow
def test_two_trials_share_one_gpu_and_run_at_the_same_time(shared_gpu):
    from ray.tune import ExperimentAnalysis

    spec, paths, trials = shared_gpu
    assert len(trials) == 2 and (trials["status"] == M.TERMINATED).all()
    ray_trials = ExperimentAnalysis(str(paths.ray_experiment(spec))).trials
    for trial in ray_trials:
        assert trial.placement_group_factory.required_resources == {"CPU": 1.0, "GPU": 0.5}
    # Ray marks a trial RUNNING when it starts it; with one GPU and 0.5 each, both ran before either finished
    # (with `gpu: 1` the second would start only after the first's last result)
    intervals = [(t.run_metadata.start_time, t.run_metadata.last_result_time) for t in ray_trials]
    assert ran_at_once(intervals), intervals


@pytest.mark.slow
def test_system_metrics_reach_the_tables_per_epoch_for_the_baseline_and_once_for_the_private_trial(shared_gpu):
    import math

    import pandas as pd

    spec, paths, trials = shared_gpu
    epochs = pd.read_parquet(paths.runs_root / spec.name / M.EPOCHS_FILE)
    assert len(epochs) == 2 * spec.privacy.epochs
    private = epochs["target_epsilon"].map(math.isfinite)
    for name in M.SYSTEM_METRICS:  # an epoch's wall time tracks its secret Poisson batches: never a private one's
        assert (epochs.loc[~private, name] > 0).all() and epochs.loc[private, name].isna().all(), name
    assert (trials[M.SYSTEM_TOTAL_TRAIN_S] > 0).all()
