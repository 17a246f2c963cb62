"""Planning numbers for `dpsweep sweep --dry-run` before any data is prepared: dataset sizes and GPU-hours.

Both are estimates, printed as such. Once a dataset is prepared its real N replaces the estimate (and sigma
is recalibrated on it); the GPU-hours come from our own benchmark on one H200.
"""

from __future__ import annotations

from dataclasses import dataclass

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

H200_SECONDS_PER_IMAGE: dict[tuple[str, int], dict[str, float]] = {
    # benchmarks/results/dp_step-cuda-h200.json: median step time at batch 32 divided by 32.
    ("convnext_small", 224): {"functorch": 0.24824 / 32, "hooks": 0.29421 / 32, "non-private": 0.09350 / 32},
}
GFLOPS_224 = {"convnext_small": 8.71, "convnext_tiny": 4.47}
"""timm's published forward GFLOPs at 224 px, to scale the benchmarked model to its sibling."""

REAL_TRIAL_OVERHEAD = 2.5
"""A real DP trial's step on the H200 (variable Poisson batch shapes, host syncs) took ~2.5x the fixed-shape
benchmark step (benchmarks/results/gpu_trial-h200.json, convnext_small 128 px); applied to every estimate."""

FORWARD_FRACTION = 1 / 3
"""An evaluation forward pass costs about a third of a non-private training step per image."""


@dataclass(frozen=True)
class GpuEstimate:
    hours: float
    basis: str


def seconds_per_image(model: str, image_size: int, mode: str) -> tuple[float, str] | None:
    """H200 seconds per training image for a DP step in ``mode`` (or ``non-private``), and how it was derived;
    None when no benchmark covers the model."""
    reference = next(((m, s) for (m, s) in H200_SECONDS_PER_IMAGE if m == model), None)
    basis = "measured"
    if reference is None:
        sibling = next(((m, s) for (m, s) in H200_SECONDS_PER_IMAGE if m in GFLOPS_224), None)
        if model not in GFLOPS_224 or sibling is None:
            return None
        reference, scale = sibling, GFLOPS_224[model] / GFLOPS_224[sibling[0]]
        basis = f"{sibling[0]} scaled by GFLOPs"
    else:
        scale = 1.0
    if image_size != reference[1]:
        scale *= (image_size / reference[1]) ** 2
        basis += f", scaled by pixel area from {reference[1]} px"
    seconds = H200_SECONDS_PER_IMAGE[reference].get(mode)  # None: this mode is not benchmarked on the H200 yet
    return None if seconds is None else (seconds * scale, basis)


def trial_gpu_seconds(
    model: str,
    image_size: int,
    mode: str,
    n_train: int,
    expected_batch_size: int,
    steps: int,
    epochs: int,
    private: bool,
) -> tuple[float, str] | None:
    """Estimated H200 seconds of one trial: its training steps plus per-epoch evaluation."""
    train = seconds_per_image(model, image_size, mode if private else "non-private")
    forward = seconds_per_image(model, image_size, "non-private")
    if train is None or forward is None:
        return None
    images_trained = steps * expected_batch_size if private else epochs * n_train
    seconds = images_trained * train[0] * REAL_TRIAL_OVERHEAD
    seconds += epochs * n_train * EVAL_IMAGES_PER_TRAIN_IMAGE * forward[0] * FORWARD_FRACTION
    return seconds, train[1]


def describe_gpu_hours(total_seconds: float, unknown: list[str], bases: set[str]) -> str:
    text = (
        f"GPU-hours estimate (one NVIDIA H200 per trial): {total_seconds / 3600:,.0f} h "
        f"(from our H200 benchmark x{REAL_TRIAL_OVERHEAD} real-trial overhead; {'; '.join(sorted(bases))})"
    )
    if unknown:
        text += f"; no estimate for {', '.join(sorted(set(unknown)))} (not benchmarked)"
    return text
