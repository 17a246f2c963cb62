"""TrialConfig: the typed, immutable description of one trial, and the vocabulary of the sweep files.

One name per setting from the YAML to the optimizer: a sweep file's `privacy:` section *is* a `PrivacyConfig`
(its grid axes ``target_epsilon`` and ``max_grad_norm`` given as lists), `speed:` *is* a `SpeedConfig`, and
``training.lr`` / ``training.seed`` are `TrialConfig.lr` / `TrialConfig.seed`. The planner builds each trial
from one template with `dataclasses.replace`. Closed sets are the `Literal` types below, validated once (in
`sweeps.spec`) against `typing.get_args` of the same types.

Privacy knobs (they change the guarantee) live in `PrivacyConfig`; speed knobs (they never change results
or the guarantee) live in `SpeedConfig`. The driver calibrates the noise multiplier and fills the derived
privacy fields (`noise_multiplier`, `sample_rate`, `steps`) before a trial starts; the trial re-checks them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

Accountant = Literal["rdp", "prv"]
PrivacyUnit = Literal["image", "patient"]
GradSampleMode = Literal["bk", "hooks", "functorch"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]
Toggle = Literal["auto", "on", "off"]
PosWeight = Literal["uniform", "train"]
ModelSelection = Literal["best_val", "last"]


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """Everything that changes the DP guarantee.

    Mechanism: DP-SGD with Poisson sampling of records at rate q, per-record clipping to L2 norm C over all
    trainable parameters, Gaussian noise of std sigma * C on the clipped sum; add/remove adjacency of one
    record (the privacy unit); the number of training records N is treated as public (q and steps are derived
    from it and released).

    Attributes:
        target_epsilon: epsilon the planned steps end at (``inf`` = non-private baseline: no clipping,
            no noise, shuffled batches). A grid axis.
        delta: the (epsilon, delta) delta; must be < 1/N (N_train images, or N_patients for the patient unit).
        max_grad_norm: per-record clipping bound C (L2 over all trainable parameters). A grid axis.
        expected_batch_size: expected logical batch size B in records (images, or patients for the patient unit);
            Poisson sample rate q = 1/ceil(N/B), N the number of training records.
        epochs: planned epochs; steps = epochs * ceil(N/B).
        accountant: ``rdp`` (default, the study's) or ``prv``; calibration and reporting use the same one.
        privacy_unit: ``image`` (each image is a record) or ``patient`` (each patient with all its images, at most
            ``max_images_per_patient``, is one record: Poisson sampling over patients, one clipped gradient per
            patient, q and steps from N_patients; `trainables.privacy.patients`). A grid axis.
        max_images_per_patient: the public cap of a patient-level trial's images per patient (patients with more
            contribute their first ones in the training split's order); None for image-level trials.
        secure_mode: cryptographically secure noise and sampling (ChaCha20; slower).
        reproducible_noise: debugging only: seed the noise and Poisson sampling from ``seed`` (published), so the
            trial has no DP guarantee; default False: their seeds come from ``os.urandom`` and stay secret.
        calibration_tolerance: how far below the target the calibrated epsilon may end (never above it).
        label_count_noise_multiplier: sigma_c of the Gaussian label-count release that ``pos_weight: train``
            needs (`trainables.privacy.label_counts`; composed into the trial's budget). The planner sets it
            (default 20) for private ``pos_weight: train`` trials and leaves it None otherwise.
        noise_multiplier: sigma (noise std = sigma * C), calibrated by the driver; 0 when non-private.
        sample_rate: Poisson sample rate q, derived by the driver from N and B.
        steps: total planned DP-SGD steps, derived by the driver.
    """

    target_epsilon: float = math.inf
    delta: float = 6e-6
    max_grad_norm: float = 1.0
    expected_batch_size: int = 32
    epochs: int = 3
    accountant: Accountant = "rdp"
    privacy_unit: PrivacyUnit = "image"
    max_images_per_patient: int | None = None
    secure_mode: bool = False
    reproducible_noise: bool = False
    calibration_tolerance: float = 0.01
    label_count_noise_multiplier: float | None = None
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0

    DERIVED = ("noise_multiplier", "sample_rate", "steps")
    """Fields the planner fills (a sweep file cannot set them)."""

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.target_epsilon)


@dataclass(frozen=True, kw_only=True)
class SpeedConfig:
    """Knobs that change speed or memory only, never results' distribution or the guarantee.

    Attributes:
        grad_sample_mode: ``bk`` (book-keeping, the fastest), ``hooks`` (Opacus, fixed conv sampler), ``functorch``
            (`trainables.privacy.engine.GRAD_SAMPLE_MODES`; every mode is verified per trial).
        device: ``auto`` (the trial's GPU when Ray gave it one, else CPU), ``cpu`` or ``cuda``.
        max_physical_batch_size: largest batch run at once; logical batches are split (virtual batches).
        threads: torch intra-op threads per trial.
        eval_batch_size: batch size for evaluation forward passes.
        fixed_shapes: run a private Poisson batch in chunks of a few fixed shapes: full chunks of
            ``max_physical_batch_size`` rows and a last chunk zero-padded to the next multiple of ``pad_multiple``
            rows; padded rows contribute exactly nothing (no loss, no per-sample gradient row, no norm;
            `trainables.privacy.chunks`). ``auto``: on CUDA only, where each new shape costs cudnn planning and
            allocator churn; on the CPU padded rows would be pure extra work. Results equal the unpadded step up to
            float rounding (bit for bit when no chunk is padded; tested in every mode). Image-level trials only.
        pad_multiple: the padding granule of ``fixed_shapes`` (rows): at most ``max_physical_batch_size /
            pad_multiple`` shapes, fewer than ``pad_multiple`` wasted rows per step. Set it to
            ``max_physical_batch_size`` for a single shape (then every step runs whole chunks: for an expected batch
            of 32, 1.45x the work in chunks of 32 and 2.0x in chunks of 64; granule 8: 1.11x).
        data_on_device: hold the training split's uint8 pixels on the trial's device and gather and normalise
            batches there (`trainables.data.loaders.DeviceImages`). ``auto``: on CUDA when the split fits in
            ``DATA_ON_DEVICE_BUDGET`` of the device's memory; otherwise batches are gathered on the CPU into
            pinned memory and copied asynchronously. Same numbers either way (tested on CPU).
        precision: ``fp32``, or ``bf16``: bfloat16 autocast for the forward and backward passes of training
            steps; per-sample gradients are upcast to float32 before their norms, the clip factors and the clipped
            and noisy sums are computed in float32, so each record still moves the sum by at most C. The
            per-sample-gradient self-check and evaluation stay float32. Unlike the other knobs it changes the trained
            weights by more than rounding (utility measured in docs/design.md); never the guarantee.
        cuda_tuning: on CUDA only (no effect on CPU): TF32 for the model's matmuls and convolutions,
            ``cudnn.benchmark`` and a channels-last model (changes rounding only). Per-sample norms and clipped sums,
            the self-check and Opacus' clipping always run with TF32 off (`trainables.privacy.bk.full_float32`).
    """

    grad_sample_mode: GradSampleMode = "bk"
    device: Device = "auto"
    max_physical_batch_size: int = 64
    threads: int = 1
    eval_batch_size: int = 256
    fixed_shapes: Toggle = "auto"
    pad_multiple: int = 8
    data_on_device: Toggle = "auto"
    precision: Precision = "fp32"
    cuda_tuning: bool = True


NESTED = ("privacy", "speed")


@dataclass(frozen=True, kw_only=True)
class TrialConfig:
    """One trial: a grid point of the sweep plus the sweep-wide settings it needs.

    Attributes:
        sweep, dataset, model, init: names (the sweep, the private training set, the timm architecture, the init).
        data_root, image_size: where the prepared dataset's cache is (`trainables.names.dataset_dir`).
        init_weights: the resolved weight file of the init (None: random, or timm's own cache).
        lr, seed: AdamW learning rate (a grid axis) and the seed of everything that is not the DP mechanism
            (model init, shuffling of non-private trials, evaluation, the self-check's samples).
        weight_decay: AdamW weight decay.
        input_mean, input_std: inputs are ``(x - mean) / std`` for pixels x in [0, 1].
        pos_weight: ``uniform`` or ``train`` (per-label negatives/positives of the training split).
        external_datasets: datasets whose test split the final model is also evaluated on.
        model_selection: ``best_val`` (the epoch with the best validation macro AUROC) or ``last``.
        test_every_epoch: also evaluate on test after every epoch (epsilon-binned tables; never selects).
        n_boot: bootstrap replicates of the final test evaluation.
        age_edges: age bins of the fairness groups.
    """

    sweep: str
    dataset: str
    data_root: str
    image_size: int
    model: str
    init: str
    init_weights: str | None = None
    lr: float = 1e-3
    seed: int = 0
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    weight_decay: float = 0.01
    input_mean: float = 0.0
    input_std: float = 1.0
    pos_weight: PosWeight = "uniform"
    external_datasets: tuple[str, ...] = ()
    model_selection: ModelSelection = "best_val"
    test_every_epoch: bool = True
    n_boot: int = 200
    age_edges: tuple[float, ...] = (0, 40, 70, 100)

    def to_flat(self) -> dict[str, Any]:
        """One flat dict of every field, nested ones included under their own (unique) names: Ray's param space,
        the trial's MLflow params and its trials.parquet columns. Tuples become lists."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in NESTED:
                flat.update({g.name: getattr(value, g.name) for g in fields(value)})
            else:
                flat[f.name] = list(value) if isinstance(value, tuple) else value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialConfig:
        """Inverse of `to_flat`; unknown keys are an error (they mean a spec/trial version mismatch)."""
        owners = {
            f.name: name for name, kind in (("privacy", PrivacyConfig), ("speed", SpeedConfig)) for f in fields(kind)
        }
        top_level = {f.name for f in fields(cls)} - set(NESTED)
        nested: dict[str, dict[str, Any]] = {name: {} for name in NESTED}
        top: dict[str, Any] = {}
        for key, value in flat.items():
            if key in owners:
                nested[owners[key]][key] = value
            elif key in top_level:
                top[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise KeyError(f"unknown trial config key {key!r}")
        return cls(privacy=PrivacyConfig(**nested["privacy"]), speed=SpeedConfig(**nested["speed"]), **top)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """The pretrain stage (the ``domain`` init): which public dataset, from which init, how long.

    Attributes:
        dataset: a prepared public dataset (e.g. ``synthetic-source``, ``mimic-cxr``).
        init: the init pretraining starts from (``random`` or a timm tag such as ``dinov3``).
        epochs, lr, batch_size, weight_decay, seed: non-private AdamW training settings.
        input_mean, input_std: input normalization; always the sweep's (``data.input_mean``/``input_std``), so
            the init fits its inputs.
    """

    dataset: str
    init: str = "random"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0
    input_mean: float = 0.0
    input_std: float = 1.0
