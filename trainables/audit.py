"""The one-run privacy audit's runners (`trainables.privacy.audit` holds its statistics and canaries): they build
the trial's model, read its data and train, so they sit beside the training loop, not under `trainables.privacy`.

White-box (`run_white_box_audit`, `white_box_audit`): ``privacy.steps`` DP-SGD steps of the engine built by
`trainables.privacy.setup.make_private` at the trial's (sigma, C, q, B), with m Dirac gradient canaries
(`trainables.privacy.audit.DiracCanaries`) Poisson-sampled beside a few real records; scored per canary from the
noisy update at its coordinate. The records are the trial's: images, or for ``privacy_unit: patient`` patients (each
with its first ``max_images_per_patient`` images, clipped as one record by the trial's patient step) sampled at the
patient rate; each canary is one more such record, its gradient one Dirac row, so the claim tested is the
patient-level epsilon.

Black-box canaries (`run_black_box_audit`). m out-of-distribution images (uniform random pixels, public
seeded) with random labels; included ones are appended to the training split and the real trial loop
(`trainables.train.train_trial`) trains on it with the trial's engine (``speed.grad_sample_mode``, ``bk`` by
default); the score is minus the trained model's loss on each canary. Its canaries are ordinary records, so they go
through everything the white-box canaries skip, the book-keeping engine's per-layer norm rules included.
The trial loop derives q = 1/ceil(N'/B) and steps from the training set it gets, so they (and sigma,
recalibrated to the same target epsilon) are computed for N' = N + (number of included canaries), exactly as
the sweep would. At the patient level a canary is a patient of ``max_images_per_patient`` such images (the most a
patient brings), N counts patients and a canary's score is minus its images' summed loss. Caveat: N' depends on
the coins, so one canary can move (q, steps) when N' crosses a multiple of B; the DP claim treats the dataset size
as public, as the whole project does (and Opacus). The black-box bound is far weaker than the white-box one.

Secrets: the coins, the sampling and the noise come from ``os.urandom`` with full entropy (128-bit
`trainables.privacy.randomness.secret_seed` through ``generator_from_seed``, or a `SecureRandom`); nothing of them is
returned or logged (`trainables.privacy.audit`). The white-box model's random init is drawn the same way
(`secret_global_rng`); the black-box one is the trial's own (``cfg.seed``, public, as in every trial: the guarantee
holds for any init independent of the data), and its mechanism streams are the trial loop's secret ones
(``privacy.reproducible_noise`` is switched off for the audit).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from trainables.config import PrivacyConfig, TrialConfig
from trainables.data.cache import SplitData, open_cache
from trainables.data.labels import LABELS
from trainables.data.loaders import CacheSplitDataset, HostImages, TrialData, evaluation_batches, load_trial_data
from trainables.models import ResolvedInit, create_model
from trainables.names import dataset_dir
from trainables.privacy.accounting import epsilon_spent
from trainables.privacy.audit import (
    AUDIT_KINDS,
    BLACK_BOX_SCORE,
    CANARY_GRADIENT_FACTOR,
    DEFAULT_CONFIDENCE,
    WHITE_BOX_SCORES,
    AuditBound,
    AuditKind,
    AuditResult,
    WhiteBoxScore,
    audit_bound,
    check_auditable,
    epsilon_ceiling,
    likelihood_ratio_scores,
    place_dirac_canaries,
    secret_global_rng,
    secret_mechanism_streams,
    secret_numpy_generator,
)
from trainables.privacy.engine import poisson_batches, private_step
from trainables.privacy.patients import PatientIndex, group_patients, private_patient_step
from trainables.privacy.planning import plan_privacy, planned_epsilon
from trainables.privacy.setup import PrivateSetup, SelfCheckBatch, make_private
from trainables.steps import GRAD_CHECK_PATIENTS, GRAD_CHECK_SAMPLES, TrainingRecords, patient_batch, per_sample_bce
from trainables.train import TrialResult, resolve_device, train_trial

RecordRun = Callable[[PrivacyConfig], None]
"""Called with an audit run's privacy config before the run trains on the private split (the privacy ledger)."""

__all__ = [
    "input_canaries",
    "recalibrated",
    "run_audit",
    "run_black_box_audit",
    "run_white_box_audit",
    "white_box_audit",
    "with_canaries",
]


def _train_split(cfg: TrialConfig, data: TrialData | None) -> CacheSplitDataset:
    if data is not None:
        return data.train
    cache = open_cache(dataset_dir(cfg.data_root, cfg.dataset, cfg.image_size))
    return CacheSplitDataset(cache.split("train"), mean=cfg.input_mean, std=cfg.input_std)


def run_white_box_audit(
    cfg: TrialConfig,
    init: ResolvedInit,
    *,
    m: int,
    confidence: float = DEFAULT_CONFIDENCE,
    score: WhiteBoxScore = "likelihood_ratio",
    real_records: int | None = None,
    data: TrialData | None = None,
    canary_seed: int = 0,
    record: RecordRun | None = None,
) -> AuditResult:
    """White-box one-run audit of the trial's DP-SGD with m Dirac gradient canaries, on the trial's model
    (``create_model(cfg.model, init)``); see `white_box_audit`.

    Args:
        data: a `trainables.data.loaders.TrialData` (only ``.train`` is used); default: the trial's cache.
        record: called with the run's privacy config before it trains (the privacy ledger): the trial's DP-SGD steps,
            without a label-count release (the white-box audit makes none).
    """
    if record is not None:
        record(dataclasses.replace(cfg.privacy, label_count_noise_multiplier=None))
    with secret_global_rng():  # a random init: 128 bits reach timm's draws from the global generator
        model = create_model(cfg.model, init)
    return white_box_audit(
        model,
        _train_split(cfg, data),
        cfg,
        m=m,
        confidence=confidence,
        score=score,
        real_records=real_records,
        canary_seed=canary_seed,
    )


def white_box_audit(
    model: nn.Module,
    train: CacheSplitDataset,
    cfg: TrialConfig,
    *,
    m: int,
    confidence: float = DEFAULT_CONFIDENCE,
    score: WhiteBoxScore = "likelihood_ratio",
    real_records: int | None = None,
    canary_seed: int = 0,
) -> AuditResult:
    """White-box one-run audit of ``cfg``'s DP-SGD mechanism on ``model`` with m Dirac gradient canaries.

    Runs ``cfg.privacy.steps`` steps of the engine (``cfg.speed.grad_sample_mode``, per-sample gradient check
    included) at the trial's (sigma, C, q, B): real records and included canaries Poisson-sampled at q by
    `poisson_batches`, canary rows clipped and noised by the engine (`private_step`'s ``extra_grad_samples``),
    AdamW at the trial's learning rate. Tests the claim ``epsilon_spent(sigma, q, steps, delta, accountant)``.
    Canary rows are clipped as whole explicit rows after the real samples' norms are computed, so ``bk``'s per-layer
    rules (instantiated or ghost norms) never see one: the black-box audit is what covers them.

    Patient level (``privacy_unit: patient``): the real records are patients (`group_patients`, the trial's cap), a
    step is the trial's `private_patient_step` (each sampled patient's images summed and clipped as one record), q and
    steps are the trial's patient-level ones, and each canary is a record of its own beside the patients: one Dirac
    row, the gradient of a canary patient, Poisson-sampled at the patient rate. The claim is then the patient-level
    epsilon.

    Args:
        model: the untrained model (any module the engine accepts); it is trained in place.
        train: the real training images.
        m: canaries (distinct parameter coordinates; at most the model's trainable values).
        score: ``likelihood_ratio`` (default) or ``sum``.
        real_records: train on only the first this many records (images, or patients; cheap audits); None = all.
        canary_seed: public seed of the canary coordinates.
    """
    check_auditable(cfg.privacy)
    if score not in WHITE_BOX_SCORES:
        raise ValueError(f"white-box score {score!r} is not one of {WHITE_BOX_SCORES}")
    start = time.perf_counter()
    privacy, speed = cfg.privacy, cfg.speed
    torch.set_num_threads(speed.threads)
    device = resolve_device(speed.device)
    records = _real_records(cfg, train, real_records, device)
    n_real = records.n_records

    model = model.to(device)
    model.train()
    # Uniform BCE weights: the audit tests the clipping and noise of the step, which no loss weighting changes.
    loss_fn = per_sample_bce(None, device)
    sampler_rng, noise_rng = secret_mechanism_streams(privacy, device)
    # The trial's records (images or patients) and Dirac canaries, one record each; the claim tested is that of
    # (sigma, q, steps) without a label-count release.
    setup = make_private(
        model,
        torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay),
        loss_fn,
        privacy=privacy,
        grad_sample_mode=speed.grad_sample_mode,
        check=_self_check_batch(records),
        noise=noise_rng,
        label_count_release=None,
    )
    canaries = place_dirac_canaries(model, m, CANARY_GRADIENT_FACTOR * privacy.max_grad_norm, seed=canary_seed)
    coins = secret_numpy_generator()
    included = coins.random(m) < 0.5
    members = np.flatnonzero(included)  # record n_real + k of the mechanism's dataset is canary members[k]

    to_units = privacy.expected_batch_size / privacy.max_grad_norm  # p.grad = noisy sum / B
    observations = np.empty((privacy.steps, m), dtype=np.float64)
    for step, indices in enumerate(
        poisson_batches(n_real + len(members), privacy.sample_rate, privacy.steps, sampler_rng)
    ):
        chosen = indices.numpy()
        real, canary_rows = chosen[chosen < n_real], members[chosen[chosen >= n_real] - n_real]
        _step(setup, loss_fn, records, real, canaries.grad_samples(model, canary_rows), speed.max_physical_batch_size)
        observations[step] = canaries.read(model) * to_units
    if sum(n for _, _, n in setup.accountant.history) != privacy.steps:
        raise RuntimeError("the audit's privacy ledger does not match its steps")  # the engine skipped a step

    if score == "likelihood_ratio":
        scores = likelihood_ratio_scores(observations, privacy.noise_multiplier, privacy.sample_rate)
    else:
        scores = observations.sum(axis=0)
    bound = audit_bound(scores, included, delta=privacy.delta, confidence=confidence)
    claimed = epsilon_spent(
        privacy.noise_multiplier, privacy.sample_rate, privacy.steps, privacy.delta, privacy.accountant
    )
    return _result(
        "white_box",
        bound,
        claimed,
        cfg,
        score,
        privacy.noise_multiplier,
        privacy.sample_rate,
        privacy.steps,
        time.perf_counter() - start,
    )


def _real_records(
    cfg: TrialConfig, train: CacheSplitDataset, real_records: int | None, device: torch.device
) -> TrainingRecords:
    """The white-box audit's real records, as the trial's steps see them: the first ``real_records`` images, or for a
    patient-level trial the first ``real_records`` patients with their capped images (all when None)."""
    if real_records is not None and real_records < 1:
        raise ValueError(f"real_records={real_records} must be >= 1 (the engine's gradient check needs a record)")
    source = HostImages(train, device)
    if cfg.privacy.privacy_unit == "image":
        n_real = len(train) if real_records is None else min(int(real_records), len(train))
        return TrainingRecords(source, n_real)
    cap = cfg.privacy.max_images_per_patient
    assert cap is not None  # PrivacyConfig requires the cap of a patient-level trial
    patients = group_patients(train.split.patient_id, cap)
    if real_records is not None:
        patients = PatientIndex(patients.images[: int(real_records)], cap, patients.n_images_left_out)
    return TrainingRecords(source, len(train), patients)


def _self_check_batch(records: TrainingRecords) -> SelfCheckBatch:
    """The self-check's records: the first `GRAD_CHECK_SAMPLES` real images and, for patients, the
    `GRAD_CHECK_PATIENTS` real patients with the most images (the first on ties; no seed is drawn)."""
    patients = records.patients
    if patients is None:
        return SelfCheckBatch(records.source.batch(np.arange(min(GRAD_CHECK_SAMPLES, records.n_images))))
    images = np.sort(np.concatenate(patients.images))[:GRAD_CHECK_SAMPLES]
    most = np.argsort([-len(p) for p in patients.images], kind="stable")[:GRAD_CHECK_PATIENTS]
    patient_images, groups = patients.gather(most)
    return SelfCheckBatch(records.source.batch(images), (*patient_batch(records.source, patient_images), groups))


def _step(
    setup: PrivateSetup,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    records: TrainingRecords,
    real: np.ndarray,
    canary_rows: dict[str, torch.Tensor],
    max_physical_batch_size: int,
) -> None:
    """One noisy step on the sampled real records (images, or patients with their images) and canary rows."""
    if records.patients is None:
        private_step(
            setup.wrapped,
            setup.optimizer,
            loss_fn,
            records.source.batch(real),
            max_physical_batch_size,
            extra_grad_samples=canary_rows,
        )
        return
    images, groups = records.patients.gather(real)
    private_patient_step(
        setup.wrapped,
        setup.optimizer,
        loss_fn,
        patient_batch(records.source, images),
        groups,
        max_physical_batch_size,
        extra_grad_samples=canary_rows,
    )


def _result(
    kind: str,
    bound: AuditBound,
    claimed: float,
    cfg: TrialConfig,
    score: str,
    sigma: float,
    q: float,
    steps: int,
    wall: float,
) -> AuditResult:
    return AuditResult(
        kind=kind,
        m=bound.m,
        guesses=bound.outcome.guesses,
        correct=bound.outcome.correct,
        epsilon_lower_bound=bound.epsilon_lower_bound,
        confidence=bound.confidence,
        claimed_epsilon=claimed,
        delta=cfg.privacy.delta,
        wall_time_s=wall,
        score=score,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        grad_sample_mode=cfg.speed.grad_sample_mode,
        claim_p_value=bound.claim_p_value(claimed),
        epsilon_ceiling=epsilon_ceiling(bound.m, delta=cfg.privacy.delta, confidence=bound.confidence),
        privacy_unit=cfg.privacy.privacy_unit,
    )


# ---------------------------------------------------------------------------------------------------------
# Black-box input canaries


def input_canaries(m: int, image_size: int, n_labels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """m out-of-distribution canaries: uint8 uniform-noise images [m, size, size] and random 0/1 labels
    float32 [m, n_labels] (public seeded: the auditor knows its canaries; only the coins are secret)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(m, image_size, image_size), dtype=np.uint8)
    labels = (rng.random((m, n_labels)) < 0.5).astype(np.float32)
    return images, labels


def with_canaries(
    train: CacheSplitDataset, images: np.ndarray, labels: np.ndarray, images_per_canary: int = 1
) -> CacheSplitDataset:
    """The training split plus the given canary images appended (in memory; sex unknown, age missing), same input
    normalization; every ``images_per_canary`` consecutive images are one canary patient."""
    split = train.split
    k = len(images)
    if k % images_per_canary:
        raise ValueError(f"{k} canary images do not make whole canaries of {images_per_canary} images")
    combined = SplitData(
        images=np.concatenate([np.asarray(split.images[split.rows]), images]),
        rows=np.arange(len(split) + k, dtype=np.int64),
        labels=np.concatenate([split.labels, labels.astype(np.float32)]),
        sex=np.concatenate([split.sex, np.full(k, "unknown", dtype=split.sex.dtype)]),
        age=np.concatenate([split.age, np.full(k, np.nan)]),
        patient_id=np.concatenate([split.patient_id.astype(object), _canary_patients(k, images_per_canary)]),
    )
    return CacheSplitDataset(combined, mean=train.mean, std=train.std)


def _canary_patients(n_images: int, images_per_canary: int) -> np.ndarray:
    """Patient ids of ``n_images`` canary images, ``images_per_canary`` consecutive images per canary patient."""
    return np.array([f"audit-canary-{i // images_per_canary}" for i in range(n_images)], dtype=object)


def recalibrated(cfg: TrialConfig, n_records: int) -> TrialConfig:
    """``cfg`` with (q, steps, sigma) planned for ``n_records`` records (images, or patients) as the sweep plans them
    (`trainables.privacy.planning.plan_privacy`: same target epsilon, delta, accountant, tolerance and label-count
    release), so `train_trial`'s budget check accepts the enlarged split."""
    return dataclasses.replace(cfg, privacy=plan_privacy(cfg.privacy, n_records))


def _n_records(cfg: TrialConfig, train: CacheSplitDataset) -> int:
    """N of the trial's unit on a training split: its images, or its patients."""
    if cfg.privacy.privacy_unit == "image":
        return len(train)
    return len(np.unique(train.split.patient_id.astype(str)))


def _trained_model(result: TrialResult) -> nn.Module:
    """The trained model of a `train_trial` run."""
    return result.model


def run_black_box_audit(
    cfg: TrialConfig,
    init: ResolvedInit,
    *,
    m: int,
    confidence: float = DEFAULT_CONFIDENCE,
    data: TrialData | None = None,
    canary_seed: int = 0,
    record: RecordRun | None = None,
) -> AuditResult:
    """Black-box one-run audit: train the real trial loop with m coin-included input canaries, score each by
    minus the trained model's loss on it (module docstring for how q, steps and sigma follow the enlarged N).
    At the patient level each canary is a patient of ``max_images_per_patient`` canary images, scored by minus their
    summed loss, and N counts patients.

    The trial's engine (``cfg.speed.grad_sample_mode``) trains it, per-layer rules and all. Evaluation extras that
    release nothing about training (bootstrap, external sets, per-epoch test) are switched off, and so is
    ``privacy.reproducible_noise``: the trial loop then draws its sampling and noise from fresh 128-bit secret seeds
    (`trainables.privacy.randomness.mechanism_randomness`). ``cfg.seed`` (public) still seeds the init, as in the
    trial.

    Args:
        data: a `trainables.data.loaders.TrialData`; default: the trial's cache.
        record: called with the run's privacy config (planned for the enlarged split, label-count release included)
            before it trains: the privacy ledger.
    """
    check_auditable(cfg.privacy)
    start = time.perf_counter()
    light = dataclasses.replace(
        cfg,
        n_boot=0,
        external_datasets=(),
        test_every_epoch=False,
        privacy=dataclasses.replace(cfg.privacy, reproducible_noise=False),
    )
    base = data if data is not None else load_trial_data(light)
    per_canary = cfg.privacy.max_images_per_patient if cfg.privacy.privacy_unit == "patient" else 1
    assert per_canary is not None  # PrivacyConfig requires the cap of a patient-level trial
    images, labels = input_canaries(m * per_canary, cfg.image_size, len(LABELS), seed=canary_seed)
    coins = secret_numpy_generator()
    included = coins.random(m) < 0.5
    rows = np.repeat(included, per_canary)  # canary i's images are rows i * per_canary ... (i + 1) * per_canary - 1
    train = with_canaries(base.train, images[rows], labels[rows], per_canary)
    trial_cfg = recalibrated(light, _n_records(light, train))
    if record is not None:
        record(trial_cfg.privacy)

    result = train_trial(trial_cfg, init, lambda metrics, state: None, data=TrialData(train, base.val, base.test))
    model = _trained_model(result)
    n_images = m * per_canary
    canary_set = CacheSplitDataset(
        SplitData(
            images=images,
            rows=np.arange(n_images),
            labels=labels,
            sex=np.full(n_images, "unknown"),
            age=np.full(n_images, np.nan),
            patient_id=_canary_patients(n_images, per_canary).astype(str),
        ),
        mean=train.mean,
        std=train.std,
    )
    losses = _losses(
        model, canary_set, per_sample_bce(None, next(model.parameters()).device), cfg.speed.eval_batch_size
    )
    scores = -losses.reshape(m, per_canary).sum(axis=1)
    bound = audit_bound(scores, included, delta=cfg.privacy.delta, confidence=confidence)
    privacy = trial_cfg.privacy
    claimed = planned_epsilon(privacy)
    return _result(
        "black_box",
        bound,
        claimed,
        trial_cfg,
        BLACK_BOX_SCORE,
        privacy.noise_multiplier,
        privacy.sample_rate,
        privacy.steps,
        time.perf_counter() - start,
    )


@torch.no_grad()
def _losses(
    model: nn.Module,
    dataset: CacheSplitDataset,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch_size: int,
) -> np.ndarray:
    model.eval()
    device = next(model.parameters()).device
    out = [
        loss_fn(model(x.to(device)), y.to(device)).double().cpu().numpy()
        for x, y in evaluation_batches(dataset, batch_size)
    ]
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------------------


def run_audit(
    cfg: TrialConfig,
    init: ResolvedInit,
    *,
    m: int,
    kind: AuditKind,
    confidence: float = DEFAULT_CONFIDENCE,
    data: TrialData | None = None,
    real_records: int | None = None,
    record: RecordRun | None = None,
) -> AuditResult:
    """One-run privacy audit of one planned private trial (what ``dpsweep audit`` calls per grid point).

    Args:
        cfg: a calibrated private trial config (as the sweep plans it).
        init: its resolved init.
        m: number of canaries.
        kind: ``white_box`` (Dirac gradient canaries through the engine's clipping and noise) or ``black_box``
            (input canaries through the real trial loop and the trial's engine, ``bk`` per-layer rules included).
        confidence: 1 - beta of the lower bound (one of a family of n audits:
            `trainables.privacy.audit.bonferroni_confidence`).
        data: optional `trainables.data.loaders.TrialData` (default: the trial's prepared cache).
        real_records: white-box only: train on the first this many real records (None = all).
        record: called with the audit run's privacy config before it trains on the private split (the privacy
            ledger, `sweeps.audit`).
    """
    if kind == "white_box":
        return run_white_box_audit(
            cfg, init, m=m, confidence=confidence, real_records=real_records, data=data, record=record
        )
    if kind == "black_box":
        if real_records is not None:
            raise ValueError("real_records applies to white-box audits only (black-box trains the whole trial)")
        return run_black_box_audit(cfg, init, m=m, confidence=confidence, data=data, record=record)
    raise ValueError(f"audit kind {kind!r} is not one of {AUDIT_KINDS}")
