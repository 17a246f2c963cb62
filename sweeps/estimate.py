"""Planning numbers for `dpsweep sweep --dry-run` before any data is prepared: dataset sizes and GPU-hours.

Both are estimates, printed as such. Once a dataset is prepared its real N replaces the estimate (and sigma
is recalibrated on it). The GPU-hours come from committed measurements on one H200 (`sweeps.measurements`): the
fixed-shape DP-step benchmark, times the measured ratio of a real trial's step to that benchmark step when one was
measured at the same model, image size and mode; without such a ratio the estimate is the benchmark step alone
(a lower bound) and says so. No hand-written overhead factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sweeps.measurements import RESULTS_DIR, Measurements, TrialStep, load_measurements, shown

ESTIMATED_TRAIN_IMAGES: dict[str, int] = {
    # Training-split images after dpsweep prepare's defaults (frontal views; official test splits kept, else
    # 20% of patients; 10% of training patients to validation), from the datasets' published counts.
    "vindr-cxr": 13_500,  # official train 15,000 images, 10% to validation
    "chestxray14": 77_872,  # train_val_list.txt 86,524 images, 10% to validation
    "padchest": 79_362,  # ~110,225 frontal images (the study's 20% test = 22,045), 80% train, 10% to validation
    "chexpert": 137_830,  # 191,431 frontal images (train + valid), 80% train, 10% to validation; before
    # dropping uncertain labels (the default), which lowers N
    "mimic-cxr": 193_500,  # ~215,000 PA/AP images (official split's test ~5,000 kept aside), 10% to validation;
    # before dropping uncertain labels
    "uka-cxr": 138_183,  # fixed split: 153,537 training images, 10% to validation
}
"""Estimated N_train per real dataset, for dry runs only."""

PUBLISHED_PATIENTS_PER_IMAGE: dict[str, tuple[int, int]] = {
    # (patients, images) of the whole published dataset, from its paper or site.
    "chestxray14": (30_805, 112_120),
    "padchest": (67_625, 160_868),
    "chexpert": (65_240, 224_316),
    "mimic-cxr": (65_379, 377_110),
}
"""Published patient and image counts, for the dry-run estimate of N_patients. VinDr-CXR has no patient ids (each
image is its own patient); UKA-CXR's are not published here (unknown until prepared)."""

ESTIMATED_TRAIN_PATIENTS: dict[str, int] = {
    name: round(ESTIMATED_TRAIN_IMAGES[name] * patients / images)
    for name, (patients, images) in PUBLISHED_PATIENTS_PER_IMAGE.items()
}
"""Estimated training patients: N_train times the dataset's published patients per image (a rough figure: frontal-view
filtering lowers images per patient, so the real N_patients is somewhat higher); dry runs only."""

EVAL_IMAGES_PER_TRAIN_IMAGE = 0.4
"""Validation + test images evaluated each epoch per training image (about 0.11 N validation and 0.28 N test
under the default splits); evaluation is a forward pass only."""

ESTIMATE_DEVICE = "cuda-h200"
"""The accelerator the dry run estimates for: its measurements are ``benchmarks/results/*-cuda-h200.json``."""

GFLOPS_224 = {"convnext_small": 8.71, "convnext_tiny": 4.47}
"""timm's published forward GFLOPs at 224 px, to scale a benchmarked model to its sibling."""

FORWARD_FRACTION = 1 / 3
"""An evaluation forward pass costs about a third of a non-private training step per image (an assumption: the
forward of forward + backward; not measured)."""


@dataclass(frozen=True)
class StepCost:
    """Device seconds per trained image of one (model, image size, mode), and how they were derived.

    Attributes:
        seconds_per_image: the fixed-shape benchmark's seconds per image (scaled as ``basis`` says), times
            ``ratio.ratio`` when a real-trial ratio was measured.
        basis: the derivation in words, e.g. ``convnext_small functorch 224 px x1.07 real-trial ratio``.
        ratio: the `TrialStep` measurement applied, or None (benchmark step only).
    """

    seconds_per_image: float
    basis: str
    ratio: TrialStep | None


def measurements() -> Measurements:
    """The committed measurements of `ESTIMATE_DEVICE`."""
    return load_measurements(ESTIMATE_DEVICE)


def step_cost(measured: Measurements, model: str, image_size: int, mode: str) -> StepCost | None:
    """Seconds per training image of a DP step in ``mode`` (or ``nonprivate``) on the measured device; None when no
    benchmark covers the model (or a GFLOPs sibling of it) in that mode.

    Like with like first: the model's own benchmark at ``image_size``, else a sibling's at ``image_size`` scaled by
    timm's GFLOPs, else the model's (then a sibling's) at the nearest size scaled by pixel area (on a GPU small
    images underuse the device, so that overestimates). A real-trial ratio applies only when it was measured at the
    benchmark record's own model, image size and mode (fp32)."""
    candidates = [model, *(m for m in GFLOPS_224 if m != model and model in GFLOPS_224)]
    measured_at = {m: measured.benchmark_sizes(m, mode) for m in candidates}
    choice = next(((m, image_size) for m in candidates if image_size in measured_at[m]), None)
    if choice is None:
        choice = next(
            ((m, min(sizes, key=lambda s: (abs(s - image_size), -s))) for m in candidates if (sizes := measured_at[m])),
            None,
        )
    if choice is None:
        return None
    reference, size = choice
    step = measured.benchmark_step(reference, size, mode)
    assert step is not None
    scale, basis = 1.0, f"{mode}"
    if reference != model:
        scale, basis = GFLOPS_224[model] / GFLOPS_224[reference], f"{mode} as {reference} x GFLOPs"
    if size != image_size:
        scale *= (image_size / size) ** 2
        basis += f" scaled by pixel area from {size} px"
    ratio = measured.trial_step(reference, size, mode)
    basis += f", x{ratio.ratio:.2f} real-trial ratio" if ratio else ", benchmark step only"
    return StepCost(step.seconds_per_image * scale * (ratio.ratio if ratio else 1.0), basis, ratio)


def trial_gpu_seconds(
    measured: Measurements,
    model: str,
    image_size: int,
    mode: str,
    n_train: int,
    expected_batch_size: int,
    steps: int,
    epochs: int,
    private: bool,
) -> tuple[float, str] | None:
    """Estimated device seconds of one trial on the measured device: its training steps plus per-epoch evaluation
    (validation + test forward passes, `EVAL_IMAGES_PER_TRAIN_IMAGE`, at `FORWARD_FRACTION` of a non-private step);
    the basis text of the training cost, or None without a benchmark."""
    train = step_cost(measured, model, image_size, mode if private else "nonprivate")
    forward = step_cost(measured, model, image_size, "nonprivate")
    if train is None or forward is None:
        return None
    images_trained = steps * expected_batch_size if private else epochs * n_train
    seconds = images_trained * train.seconds_per_image
    forward_benchmark = forward.seconds_per_image / (forward.ratio.ratio if forward.ratio else 1.0)
    seconds += epochs * n_train * EVAL_IMAGES_PER_TRAIN_IMAGE * forward_benchmark * FORWARD_FRACTION
    return seconds, train.basis


def describe_gpu_hours(total_seconds: float, unknown: list[str], bases: set[str], measured: Measurements) -> str:
    """The dry run's GPU-hours line: the total and every file and derivation it rests on."""
    if measured.steps_file is None:
        return (
            f"GPU-hours estimate: none (no DP-step benchmark for {measured.device}: "
            f"{shown(_expected(measured, 'dp_step'))} is missing; run benchmarks/device_run.py "
            "on the device and commit its results)"
        )
    text = (
        f"GPU-hours estimate (one {measured.device_name} per trial): {total_seconds / 3600:,.0f} h, from the "
        f"fixed-shape DP-step benchmark {shown(measured.steps_file)}"
    )
    if measured.trials_file is not None and measured.trials:
        text += f" and the real-trial / benchmark step ratios of {shown(measured.trials_file)}"
    else:
        text += (
            f"; no real-trial measurement on this device ({shown(_expected(measured, 'trial_step'))} is missing): "
            "the estimate is the benchmark step alone, with no overhead factor (a lower bound)"
        )
    text += f"; {'; '.join(sorted(bases))}" if bases else ""
    if unknown:
        text += f"; no estimate for {', '.join(sorted(set(unknown)))} (not benchmarked)"
    return text


def describe_trials_per_gpu(measured: Measurements, cases: set[tuple[str, int, str, int, str]]) -> list[str]:
    """How many trials of each (model, image size, mode, physical batch, precision) fit in the measured device's
    memory, from a measured per-trial peak (`TrialStep.peak_memory_mib`), or that none was measured."""
    where = shown(measured.trials_file or _expected(measured, "trial_step"))
    lines = []
    for model, size, mode, physical_batch, precision in sorted(cases):
        case = f"{model} {size} px {mode} {precision}, physical batch {physical_batch}"
        peak = measured.trial_peak(model, size, mode, physical_batch, precision)
        if peak is None or peak.peak_memory_mib is None or measured.device_memory_mib is None:
            lines.append(
                f"  trials per {measured.device_name}: {case}: no measured per-trial peak memory in {where}; "
                "run benchmarks/device_run.py on the device to measure it"
            )
            continue
        fit = int(measured.device_memory_mib // peak.peak_memory_mib)
        share = f"resources.gpu: {fit_share(fit):.4f}" if fit >= 1 else "it does not fit"
        lines.append(
            f"  trials per {measured.device_name}: {case}: {fit} by memory (peak {peak.peak_memory_mib:,.0f} MiB "
            f"per trial of {measured.device_memory_mib:,.0f} MiB, {where}); {share}"
        )
    return lines


def fit_share(trials: int) -> float:
    """The ``resources.gpu`` share that packs ``trials`` trials on one GPU: 1/trials rounded down to Ray's 0.0001
    steps (rounding up could make the last one not fit)."""
    return int(10_000 / trials) / 10_000


def _expected(measured: Measurements, kind: str) -> Path:
    return RESULTS_DIR / f"{kind}-{measured.device}.json"
