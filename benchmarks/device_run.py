"""The prepared device check: one command, under 10 minutes on one NVIDIA GPU, results under benchmarks/results/.

On a machine with an NVIDIA GPU, from the repository root, with this repository's virtual environment (the device
machines have no internet: carry ``.venv`` there, or create it where the wheels are at hand with
``pip install -e '.[dev]'``; nothing is downloaded, the models start from random weights):

    .venv/bin/python benchmarks/device_run.py

It runs, each case in a fresh process:

1. `bench_dp_step` on ConvNeXt-Small 224 px, batch 32, modes nonprivate / bk / hooks / functorch (fixed-shape
   steps, interleaved) -> ``dp_step-cuda-<gpu>.json``;
2. `bench_trial_step` on ConvNeXt-Small 224 px, expected batch 64, physical batch 64 (``sweeps/paper.yaml``'s),
   modes bk, functorch and nonprivate, plus bk in bf16
   (``--precision fp32`` leaves it out): a short real trial's steady step next to the benchmark step,
   ``trial_step_over_benchmark_step`` and the trial's peak device memory -> ``trial_step-cuda-<gpu>.json``.

``<gpu>`` is the device name without ``NVIDIA`` (``h200``), the name `sweeps.estimate` looks for. Commit both files:
the dry run's GPU-hours and trials-per-GPU advice then cite them. Without CUDA it exits 2 with a message.
``--device cpu --out-dir DIR`` runs the same code on a tiny configuration (test_convnext, 32 px, a few steps;
what the tests run); its numbers are no measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dp_step  # from this folder
import bench_trial_step
from bench_trial_step import Case

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Preset:
    """What one device run measures."""

    model: str
    image_size: int
    dp_modes: tuple[str, ...]
    dp_batch: int
    dp_rounds: int
    trial_modes: tuple[str, ...]
    batch: int
    physical_batch: int
    train_images: int
    epochs: int
    rounds: int
    threads: int


PRESETS = {
    "cuda": Preset(
        model="convnext_small",
        image_size=224,
        dp_modes=("nonprivate", "bk", "hooks", "functorch"),
        dp_batch=32,
        dp_rounds=5,
        trial_modes=("bk", "functorch", "nonprivate"),
        batch=64,
        physical_batch=64,
        train_images=512,  # 8 steps per epoch
        epochs=3,
        rounds=3,
        threads=8,
    ),
    "cpu": Preset(  # exercises every code path in seconds; not a measurement
        model="test_convnext",
        image_size=32,
        dp_modes=("nonprivate", "bk"),
        dp_batch=8,
        dp_rounds=1,
        trial_modes=("bk",),
        batch=8,
        physical_batch=8,
        train_images=24,
        epochs=2,
        rounds=1,
        threads=1,
    ),
}


def cases(preset: Preset, device: str, precision: str) -> list[Case]:
    """The trial-step cases: every trial mode in fp32, and bk in bf16 unless ``precision`` is ``fp32``."""
    common = dict(
        model=preset.model,
        image_size=preset.image_size,
        device=device,
        batch=preset.batch,
        physical_batch=preset.physical_batch,
        train_images=preset.train_images,
        epochs=preset.epochs,
        rounds=preset.rounds,
        threads=preset.threads,
    )
    fp32 = [Case(mode=mode, **common) for mode in preset.trial_modes]
    return fp32 + ([Case(mode="bk", precision="bf16", **common)] if precision == "auto" else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the tiny check (tests)")
    parser.add_argument("--out-dir", type=Path, help="where the JSON goes (default benchmarks/results; cpu: required)")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32"),
        help="auto: also a bf16 bk trial; fp32: fp32 trials only",
    )
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "device_run: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with "
            "an NVIDIA GPU and a CUDA build of torch, or `--device cpu --out-dir DIR` for the tiny CPU check",
            file=sys.stderr,
        )
        return 2
    if args.device == "cpu" and args.out_dir is None:
        parser.error("--device cpu needs --out-dir: its tiny numbers must not replace benchmarks/results")
    out_dir = args.out_dir or RESULTS
    preset = PRESETS[args.device]
    started = time.perf_counter()
    chosen = cases(preset, args.device, args.precision)
    print(
        f"device_run: {preset.model} {preset.image_size} px on {args.device}; trial cases "
        + ", ".join(f"{c.mode} {c.precision}" for c in chosen),
        flush=True,
    )
    # bench_dp_step.measure, but a worker that dies (e.g. out of memory) fails the run instead of hanging it
    os.environ["MALLOC_MMAP_THRESHOLD_"] = bench_dp_step.MMAP_THRESHOLD
    dp_case = (
        preset.model,
        preset.image_size,
        args.device,
        list(preset.dp_modes),
        preset.dp_batch,
        preset.dp_rounds,
        preset.threads,
    )
    dp_records = bench_trial_step.in_fresh_process(bench_dp_step._worker, (dp_case,))
    bench_dp_step.write(dp_records, args.device, out_dir / bench_trial_step.results_name("dp_step", args.device))
    trial_records = bench_trial_step.measure_all(chosen)
    bench_trial_step.write(
        trial_records, args.device, out_dir / bench_trial_step.results_name("trial_step", args.device)
    )
    print(f"device_run: done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
