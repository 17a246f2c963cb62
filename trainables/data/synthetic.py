"""The synthetic twin: procedurally generated chest-X-ray-like images with the study's five labels.

The embedded default sweep runs offline on a few CPU cores on this data. Four "sites" mirror the
study's design: ``synthetic-source`` is the public source used for non-private domain pretraining,
``synthetic-a``/``-b``/``-c`` are the private fine-tuning targets (each also the external test set of
the others). Everything is deterministic given ``(name, seed, n_images)``; the image size only
changes the rendering (the same cohort, anatomy and findings are drawn at every size).

What an image shows (frontal view, displayed as a radiograph: bright = dense, the patient's left on
the image's right). Coordinates below are normalized to [-1, 1] across the image, y pointing down.

- Anatomy: body outline (soft tissue), two lung fields (dark: air) with a domed diaphragm and sharp
  costophrenic angles, mediastinum with spine and aortic knob, a heart shadow on the image's right,
  hila with vascular markings fading to the periphery, posterior ribs and clavicles. Men have a wider
  thorax; women have breast shadows over the lower lung zones.
- Findings (each one replaces lung air by fluid/tissue, so it brightens the image where it lies):

  * cardiomegaly: cardiothoracic ratio (heart width / inner thorax width) drawn uniformly from
    [0.50, 0.64] (and at least 0.04 above the patient's normal ratio) instead of the normal ratio:
    mean 0.45, std 0.03, clipped to [0.37, 0.53], plus 0.05 x aging (see below).
    An AP film magnifies the heart by ``AP_MAGNIFICATION``, so a normal heart on a bedside film can
    look enlarged, as in real data.
  * pleural_effusion: fluid filling one or both lung bases from the diaphragm up to a level of
    6-45 % of the lung height, with a meniscus that rises laterally (blunted costophrenic angle).
  * atelectasis: a dense band (plate-like, 40 %) or a wedge from the hilum to the lower lateral lung
    (60 %), with volume loss: the hemidiaphragm on that side rises and the mediastinum shifts
    toward it.
  * pneumonia: patchy cloud-like consolidation (a blob envelope times a smooth random field) in one
    lung, in both lungs for 30 % of cases.
  * no_finding = 1 exactly when none of the four is present.

- Co-occurrence: a patient-level frailty and an image-level acuity term raise every finding's log
  odds; cardiomegaly and pneumonia raise effusion's, effusion and pneumonia raise atelectasis's.
  Cardiomegaly is mostly persistent within a patient (a strong patient-level term); acute findings
  change between a patient's images.
- Age and sex: older patients have more findings, and their findings are harder to see. With
  ``aging = clip((age - 18) / 72, 0, 1)``: finding opacity x (1 - 0.65 aging), lung air contrast
  x (1 - 0.2 aging), noise x (1 + 2 aging), scarring "clutter" that mimics consolidation
  (amplitude ~ aging^2), a larger normal heart, poorer inspiration (raised diaphragm, mimicking
  volume loss), more rotation and more AP films (mimicking cardiomegaly). Men have a wider thorax
  and slightly more cardiomegaly and pneumonia; women have breast shadows over the lung bases.
  Measured: a logistic regression on 16x16 block-averaged pixels, trained on the train split of
  ``synthetic-source`` (seed 0), scores a macro AUROC of 0.80 on its test split, and 0.82 on ages
  [0, 40) vs 0.72 on [70, 100) over the held-out (val + test) patients; seeds 0-3 gave gaps of
  0.08-0.15 (generator version 2). (The predecessor study saw 0.90 vs 0.81 on VinDr-CXR.)
- Sites: each applies its own acquisition (gamma, contrast, offset, heel-effect gradient, blur,
  noise, a corner marker) and has its own age mix, AP share and prevalence shift; the finding
  features themselves are the same everywhere, so a model pretrained on the source transfers.

Rendering (vectorized numpy over chunks of images; no per-pixel Python): a density map (soft tissue
+ bone + heart, minus the air of the aerated lung that findings have not replaced) in [0, 1]; the
patient's rotation and shift (bilinear resampling); heel effect; side marker; Gaussian detector blur;
signal-dependent Gaussian noise (sd = noise_sd x noise_gain x (0.35 + 0.65 sqrt(intensity))); the
site's tone curve to uint8. Each image's random textures and noise come from its own seed, so its
pixels do not depend on the other images or on the chunking.

Splits are patient-disjoint, about 70/10/20 % of *patients* (``SPLIT_FRACTIONS``), by the same keyed hash of
each patient's id as real datasets (`trainables.data.splits.keyed_split`: adding a patient moves nobody else), so
the counts are binomial. Real datasets draw a secret key from ``os.urandom``; the twin is public synthetic data
and must stay deterministic, so its key is derived from the site's name and the generator seed
(`synthetic_split_key`). The first key of that sequence that leaves no split empty is used: attempt 0 for
every cohort of more than a few dozen patients, a later one only for the tiny cohorts of tests. No histogram
equalization or min-max scaling is applied: site intensity differences are part of the shift.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from trainables.data.cache import CARD_FILE, IMAGES_FILE, MANIFEST_COLUMNS, MANIFEST_FILE, write_cache
from trainables.data.labels import LABELS, SPLITS
from trainables.data.splits import keyed_split
from trainables.names import dataset_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = "2"
"""Bump whenever a change alters any generated pixel or manifest value (invalidates prepared copies). 2: keyed
splits (`trainables.data.splits`) instead of a seeded permutation; pixels, labels and demographics unchanged."""

NO_FINDING = "no_finding"
FINDINGS: tuple[str, ...] = tuple(label for label in LABELS if label != NO_FINDING)
"""The four findings drawn by the generator (atelectasis, cardiomegaly, pleural_effusion, pneumonia);
``no_finding`` is derived from them."""

SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}
"""Expected share of *patients* per split (each patient is drawn on its own, so the realized shares are binomial;
image shares differ slightly more because patients have 1-3 images)."""

MIN_SIZE = 32
"""Smallest supported image side in pixels."""

MIN_IMAGES = 10
"""Smallest cohort: guarantees at least four patients, so every split gets at least one."""

IMAGES_PER_PATIENT_P: tuple[float, float, float] = (0.5, 0.3, 0.2)
"""Probability that a patient has 1, 2 or 3 images."""

AP_MAGNIFICATION = 1.12
"""Apparent heart-width factor of an AP (bedside) film relative to PA."""

_CHUNK_PIXELS = 1 << 16  # pixels rendered at once: float32 temporaries of 256 KiB stay in the L2 cache
_TONE_LEVELS = 1024  # resolution of the linear intensity fed to each image's tone-curve lookup table


@dataclass(frozen=True)
class SiteProfile:
    """One synthetic site: cohort mix and acquisition shift.

    Attributes:
        name: dataset name, e.g. ``synthetic-a``.
        description: what the site imitates.
        n_images: default number of images.
        age_beta: (a, b) of the Beta distribution of a patient's first age, scaled to [18, 95] years.
        male_share: probability that a patient is male.
        prevalence_shift: log-odds added to every finding (sicker > 0, healthier < 0).
        ap_logit: log-odds of an AP film for a 55-year-old without acute findings.
        gamma: tone curve exponent applied to the [0, 1] detector intensity (> 1 darkens mid-tones).
        contrast: tone curve multiplier after the gamma.
        offset: tone curve offset after the contrast, in [0, 1] units (1 = 255 gray levels).
        heel: heel effect: exposure multiplied by ``1 + heel * y`` (y = -1 at the top, +1 at the bottom).
        noise_sd: standard deviation of detector noise at full signal, in [0, 1] units, for a young
            patient (x 3 from 90 years).
        blur_px: Gaussian blur sigma in pixels at 64 px (scaled with the image size).
        marker_corner: corner of the burned-in side marker: 0 top-left, 1 top-right, 2 bottom-left,
            3 bottom-right.
    """

    name: str
    description: str
    n_images: int
    age_beta: tuple[float, float]
    male_share: float
    prevalence_shift: float
    ap_logit: float
    gamma: float
    contrast: float
    offset: float
    heel: float
    noise_sd: float
    blur_px: float
    marker_corner: int


SITES: dict[str, SiteProfile] = {
    profile.name: profile
    for profile in (
        SiteProfile(
            name="synthetic-source",
            description="public pretraining source (MIMIC-like): large, mixed inpatient/outpatient",
            n_images=4000,
            age_beta=(1.6, 1.4),
            male_share=0.52,
            prevalence_shift=0.0,
            ap_logit=-0.3,
            gamma=1.0,
            contrast=1.0,
            offset=0.04,
            heel=0.0,
            noise_sd=0.03,
            blur_px=0.7,
            marker_corner=0,
        ),
        SiteProfile(
            name="synthetic-a",
            description="bedside intensive care (UKA-like): mostly AP, sicker, noisier, darker",
            n_images=2500,
            age_beta=(1.4, 1.2),
            male_share=0.58,
            prevalence_shift=0.35,
            ap_logit=1.2,
            gamma=1.25,
            contrast=0.95,
            offset=0.0,
            heel=0.06,
            noise_sd=0.045,
            blur_px=0.9,
            marker_corner=1,
        ),
        SiteProfile(
            name="synthetic-b",
            description="outpatient PA screening (VinDr-like): younger, healthier, crisp and bright",
            n_images=2500,
            age_beta=(1.2, 1.5),
            male_share=0.48,
            prevalence_shift=-0.35,
            ap_logit=-1.5,
            gamma=0.85,
            contrast=1.08,
            offset=0.08,
            heel=-0.04,
            noise_sd=0.022,
            blur_px=0.5,
            marker_corner=2,
        ),
        SiteProfile(
            name="synthetic-c",
            description="older equipment: flat contrast, blurry, grainy, washed-out background",
            n_images=2500,
            age_beta=(1.5, 1.5),
            male_share=0.5,
            prevalence_shift=0.0,
            ap_logit=-0.2,
            gamma=1.1,
            contrast=0.82,
            offset=0.12,
            heel=0.03,
            noise_sd=0.04,
            blur_px=1.3,
            marker_corner=3,
        ),
    )
}

SYNTHETIC_DATASETS: tuple[str, ...] = tuple(SITES)
"""Names of the synthetic datasets: the public source first, then the private targets."""


def site_profile(name: str) -> SiteProfile:
    """Look up a synthetic site by name; an unknown name raises ``ValueError`` listing the valid ones."""
    if name not in SITES:
        raise ValueError(f"unknown synthetic dataset {name!r}; valid names: {', '.join(SYNTHETIC_DATASETS)}")
    return SITES[name]


@dataclass(frozen=True)
class Scenes:
    """Everything needed to render a batch of images; one entry per image along the first axis.

    Lengths are in normalized image units (the image spans [-1, 1]; y points down). "Side" arrays
    have shape [N, 2]: column 0 is the image's left (the patient's right), column 1 the image's right.
    Finding geometry is stored for every image but only drawn where the finding's flag is set, so a
    test can switch one finding on or off and re-render the same image.
    """

    # Anatomy and positioning.
    thorax_hw: np.ndarray  # inner rib-cage half width
    body_hw: np.ndarray  # body outline half width
    apex_y: np.ndarray  # lung apex
    base_y: np.ndarray  # top of the image-left hemidiaphragm dome at full inspiration
    base_step: np.ndarray  # image-right hemidiaphragm lies this much lower
    dome_depth: np.ndarray  # dome height: costophrenic angles lie this much below the dome top
    inspiration_loss: np.ndarray  # both hemidiaphragms raised by this much (poor inspiration)
    medial_x: np.ndarray  # half width of the mediastinum (lungs' medial borders)
    heart_ctr: np.ndarray  # the patient's normal cardiothoracic ratio on a PA film
    heart_magnification: np.ndarray  # 1 for PA, AP_MAGNIFICATION for AP
    rib_freq: np.ndarray  # posterior ribs per unit height
    rib_phase: np.ndarray  # radians
    rib_amp: np.ndarray  # rib density
    breast_amp: np.ndarray  # breast-shadow density (0 for men)
    shift_x: np.ndarray  # patient positioning offset
    shift_y: np.ndarray
    rotation: np.ndarray  # radians
    # Findings (flags are the labels; geometry is used only where the flag is set).
    atelectasis: np.ndarray  # bool
    atelectasis_side: np.ndarray  # int8, -1 image left, +1 image right
    atelectasis_y: np.ndarray  # [N, 2] y of the band's medial and lateral ends
    atelectasis_width: np.ndarray  # [N, 2] half width at the medial and lateral ends
    atelectasis_volume_loss: np.ndarray  # hemidiaphragm rise; the mediastinum shifts by half of it
    cardiomegaly: np.ndarray  # bool
    cardiomegaly_ctr: np.ndarray  # cardiothoracic ratio (PA) when present; >= heart_ctr + 0.04
    pleural_effusion: np.ndarray  # bool
    effusion_level: np.ndarray  # [N, 2] fluid height as a fraction of lung height; 0 = dry side
    pneumonia: np.ndarray  # bool
    pneumonia_side: np.ndarray  # int8, -1 image left, +1 image right
    pneumonia_center: np.ndarray  # [N, 2] (across lung from medial, down lung from apex), fractions
    pneumonia_radius: np.ndarray
    pneumonia_strength: np.ndarray  # peak opacity before the visibility gain
    pneumonia_bilateral: np.ndarray  # bool: a smaller mirrored patch in the other lung
    # Visibility (depends on age).
    finding_gain: np.ndarray  # multiplies every finding's opacity
    air_contrast: np.ndarray  # density removed by fully aerated lung
    texture_amp: np.ndarray  # vascular/interstitial marking strength
    clutter_amp: np.ndarray  # strength of finding-like scarring
    noise_gain: np.ndarray  # multiplies the site's noise_sd
    # Acquisition (site, with small per-image jitter).
    gamma: np.ndarray
    contrast: np.ndarray
    offset: np.ndarray
    heel: np.ndarray
    noise_sd: np.ndarray
    blur_px: np.ndarray  # Gaussian sigma in pixels at 64 px
    marker_corner: np.ndarray  # int8
    noise_seed: np.ndarray  # uint64: seeds the image's random textures and noise

    def __len__(self) -> int:
        return len(self.noise_seed)

    def take(self, rows: slice | np.ndarray) -> Scenes:
        """The scenes at ``rows`` (a slice or an index array), as a new `Scenes`."""
        return Scenes(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


def generate_synthetic(
    name: str, size: int = 64, n_images: int | None = None, seed: int = 0
) -> tuple[np.ndarray, pd.DataFrame]:
    """Generate one synthetic site in memory.

    Args:
        name: one of ``SYNTHETIC_DATASETS``.
        size: image side in pixels (>= ``MIN_SIZE``). The cohort does not depend on it.
        n_images: number of images (>= ``MIN_IMAGES``); None = the site's default.
        seed: non-negative integer; combined with ``name`` so that sites draw from different streams.

    Returns:
        ``(images, manifest)``: uint8 [N, size, size] and a manifest with ``MANIFEST_COLUMNS`` (in
        that order and those dtypes), row ``i`` describing ``images[i]``; rows are grouped by patient.
    """
    _check_size(size)
    manifest, scenes = sample_cohort(name, n_images=n_images, seed=seed)
    return render_scenes(scenes, size), manifest


def sample_cohort(name: str, n_images: int | None = None, seed: int = 0) -> tuple[pd.DataFrame, Scenes]:
    """Draw a site's patients, images, labels, splits and scene parameters (no pixels).

    Args and validation as `generate_synthetic`. Returns the manifest and the matching `Scenes`.
    """
    profile = site_profile(name)
    n = _check_n_images(profile, n_images)
    _check_seed(seed)
    rng = np.random.default_rng(_seed_sequence(name, seed))
    return _sample(profile, n, rng, seed)


def prepare_synthetic(name: str, data_root: Path, size: int = 64, n_images: int | None = None, seed: int = 0) -> Path:
    """Write a synthetic site to the shared cache at ``<data_root>/<name>/<size>/``, once.

    A folder whose card records the same arguments and generator version, and whose image array and
    manifest still match the digests recorded there, is left untouched (no file is rewritten). Any
    difference (other arguments, an older generator, a missing or altered file) regenerates it.

    Args: as `generate_synthetic`; ``data_root`` is the folder holding all prepared datasets.

    Returns:
        The prepared folder.
    """
    profile = site_profile(name)
    _check_size(size)
    n = _check_n_images(profile, n_images)
    _check_seed(seed)
    out_dir = dataset_dir(data_root, name, size)
    expected = _card_identity(profile, size, n, seed)
    reason = _why_not_identical(out_dir, expected)
    if reason is None:
        return out_dir
    log.info("preparing %s at %d px in %s (%s)", name, size, out_dir, reason)
    images, manifest = generate_synthetic(name, size=size, n_images=n, seed=seed)
    card = {
        **expected,
        "images_sha256": _images_digest(images),
        "manifest_sha256": _manifest_digest(manifest),
    }
    return write_cache(out_dir, images, manifest, card=card)


# ----------------------------------------------------------------------------------------------------
# Validation, seeding and the prepared-copy identity


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}")


def _check_n_images(profile: SiteProfile, n_images: int | None) -> int:
    if n_images is None:
        return profile.n_images
    if isinstance(n_images, bool) or not isinstance(n_images, int | np.integer) or n_images < MIN_IMAGES:
        raise ValueError(
            f"n_images must be an integer >= {MIN_IMAGES} (or None for the site's default "
            f"{profile.n_images}), got {n_images!r}"
        )
    return int(n_images)


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _seed_sequence(name: str, seed: int) -> np.random.SeedSequence:
    """A stream per (site, seed): the name enters through a stable hash, not Python's salted ``hash``."""
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.SeedSequence([int(seed), name_key])


def _card_identity(profile: SiteProfile, size: int, n_images: int, seed: int) -> dict[str, Any]:
    """The card fields that identify a prepared copy (JSON-normalized, so they compare to a read card)."""
    identity: dict[str, Any] = {
        "synthetic": True,
        "dataset": profile.name,
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
        "requested": {"size": int(size), "n_images": int(n_images)},
        "site_profile": dataclasses.asdict(profile),
    }
    normalized: dict[str, Any] = json.loads(json.dumps(identity))
    return normalized


def _images_digest(images: np.ndarray) -> str:
    header = f"{images.dtype.str}{images.shape}".encode()
    return hashlib.sha256(header + np.ascontiguousarray(images).tobytes()).hexdigest()


def _manifest_digest(manifest: pd.DataFrame) -> str:
    canonical = manifest.reset_index(drop=True)[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS)
    row_hashes = pd.util.hash_pandas_object(canonical, index=False).to_numpy()
    return hashlib.sha256(row_hashes.tobytes()).hexdigest()


def _why_not_identical(out_dir: Path, expected: dict[str, Any]) -> str | None:
    """None when ``out_dir`` holds exactly the copy described by ``expected``; else the reason it does not."""
    card_path = out_dir / CARD_FILE
    if not card_path.exists():
        return "not prepared yet"
    try:
        card = json.loads(card_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return f"unreadable {card_path}: {error}"
    changed = [key for key, value in expected.items() if card.get(key) != value]
    if changed:
        return f"card differs in {changed}"
    try:
        images = np.load(out_dir / IMAGES_FILE, mmap_mode="r")
        manifest = pd.read_parquet(out_dir / MANIFEST_FILE)
    except (OSError, ValueError) as error:
        return f"unreadable cache files: {error}"
    if card.get("images_sha256") != _images_digest(images):
        return f"{IMAGES_FILE} does not match the digest in the card"
    if card.get("manifest_sha256") != _manifest_digest(manifest):
        return f"{MANIFEST_FILE} does not match the digest in the card"
    return None


# ----------------------------------------------------------------------------------------------------
# The cohort: patients, images, labels, splits and scene parameters


def _sample(profile: SiteProfile, n: int, rng: np.random.Generator, seed: int) -> tuple[pd.DataFrame, Scenes]:
    # Patients, with 1-3 images each; the last patient is trimmed so that there are exactly n images.
    counts = rng.choice([1, 2, 3], size=n, p=IMAGES_PER_PATIENT_P)
    ends = np.cumsum(counts)
    n_patients = int(np.searchsorted(ends, n) + 1)
    counts = counts[:n_patients].copy()
    counts[-1] -= ends[n_patients - 1] - n
    patient = np.repeat(np.arange(n_patients), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    visit = np.arange(n) - first[patient]

    # Patient-level draws.
    male_p = rng.random(n_patients) < profile.male_share
    first_age = 18.0 + 77.0 * rng.beta(*profile.age_beta, size=n_patients)
    frailty_p = rng.standard_normal(n_patients)
    heart_p = rng.standard_normal(n_patients)  # persistent cardiomegaly propensity
    thorax_hw_p = np.where(male_p, 0.75, 0.69) + 0.025 * rng.standard_normal(n_patients)
    body_margin_p = rng.uniform(0.1, 0.25, n_patients)
    apex_y_p = -0.74 + 0.03 * rng.standard_normal(n_patients)
    base_y_p = np.where(male_p, 0.45, 0.42) + 0.03 * rng.standard_normal(n_patients)
    base_step_p = rng.uniform(0.0, 0.06, n_patients)
    dome_p = rng.uniform(0.08, 0.13, n_patients)
    medial_p = rng.uniform(0.1, 0.14, n_patients)
    ctr_p = np.clip(0.45 + 0.03 * rng.standard_normal(n_patients), 0.37, 0.53)
    rib_freq_p = rng.uniform(5.5, 7.0, n_patients)
    rib_phase_p = rng.uniform(0, 2 * np.pi, n_patients)
    breast_p = np.where(male_p, 0.0, rng.uniform(0.05, 0.12, n_patients))

    # Image-level: age grows over follow-up visits (0-2 years apart); whole years, as real datasets.
    gaps = np.where(visit > 0, rng.uniform(0.0, 2.0, n), 0.0)
    age_exact = first_age[patient] + (np.cumsum(gaps) - np.cumsum(gaps)[first][patient])
    age = np.floor(np.minimum(age_exact, 97.0))
    aging = np.clip((age - 18.0) / 72.0, 0.0, 1.0)  # 0 at 18 years, 1 from 90 years
    age_z = (age - 55.0) / 20.0
    male = male_p[patient]
    acuity = rng.standard_normal(n)
    shared = 0.55 * frailty_p[patient] + 0.45 * acuity + profile.prevalence_shift

    def bernoulli(logit: np.ndarray) -> np.ndarray:
        drawn: np.ndarray = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
        return drawn

    cardiomegaly = bernoulli(-2.6 + 0.65 * age_z + 0.3 * male + 1.3 * heart_p[patient] + 0.3 * shared)
    pneumonia = bernoulli(-2.5 + 0.35 * age_z + 0.2 * male + shared)
    pleural_effusion = bernoulli(-2.7 + 0.5 * age_z + 1.0 * cardiomegaly + 0.7 * pneumonia + shared)
    atelectasis = bernoulli(-2.4 + 0.45 * age_z + 1.1 * pleural_effusion + 0.5 * pneumonia + 0.8 * shared)
    no_finding = ~(atelectasis | cardiomegaly | pleural_effusion | pneumonia)

    # Bedside (AP) films: older and acutely ill patients.
    ap = bernoulli(profile.ap_logit + 0.8 * age_z + 0.7 * (pneumonia | pleural_effusion))

    # Finding geometry (drawn for every image so that the stream does not depend on the flags).
    cardiomegaly_ctr = rng.uniform(0.5, 0.64, n)
    effusion_sides = rng.choice(3, size=n, p=[0.35, 0.3, 0.35])  # image-left only, image-right only, both
    effusion_level = rng.uniform(0.06, 0.45, (n, 2))
    effusion_level[effusion_sides == 0, 1] = 0.0
    effusion_level[effusion_sides == 1, 0] = 0.0
    atelectasis_side = np.where(rng.random(n) < 0.55, 1, -1).astype(np.int8)
    plate = rng.random(n) < 0.4
    plate_y = rng.uniform(0.05, 0.3, n)
    wedge_y0 = rng.uniform(-0.05, 0.15, n)
    atelectasis_y = np.stack(
        [
            np.where(plate, plate_y, wedge_y0),
            np.where(plate, plate_y + rng.uniform(-0.05, 0.05, n), wedge_y0 + rng.uniform(0.15, 0.35, n)),
        ],
        axis=1,
    )
    plate_w = rng.uniform(0.025, 0.04, n)
    atelectasis_width = np.stack(
        [np.where(plate, plate_w, 0.02), np.where(plate, plate_w, rng.uniform(0.07, 0.13, n))], axis=1
    )
    atelectasis_volume_loss = np.where(plate, rng.uniform(0.01, 0.03, n), rng.uniform(0.04, 0.09, n))
    pneumonia_side = np.where(rng.random(n) < 0.5, 1, -1).astype(np.int8)
    pneumonia_center = np.stack([rng.uniform(0.2, 0.8, n), rng.uniform(0.3, 0.88, n)], axis=1)
    pneumonia_radius = rng.uniform(0.12, 0.22, n)
    pneumonia_strength = rng.uniform(0.55, 0.95, n)
    pneumonia_bilateral = rng.random(n) < 0.3

    # Visibility: older = fainter findings, flatter lungs, more noise, more look-alike clutter.
    finding_gain = rng.uniform(0.7, 1.0, n) * (1.0 - 0.65 * aging)
    air_contrast = rng.uniform(0.38, 0.46, n) * (1.0 - 0.2 * aging)
    texture_amp = rng.uniform(0.8, 1.2, n) * (1.0 + 1.5 * aging)
    clutter_amp = rng.uniform(0.8, 1.5, n) * aging**2
    noise_gain = 1.0 + 2.0 * aging
    inspiration_loss = aging * rng.uniform(0.0, 0.1, n) + ap * rng.uniform(0.0, 0.06, n)
    rotation = np.deg2rad(1.5 + 3.0 * aging) * rng.standard_normal(n)
    shift = 0.03 * rng.standard_normal((n, 2))
    rib_amp = rng.uniform(0.08, 0.12, n) * (1.0 - 0.35 * aging)

    normal_ctr = ctr_p[patient] + 0.05 * aging  # the normal heart looks larger with age

    def jitter(value: float, rel: float) -> np.ndarray:
        return value * (1.0 + rel * rng.standard_normal(n))

    noise_seed = rng.integers(0, 2**63, size=n, dtype=np.uint64)

    f32 = np.float32
    scenes = Scenes(
        thorax_hw=thorax_hw_p[patient].astype(f32),
        body_hw=(thorax_hw_p + body_margin_p)[patient].astype(f32),
        apex_y=apex_y_p[patient].astype(f32),
        base_y=base_y_p[patient].astype(f32),
        base_step=base_step_p[patient].astype(f32),
        dome_depth=dome_p[patient].astype(f32),
        inspiration_loss=inspiration_loss.astype(f32),
        medial_x=medial_p[patient].astype(f32),
        heart_ctr=normal_ctr.astype(f32),
        heart_magnification=np.where(ap, AP_MAGNIFICATION, 1.0).astype(f32),
        rib_freq=rib_freq_p[patient].astype(f32),
        rib_phase=rib_phase_p[patient].astype(f32),
        rib_amp=rib_amp.astype(f32),
        breast_amp=breast_p[patient].astype(f32),
        shift_x=shift[:, 0].astype(f32),
        shift_y=shift[:, 1].astype(f32),
        rotation=rotation.astype(f32),
        atelectasis=atelectasis,
        atelectasis_side=atelectasis_side,
        atelectasis_y=atelectasis_y.astype(f32),
        atelectasis_width=atelectasis_width.astype(f32),
        atelectasis_volume_loss=atelectasis_volume_loss.astype(f32),
        cardiomegaly=cardiomegaly,
        cardiomegaly_ctr=np.maximum(cardiomegaly_ctr, normal_ctr + 0.04).astype(f32),
        pleural_effusion=pleural_effusion,
        effusion_level=effusion_level.astype(f32),
        pneumonia=pneumonia,
        pneumonia_side=pneumonia_side,
        pneumonia_center=pneumonia_center.astype(f32),
        pneumonia_radius=pneumonia_radius.astype(f32),
        pneumonia_strength=pneumonia_strength.astype(f32),
        pneumonia_bilateral=pneumonia_bilateral,
        finding_gain=finding_gain.astype(f32),
        air_contrast=air_contrast.astype(f32),
        texture_amp=texture_amp.astype(f32),
        clutter_amp=clutter_amp.astype(f32),
        noise_gain=noise_gain.astype(f32),
        gamma=jitter(profile.gamma, 0.03).astype(f32),
        contrast=jitter(profile.contrast, 0.03).astype(f32),
        offset=(profile.offset + 0.01 * rng.standard_normal(n)).astype(f32),
        heel=jitter(profile.heel, 0.1).astype(f32),
        noise_sd=jitter(profile.noise_sd, 0.05).astype(f32),
        blur_px=np.maximum(jitter(profile.blur_px, 0.05), 0.3).astype(f32),
        marker_corner=np.full(n, profile.marker_corner, dtype=np.int8),
        noise_seed=noise_seed,
    )

    patient_ids = np.array([f"{profile.name}-p{i:05d}" for i in range(n_patients)], dtype=object)
    manifest = pd.DataFrame(
        {
            "image_id": [f"{pid}-v{v}" for pid, v in zip(patient_ids[patient], visit, strict=True)],
            "patient_id": patient_ids[patient],
            "split": _assign_splits(patient_ids, profile.name, seed)[patient],
            "atelectasis": atelectasis,
            "cardiomegaly": cardiomegaly,
            "pleural_effusion": pleural_effusion,
            "pneumonia": pneumonia,
            "no_finding": no_finding,
            "sex": np.where(male, "M", "F"),
            "age": age,
            "view": np.where(ap, "AP", "PA"),
            "site": profile.name,
            "source_path": "",
        }
    )
    return manifest[list(MANIFEST_COLUMNS)].astype(MANIFEST_COLUMNS), scenes


MAX_SPLIT_KEY_ATTEMPTS = 10_000
"""Keys tried for a tiny cohort before giving up (4 patients, the smallest, succeed with probability ~0.17 each)."""


def synthetic_split_key(name: str, seed: int, attempt: int = 0) -> bytes:
    """The twin's split key: SHA-256 of a fixed text, the site name, the seed and the attempt number.

    Public and deterministic, unlike a real dataset's key (drawn from ``os.urandom`` and kept secret).
    """
    return hashlib.sha256(f"dpsweep synthetic split key\0{name}\0{int(seed)}\0{attempt}".encode()).digest()


def _assign_splits(patient_ids: np.ndarray, name: str, seed: int) -> np.ndarray:
    """Split per patient: `keyed_split` with ``SPLIT_FRACTIONS`` under the first `synthetic_split_key` that leaves
    no split empty (validation is drawn among non-test patients, so its probability is val / (1 - test))."""
    test_fraction = SPLIT_FRACTIONS["test"]
    val_fraction = SPLIT_FRACTIONS["val"] / (1.0 - test_fraction)
    for attempt in range(MAX_SPLIT_KEY_ATTEMPTS):
        split = keyed_split(
            patient_ids,
            synthetic_split_key(name, seed, attempt),
            test_fraction=test_fraction,
            val_fraction=val_fraction,
        )
        if set(split.tolist()) == set(SPLITS):
            return split
    raise RuntimeError(f"{name}: no split key in {MAX_SPLIT_KEY_ATTEMPTS} attempts fills every split")


# ----------------------------------------------------------------------------------------------------
# Rendering: vectorized over a chunk of images; per-image random textures come from each image's seed,
# so an image's pixels do not depend on the chunking or on the other images.


def render_scenes(scenes: Scenes, size: int) -> np.ndarray:
    """Render scenes to uint8 images [N, size, size] (0 = black = air outside the body)."""
    _check_size(size)
    out = np.empty((len(scenes), size, size), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (size * size))
    for start in range(0, len(scenes), chunk):
        out[start : start + chunk] = _render_chunk(scenes.take(slice(start, start + chunk)), size)
    return out


# A scene parameter in the rendering helpers: a scalar (a float32 one keeps the arithmetic in float32) or an array
# that broadcasts against [B, H, W] pixels.
Broadcastable: TypeAlias = float | np.floating[Any] | np.ndarray


def _col(values: np.ndarray) -> np.ndarray:
    """Per-image values as a [B, 1, 1] float32 column that broadcasts against [B, H, W] pixel arrays."""
    return np.asarray(values, dtype=np.float32)[:, None, None]


def _smooth_field_matrix(k: int, size: int) -> np.ndarray:
    """[size, k] Gaussian interpolation from a k-point grid on [-1, 1] to pixel centres.

    Rows have unit L2 norm, so ``M @ G @ M.T`` of a k x k standard-normal grid G is a smooth field
    whose every pixel is exactly standard normal.
    """
    nodes = np.linspace(-1.0, 1.0, k)
    centers = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    spacing = 2.0 / (k - 1)
    weights = np.exp(-0.5 * ((centers[:, None] - nodes[None, :]) / (0.7 * spacing)) ** 2)
    matrix: np.ndarray = (weights / np.linalg.norm(weights, axis=1, keepdims=True)).astype(np.float32)
    return matrix


def _blur_matrices(sigma_px: np.ndarray, size: int) -> np.ndarray:
    """[B, size, size] row-normalized Gaussian blur matrices (edges renormalized, no dark border)."""
    index = np.arange(size, dtype=np.float32)
    distance2 = (index[:, None] - index[None, :]) ** 2
    weights = np.exp(-distance2[None] / (2.0 * _col(sigma_px) ** 2))
    normalized: np.ndarray = weights / weights.sum(axis=2, keepdims=True)
    return normalized


def _soft(distance: np.ndarray, edge: Broadcastable) -> np.ndarray:
    """Indicator of ``distance > 0`` with a linear ramp from -edge/2 to +edge/2 (anti-aliasing).

    A ramp rather than a sigmoid: transcendental functions dominate the rendering time.
    """
    return np.clip(0.5 + distance / edge, 0.0, 1.0)


def _abs_power(value: np.ndarray, power: int) -> np.ndarray:
    """``|value| ** power`` for a small integer power, by multiplication (``**`` is 20x slower)."""
    magnitude = np.abs(value) if power % 2 else value
    result: np.ndarray = magnitude * magnitude
    for _ in range(power - 2):
        result = result * magnitude
    return result


def _inside_superellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: Broadcastable,
    cy: Broadcastable,
    hw: Broadcastable,
    hh: Broadcastable,
    power: int,
    edge: Broadcastable,
) -> np.ndarray:
    """Smooth mask of ``(|x-cx|/hw)^p + (|y-cy|/hh)^p < 1`` (integer p >= 2).

    The signed distance to the boundary is approximated to first order, ``(1 - level) * min(hw, hh) / p``.
    """
    level = _abs_power((x - cx) / hw, power) + _abs_power((y - cy) / hh, power)
    scale = np.asarray(np.minimum(hw, hh) / power, dtype=np.float32)  # keep float32 with scalar hw, hh
    return _soft((1.0 - level) * scale, edge)


def _bump(distance2: np.ndarray, radius: Broadcastable) -> np.ndarray:
    """``(1 - d^2 / R^2)^2`` inside radius R, 0 outside: a Gaussian-like blob with compact support.

    Compared with ``exp``, it is cheap and it keeps a finding strictly inside its region.
    """
    inside = np.maximum(1.0 - distance2 * np.asarray(1.0 / (radius * radius), dtype=np.float32), 0.0)
    return inside * inside


def _segment_distance(
    x: np.ndarray, y: np.ndarray, x0: Broadcastable, y0: Broadcastable, x1: Broadcastable, y1: Broadcastable
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each pixel to the segment (x0, y0)-(x1, y1), and the position t in [0, 1] along it."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
    ex, ey = x - (x0 + t * dx), y - (y0 + t * dy)
    return np.sqrt(ex * ex + ey * ey), t


def _random_textures(seeds: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Per-image random inputs: smooth fields (size-independent grids) and white detector noise."""
    grids = {"vessels": 16, "clutter": 12, "patches": 9}
    drawn = {key: np.empty((len(seeds), k, k), np.float32) for key, k in grids.items()}
    white = np.empty((len(seeds), size, size), np.float32)
    for i, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        for key, k in grids.items():
            drawn[key][i] = rng.standard_normal((k, k), dtype=np.float32)
        white[i] = rng.standard_normal((size, size), dtype=np.float32)
    fields = {}
    for key, k in grids.items():
        matrix = _smooth_field_matrix(k, size)
        fields[key] = matrix @ drawn[key] @ matrix.T
    fields["white"] = white
    return fields


def _render_chunk(s: Scenes, size: int) -> np.ndarray:
    f32 = np.float32
    px = f32(2.0 / size)  # one pixel in normalized units
    centers = (np.arange(size, dtype=f32) + f32(0.5)) / f32(size) * f32(2.0) - f32(1.0)
    # The patient is drawn upright and centred, then rotated and shifted as a whole (`_position`). In the
    # upright frame x varies along columns and y along rows only, so most terms stay 1-D (broadcast).
    x, y = centers[None, None, :], centers[None, :, None]
    textures = _random_textures(s.noise_seed, size)

    thorax_hw, apex = _col(s.thorax_hw), _col(s.apex_y)
    dome, medial = _col(s.dome_depth), _col(s.medial_x)
    atel_side = _col(s.atelectasis_side)
    volume_loss = _col(s.atelectasis) * _col(s.atelectasis_volume_loss)
    mediastinal_shift = f32(0.5) * volume_loss * atel_side  # collapse pulls the mediastinum toward its side
    gain = _col(s.finding_gain)

    # Lungs, one side at a time (0: image left, 1: image right). Each is a superellipse, narrower toward
    # the apex (the rib cage tapers), cut by the diaphragm dome; the cut makes the costophrenic angle.
    lungs, sides = [], []
    for j, sign in enumerate((-1.0, 1.0)):
        base = _col(s.base_y) + (j == 1) * _col(s.base_step) - _col(s.inspiration_loss)
        base = base - volume_loss * (atel_side == sign)
        medial_edge = mediastinal_shift + sign * medial
        lateral_edge = sign * (thorax_hw - 0.035)
        cx, hw = 0.5 * (medial_edge + lateral_edge), 0.5 * np.abs(lateral_edge - medial_edge)
        bottom = base + dome + 0.06
        down = np.clip((y - apex) / (bottom - apex), 0.0, 1.0)
        hw_taper = hw * (0.7 + 0.3 * down * (2.0 - down))
        ellipse = _inside_superellipse(
            x, y, medial_edge + sign * hw_taper, 0.5 * (apex + bottom), hw_taper, 0.5 * (bottom - apex), 3, px
        )
        u = (x - cx) / hw
        lungs.append(ellipse * _soft(base + dome * u * u - y, px))
        sides.append((sign, base, medial_edge, lateral_edge))
    lung = np.minimum(lungs[0] + lungs[1], 1.0)

    # Heart: width = cardiothoracic ratio x inner thorax width, about two thirds right of the midline,
    # resting on the image-right hemidiaphragm.
    ctr = np.where(s.cardiomegaly[:, None, None], _col(s.cardiomegaly_ctr), _col(s.heart_ctr))
    heart_hw = ctr * _col(s.heart_magnification) * thorax_hw
    heart_hh = 0.12 + 0.5 * heart_hw
    heart_cy = sides[1][1] + 0.05 - 0.8 * heart_hh
    heart = _inside_superellipse(x, y, mediastinal_shift + 0.3 * heart_hw, heart_cy, heart_hw, heart_hh, 2, 1.5 * px)
    aortic_knob = _inside_superellipse(x, y, mediastinal_shift + 0.1, apex + 0.38, 0.065, 0.065, 2, px)

    # Bones and soft tissue.
    abs_x, abs_x_mediastinum = np.abs(x), np.abs(x - mediastinal_shift)
    body = _inside_superellipse(x, y, 0.0, 0.3, _col(s.body_hw), 1.5, 3, 2.0 * px)
    thorax = _inside_superellipse(x, y, 0.0, 0.5 * (apex + 0.6), thorax_hw, 0.5 * (0.6 - apex) + 0.08, 2, 2 * px)
    vertebrae = (0.8 + 0.2 * np.cos(2 * np.pi * 6.0 * y)).astype(f32)
    spine = _soft(0.055 - np.abs(x - 0.3 * mediastinal_shift), px) * vertebrae
    mediastinum = _soft(0.13 - abs_x_mediastinum, 2 * px) * _soft(heart_cy - y, 4 * px)
    carina_y = apex + 0.45
    trachea = _soft(0.035 - abs_x_mediastinum, px) * _soft(carina_y - y, 2 * px)  # an air column
    rib_arc = y - 0.45 * abs_x + 0.55 * x * x  # posterior ribs arch up, then down laterally
    rib_cycle = _col(s.rib_freq) * rib_arc + _col(s.rib_phase / (2 * np.pi))
    rib_wave = np.abs(rib_cycle - np.floor(rib_cycle) - 0.5)  # triangle wave: 0.5 on a rib's axis
    ribs = np.clip((rib_wave - 0.25) * 5.0, 0.0, 1.0) * thorax * (0.3 + 0.7 * lung)
    # Left-right symmetric structures are drawn once, in |x|.
    distance, _ = _segment_distance(abs_x, y, 0.07, -0.7, thorax_hw + 0.05, -0.84)
    clavicles = _soft(0.03 - distance, px)
    breasts = _inside_superellipse(abs_x, y, 0.62 * thorax_hw, 0.4, 0.3, 0.24, 2, 0.08)
    hx, hy = abs_x_mediastinum - medial - 0.06, y + 0.02
    hilum_distance2 = hx * hx + hy * hy
    hila = _bump(hilum_distance2, 0.13)
    hilar_weight = _bump(hilum_distance2, 0.9)
    vessels = np.maximum(textures["vessels"] - 0.3, 0.0) * (f32(0.06) * _col(s.texture_amp)) * hilar_weight

    # Findings: each is an opacity in [0, 1] that removes lung air.
    effusion_fill = f32(0.0)
    for j, (sign, base, medial_edge, lateral_edge) in enumerate(sides):
        level = _col(s.effusion_level[:, j]) * _col(s.pleural_effusion)
        across = np.clip((x - medial_edge) / (lateral_edge - medial_edge), 0.0, 1.0)
        surface = base + 0.6 * dome - level * (base - apex) - (0.05 + 0.12 * level) * across * across
        side = _soft(sign * (x - medial_edge), px)
        effusion_fill = effusion_fill + (level > 0) * _soft(y - surface, 1.5 * px) * side
    effusion = np.minimum(effusion_fill, 1.0) * (f32(0.92) * gain)

    lung_atel = np.where(s.atelectasis_side[:, None, None] > 0, lungs[1], lungs[0])
    width0, width1 = _col(s.atelectasis_width[:, 0]), _col(s.atelectasis_width[:, 1])
    distance, t = _segment_distance(
        x,
        y,
        mediastinal_shift + atel_side * (medial + 0.06),
        _col(s.atelectasis_y[:, 0]),
        atel_side * (thorax_hw - 0.07),
        _col(s.atelectasis_y[:, 1]),
    )
    band = _soft(width0 + t * (width1 - width0) - distance, px)
    atelectasis = band * lung_atel * (f32(0.9) * gain * _col(s.atelectasis))

    pneumonia = f32(0.0)
    for j, (sign, base, medial_edge, lateral_edge) in enumerate(sides):
        main = s.pneumonia_side == sign  # the main patch; the other side gets a smaller one if bilateral
        present = s.pneumonia & (main | s.pneumonia_bilateral)
        across = s.pneumonia_center[:, 0] * np.where(main, 1.0, 0.85)
        down = s.pneumonia_center[:, 1] * np.where(main, 1.0, 0.8) + np.where(main, 0.0, 0.12)
        radius = s.pneumonia_radius * np.where(main, 1.0, 0.75)
        cx = medial_edge + _col(across) * (lateral_edge - medial_edge)
        cy = apex + _col(down) * (base - apex)
        dx, dy = x - cx, y - cy
        envelope = np.minimum(f32(1.4) * _bump(dx * dx + dy * dy, _col(2.0 * radius)), 1.0)
        pneumonia = pneumonia + _col(present) * envelope * lungs[j]
    patchy = f32(1.8) * textures["patches"] + f32(0.6)
    patchiness = 0.5 + 0.5 * patchy / (1.0 + np.abs(patchy))  # a sigmoid without exp
    pneumonia = np.minimum(pneumonia, 1.0) * patchiness * (_col(s.pneumonia_strength) * gain)

    clutter = np.clip(textures["clutter"] - 1.2, 0.0, 1.0) * _col(s.clutter_amp)

    air = lung * (1.0 - heart) * (1.0 - aortic_knob)
    aerated = air * (1.0 - effusion) * (1.0 - atelectasis) * (1.0 - pneumonia) * (1.0 - clutter)
    density = (
        0.55 * body
        + 0.06 * mediastinum
        + 0.03 * heart
        + 0.05 * aortic_knob
        + 0.08 * spine
        + _col(s.rib_amp) * ribs
        + 0.09 * clavicles
        + 0.05 * hila
        + vessels * lung
        + _col(s.breast_amp) * breasts
        + 0.04 * effusion * thorax
        - _col(s.air_contrast) * aerated
        - 0.12 * trachea
    )
    intensity = _position(np.clip(density / 0.75, 0.0, 1.0), s)

    # Acquisition: heel effect (exposure gradient), marker, detector blur, signal-dependent noise, then
    # the site's tone curve (offset + contrast * I^gamma) through a per-image lookup table to 8 bits.
    intensity = intensity * (1.0 + _col(s.heel) * y)
    corner_x = _col(np.where(s.marker_corner % 2 == 1, 0.8, -0.8))
    corner_y = _col(np.where(s.marker_corner >= 2, 0.86, -0.86))
    marker = _soft(0.09 - np.abs(x - corner_x), px) * _soft(0.06 - np.abs(y - corner_y), px)
    intensity = np.maximum(intensity, 0.95 * marker)
    blur = _blur_matrices(s.blur_px * (size / 64.0), size)
    intensity = blur @ intensity @ blur.transpose(0, 2, 1)
    noise_sd = _col(s.noise_sd * s.noise_gain) * (0.35 + 0.65 * np.sqrt(np.clip(intensity, 0.0, 1.0)))
    intensity = intensity + noise_sd * textures["white"]
    assert intensity.dtype == f32, f"rendering promoted to {intensity.dtype}"  # float64 would double the cost
    levels = np.rint(np.clip(intensity, 0.0, 1.0) * (_TONE_LEVELS - 1)).astype(np.intp)
    tone = _tone_tables(s)
    rows = np.arange(len(s), dtype=np.intp)[:, None, None] * _TONE_LEVELS
    pixels: np.ndarray = np.take(tone.ravel(), levels + rows)
    return pixels


def _position(upright: np.ndarray, s: Scenes) -> np.ndarray:
    """Rotate each upright image by ``s.rotation`` about the image centre and shift it by ``s.shift_*``.

    Bilinear resampling; pixels whose source lies outside the image repeat the border.
    """
    batch, size, _ = upright.shape
    centers = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    x, y = centers[None, None, :] - _col(s.shift_x), centers[None, :, None] - _col(s.shift_y)
    cos, sin = np.cos(_col(s.rotation)), np.sin(_col(s.rotation))
    # Source position (in pixels) of every output pixel in the upright image.
    column = np.clip((cos * x + sin * y + 1.0) * (size / 2.0) - 0.5, 0.0, size - 1.0)
    row = np.clip((cos * y - sin * x + 1.0) * (size / 2.0) - 0.5, 0.0, size - 1.0)
    column0 = np.minimum(column.astype(np.int32), size - 2)
    row0 = np.minimum(row.astype(np.int32), size - 2)
    dc, dr = column - column0.astype(np.float32), row - row0.astype(np.float32)
    flat = upright.ravel()
    index = (np.arange(batch, dtype=np.intp)[:, None, None] * size + row0) * size + column0
    top_left, top_right = np.take(flat, index), np.take(flat, index + 1)
    bottom_left, bottom_right = np.take(flat, index + size), np.take(flat, index + (size + 1))
    top = top_left + dc * (top_right - top_left)
    bottom = bottom_left + dc * (bottom_right - bottom_left)
    moved: np.ndarray = top + dr * (bottom - top)
    return moved


def _tone_tables(s: Scenes) -> np.ndarray:
    """[B, _TONE_LEVELS] uint8 lookup tables: ``round(255 * clip(offset + contrast * I^gamma, 0, 1))``."""
    linear = np.linspace(0.0, 1.0, _TONE_LEVELS)[None, :]
    curve = s.offset[:, None] + s.contrast[:, None] * linear ** s.gamma[:, None].astype(np.float64)
    return np.rint(np.clip(curve, 0.0, 1.0) * 255.0).astype(np.uint8)
