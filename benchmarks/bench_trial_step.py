"""A real trial's steady step next to the fixed-shape benchmark step of the same configuration, in one process.

For each grad-sample mode (and ``nonprivate``), one fresh spawned process prepares a synthetic site, then runs
`trainables.train.train_trial` on it (Poisson batches, data gathering, the engine, accounting: everything a sweep's
trial does) and, *between the trial's epochs* (in its report callback, outside the epoch's timed steps), rounds of
`bench_dp_step`'s fixed-shape step of the same model, image size, batch and mode. Trial and benchmark thus see the
same machine state, interleaved:

- ``trial_step_s``: median over the trial's epochs after the first (warm-up) of ``system/step_s`` (the epoch's
  training wall time over its logical batches; on CUDA the epoch ends with one synchronize);
- ``benchmark_step_s``: median of every benchmark round (one fixed batch of ``expected_batch_size`` images, run as one
  physical batch);
- ``trial_step_over_benchmark_step``: their ratio, the key `sweeps.estimate` multiplies the benchmark by.

Peak memory (CUDA): at the end of the trial's first epoch (self-check, steps and per-epoch evaluation done; before
any benchmark object exists), the caching allocator's peak reservation plus the CUDA context (device memory in use
minus what the allocator reserved; the benchmark process must have the GPU to itself), ``peak_memory_mib``: what one
trial needs on a GPU, which `sweeps.estimate.describe_trials_per_gpu` divides the device memory by. None on CPU.

    python benchmarks/bench_trial_step.py     # make bench: CPU, convnext_atto 64 px, bk, batch 32, physical 64 (~20 s)
    python benchmarks/bench_trial_step.py --device cuda --model convnext_small --size 224 --modes bk,functorch

Output JSON (default ``benchmarks/results/trial_step-<device>.json``, ``<device>`` = ``cpu`` or ``cuda-<gpu>``, e.g.
``cuda-h200``): ``{"machine": ..., "records": [one per mode]}``. Absolute times on a shared machine are inflated by
its load (``load_average_1min``); the ratio is what carries over.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_dp_step, also in spawned workers

RESULTS = Path(__file__).parent / "results"
MODES = ("nonprivate", "bk", "hooks", "functorch")


@dataclass(frozen=True)
class Case:
    """One measurement: a trial and its benchmark step.

    Attributes:
        batch: the trial's expected logical batch (privacy.expected_batch_size) and the benchmark's fixed batch.
        physical_batch: the trial's speed.max_physical_batch_size.
        train_images: synthetic training images wanted (the site is generated with enough images for that).
        epochs: trial epochs; the first is warm-up, the others are timed.
        rounds: benchmark steps run after each epoch.
        precision: the trial's speed.precision (``fp32`` or ``bf16``; the benchmark step is always fp32).
    """

    model: str
    image_size: int
    mode: str
    device: str
    batch: int
    physical_batch: int
    train_images: int
    epochs: int
    rounds: int
    threads: int
    precision: str = "fp32"


def device_slug(gpu_name: str) -> str:
    """``NVIDIA H200`` -> ``h200``: the device part of the results' file names."""
    name = re.sub(r"^nvidia\s+", "", gpu_name.strip(), flags=re.IGNORECASE).lower()
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "gpu"


def _trial_config(case: Case, root: Path, n_train: int) -> Any:
    from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
    from trainables.privacy.planning import plan_privacy

    private = case.mode != "nonprivate"
    epsilon = 8.0 if private else math.inf
    speed: dict[str, Any] = dict(
        device=case.device,
        grad_sample_mode=case.mode if private else "bk",
        max_physical_batch_size=case.physical_batch,
        threads=case.threads,
        eval_batch_size=256,
        precision=case.precision,
    )
    return TrialConfig(
        sweep="trial-step",
        dataset="synthetic-a",
        data_root=str(root),
        image_size=case.image_size,
        model=case.model,
        init="random",
        init_weights=None,
        lr=5e-4,
        seed=0,
        input_mean=0.5,
        input_std=0.25,
        n_boot=0,
        test_every_epoch=False,
        privacy=plan_privacy(
            PrivacyConfig(
                target_epsilon=epsilon,
                delta=1e-5,
                max_grad_norm=1.0,
                expected_batch_size=case.batch,
                epochs=case.epochs,
            ),
            n_train,
        ),
        speed=SpeedConfig(**speed),
    )


def synthetic_images(train_images: int) -> int:
    """Images to generate for about ``train_images`` in the training split (the synthetic split keeps ~72%)."""
    return max(64, math.ceil(train_images / 0.72))


def prepare_site(data_root: Path, image_size: int, train_images: int) -> None:
    """The synthetic site every case of a run trains on (generated once; `prepare_synthetic` reuses it)."""
    from trainables.data.synthetic import prepare_synthetic

    prepare_synthetic("synthetic-a", data_root, size=image_size, n_images=synthetic_images(train_images))


def run_case(case: Case, data_root: Path) -> dict[str, Any]:
    """The trial with benchmark rounds between its epochs, in this process, on the site `prepare_site` made in
    ``data_root``; one record."""
    import pandas as pd
    import torch
    from bench_dp_step import _make_steps

    from trainables import names as M
    from trainables.models import resolve_init
    from trainables.names import MANIFEST_FILE, dataset_dir
    from trainables.train import train_trial

    torch.set_num_threads(case.threads)
    cuda = case.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    split = pd.read_parquet(dataset_dir(data_root, "synthetic-a", case.image_size) / MANIFEST_FILE, columns=["split"])
    n_train = int((split["split"] == "train").sum())
    cfg = _trial_config(case, data_root, n_train)
    load = [os.getloadavg()[0]]
    systems: list[dict[str, float]] = []
    bench_times: list[float] = []
    memory: dict[str, float] = {}
    bench: dict[str, Any] = {}

    def report(metrics: dict[str, Any], state: Any) -> None:
        if cuda and not memory:  # first epoch: only the trial's own memory exists yet
            sync()
            free, total = torch.cuda.mem_get_info()
            reserved = torch.cuda.memory_reserved()
            memory.update(
                peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                context_mib=max(0.0, (total - free - reserved) / 2**20),
                device_memory_mib=total / 2**20,
            )
        if not bench:
            steps, _, _ = _make_steps(case.model, case.image_size, [case.mode], case.batch, case.device)
            bench["step"] = steps[case.mode]
            bench["step"]()  # warm-up (plans, optimizer state)
            sync()
        for _ in range(case.rounds):
            sync()
            start = time.perf_counter()
            bench["step"]()
            sync()
            bench_times.append(time.perf_counter() - start)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    # A private trial reports no per-epoch time; the timing hook gives it to this process (nothing is published).
    result = train_trial(cfg, resolve_init("random", case.model), report, epoch_timing=systems.append)
    total_s = time.perf_counter() - start
    load.append(os.getloadavg()[0])
    final = result.metrics
    if cfg.privacy.is_private and not final[M.EPSILON] <= cfg.privacy.target_epsilon:
        raise AssertionError(f"epsilon spent {final[M.EPSILON]} > target {cfg.privacy.target_epsilon}")
    model_device = str(next(result.model.parameters()).device)
    if not model_device.startswith(case.device):
        raise AssertionError(f"the trial trained on {model_device}, not {case.device}")
    steady = [s[M.SYSTEM_STEP_S] for s in systems[1:]] or [s[M.SYSTEM_STEP_S] for s in systems]
    trial_step_s, benchmark_step_s = statistics.median(steady), statistics.median(bench_times)
    peak = memory["peak_reserved_mib"] + memory["context_mib"] if memory else None
    return {
        "model": case.model,
        "image_size": case.image_size,
        "mode": case.mode,
        "precision": case.precision,
        "benchmark_precision": "fp32",
        "device": case.device,
        "expected_batch_size": case.batch,
        "physical_batch": case.physical_batch,
        "threads": case.threads,
        "n_train": n_train,
        "steps_per_epoch": cfg.privacy.steps // cfg.privacy.epochs,
        "epochs": case.epochs,
        "trial_step_s": trial_step_s,
        "trial_step_s_epochs": [s[M.SYSTEM_STEP_S] for s in systems],
        "trial_images_per_s_epochs": [s[M.SYSTEM_IMAGES_PER_S] for s in systems],
        "benchmark_step_s": benchmark_step_s,
        "benchmark_step_s_all": bench_times,
        "trial_step_over_benchmark_step": trial_step_s / benchmark_step_s,
        "peak_memory_mib": peak,
        **memory,
        "trial_total_s": total_s,
        "epsilon_spent": final[M.EPSILON],
        "model_device": model_device,
        "load_average_1min": load,
    }


def _worker(case: Case, data_root: Path, queue: Any) -> None:
    queue.put(run_case(case, data_root))


def in_fresh_process(target: Any, args: tuple[Any, ...]) -> Any:
    """``target(*args, queue)`` in a spawned process; what it put on the queue. A worker that dies without a result
    (an exception, the OOM killer, a CUDA error) raises here instead of leaving the parent waiting."""
    import queue as queues

    context = mp.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=target, args=(*args, results))
    process.start()
    while True:
        try:
            result = results.get(timeout=2.0)
            break
        except queues.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=2.0)  # put just before it exited
                    break
                except queues.Empty:
                    raise RuntimeError(
                        f"benchmark worker {target.__name__} died (exit code {process.exitcode}) without a "
                        "result; its traceback is above"
                    ) from None
    process.join()
    return result


def measure(case: Case, data_root: Path) -> dict[str, Any]:
    """`run_case` in a fresh spawned process (its own device memory and peak statistics)."""
    record = in_fresh_process(_worker, (case, data_root))
    print(
        f"{case.model} {case.image_size}px {case.device} {case.mode} {case.precision} batch {case.batch}: trial "
        f"{record['trial_step_s']:.4f} s/step, benchmark {record['benchmark_step_s']:.4f} s/step, ratio "
        f"{record['trial_step_over_benchmark_step']:.3f}"
        + (f", peak {record['peak_memory_mib']:.0f} MiB per trial" if record["peak_memory_mib"] else ""),
        flush=True,
    )
    return record


def machine(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu_count": mp.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_mib"] = torch.cuda.mem_get_info()[1] / 2**20
    from importlib.metadata import version

    info.update(opacus=version("opacus"), timm=version("timm"))
    return info


def results_name(kind: str, device: str) -> str:
    """``trial_step-cpu.json``, ``dp_step-cuda-h200.json``: the file names `sweeps.measurements` reads."""
    if device == "cpu":
        return f"{kind}-cpu.json"
    import torch

    return f"{kind}-cuda-{device_slug(torch.cuda.get_device_name(0))}.json"


def write(records: list[dict[str, Any]], device: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    note = (
        "trial_step_s: median of system/step_s over the trial's epochs after the first; benchmark_step_s: median "
        "of bench_dp_step's fixed-shape step (fp32, one physical batch of expected_batch_size) run between the "
        "epochs in the same process; absolute times depend on the machine's load (load_average_1min)"
    )
    out.write_text(json.dumps({"machine": machine(device), "records": records, "note": note}, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--modes", default="bk", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--batch", type=int, default=32, help="expected logical batch = benchmark batch")
    parser.add_argument(
        "--physical-batch",
        type=int,
        help="the trial's max_physical_batch_size (default: 2 x --batch, so that a Poisson batch runs as one chunk, "
        "as in the smoke sweep; the benchmark runs its fixed batch as one chunk too)",
    )
    parser.add_argument("--train-images", type=int, default=384, help="training images (steps/epoch = this / batch)")
    parser.add_argument("--epochs", type=int, default=4, help="trial epochs; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="benchmark steps after each epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="the trial's speed.precision")
    parser.add_argument("--out", type=Path, help="output JSON (default benchmarks/results/trial_step-<device>.json)")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is visible")
    cases = [
        Case(
            model=args.model,
            image_size=args.size,
            mode=mode,
            device=args.device,
            batch=args.batch,
            physical_batch=args.physical_batch or 2 * args.batch,
            train_images=args.train_images,
            epochs=args.epochs,
            rounds=args.rounds,
            threads=args.threads,
            precision=args.precision,
        )
        for mode in modes
    ]
    write(measure_all(cases), args.device, args.out or RESULTS / results_name("trial_step", args.device))


def measure_all(cases: list[Case]) -> list[dict[str, Any]]:
    """Every case in its own process, on synthetic sites generated once per image size in a temporary folder."""
    with tempfile.TemporaryDirectory() as folder:
        for size in sorted({c.image_size for c in cases}):
            prepare_site(Path(folder), size, max(c.train_images for c in cases if c.image_size == size))
        return [measure(case, Path(folder)) for case in cases]


if __name__ == "__main__":
    main()
