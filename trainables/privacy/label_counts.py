"""Positive weights from the training labels (``training.pos_weight: train``) without breaking DP.

**Why.** The study weights each label's positive BCE term by negatives/positives counted on the training
split. Those counts are a function of every private record, so with exact counts one record changes the
loss of *all* others: removing one of 2 positives of a label on a 64-image set doubles that label's
weight for the other positive, and the sum of clipped per-sample gradients then moves by 1.27 C, not the
C the accountant assumes (`tests/privacy/test_label_counts.py` reproduces it). Exact counts are therefore
refused for a private trial (`train_pos_weight` raises).

**The mechanism.** The per-label positive counts ``c = sum_i y_i`` (``y_i`` in {0, 1}^L, one row per
image) are released once, before training, with the Gaussian mechanism:

    c~ = c + N(0, (sigma_c * Delta)^2 I_L),    Delta = sqrt(L)  (K sqrt(L) for patients, below)

* **Adjacency**: add/remove one image (the privacy unit of the trial, as DP-SGD's). ``c`` changes by one
  row ``y_i``, whose L2 norm is at most ``sqrt(L)`` when any label combination is possible (multi-label;
  the study's five labels, ``no_finding`` included, are not assumed exclusive). ``Delta = sqrt(L)``
  therefore holds for every dataset without looking at it; if the labels were mutually exclusive it would
  be 1, which we do not exploit.
* **Patients** (``privacy_unit: patient``, cap K = ``max_images_per_patient``): the record is a patient with
  the images it trains on (its first K, `trainables.privacy.patients.group_patients`), and the counts are
  over exactly those images, so ``c`` changes by ``sum_{i in I_p} y_i``, each coordinate at most
  ``|I_p| <= K``: ``Delta = K sqrt(L)``, reached by a patient with K images that are positive for every
  label (`count_sensitivity`; tests enumerate every patient of small label tables). We count images, not
  patients with a label: ``pos_weight`` is the image-level ratio negatives/positives the loss is taken
  over, which patient counts (sensitivity sqrt(L)) would estimate only when every patient had one image.
  The price is K times the noise in images at the same sigma_c (and the same epsilon): 20 x 4 x sqrt(5) ~
  180 images per count at K = 4. The release is accounted at the patient level as ``GaussianDpEvent(
  sigma_c)``, like the image-level one at the image level (the privacy ledger's patient-level view takes a
  patient-level run at k = 1 with this sigma_c, `trainables.privacy.ledger`).
* **Accounting**: a Gaussian mechanism of sensitivity Delta with noise std ``sigma_c * Delta`` has the
  RDP of noise multiplier ``sigma_c`` (alpha / (2 sigma_c^2)): Opacus history entry ``(sigma_c, 1.0, 1)``,
  dp-accounting ``GaussianDpEvent(sigma_c)``. It is composed with the DP-SGD steps in the trial's
  accountant (`trainables.privacy.accounting`), and DP-SGD's sigma is calibrated so the total ends at
  the target.
* **N is public.** The number of training images N is treated as public, the convention Opacus and
  dpsweep already use when they set q = 1 / ceil(N / B) from ``len(dataset)``. Strict add/remove
  adjacency would make N private as well; we do not account for it, and say so in every docstring that
  uses N. For patients N is the patients' capped images, a function of the images per patient, which are
  treated as public metadata (`trainables.privacy.units`), like N_patients.
* **Post-processing**: the released counts are clamped to [1, N - 1] and turned into
  ``pos_weight = (N - c~) / c~``. Everything the trial does with them afterwards is post-processing of
  an accounted release, so DP-SGD's clipped sum, *given* the released weights, has sensitivity C again
  (adaptive composition: the second mechanism may depend on the first one's output).
* **Randomness**: the noise is secret: from a `SecureRandom` (secure mode) or a numpy generator keyed by
  ``os.urandom``, never from the trial's seed. The release is drawn once per trial and stored in the
  checkpoint (`LabelCountRelease.to_dict`): a resumed trial must reuse it, since a second draw would be
  a second, unaccounted release.

**Default noise** `DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER` = 20: the noise std on each count is
20 x sqrt(5) ~ 45 images. At the study's scale (positives in the thousands per label) that moves a
weight by a few percent at most. The release alone is epsilon 0.19 at delta 6e-6 (RDP); composed with
DP-SGD it raises the calibrated sigma by 0.9%, 0.1% and 0.04% at target epsilon 1, 3 and 8 on the smoke
scale (q = 1/56, 168 steps; pinned in the tests), where sigma_c = 10 would cost 4.3% at epsilon 1 and
sigma_c = 5 46%. On the small synthetic twins (260-980 positives per label) the counts move by 5-17%.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import IAccountant

from trainables.privacy.accounting import LABEL_COUNT_SAMPLE_RATE
from trainables.privacy.secure import SecureRandom

__all__ = [
    "DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER",
    "LabelCountRelease",
    "PosWeight",
    "account_release",
    "count_sensitivity",
    "patient_labels",
    "release_label_counts",
    "train_pos_weight",
]

DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER = 20.0
"""Default sigma_c of the label-count release (``privacy.label_count_noise_multiplier``): see the module
docstring for what it costs and how much it moves the weights."""


def count_sensitivity(n_labels: int, max_images_per_patient: int | None = None) -> float:
    """L2 sensitivity of the per-label positive-count vector under add/remove of one record.

    One image (``max_images_per_patient`` None): its label row, at most sqrt(L). One patient whose images are
    counted, at most K = ``max_images_per_patient`` of them: the sum of its rows, each coordinate at most K, so
    K sqrt(L) (module docstring).

    Args:
        n_labels: L, the number of labels (each image's label row is in {0, 1}^L).
        max_images_per_patient: K for a patient-level release, None for an image-level one.
    """
    if isinstance(n_labels, bool) or not (isinstance(n_labels, numbers.Integral) and n_labels >= 1):
        raise ValueError(f"n_labels={n_labels!r} must be a whole number >= 1")
    cap = max_images_per_patient
    if cap is None:
        return math.sqrt(int(n_labels))
    if isinstance(cap, bool) or not (isinstance(cap, numbers.Integral) and cap >= 1):
        raise ValueError(f"max_images_per_patient={cap!r} must be a whole number >= 1, or None (image records)")
    return int(cap) * math.sqrt(int(n_labels))


@dataclass(frozen=True)
class LabelCountRelease:
    """The one Gaussian release of the training split's per-label positive counts.

    Attributes:
        noisy_positives: c~, the released counts per label (before clamping), in images.
        n_train: N, the number of training images counted (for patients: their capped images; treated as public,
            see the module docstring).
        noise_multiplier: sigma_c; the noise std per count was ``sigma_c * sensitivity``.
        sensitivity: Delta, the L2 sensitivity the noise was scaled to: sqrt(L), or K sqrt(L) for patients
            (`count_sensitivity`).
        max_images_per_patient: K of a patient-level release; None for an image-level one (and in checkpoints
            written before patient-level releases existed).
    """

    noisy_positives: tuple[float, ...]
    n_train: int
    noise_multiplier: float
    sensitivity: float
    max_images_per_patient: int | None = None

    def __post_init__(self) -> None:
        if not self.noisy_positives or not all(math.isfinite(c) for c in self.noisy_positives):
            raise ValueError(f"noisy_positives={self.noisy_positives!r} must be a non-empty tuple of finite counts")
        if isinstance(self.n_train, bool) or not (isinstance(self.n_train, numbers.Integral) and self.n_train >= 2):
            raise ValueError(f"n_train={self.n_train!r} must be a whole number >= 2 of training images")
        if not (0 < self.noise_multiplier < math.inf):
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} must be a finite number > 0")
        expected = count_sensitivity(len(self.noisy_positives), self.max_images_per_patient)
        if self.sensitivity != expected:
            formula = (
                "sqrt(n_labels)" if self.max_images_per_patient is None else "max_images_per_patient x sqrt(n_labels)"
            )
            raise ValueError(f"sensitivity={self.sensitivity!r} must be {formula} = {expected!r}")
        object.__setattr__(self, "noisy_positives", tuple(float(c) for c in self.noisy_positives))
        object.__setattr__(self, "n_train", int(self.n_train))
        object.__setattr__(self, "noise_multiplier", float(self.noise_multiplier))

    def pos_weight(self) -> np.ndarray:
        """``(N - c) / c`` per label with c = c~ clamped to [1, N - 1] (post-processing), float64 [L]."""
        clamped = np.clip(np.asarray(self.noisy_positives, dtype=np.float64), 1.0, self.n_train - 1.0)
        return (self.n_train - clamped) / clamped

    def to_dict(self) -> dict[str, object]:
        """Plain values for a checkpoint or a log (the release is DP: it may be logged)."""
        return {
            "noisy_positives": list(self.noisy_positives),
            "n_train": self.n_train,
            "noise_multiplier": self.noise_multiplier,
            "sensitivity": self.sensitivity,
            "max_images_per_patient": self.max_images_per_patient,
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> LabelCountRelease:
        """Inverse of `to_dict` (validated again)."""
        positives = values["noisy_positives"]
        if not isinstance(positives, list | tuple):
            raise ValueError(f"noisy_positives={positives!r} must be a list of counts")
        n_train, sigma, sensitivity = values["n_train"], values["noise_multiplier"], values["sensitivity"]
        cap = values.get("max_images_per_patient")  # absent in image-level checkpoints of earlier versions
        if not (
            isinstance(n_train, int)
            and isinstance(sigma, float)
            and isinstance(sensitivity, float)
            and (cap is None or isinstance(cap, int))
        ):
            raise ValueError(f"not a label-count release: {dict(values)!r}")
        return cls(tuple(float(c) for c in positives), n_train, sigma, sensitivity, cap)


def patient_labels(labels: np.ndarray, patient_images: Sequence[np.ndarray]) -> np.ndarray:
    """The label rows a patient-level release counts: the images each patient trains on (``PatientIndex.images``:
    its first ``max_images_per_patient``), in the split's order; images of patients beyond their cap are left out.

    Args:
        labels: [N, L] labels of the whole training split.
        patient_images: per patient, the indices into the split of the images it contributes.
    """
    labels = np.asarray(labels)
    rows = np.sort(np.concatenate(patient_images)) if len(patient_images) else np.zeros(0, dtype=np.int64)
    selected: np.ndarray = labels[rows]
    return selected


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[0] < 2 or labels.shape[1] < 1:
        raise ValueError(f"labels must be a [N >= 2, L >= 1] array of 0/1 label rows, got shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must hold only 0 and 1 (the sensitivity sqrt(L) assumes binary label rows)")
    return labels


def release_label_counts(
    labels: np.ndarray,
    noise_multiplier: float,
    rng: SecureRandom | None = None,
    *,
    max_images_per_patient: int | None = None,
) -> LabelCountRelease:
    """Release the per-label positive counts of the training split with the Gaussian mechanism.

    Noise std per count ``noise_multiplier * sensitivity`` (`count_sensitivity`; module docstring: add/remove of
    one record, N public). The caller must account for the release as ``(noise_multiplier, 1.0, 1)`` in the trial's
    accountant (`trainables.privacy.accounting.accountant_history`; a patient-level trial's accountant is over
    patients) and must call this once per trial.

    Args:
        labels: [N, L] 0/1 labels of the private training split: every image, or for a patient-level trial exactly
            the images its patients train on (each patient's first K, `trainables.privacy.patients.PatientIndex`):
            the sensitivity K sqrt(L) holds only if no patient has more than K rows here.
        noise_multiplier: sigma_c > 0, finite.
        rng: a `SecureRandom` in secure mode; None draws from a numpy generator keyed by 32 bytes of
            ``os.urandom`` (secret, never logged, not reproducible).
        max_images_per_patient: K of a patient-level trial; None for an image-level one.

    Returns:
        The `LabelCountRelease`.
    """
    labels = _check_labels(labels)
    if isinstance(noise_multiplier, bool) or not (
        isinstance(noise_multiplier, numbers.Real) and 0 < noise_multiplier < math.inf
    ):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number > 0")
    n_train, n_labels = labels.shape
    sensitivity = count_sensitivity(n_labels, max_images_per_patient)
    if rng is None:
        standard = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little"))).standard_normal(
            n_labels
        )
    else:
        standard = rng.standard_normal(n_labels).numpy()
    positives = labels.sum(axis=0, dtype=np.float64)
    noisy = positives + float(noise_multiplier) * sensitivity * standard
    return LabelCountRelease(
        tuple(float(c) for c in noisy), n_train, float(noise_multiplier), sensitivity, max_images_per_patient
    )


@dataclass(frozen=True)
class PosWeight:
    """The BCE positive weights a trial trains with, and where they came from.

    Attributes:
        values: per-label weights (negatives / positives), float64 [L].
        release: the accounted label-count release they are computed from; None only for a non-private
            trial (exact counts).
    """

    values: np.ndarray
    release: LabelCountRelease | None


def train_pos_weight(
    labels: np.ndarray,
    *,
    target_epsilon: float,
    noise_multiplier: float | None,
    rng: SecureRandom | None = None,
    restored: LabelCountRelease | None = None,
    max_images_per_patient: int | None = None,
) -> PosWeight:
    """Positive weights for ``training.pos_weight: train``: DP counts for a private trial, exact otherwise.

    A private trial (finite ``target_epsilon``) gets ``(N - c~) / c~`` from `release_label_counts`; exact
    counts of a private training set are refused, because they make every record's loss depend on the
    other records' labels outside the accounted mechanism (module docstring). A non-private baseline
    (``target_epsilon = inf``) counts exactly, clamped alike.

    Args:
        labels: [N, L] 0/1 labels of the training images the trial trains on (for patients: their capped images,
            as `release_label_counts`).
        target_epsilon: the trial's target epsilon (> 0; ``inf`` for a non-private baseline).
        noise_multiplier: sigma_c of the release (``privacy.label_count_noise_multiplier``); must be a
            finite number > 0 for a private trial; ignored for a non-private one.
        rng: as `release_label_counts`.
        restored: the release a resumed trial saved in its checkpoint (`LabelCountRelease.from_dict`): reused,
            never drawn again (a second draw would be a second, unaccounted release). Must match the labels'
            N and L, ``noise_multiplier`` and ``max_images_per_patient``.
        max_images_per_patient: K of a patient-level trial (the release's sensitivity is K sqrt(L)); None for an
            image-level one.

    Raises:
        ValueError: a private trial asked for exact counts (``noise_multiplier`` None or 0), a restored
            release that does not match, or bad inputs.
    """
    labels = _check_labels(labels)
    if isinstance(target_epsilon, bool) or not (isinstance(target_epsilon, numbers.Real) and target_epsilon > 0):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be > 0 (inf for a non-private baseline)")
    if math.isinf(target_epsilon):
        n_train = labels.shape[0]
        positives = np.clip(labels.sum(axis=0, dtype=np.float64), 1.0, n_train - 1.0)
        return PosWeight((n_train - positives) / positives, None)
    if noise_multiplier is None or noise_multiplier == 0:
        raise ValueError(
            f"training.pos_weight = 'train' with privacy.label_count_noise_multiplier = {noise_multiplier!r} would "
            f"read exact label counts of the private training set (target epsilon {target_epsilon:g}) outside the DP "
            "mechanism: every record's loss would depend on the others' labels, so the clipped gradient sum's "
            "sensitivity exceeds the clip norm the accountant assumes. Fix: set privacy.label_count_noise_multiplier "
            f"> 0 (default {DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER:g}: Gaussian-noised counts, accounted in the trial's "
            "budget), or use training.pos_weight: uniform"
        )
    if restored is not None:
        n_train, n_labels = labels.shape
        saved = (
            restored.n_train,
            len(restored.noisy_positives),
            restored.noise_multiplier,
            restored.max_images_per_patient,
        )
        if saved != (n_train, n_labels, float(noise_multiplier), max_images_per_patient):
            raise ValueError(
                f"the checkpoint's label-count release (N={restored.n_train}, {len(restored.noisy_positives)} labels, "
                f"noise multiplier {restored.noise_multiplier}, images per patient "
                f"{restored.max_images_per_patient}) does not match this trial (N={n_train}, {n_labels} labels, "
                f"{noise_multiplier}, {max_images_per_patient}); refusing to resume"
            )
        return PosWeight(restored.pos_weight(), restored)
    release = release_label_counts(labels, noise_multiplier, rng, max_images_per_patient=max_images_per_patient)
    return PosWeight(release.pos_weight(), release)


def account_release(accountant: IAccountant, release: LabelCountRelease) -> None:
    """Record the release in a fresh trial's Opacus accountant, before any DP-SGD step: ``(sigma_c, 1.0, 1)``.

    From then on ``accountant.get_epsilon(delta)`` includes it (every epoch's epsilon does), and the ledger
    is `trainables.privacy.accounting.accountant_history` with ``label_count_noise_multiplier=sigma_c``.

    Raises:
        ValueError: the accountant already holds entries (the release must come first and only once).
    """
    if accountant.history:
        raise ValueError(
            f"the accountant already records {accountant.history}; the label-count release must be recorded once, "
            "before the first DP-SGD step (a resumed trial restores its ledger instead)"
        )
    accountant.history.append((release.noise_multiplier, LABEL_COUNT_SAMPLE_RATE, 1))
