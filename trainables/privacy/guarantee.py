"""A trial's privacy guarantee in words: what is protected, under which assumptions, and what is not.

For MLflow tags, trials.parquet, the sweep summary and the report. `has_dp_guarantee` says whether a trial
may be binned as private; `guarantee_statement` spells the guarantee out.
"""

from __future__ import annotations

from trainables.config import PrivacyConfig
from trainables.privacy.randomness import randomness_mode

NO_GUARANTEE_SEED_PUBLISHED = "none (noise seed published)"
"""The guarantee of a ``privacy.reproducible_noise`` trial: its noise and sampling replay from its logged seed."""
NO_GUARANTEE_NON_PRIVATE = "none (non-private baseline: no clipping, no noise)"


def has_dp_guarantee(privacy: PrivacyConfig) -> bool:
    """Whether the trial's (epsilon, delta) holds: private, and its noise seed not published."""
    return randomness_mode(privacy) in ("default", "secure")


def guarantee_statement(privacy: PrivacyConfig, n_train: int, *, pos_weight: str = "uniform") -> str:
    """The guarantee of one trial in words (one line, for a tag or a table cell).

    Args:
        privacy: the trial's privacy settings (calibrated: ``noise_multiplier``, ``sample_rate``, ``steps``).
        n_train: training images N; treated as public (q = 1/ceil(N/B) is derived from it).
        pos_weight: the trial's ``pos_weight``; with ``train`` a private trial releases Gaussian-noised label counts
            (``privacy.label_count_noise_multiplier``), composed into its budget.

    Returns:
        `NO_GUARANTEE_NON_PRIVATE`, `NO_GUARANTEE_SEED_PUBLISHED` (followed by why), or a statement of the
        (epsilon, delta)-DP guarantee: unit, adjacency, N public, mechanism, accountant, randomness, and
        what lies outside it.
    """
    mode = randomness_mode(privacy)
    if mode == "non_private":
        return NO_GUARANTEE_NON_PRIVATE
    if mode == "reproducible":
        return (
            f"{NO_GUARANTEE_SEED_PUBLISHED}: privacy.reproducible_noise seeds the noise and Poisson sampling "
            "from the logged seed, so the trial can be replayed; its epsilon is not a guarantee"
        )
    randomness = (
        "ChaCha20 CSPRNG under a fresh os.urandom key, 4-Gaussian floating-point defence (secure_mode)"
        if mode == "secure"
        else "torch generators seeded from os.urandom, kept only in checkpoints (not a CSPRNG; "
        "floating-point noise not hardened: use secure_mode for final runs)"
    )
    outside = [
        "validation-based epoch selection and thresholds, and the per-epoch validation/test metrics "
        "(validation and test images are not protected)",
        "tuning across trials (see the sweep's tuning epsilon)",
    ]
    if privacy.privacy_unit == "image":
        outside.append("a patient with k images gets only the k-image group guarantee (privacy/epsilon_patient)")
    unit = (
        f"one patient (all its training images, at most {privacy.max_images_per_patient}; N = training patients)"
        if privacy.privacy_unit == "patient"
        else "one image"
    )
    release = ""
    if pos_weight == "train" and privacy.label_count_noise_multiplier is not None:
        release = (
            f", after one Gaussian release of the training label counts (noise multiplier "
            f"{privacy.label_count_noise_multiplier:g}) for pos_weight=train, composed into the budget"
        )
    return (
        f"({privacy.target_epsilon:g}, {privacy.delta:g})-DP target for the released model updates; unit: "
        f"{unit}; add/remove adjacency; N={n_train} treated as public; DP-SGD with Poisson sampling "
        f"q={privacy.sample_rate:.6g}, {privacy.steps} steps, clip C={privacy.max_grad_norm:g}, noise multiplier "
        f"{privacy.noise_multiplier:.6g}{release}; accountant {privacy.accountant} (Opacus); randomness: {randomness}. "
        f"Outside it: {'; '.join(outside)}."
    )
