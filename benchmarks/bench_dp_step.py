"""DP-SGD step cost vs a non-private step, per grad-sample mode: step time and peak memory.

For each case (model, image size, device), one fresh process builds the model once per mode and then times the
modes *interleaved* (round after round, every mode once per round), so that load drifting on a shared machine
hits all of them alike; each mode's step time is the median over rounds. Two passes: the non-private step with the
bk modes, then the non-private step again with the slow reference modes (`REFERENCE_MODES`), each ratio taken to
the non-private median of its own pass (``baseline_step_s``). In one pass, the reference modes' steps (3x the time
and 4x the memory at convnext_tiny 128 px) slowed the steps timed after them erratically, by up to 30% on this
project's 2-core machine: the non-private step's median there came out 3.13 s beside them and 2.44 s without them,
and bk read 0.90x the non-private step where it is 1.09x. Modes: ``nonprivate`` (AdamW step),
``bk`` / ``hooks`` / ``functorch`` (a full `private_step`: clipping, noise, accounting, AdamW), ``bk-patient`` and
``bk-patient-10`` (a full patient-level `private_patient_step` in bk on the same 32 images, grouped into patients:
`patient_groups`) and ``stock-hooks`` (stock Opacus GradSampleModule, *wrong* on ConvNeXt, timed for reference
only). Every private mode is set up by `trainables.privacy.setup.make_private`, the trials' recipe, whose self-check
against torch.func on 4 samples (and, for the patient modes, on whole patients) must pass (``check``: its max
relative error); ``stock-hooks`` is wrapped by hand and records the check's error text instead.

Denormal floats are flushed to zero in every mode (``torch.set_flush_denormal``, x86 CPUs): unflushed, they stalled
the non-private step's AdamW and backward erratically, by up to 2x.

Peak memory: after the timed rounds, one more step per mode, each from the same state (model and optimizer
state only: every mode's gradients, per-sample gradients and clipped sums freed): CUDA ``max_memory_allocated``
minus what was allocated before the step; CPU the peak resident set during the step (``/proc/self/statm``
every 0.5 ms) minus the resident set before it, with glibc's mmap threshold pinned at 128 KiB in the worker
(``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set at once instead of staying cached.

    python benchmarks/bench_dp_step.py                 # make bench: CPU cases (+ the GPU case when one is present)
    python benchmarks/bench_dp_step.py --model convnext_atto --size 64 --modes nonprivate,bk --out /tmp/r.json

`make bench` runs `CPU_CASES`, each with its own modes and rounds: the slow reference modes only where a step is
short, so that the three cases stay near 10 minutes on this project's idle 2-core machine (`--modes` and `--rounds`
narrow every case).

Output JSON: ``{"machine": ..., "records": [one per (model, size, device, mode)]}``; each record holds
``step_s`` (median), ``ratio_vs_nonprivate`` (to ``baseline_step_s``, the non-private median of its pass),
``peak_mem_mib``, ``peak_mem_ratio_vs_nonprivate`` and the load average seen, since absolute times on a shared machine
are inflated.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MODES = ("nonprivate", "bk", "bk-patient", "bk-patient-10", "hooks", "functorch", "stock-hooks")
REFERENCE_MODES = ("hooks", "functorch", "stock-hooks")
"""Timed in a second pass beside the non-private step (module docstring)."""
PATIENT_MODES = {"bk-patient": 3, "bk-patient-10": 10}
"""Patient-level modes -> the most images of one patient (the cap ``max_images_per_patient``)."""


@dataclass(frozen=True)
class Case:
    """One `make bench` case: a model at one image size, the modes timed together and the rounds."""

    model: str
    size: int
    modes: tuple[str, ...] = MODES
    rounds: int = 5


CPU_CASES = (
    Case("convnext_atto", 64, rounds=10),
    Case("convnext_tiny", 128, ("nonprivate", "bk", "hooks", "functorch", "stock-hooks")),
    Case("convnext_tiny", 224, ("nonprivate", "bk", "bk-patient"), rounds=6),
)
GPU_CASES = (Case("convnext_small", 224, ("nonprivate", "bk", "hooks", "functorch", "stock-hooks")),)
RESULTS = Path(__file__).parent / "results"
MMAP_THRESHOLD = str(128 * 1024)


def patient_groups(n_images: int, largest: int, seed: int = 0) -> np.ndarray:
    """Each image's patient, patient-contiguous, for a batch of ``n_images`` images (drawn deterministically).

    ``largest`` 3: patients of 1, 2 or 3 images with the synthetic twin's probabilities
    (`trainables.data.synthetic.IMAGES_PER_PATIENT_P`), the last one trimmed to fill the batch. Larger: one patient
    of ``largest`` images first (a patient with many studies, as in CheXpert or MIMIC), then twin-like patients.
    """
    from trainables.data.synthetic import IMAGES_PER_PATIENT_P

    rng = np.random.default_rng(seed)
    counts = rng.choice([1, 2, 3], size=n_images, p=IMAGES_PER_PATIENT_P)
    if largest > 3:
        counts = np.r_[largest, counts]
    patient = np.repeat(np.arange(len(counts)), counts)[:n_images]
    return patient.astype(np.int64)


class _RssSampler:
    """Peak resident set (bytes) of this process while active, sampled from /proc/self/statm."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> _RssSampler:
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


@dataclass
class ModeStep:
    """One mode's step on its own copy of the model.

    Attributes:
        step: one full training step on the case's batch.
        reset: frees the mode's gradients (and per-sample gradients, clipped sums) between steps.
        check: the self-check's max relative error (``stock-hooks``: its error text); None for ``nonprivate``.
        model: the model (``nonprivate``) or its wrapper; optimizer: AdamW or the DP optimizer around it.
    """

    step: Callable[[], None]
    reset: Callable[[], None]
    check: float | str | None
    model: Any
    optimizer: Any


def make_modes(model_name: str, size: int, modes: list[str], batch: int, device: str) -> dict[str, ModeStep]:
    """One `ModeStep` per mode, each on its own copy of the model (same seed, same batch)."""
    import timm
    import torch
    from opacus import GradSampleModule

    from trainables.config import PrivacyConfig
    from trainables.privacy.accounting import create_accountant
    from trainables.privacy.engine import (
        PerSampleGradientError,
        check_per_sample_gradients,
        make_dp_optimizer,
        private_step,
    )
    from trainables.privacy.patients import private_patient_step
    from trainables.privacy.setup import SelfCheckBatch, make_private

    # The mechanism's numbers do not change a step's cost: sigma 1, C 1, q 0.01 (target_epsilon only marks it private).
    privacy = PrivacyConfig(
        target_epsilon=8.0,
        max_grad_norm=1.0,
        expected_batch_size=batch,
        noise_multiplier=1.0,
        sample_rate=0.01,
        steps=100,
    )

    x = torch.rand(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 5, device=device) > 0.7).float()

    def loss_fn(logits, targets):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)

    made = {}
    for mode in modes:
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=5, in_chans=1, drop_path_rate=0.0).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        if mode == "nonprivate":

            def step(model=model, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                loss_fn(model(x), y).mean().backward()
                optimizer.step()

            made[mode] = ModeStep(step, lambda o=optimizer: o.zero_grad(set_to_none=True), None, model, optimizer)
            continue
        largest = PATIENT_MODES.get(mode)
        if mode == "stock-hooks":
            # Known wrong on ConvNeXt (timed for reference only): make_private would refuse it at its self-check, so
            # this one mode is wrapped by hand, its check's error recorded, and stepped anyway.
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")  # as wrap_model
            check: float | str
            try:
                check = check_per_sample_gradients(wrapped, loss_fn, x[:4], y[:4]).max_relative_error
            except PerSampleGradientError as error:
                check = str(error)
            dp_optimizer = make_dp_optimizer(
                optimizer,
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=privacy.max_grad_norm,
                expected_batch_size=privacy.expected_batch_size,
                noise_generator=torch.Generator(device=device).manual_seed(1),
                accountant=create_accountant(privacy.accountant),
                sample_rate=privacy.sample_rate,
            )
        elif largest is None:
            setup = make_private(
                model,
                optimizer,
                loss_fn,
                privacy=privacy,
                grad_sample_mode=mode,
                check=SelfCheckBatch((x[:4], y[:4])),
                noise=torch.Generator(device=device).manual_seed(1),
                label_count_release=None,
            )
            check, wrapped, dp_optimizer = setup.check.max_relative_error, setup.wrapped, setup.optimizer
        else:
            groups = patient_groups(batch, largest)
            n_check = int(np.searchsorted(groups, groups[min(3, batch - 1)], side="right"))  # whole patients, >= 4
            setup = make_private(
                model,
                optimizer,
                loss_fn,
                privacy=dataclasses.replace(privacy, privacy_unit="patient", max_images_per_patient=largest),
                grad_sample_mode="bk",
                check=SelfCheckBatch((x[:4], y[:4]), (x[:n_check], y[:n_check], groups[:n_check])),
                noise=torch.Generator(device=device).manual_seed(1),
                label_count_release=None,
            )
            assert setup.patient_check is not None
            check = max(setup.check.max_relative_error, setup.patient_check.max_relative_error)
            wrapped, dp_optimizer = setup.wrapped, setup.optimizer
        if largest is None:

            def step(wrapped=wrapped, dp_optimizer=dp_optimizer):
                private_step(wrapped, dp_optimizer, loss_fn, (x, y), max_physical_batch_size=batch)

        else:

            def step(wrapped=wrapped, dp_optimizer=dp_optimizer, groups=groups):
                private_patient_step(wrapped, dp_optimizer, loss_fn, (x, y), groups, max_physical_batch_size=batch)

        made[mode] = ModeStep(step, lambda o=dp_optimizer: o.zero_grad(set_to_none=True), check, wrapped, dp_optimizer)
    return made


def _make_steps(model_name: str, size: int, modes: list[str], batch: int, device: str):
    """(step, check, reset) per mode, from `make_modes` (`bench_trial_step`'s interface)."""
    made = make_modes(model_name, size, modes, batch, device)
    return (
        {m: s.step for m, s in made.items()},
        {m: s.check for m, s in made.items() if s.check is not None},
        {m: s.reset for m, s in made.items()},
    )


def run_case(
    model_name: str, size: int, device: str, modes: list[str], batch: int, rounds: int, threads: int
) -> list[dict[str, Any]]:
    """Interleaved timing and per-mode peak memory of one case, in this process: one record per mode."""
    import torch

    torch.set_num_threads(threads)
    # Denormal floats (timm's 1e-6 layer scales make some gradients and AdamW moments tiny) stalled the CPU's
    # non-private step erratically (AdamW 0.1-4.3 s, the step 8.7-20.8 s on convnext_tiny 224 px; steady 7.4 s
    # flushed), so every mode runs with them flushed to zero: the same arithmetic for all, a stable baseline.
    torch.set_flush_denormal(True)
    steps, checks, resets = _make_steps(model_name, size, modes, batch, device)
    patients = {m: np.bincount(patient_groups(batch, PATIENT_MODES[m])).tolist() for m in modes if m in PATIENT_MODES}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    load_before = os.getloadavg()[0]

    def interleaved(timed: list[str]) -> dict[str, list[float]]:
        times: dict[str, list[float]] = {mode: [] for mode in timed}
        for round_ in range(rounds + 1):  # round 0 warms up (oneDNN/cuDNN plans, optimizer state)
            for mode in timed:
                sync()
                start = time.perf_counter()
                steps[mode]()
                sync()
                if round_ > 0:
                    times[mode].append(time.perf_counter() - start)
        return times

    baseline = ["nonprivate"] if "nonprivate" in modes else []
    reference = [mode for mode in modes if mode in REFERENCE_MODES]
    times = interleaved([mode for mode in modes if mode not in REFERENCE_MODES])
    passes = {mode: times for mode in times}
    if reference:
        reference_times = interleaved(baseline + reference)
        times |= {mode: reference_times[mode] for mode in reference}
        passes |= {mode: reference_times for mode in reference}
    peaks = {}
    for mode in modes:
        for reset in resets.values():  # every mode's gradients, per-sample gradients and sums freed
            reset()
        gc.collect()
        if device == "cuda":
            sync()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            steps[mode]()
            sync()
            peaks[mode] = (torch.cuda.max_memory_allocated() - before) / 2**20
        else:
            sampler = _RssSampler()
            with sampler:
                before = sampler.peak
                steps[mode]()
            peaks[mode] = (sampler.peak - before) / 2**20
    load_after = os.getloadavg()[0]
    base_peak = peaks.get("nonprivate")
    records = []
    for mode in modes:
        step_s = statistics.median(times[mode])
        base_time = statistics.median(passes[mode]["nonprivate"]) if baseline else None
        records.append(
            {
                "model": model_name,
                "image_size": size,
                "device": device,
                "mode": mode,
                "batch": batch,
                "threads": threads,
                "rounds": rounds,
                "step_s": step_s,
                "step_s_all": times[mode],
                "ratio_vs_nonprivate": step_s / base_time if base_time else None,
                "baseline_step_s": base_time,
                "peak_mem_mib": peaks[mode],
                "peak_mem_ratio_vs_nonprivate": peaks[mode] / base_peak if base_peak else None,
                "check": checks.get(mode),
                "load_average_1min": [load_before, load_after],
            }
            | ({"images_per_patient": patients[mode]} if mode in patients else {})
        )
        print(
            f"{model_name} {size}px {device} {mode}: {step_s:.3f} s/step"
            + (f" ({records[-1]['ratio_vs_nonprivate']:.2f}x)" if base_time else "")
            + f", peak +{peaks[mode]:.0f} MiB"
            + (f" ({records[-1]['peak_mem_ratio_vs_nonprivate']:.2f}x)" if base_peak else ""),
            flush=True,
        )
    return records


def _worker(args: tuple, queue: Any) -> None:
    queue.put(run_case(*args))


def measure(
    model_name: str, size: int, device: str, modes: list[str], batch: int, rounds: int, threads: int
) -> list[dict[str, Any]]:
    """`run_case` in a fresh spawned process (its own memory, glibc mmap threshold pinned)."""
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # inherited by the spawned worker only at its start
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=((model_name, size, device, modes, batch, rounds, threads), queue))
    process.start()
    records = queue.get()
    process.join()
    return records


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": mp.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    from importlib.metadata import version

    info.update(opacus=version("opacus"), timm=version("timm"))
    return info


def write(records: list[dict[str, Any]], device: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine(device),
                "records": records,
                "note": "medians of interleaved rounds; stock-hooks computes wrong per-sample gradients on ConvNeXt "
                "(timed for reference only); absolute times depend on the machine's load (load_average_1min)",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="one case: timm model name (with --size)")
    parser.add_argument("--size", type=int, help="one case: image size in pixels")
    parser.add_argument("--device", default=None, choices=("cpu", "cuda"), help="one case: default cpu")
    parser.add_argument(
        "--modes", help=f"comma-separated subset of {','.join(MODES)} (default: all for one case, each case's own)"
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--rounds", type=int, help="timed interleaved rounds after one warm-up round (default: 5, or each case's own)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="output JSON (default benchmarks/results/dp_step-<device>.json)")
    args = parser.parse_args()
    modes = None if args.modes is None else [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes or ()) - set(MODES))
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {MODES}")
    if (args.model is None) != (args.size is None):
        parser.error("--model and --size go together")
    if args.model:
        device = args.device or "cpu"
        case = Case(args.model, args.size, tuple(modes or MODES), args.rounds or 5)
        records = measure(case.model, case.size, device, list(case.modes), args.batch, case.rounds, args.threads)
        write(records, device, args.out or RESULTS / f"dp_step-{device}.json")
        return
    import torch

    plan = [("cpu", CPU_CASES)] + ([("cuda", GPU_CASES)] if torch.cuda.is_available() else [])
    everything = []
    for device, cases in plan:
        records = [
            r
            for case in cases
            if (case_modes := [m for m in case.modes if modes is None or m in modes])
            for r in measure(
                case.model, case.size, device, case_modes, args.batch, args.rounds or case.rounds, args.threads
            )
        ]
        everything += records
        if args.out is None:
            write(records, device, RESULTS / f"dp_step-{device}.json")
    if args.out is not None:
        write(everything, plan[-1][0], args.out)


if __name__ == "__main__":
    main()
