"""Committed speed and memory measurements (``benchmarks/results/*.json``) as the dry run reads them.

Two kinds of file per device (``cpu``, ``cuda-h200``, ...; the device is the part of the name after the first dash):

- ``dp_step-<device>.json`` (`benchmarks/bench_dp_step.py`): the fixed-shape DP step, one batch of constant size,
  per grad-sample mode. Its current layout is ``{"records": [{model, image_size, mode, batch, step_s, ...}]}``;
  the first H200 run used ``{"results": [{model, image_size, batch, <mode>: {median_step_s, ...}}]}``. Both are
  read; the mode ``non-private`` of the old layout is ``nonprivate``.
- ``trial_step-<device>.json`` (`benchmarks/bench_trial_step.py`): a real trial's steady step measured next to the
  fixed-shape step of the same model, image size, batch and mode in one process, their ratio
  ``trial_step_over_benchmark_step``, and the trial's peak device memory (CUDA only).

Nothing here runs a benchmark or invents a number: a missing file or record is reported as missing. Pure Python,
no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
TRIAL_RATIO_KEY = "trial_step_over_benchmark_step"


@dataclass(frozen=True)
class BenchmarkStep:
    """One fixed-shape DP step: ``step_s`` seconds (median) for a batch of ``batch`` images."""

    model: str
    image_size: int
    mode: str  # nonprivate, bk, hooks, functorch, stock-hooks
    batch: int
    step_s: float

    @property
    def seconds_per_image(self) -> float:
        return self.step_s / self.batch


@dataclass(frozen=True)
class TrialStep:
    """A real trial's steady step next to the fixed-shape step of the same configuration, in one run.

    Attributes:
        expected_batch_size: the trial's expected logical batch (q N), also the benchmark's fixed batch.
        physical_batch: the trial's ``speed.max_physical_batch_size``.
        precision: the trial's ``speed.precision`` (``fp32`` where the knob does not exist).
        trial_step_s, benchmark_step_s: seconds per logical batch (medians).
        ratio: ``trial_step_s / benchmark_step_s``.
        peak_memory_mib: the trial process's peak device memory (CUDA context + the caching allocator's peak
            reservation), MiB; None on CPU.
    """

    model: str
    image_size: int
    mode: str
    precision: str
    expected_batch_size: int
    physical_batch: int
    trial_step_s: float
    benchmark_step_s: float
    ratio: float
    peak_memory_mib: float | None


@dataclass(frozen=True)
class Measurements:
    """What is committed for one device. ``*_file`` is None when that file is absent."""

    device: str
    device_name: str
    device_memory_mib: float | None
    steps_file: Path | None
    steps: tuple[BenchmarkStep, ...]
    trials_file: Path | None
    trials: tuple[TrialStep, ...]

    def benchmark_step(self, model: str, image_size: int, mode: str) -> BenchmarkStep | None:
        return next(
            (s for s in self.steps if (s.model, s.image_size, s.mode) == (model, image_size, mode)),
            None,
        )

    def benchmark_sizes(self, model: str, mode: str) -> list[int]:
        return sorted({s.image_size for s in self.steps if (s.model, s.mode) == (model, mode)})

    def trial_step(self, model: str, image_size: int, mode: str, precision: str = "fp32") -> TrialStep | None:
        """The measured ratio for this configuration (the first record; any batch)."""
        return next(
            (
                t
                for t in self.trials
                if (t.model, t.image_size, t.mode, t.precision) == (model, image_size, mode, precision)
            ),
            None,
        )

    def trial_peak(
        self, model: str, image_size: int, mode: str, physical_batch: int, precision: str = "fp32"
    ) -> TrialStep | None:
        """The measured per-trial peak memory for exactly this configuration, if any."""
        return next(
            (
                t
                for t in self.trials
                if t.peak_memory_mib is not None
                and (t.model, t.image_size, t.mode, t.physical_batch, t.precision)
                == (model, image_size, mode, physical_batch, precision)
            ),
            None,
        )


def shown(path: Path | None) -> str:
    """A results file as printed: relative to the repository when inside it."""
    if path is None:
        return "-"
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def load_measurements(device: str, results: Path = RESULTS_DIR) -> Measurements:
    """Read ``dp_step-<device>.json`` and ``trial_step-<device>.json`` from ``results`` (either may be absent)."""
    steps_file, trials_file = results / f"dp_step-{device}.json", results / f"trial_step-{device}.json"
    steps_raw = _read(steps_file)
    trials_raw = _read(trials_file)
    machine = {**(steps_raw or {}).get("machine", {}), **(trials_raw or {}).get("machine", {})}
    return Measurements(
        device=device,
        device_name=str(machine.get("gpu") or device),
        device_memory_mib=machine.get("gpu_memory_mib"),
        steps_file=steps_file if steps_raw is not None else None,
        steps=tuple(_benchmark_steps(steps_raw)) if steps_raw is not None else (),
        trials_file=trials_file if trials_raw is not None else None,
        trials=tuple(_trial_steps(trials_raw)) if trials_raw is not None else (),
    )


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mode(name: str) -> str:
    return "nonprivate" if name == "non-private" else name


def _benchmark_steps(raw: dict[str, Any]) -> list[BenchmarkStep]:
    if "records" in raw:
        return [
            BenchmarkStep(r["model"], int(r["image_size"]), _mode(r["mode"]), int(r["batch"]), float(r["step_s"]))
            for r in raw["records"]
        ]
    return [  # the first H200 layout: one entry per case, one dict per mode
        BenchmarkStep(
            case["model"], int(case["image_size"]), _mode(mode), int(case["batch"]), float(v["median_step_s"])
        )
        for case in raw["results"]
        for mode, v in case.items()
        if isinstance(v, dict) and "median_step_s" in v
    ]


def _trial_steps(raw: dict[str, Any]) -> list[TrialStep]:
    return [
        TrialStep(
            model=r["model"],
            image_size=int(r["image_size"]),
            mode=r["mode"],
            precision=r.get("precision", "fp32"),
            expected_batch_size=int(r["expected_batch_size"]),
            physical_batch=int(r["physical_batch"]),
            trial_step_s=float(r["trial_step_s"]),
            benchmark_step_s=float(r["benchmark_step_s"]),
            ratio=float(r[TRIAL_RATIO_KEY]),
            peak_memory_mib=None if r.get("peak_memory_mib") is None else float(r["peak_memory_mib"]),
        )
        for r in raw.get("records", [])
        if TRIAL_RATIO_KEY in r
    ]
