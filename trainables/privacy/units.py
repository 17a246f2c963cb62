"""Privacy units: what an image-level DP-SGD guarantee means for a patient with k images.

**The mechanism.** Image-level DP-SGD (`trainables.privacy.engine`): every training image joins a step's batch
independently with probability q (Poisson sampling), each included image's gradient is clipped to L2 norm <= C,
and the step releases ``sum of clipped gradients + N(0, (sigma C)^2 I)``; ``steps`` such steps are composed
adaptively. The accountant bounds add/remove of *one image*.

**A patient with k training images.** Adding or removing the patient adds or removes k images at once. At one
step, each of the k images is included independently with probability q, so the number J of the patient's images
in the batch is Binomial(k, q), and the released sum moves by the sum of J clipped gradients, a vector of norm
<= J C. In units of C, one step's pair of output distributions is therefore (remove direction)

    P = sum_j Binomial(k, q)[j] * N(v_j, sigma^2 I)   vs   Q = N(0, sigma^2 I),   ||v_j|| <= j,

and the add direction swaps P and Q. By Choquette-Choo, Ganesh, Steinke, Thakurta 2023 ("Privacy Amplification
for Matrix Mechanisms", arXiv:2310.15526, Cor. 4.7) this vector mixture is dominated by the *scalar* mixture of
Gaussians with sensitivities j = 0..k and probabilities Binomial(k, q)[j], which is dp-accounting's
``from_mixture_gaussian_mechanism`` (its docstring states both directions: ADD compares N(0, sigma^2) with the
mixture, REMOVE the shifted mixture with N(0, sigma^2); the returned PLD holds both and its epsilon is the
maximum of the two). The bound is tight: a patient whose k images all have the same clipped gradient of norm C,
orthogonal to everyone else's, realises the scalar mixture exactly. Composition over the ``steps`` steps is the
PLD's self-composition (valid under adaptive composition of dominating pairs).

This is *not* the k-fold composition of the image-level mechanism with fresh noise per image: the k images share
one noise draw, so their shifts add up linearly (sensitivity k, not sqrt(k), when all are sampled); treating them
as k independent releases would understate the patient's epsilon.

**Rounding.** The PLD is discretised with pessimistic rounding, so every value here is an upper bound on the true
epsilon; the default discretisation interval 1e-3 (coarser than dp-accounting's 1e-4, 5x faster) changes
epsilon by < 0.05% at the smoke and study scales (checked in the tests).

**A label-count release** (``training.pos_weight: train``, `trainables.privacy.label_counts`) of noise multiplier
sigma_c per image has L2 sensitivity <= k Delta for a patient with k images (triangle inequality), i.e. noise
multiplier sigma_c / k in patient units; `patient_epsilon` composes it as a Gaussian of that multiplier.

**Images per patient are public metadata.** The k of a trial is the largest (or 99th percentile) number of
training images of one patient in the training split, computed from the patient ids and treated as public, like
N. Strictly, the maximum is a function of the private data (removing the one patient with the most images can
lower it); we do not account for that release, and say so wherever it is reported.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.stats import binom

if TYPE_CHECKING:
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

__all__ = [
    "DEFAULT_VALUE_DISCRETIZATION",
    "ImagesPerPatient",
    "PatientMechanism",
    "composed_patient_epsilon",
    "images_per_patient",
    "patient_epsilon",
    "patient_epsilon_rdp",
]

DEFAULT_VALUE_DISCRETIZATION = 1e-3
"""Privacy-loss discretisation interval of `patient_epsilon` (pessimistic rounding: an upper bound)."""


@dataclass(frozen=True)
class ImagesPerPatient:
    """Distribution of the number of images per patient in one split (public dataset metadata).

    Attributes:
        n_patients: distinct patients.
        minimum, median, p99, maximum: images per patient; ``p99`` is the 99th percentile rounded up to an
            observed count (``numpy.quantile(..., method="higher")``), so it is a real patient's k.
    """

    n_patients: int
    minimum: int
    median: float
    p99: int
    maximum: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "n_patients": self.n_patients,
            "min": self.minimum,
            "median": self.median,
            "p99": self.p99,
            "max": self.maximum,
        }


def images_per_patient(patient_ids: Sequence[str] | np.ndarray) -> ImagesPerPatient:
    """Count images per patient id (one id per image).

    Raises:
        ValueError: no images.
    """
    ids = np.asarray(patient_ids)
    if ids.size == 0:
        raise ValueError("images_per_patient needs at least one image (got an empty list of patient ids)")
    _, counts = np.unique(ids, return_counts=True)
    return ImagesPerPatient(
        n_patients=int(len(counts)),
        minimum=int(counts.min()),
        median=float(np.median(counts)),
        p99=int(np.percentile(counts, 99, method="inverted_cdf")),  # nearest rank, as the cards
        maximum=int(counts.max()),
    )


def _check(noise_multiplier: float, sample_rate: float, steps: int, delta: float, k: int) -> None:
    if not (isinstance(noise_multiplier, numbers.Real) and 0 <= noise_multiplier < math.inf):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 (units of C)")
    if not (isinstance(sample_rate, numbers.Real) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]: the per-image Poisson sampling probability")
    if not (isinstance(steps, numbers.Integral) and steps >= 0):
        raise ValueError(f"steps={steps!r} must be a whole number >= 0 of DP-SGD steps")
    if not (isinstance(delta, numbers.Real) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    if not (isinstance(k, numbers.Integral) and k >= 1):
        raise ValueError(f"k={k!r} must be a whole number >= 1 of images of one patient")


def _shift_distribution(k: int, sample_rate: float) -> tuple[list[float], list[float]]:
    """Sensitivities 0..k (units of C) and their Binomial(k, q) probabilities; zero-mass shifts dropped."""
    shifts = np.arange(k + 1)
    probabilities = binom.pmf(shifts, k, sample_rate)
    keep = probabilities > 0
    return [float(s) for s in shifts[keep]], [float(p) for p in probabilities[keep]]


def patient_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    k: int,
    *,
    label_count_noise_multiplier: float | None = None,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> float:
    """Epsilon, for one patient with ``k`` training images, of image-level DP-SGD (see the module docstring).

    The PLD of one step is dp-accounting's mixture of Gaussians with shifts j = 0..k (units of C) weighted by
    Binomial(k, q)[j] against N(0, sigma^2), both add and remove directions, self-composed ``steps`` times.
    For k = 1 it is the image-level epsilon (dp-accounting's PLD of the Poisson-subsampled Gaussian).

    Args:
        noise_multiplier: sigma (noise std in units of the clip norm C).
        sample_rate: q, the per-*image* Poisson sampling probability of each step.
        steps: DP-SGD steps taken, >= 0.
        delta: the delta of the patient-level (epsilon, delta) guarantee.
        k: the patient's number of training images, >= 1.
        label_count_noise_multiplier: sigma_c of the per-image label-count release composed with training
            (``pos_weight: train``), or None; accounted as a Gaussian of multiplier sigma_c / k.
        value_discretization_interval: PLD discretisation (pessimistic: smaller is tighter and slower).

    Returns:
        Epsilon (natural log) under add/remove of the patient's k images; 0 when nothing was released and
        ``inf`` for sigma = 0 with at least one step.
    """
    _check(noise_multiplier, sample_rate, steps, delta, k)
    if steps == 0 and label_count_noise_multiplier is None:
        return 0.0
    if noise_multiplier == 0 and steps > 0:
        return math.inf
    from dp_accounting.pld import privacy_loss_distribution as pld

    distribution = None
    if steps:
        shifts, probabilities = _shift_distribution(int(k), float(sample_rate))
        distribution = pld.from_mixture_gaussian_mechanism(
            float(noise_multiplier),
            shifts,
            probabilities,
            pessimistic_estimate=True,
            value_discretization_interval=value_discretization_interval,
        ).self_compose(int(steps))
    if label_count_noise_multiplier is not None:
        release = pld.from_gaussian_mechanism(
            float(label_count_noise_multiplier) / int(k),
            sensitivity=1.0,
            pessimistic_estimate=True,
            value_discretization_interval=value_discretization_interval,
        )
        distribution = release if distribution is None else distribution.compose(release)
    assert distribution is not None
    return float(distribution.get_epsilon_for_delta(float(delta)))


@dataclass(frozen=True)
class PatientMechanism:
    """One trial seen at the patient level: ``k`` = 1 for a patient-level trial (its records are patients), the
    largest images per patient for an image-level one (its k images per patient share each step's noise).

    Attributes:
        noise_multiplier, sample_rate, steps: the trial's sigma, q (per record of its own unit) and its steps.
        k: images of one patient that are separate records of the trial (1 for patient-level trials).
        label_count_noise_multiplier: sigma_c of the trial's label-count release, or None. For one patient it is a
            Gaussian of noise multiplier sigma_c / k: the patient's k records move the counts by at most k times one
            record's sensitivity.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    k: int
    label_count_noise_multiplier: float | None = None


def composed_patient_epsilon(
    mechanisms: Sequence[PatientMechanism],
    delta: float,
    *,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> float:
    """Epsilon for one patient of releasing everything a set of trials on the same data released (a fixed set of
    trials, as a grid's; not adaptive selection): the composition of each trial's patient-level PLD (the
    Binomial(k, q) mixture of `patient_epsilon`, self-composed over its steps). Valid across privacy units, since
    every trial is expressed at the patient level; each label-count release is composed as a Gaussian of noise
    multiplier sigma_c / k (`PatientMechanism`).

    Returns:
        Epsilon at ``delta``; 0 for no steps, ``inf`` if any trial with steps has sigma 0.
    """
    if any(m.steps and m.noise_multiplier == 0 for m in mechanisms):
        for m in mechanisms:
            _check(m.noise_multiplier, m.sample_rate, m.steps, delta, m.k)
        return math.inf
    distribution = composed_patient_pld(mechanisms, delta, value_discretization_interval=value_discretization_interval)
    return 0.0 if distribution is None else float(distribution.get_epsilon_for_delta(float(delta)))


def composed_patient_pld(
    mechanisms: Sequence[PatientMechanism],
    delta: float,
    *,
    value_discretization_interval: float = DEFAULT_VALUE_DISCRETIZATION,
) -> PrivacyLossDistribution | None:
    """The composed patient-level PLD of `composed_patient_epsilon` (None when no trial took a step), for callers that
    compose more releases onto it (`trainables.privacy.ledger`).

    Raises:
        ValueError: a mechanism is out of range, or has steps with sigma 0 (no finite PLD).
    """
    from dp_accounting.pld import privacy_loss_distribution as pld

    # Equal mechanisms are built once and self-composed: the label-count releases by their sigma_c / k, the steps by
    # (sigma, q, k) with their steps summed (a grid's trials share a few; each mixture PLD takes seconds to build).
    releases: Counter[float] = Counter()
    steps: Counter[tuple[float, float, int]] = Counter()
    for m in mechanisms:
        _check(m.noise_multiplier, m.sample_rate, m.steps, delta, m.k)
        if m.label_count_noise_multiplier is not None:
            releases[float(m.label_count_noise_multiplier) / m.k] += 1
        if m.steps == 0:
            continue
        if m.noise_multiplier == 0:
            raise ValueError("a non-private trial (sigma 0) has no finite privacy loss distribution")
        steps[(float(m.noise_multiplier), float(m.sample_rate), int(m.k))] += int(m.steps)
    parts = [
        pld.from_gaussian_mechanism(
            sigma_c, pessimistic_estimate=True, value_discretization_interval=value_discretization_interval
        ).self_compose(count)
        for sigma_c, count in releases.items()
    ]
    for (sigma, q, k), count in steps.items():
        shifts, probabilities = _shift_distribution(k, q)
        parts.append(
            pld.from_mixture_gaussian_mechanism(
                sigma,
                shifts,
                probabilities,
                pessimistic_estimate=True,
                value_discretization_interval=value_discretization_interval,
            ).self_compose(count)
        )
    distribution = None
    for part in parts:
        distribution = part if distribution is None else distribution.compose(part)
    return distribution


RDP_ORDERS: tuple[float, ...] = tuple([1.1 + 0.1 * i for i in range(99)] + list(range(12, 64)))
"""Orders of `patient_epsilon_rdp` (Opacus's defaults)."""


def _log_mixture_density(x: np.ndarray, sigma: float, shifts: list[float], probabilities: list[float]) -> np.ndarray:
    """log of sum_j p_j N(x; s_j, sigma^2), up to the common Gaussian normaliser (cancels in the divergences)."""
    terms = np.stack([math.log(p) - (x - s) ** 2 / (2 * sigma**2) for s, p in zip(shifts, probabilities, strict=True)])
    top = terms.max(axis=0)
    return np.asarray(top + np.log(np.exp(terms - top).sum(axis=0)))


def patient_epsilon_rdp(noise_multiplier: float, sample_rate: float, steps: int, delta: float, k: int) -> float:
    """An independent upper bound on `patient_epsilon`: Renyi DP of the same mixture by numerical quadrature.

    For each order alpha, the Renyi divergences D_alpha(P||Q) and D_alpha(Q||P) of one step (P the mixture of
    N(j, sigma^2) with Binomial(k, q) weights, Q = N(0, sigma^2)) are integrated on a fine grid (trapezoid, step
    sigma/2000, from -30 sigma to k + 30 sigma), the larger one is multiplied by ``steps`` and converted to
    (epsilon, delta) with Balle et al. 2020 Thm. 21, as Opacus does; minimised over `RDP_ORDERS`. It shares no
    code with dp-accounting's PLD, so the two agreeing (RDP slightly above PLD) checks `patient_epsilon`.
    """
    _check(noise_multiplier, sample_rate, steps, delta, k)
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    sigma = float(noise_multiplier)
    shifts, probabilities = _shift_distribution(int(k), float(sample_rate))
    x = np.arange(-30 * sigma, k + 30 * sigma, sigma / 2000)
    log_q = -(x**2) / (2 * sigma**2)
    log_p = _log_mixture_density(x, sigma, shifts, probabilities)
    log_norm = -0.5 * math.log(2 * math.pi * sigma**2)
    best = math.inf
    for alpha in RDP_ORDERS:
        divergences = []
        for log_a, log_b in ((log_p, log_q), (log_q, log_p)):
            integrand = alpha * log_a + (1 - alpha) * log_b + log_norm
            top = integrand.max()
            integral = np.trapezoid(np.exp(integrand - top), x)
            divergences.append((top + math.log(integral)) / (alpha - 1))
        rdp = steps * max(divergences)
        epsilon = rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        best = min(best, epsilon)
    return float(best)
