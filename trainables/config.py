"""TrialConfig: the typed, immutable description of one trial, checked on construction, and the vocabulary of the
sweep files.

**One declaration per setting.** A sweep file's sections are these classes (`sweeps.schema`), so a setting has one
name and one default from the YAML to the optimizer:

    section       the sweep's settings (shared by every trial)   in one trial
    data:         `DataSettings` (+ the dataset lists, `sweeps`)  inherited by `TrialConfig`; ``dataset`` a grid axis
    training:     `TrainingSettings`                              inherited by `TrialConfig`; ``lr``, ``seed`` grid axes
    evaluation:   `EvaluationSettings`                            inherited by `TrialConfig`
    privacy:      `PrivacySettings`                               `TrialConfig.privacy`, a `PrivacyConfig`: the settings
                                                                  + grid axes ``target_epsilon``, ``max_grad_norm``,
                                                                  ``privacy_unit`` + the planner's derived fields
    speed:        `SpeedConfig`                                   `TrialConfig.speed`
    pretrain:     `PretrainConfig`                                (the pretrain stage builds its own trial)

`TrialConfig` inherits the data, training and evaluation settings rather than nesting them, so its fields keep
their flat names (``cfg.lr``, ``cfg.n_boot``) and `TrialConfig.to_flat` its keys (Ray's param space, the MLflow
params, the trials.parquet columns: sweeps on disk resume with them). A grid axis holds the values of one trial
field; a sweep file that leaves it out sweeps the field's default, declared here. The sweep's settings hold no
grid axis, so nothing carries a placeholder: the planner builds each trial in one construction from the sweep's
settings and its grid point (`sweeps.schema.SweepSpec.trial_config`). Closed sets are the `Literal` types below,
checked where a sweep file is read (`sweeps.spec`) against `typing.get_args` of the same types.

**Checked on construction.** Every class checks its own fields in ``__post_init__`` (the classes `TrialConfig`
inherits cooperatively, so it checks them all) and `TrialConfig` the pairs across sections (a label-count noise
without ``pos_weight: train``, or a patient cap above the physical batch). A violation raises `ConfigError`
naming the field's path in the trial config (``privacy.delta``, ``speed.pad_multiple``, ``lr``), the value and the
fix, wherever the config is built: the planner, the pretrain stage, the audit, a benchmark or a test.
`sweeps.validate` turns it into a `SpecError` naming the sweep file's field (``training.lr[1]``).

Privacy knobs (they change the guarantee) live in `PrivacyConfig`; speed knobs (they never change results or the
guarantee) live in `SpeedConfig`. The driver calibrates the noise multiplier and fills the derived privacy fields
(`PrivacyConfig.DERIVED`) before a trial starts; the trial re-checks them against its data.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

from trainables.errors import UserError

Accountant = Literal["rdp", "prv"]
PrivacyUnit = Literal["image", "patient"]
GradSampleMode = Literal["bk", "hooks", "functorch"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16"]
Toggle = Literal["auto", "on", "off"]
PosWeight = Literal["uniform", "train"]
ModelSelection = Literal["best_val", "last"]


MAX_SEED = 2**32 - 1
"""The largest seed: numpy's legacy generators (Optuna's samplers) take seeds below 2**32."""
MIN_DELTA = 1e-10
"""The smallest delta: below it calibration stops working (the rdp accountant cannot certify epsilon below 0.29 at
delta 1e-10, nor below 11 at 1e-300, however much noise is added; prv's floating-point error exceeds delta near
1e-13), and no dataset needs it (delta well below 1/N: 1e-5 to 1e-8)."""
MAX_TARGET_EPSILON = 100.0
"""The largest finite target epsilon: a bound on a likelihood ratio of e^100 protects nothing, and the accountants
lose their footing above it (rdp's bound then rests on its smallest order, prv overflows near 700); a non-private
baseline is ``.inf``."""
MAX_IMAGE_SIZE = 4096
"""The largest image side in pixels: beyond the native resolution of chest X-ray datasets (about 3000 px)."""
MAX_BOOTSTRAP = 100_000
"""The most bootstrap replicates: each re-scores every test set (n_boot x N indices held at once)."""


class ConfigError(UserError, ValueError):
    """A config value breaks an invariant of its class; the message is ``<field> = <value><problem>``.

    Attributes:
        field: the value's path in the trial config (``privacy.delta``, ``speed.pad_multiple``, ``lr``;
            `PretrainConfig`'s are ``pretrain.<name>``).
        value: the offending value.
        problem: what is wrong and the fix, worded to follow ``<field> = <value>``.
    """

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field} = {shown(value)}{problem}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, Any, str]]:
        return type(self), (self.field, self.value, self.problem)  # Ray sends a trial's errors pickled


def shown(value: Any) -> str:
    """A value as a sweep file would spell it (tuples as lists)."""
    return repr(list(value) if isinstance(value, tuple) else value)


def is_private(target_epsilon: float) -> bool:
    """Whether a trial with this target is private; ``inf`` is the non-private baseline (no clipping, no noise,
    shuffled batches). The one definition; `PrivacyConfig.is_private` asks it."""
    return math.isfinite(target_epsilon)


def _check(ok: bool, field: str, value: Any, problem: str) -> None:
    if not ok:
        raise ConfigError(field, value, problem)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _real(value) and math.isfinite(value)


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum


def _check_positive(field: str, value: Any, example: str) -> None:
    _check(_finite(value) and value > 0, field, value, f" must be a finite number > 0, e.g. {example}")


def _check_whole(field: str, value: Any, minimum: int, unit: str = "") -> None:
    _check(_whole(value, minimum), field, value, f" must be a whole number >= {minimum}{unit}")


def _check_seed(field: str, value: Any) -> None:
    _check_whole(field, value, 0)
    _check(
        value <= MAX_SEED, field, value, f" must be at most 2**32 - 1 = {MAX_SEED} (the seeds numpy and Optuna take)"
    )


def _check_weight_decay(field: str, weight_decay: Any, lr: Any, lr_field: str) -> None:
    """AdamW's decoupled decay multiplies every weight by ``1 - lr * weight_decay`` at each step: at 1 or more the
    weights are zeroed or flip sign every step, so nothing is learned."""
    _check(
        weight_decay * lr < 1,
        field,
        weight_decay,
        f" with {lr_field} = {lr!r}: AdamW multiplies every weight by 1 - lr x weight_decay = "
        f"{1 - lr * weight_decay:.3g} at each step, which zeroes or flips the weights; keep lr x weight_decay well "
        "below 1 (e.g. weight_decay 0.01)",
    )


def _check_name(field: str, value: Any, what: str) -> None:
    _check(isinstance(value, str) and value != "", field, value, f" must name {what}")


class _Checked:
    """Root of the cooperative checks: each config class's ``__post_init__`` checks its own fields and calls
    ``super().__post_init__()``, so a class that inherits several (`TrialConfig`) checks them all."""

    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True, kw_only=True)
class InputNormalization(_Checked):
    """Inputs are ``(x - input_mean) / input_std`` for pixels x in [0, 1] (public constants; 0 and 1: plain [0, 1]).
    A sweep file sets them in ``data:``; the pretrain stage always uses the sweep's, so the init fits its inputs."""

    input_mean: float = 0.0
    input_std: float = 1.0

    def __post_init__(self) -> None:
        _check(
            _finite(self.input_mean) and 0 <= self.input_mean <= 1,
            "input_mean",
            self.input_mean,
            " must be a finite number in [0, 1] (pixels are in [0, 1]), e.g. 0.5 (0: no centring)",
        )
        _check_positive("input_std", self.input_std, "0.25")
        _check(
            0.01 <= self.input_std <= 1,
            "input_std",
            self.input_std,
            " must be in [0.01, 1]: pixels in [0, 1] have a std of at most 0.5, and 1 means no scaling; e.g. 0.25",
        )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class DataSettings(InputNormalization):
    """The trial settings of a sweep file's ``data:`` section; the section's dataset lists and folders are
    `sweeps.schema.DataSpec`'s.

    Attributes:
        image_size: side of the prepared images in pixels (the dataset cache's ``<size>`` folder).
    """

    image_size: int = 64

    def __post_init__(self) -> None:
        _check_whole("image_size", self.image_size, 32, " (pixels: ConvNeXt downsamples by 32)")
        _check(
            self.image_size <= MAX_IMAGE_SIZE,
            "image_size",
            self.image_size,
            f" must be at most {MAX_IMAGE_SIZE} pixels (beyond the datasets' native resolution); the study uses 224",
        )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class TrainingSettings(_Checked):
    """A sweep file's ``training:`` section besides its grid axes ``lr`` and ``seed`` (`TrialConfig`'s fields).

    Attributes:
        weight_decay: AdamW weight decay.
        pos_weight: ``uniform`` or ``train`` (per-label negatives/positives of the training split; a private trial
            releases them as Gaussian-noised counts, `trainables.privacy.label_counts`).
        model_selection: ``best_val`` (the epoch with the best validation macro AUROC) or ``last``.
    """

    weight_decay: float = 0.01
    pos_weight: PosWeight = "uniform"
    model_selection: ModelSelection = "best_val"

    def __post_init__(self) -> None:
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            " must be a finite number >= 0, e.g. 0.01",
        )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class EvaluationSettings(_Checked):
    """A sweep file's ``evaluation:`` section.

    Attributes:
        n_boot: paired bootstrap replicates of the final test evaluation (0: none).
        age_edges: age bins of the fairness groups, in years: ``[edges[i], edges[i+1])``; ``inf`` may close the last.
        test_every_epoch: also evaluate on test after every epoch (epsilon-binned tables; never selects).
    """

    n_boot: int = 1000
    age_edges: tuple[float, ...] = (0, 40, 70, 100)
    test_every_epoch: bool = True

    def __post_init__(self) -> None:
        _check_whole("n_boot", self.n_boot, 0)
        _check(
            self.n_boot <= MAX_BOOTSTRAP,
            "n_boot",
            self.n_boot,
            f" must be at most {MAX_BOOTSTRAP} (each replicate re-scores every test set); 1000 is the usual",
        )
        edges = self.age_edges
        example = ", e.g. [0, 40, 70, 100]"
        _check(len(edges) >= 2, "age_edges", edges, f": give at least two edges (years){example}")
        _check(all(_real(e) and not math.isnan(e) for e in edges), "age_edges", edges, f" must be numbers{example}")
        _check(
            all(low < high for low, high in zip(edges, edges[1:], strict=False)),
            "age_edges",
            edges,
            f" must be strictly increasing{example}",
        )
        _check(edges[0] >= 0, "age_edges", edges, f" must start at an age >= 0{example}")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class PrivacySettings(_Checked):
    """Everything that changes the DP guarantee and is the same for every trial of a sweep: a sweep file's
    ``privacy:`` section besides its grid axes (`PrivacyConfig` adds those and the planner's derived fields).

    Mechanism: DP-SGD with Poisson sampling of records at rate q, per-record clipping to L2 norm C over all
    trainable parameters, Gaussian noise of std sigma * C on the clipped sum; add/remove adjacency of one
    record (the privacy unit); the number of training records N is treated as public (q and steps are derived
    from it and released).

    Attributes:
        delta: the (epsilon, delta) delta; must be < 1/N (N_train images, or N_patients for the patient unit;
            checked by the planner, which knows N).
        expected_batch_size: expected logical batch size B in records (images, or patients for the patient unit);
            Poisson sample rate q = 1/ceil(N/B), N the number of training records.
        epochs: planned epochs; steps = epochs * ceil(N/B).
        accountant: ``rdp`` (default, the study's) or ``prv``; calibration and reporting use the same one.
        max_images_per_patient: the public cap of a patient-level trial's images per patient (patients with more
            contribute their first ones in the training split's order); None for image-level trials.
        secure_mode: cryptographically secure noise and sampling (ChaCha20; slower).
        reproducible_noise: debugging only: seed the noise and Poisson sampling from ``seed`` (published), so the
            trial has no DP guarantee; default False: their seeds come from ``os.urandom`` and stay secret.
        calibration_tolerance: how far below the target the calibrated epsilon may end (never above it).
        label_count_noise_multiplier: sigma_c of the Gaussian label-count release that ``pos_weight: train``
            needs (`trainables.privacy.label_counts`; composed into the trial's budget; in units of the count
            vector's sensitivity for the trial's record: sqrt(L) per image, ``max_images_per_patient`` x sqrt(L)
            per patient). The planner sets it (default 20) for private ``pos_weight: train`` trials and leaves it
            None otherwise.
    """

    delta: float = 6e-6
    expected_batch_size: int = 32
    epochs: int = 3
    accountant: Accountant = "rdp"
    max_images_per_patient: int | None = None
    secure_mode: bool = False
    reproducible_noise: bool = False
    calibration_tolerance: float = 0.01
    label_count_noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        _check(
            _finite(self.delta) and 0 < self.delta < 1,
            "privacy.delta",
            self.delta,
            " must be in (0, 1), and below 1/N_train, e.g. 1e-5",
        )
        _check(
            self.delta >= MIN_DELTA,
            "privacy.delta",
            self.delta,
            f" is unreasonably small: below {MIN_DELTA:g} no noise can be calibrated for it (the rdp accountant's "
            "epsilon stays above the targets however much noise is added; prv's floating point fails), and nothing "
            "is gained; choose a delta well below 1/N_train, e.g. 1e-5 to 1e-8",
        )
        _check_whole("privacy.expected_batch_size", self.expected_batch_size, 1, " (records per logical batch)")
        _check_whole("privacy.epochs", self.epochs, 1)
        cap = self.max_images_per_patient
        _check(
            cap is None or _whole(cap, 1),
            "privacy.max_images_per_patient",
            cap,
            " must be a whole number >= 1 (the public cap of a patient's images), or None",
        )
        _check(
            not (self.secure_mode and self.reproducible_noise),
            "privacy.reproducible_noise",
            self.reproducible_noise,
            " with privacy.secure_mode = True: they exclude each other (secure mode draws secret noise, reproducible "
            "noise replays the published seed); keep one (reproducible_noise is for debugging only)",
        )
        _check(
            _finite(self.calibration_tolerance) and 0 < self.calibration_tolerance < 1,
            "privacy.calibration_tolerance",
            self.calibration_tolerance,
            " must be in (0, 1), e.g. 0.01",
        )
        sigma_c = self.label_count_noise_multiplier
        _check(
            sigma_c is None or (_finite(sigma_c) and sigma_c > 0),
            "privacy.label_count_noise_multiplier",
            sigma_c,
            " must be a finite number > 0: exact label counts of the private training set would make every "
            "record's loss depend on the others' labels outside the accounted mechanism; leave it out for the "
            "default (20)",
        )
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig(PrivacySettings):
    """One trial's privacy: the sweep's `PrivacySettings`, its grid point's values and the planner's derived fields.

    Attributes:
        target_epsilon: epsilon the planned steps end at (``inf`` = non-private baseline: no clipping,
            no noise, shuffled batches). A grid axis.
        max_grad_norm: per-record clipping bound C (L2 over all trainable parameters). A grid axis. A non-private
            trial clips nothing (Optuna's baselines carry 0).
        privacy_unit: ``image`` (each image is a record) or ``patient`` (each patient with all its images, at most
            ``max_images_per_patient``, is one record: Poisson sampling over patients, one clipped gradient per
            patient, q and steps from N_patients; `trainables.privacy.patients`). A grid axis.
        noise_multiplier: sigma (noise std = sigma * C), calibrated by the driver; 0 when non-private.
        sample_rate: Poisson sample rate q, derived by the driver from N and B.
        steps: total planned DP-SGD steps, derived by the driver.
    """

    target_epsilon: float
    max_grad_norm: float = 1.0
    privacy_unit: PrivacyUnit = "image"
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0

    DERIVED: ClassVar[tuple[str, ...]] = ("noise_multiplier", "sample_rate", "steps")
    """Fields the planner fills (a sweep file cannot set them)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        eps = self.target_epsilon
        _check(
            _real(eps) and eps > 0,
            "privacy.target_epsilon",
            eps,
            " must be > 0 (use .inf for the non-private baseline)",
        )
        if self.is_private:
            _check(
                eps <= MAX_TARGET_EPSILON,
                "privacy.target_epsilon",
                eps,
                f" is too large to mean anything: above {MAX_TARGET_EPSILON:g} the bound (a likelihood ratio of up to "
                "e^epsilon) protects no one and the accountants cannot calibrate reliably; use a target up to "
                f"{MAX_TARGET_EPSILON:g}, or .inf for the non-private baseline",
            )
            tolerance = self.calibration_tolerance
            _check(
                eps > tolerance,
                "privacy.target_epsilon",
                eps,
                f" is not above privacy.calibration_tolerance = {tolerance!r}: calibration ends in [target - "
                "tolerance, target], which must hold epsilons > 0; raise the target or lower the tolerance",
            )
        clip = self.max_grad_norm
        if self.is_private:
            _check(_finite(clip) and clip > 0, "privacy.max_grad_norm", clip, " must be a finite number > 0")
        else:
            _check(
                _finite(clip) and clip >= 0,
                "privacy.max_grad_norm",
                clip,
                " must be a finite number >= 0 (a non-private trial clips nothing)",
            )
        cap = self.max_images_per_patient
        if self.privacy_unit == "patient":
            _check(
                cap is not None,
                "privacy.max_images_per_patient",
                cap,
                ": a patient-level trial needs the public cap of images per patient (patients with more "
                "contribute their first ones), a whole number >= 1, e.g. 4",
            )
        else:
            _check(
                cap is None,
                "privacy.max_images_per_patient",
                cap,
                f" is set but privacy.privacy_unit is {self.privacy_unit!r}; it caps a patient-level trial's "
                "images: remove it, or set privacy.privacy_unit: patient",
            )
        sigma = self.noise_multiplier
        _check(_finite(sigma) and sigma >= 0, "privacy.noise_multiplier", sigma, " must be a finite number >= 0")
        q = self.sample_rate
        _check(_finite(q) and 0 <= q <= 1, "privacy.sample_rate", q, " must be in [0, 1]")
        _check_whole("privacy.steps", self.steps, 0)

    @property
    def is_private(self) -> bool:
        return is_private(self.target_epsilon)


@dataclass(frozen=True, kw_only=True)
class SpeedConfig(_Checked):
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
            float rounding (bit for bit when no chunk is padded; tested in every mode). Patient-level trials cut
            chunks between patients and pad each one; padding rows belong to no patient.
        pad_multiple: the padding granule of ``fixed_shapes`` (rows, at most ``max_physical_batch_size``): at most
            ``max_physical_batch_size / pad_multiple`` shapes, fewer than ``pad_multiple`` wasted rows per step. Set
            it to ``max_physical_batch_size`` for a single shape (then every step runs whole chunks: for an expected
            batch of 32, 1.45x the work in chunks of 32 and 2.0x in chunks of 64; granule 8: 1.11x).
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

    def __post_init__(self) -> None:
        _check_whole("speed.max_physical_batch_size", self.max_physical_batch_size, 1)
        _check_whole("speed.threads", self.threads, 1)
        _check_whole("speed.eval_batch_size", self.eval_batch_size, 1)
        physical = self.max_physical_batch_size
        _check(
            _whole(self.pad_multiple, 1) and self.pad_multiple <= physical,
            "speed.pad_multiple",
            self.pad_multiple,
            f" must be between 1 and speed.max_physical_batch_size = {physical} (rows a padded chunk is rounded "
            "up to; e.g. 8)",
        )
        super().__post_init__()


NESTED = ("privacy", "speed")


@dataclass(frozen=True, kw_only=True)
class TrialConfig(DataSettings, TrainingSettings, EvaluationSettings):
    """One trial: a grid point of the sweep plus the sweep's settings it needs.

    The data, training and evaluation settings are inherited (`DataSettings`, `TrainingSettings`,
    `EvaluationSettings`: image_size, input_mean, input_std, weight_decay, pos_weight, model_selection, n_boot,
    age_edges, test_every_epoch); privacy and speed are nested.

    Attributes:
        sweep, dataset, model, init: names (the sweep, the private training set, the timm architecture, the init).
        data_root: where the prepared datasets' caches are (`trainables.names.dataset_dir`).
        init_weights: the resolved weight file of the init (None: random, or timm's own cache).
        lr, seed: AdamW learning rate (``training.lr``, a grid axis) and the seed (``training.seed``, a grid axis)
            of everything that is not the DP mechanism (model init, shuffling of non-private trials, evaluation,
            the self-check's samples).
        external_datasets: datasets whose test split the final model is also evaluated on.
        train_fraction: the share of the training split's patients the trial trains on (``data.train_fraction``, a
            grid axis), in (0, 1]: the nested, patient-level subset of `trainables.data.splits.train_subset`;
            validation and test are never subsampled. N (images, patients), q and steps are the subset's.
        proxy: a phase-1 trial of ``search: proxy`` (`sweeps.proxy`): DP-SGD on a *public* dataset at a TAN-scaled
            (sigma, q) for the steps of a private reference plan, which it runs exactly (``privacy.steps`` over
            ``privacy.epochs``). Not private and not accounted (public data): its plan is not checked against the
            target and it reports no epsilon. Only in `to_flat` when true.
    """

    sweep: str
    dataset: str
    data_root: str
    model: str
    init: str
    init_weights: str | None = None
    lr: float = 1e-3
    seed: int = 0
    privacy: PrivacyConfig
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    external_datasets: tuple[str, ...] = ()
    train_fraction: float = 1.0
    proxy: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_name("sweep", self.sweep, "the sweep")
        _check_name("dataset", self.dataset, "the private training set, e.g. 'synthetic-a'")
        _check_name("data_root", self.data_root, "the folder of the prepared datasets")
        _check_name("model", self.model, "a timm architecture, e.g. 'convnext_small'")
        _check_name("init", self.init, "an init, e.g. 'random'")
        _check_positive("lr", self.lr, "0.001")
        _check_weight_decay("weight_decay", self.weight_decay, self.lr, "training.lr")
        _check_seed("seed", self.seed)
        _check(
            _finite(self.train_fraction) and 0 < self.train_fraction <= 1,
            "train_fraction",
            self.train_fraction,
            " must be a number in (0, 1], the share of training patients, e.g. 0.25 (1: the whole training split)",
        )
        self._check_sections()

    def _check_sections(self) -> None:
        """The rules across sections."""
        p, s = self.privacy, self.speed
        if self.proxy:
            _check(
                p.is_private and p.steps >= p.epochs and p.steps % p.epochs == 0 and p.sample_rate > 0,
                "privacy.steps",
                p.steps,
                f" of a proxy trial must be a positive multiple of privacy.epochs = {p.epochs} with a sample rate > 0 "
                "(it runs its private reference's steps exactly, epoch by epoch)",
            )
        sigma_c = p.label_count_noise_multiplier
        _check(
            sigma_c is None or self.pos_weight == "train",
            "privacy.label_count_noise_multiplier",
            sigma_c,
            f" is set but training.pos_weight is {self.pos_weight!r}; it is the noise of the label counts that "
            "`pos_weight: train` releases: remove it, or set training.pos_weight: train",
        )
        if p.privacy_unit != "patient":
            return
        cap = p.max_images_per_patient
        _check(
            cap is not None and cap <= s.max_physical_batch_size,
            "privacy.max_images_per_patient",
            cap,
            f" exceeds speed.max_physical_batch_size = {s.max_physical_batch_size}: a patient's images are clipped "
            "together, so they must fit in one physical batch; lower the cap or raise the physical batch",
        )

    def to_flat(self) -> dict[str, Any]:
        """One flat dict of every field, nested ones included under their own (unique) names: Ray's param space,
        the trial's MLflow params and its trials.parquet columns. Tuples become lists. ``train_fraction`` only when
        below 1, so a trial on the whole training split has the keys (params, columns) of the trials before it."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name == "train_fraction" and value == 1) or (f.name == "proxy" and not value):
                continue
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
class PretrainConfig(InputNormalization):
    """The pretrain stage (the ``domain`` init): which public dataset, from which init, how long.

    Attributes:
        dataset: a prepared public dataset (e.g. ``synthetic-source``, ``mimic-cxr``).
        init: the init pretraining starts from (``random`` or a timm tag such as ``dinov3``; not ``domain``, which is
            what it makes).
        epochs, lr, batch_size, weight_decay, seed: non-private AdamW training settings.

    Its input normalization (`InputNormalization`) is always the sweep's (``data.input_mean``/``input_std``), so
    the init fits its inputs.
    """

    dataset: str
    init: str = "random"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        _check_name("pretrain.dataset", self.dataset, "a prepared public dataset, e.g. 'mimic-cxr'")
        _check_name("pretrain.init", self.init, "an init, e.g. 'random'")
        _check(
            self.init != "domain",
            "pretrain.init",
            self.init,
            ": the pretrain stage makes the 'domain' init, so it cannot start from it; use random or a timm tag",
        )
        _check_whole("pretrain.epochs", self.epochs, 1)
        _check_positive("pretrain.lr", self.lr, "0.001")
        _check_whole("pretrain.batch_size", self.batch_size, 1, ", e.g. 64")
        _check(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            "pretrain.weight_decay",
            self.weight_decay,
            " must be a finite number >= 0, e.g. 0.01",
        )
        _check_weight_decay("pretrain.weight_decay", self.weight_decay, self.lr, "pretrain.lr")
        _check_seed("pretrain.seed", self.seed)
        super().__post_init__()
