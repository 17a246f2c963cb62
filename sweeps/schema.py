"""The sweep file's types: `SweepSpec`, its sections and grid, and the trial config of a grid point.

Types only: reading a file into them is `sweeps.spec`'s job, the sweep-level checks are `sweeps.validate`'s (both
import this module; it imports neither). A section that sets trial fields *is* the trial's config class
(`trainables.config`): ``privacy:`` a `PrivacySettings`, ``training:`` a `TrainingSettings`, ``evaluation:`` an
`EvaluationSettings`, ``speed:`` a `SpeedConfig`, ``pretrain:`` a `PretrainConfig`, and ``data:`` a `DataSpec`,
which is `DataSettings` plus the dataset lists and folders. The grid axes (``privacy.target_epsilon``,
``privacy.max_grad_norm``, ``privacy.privacy_unit``, ``training.lr``, ``training.seed``, ``data.train``,
``data.train_fraction``, ``model``, ``inits``) are lists of one trial field's values; `SweepSpec.trial_config`
builds the trial of one grid point in one construction, so every config check sees a real trial.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from trainables.config import (
    DataSettings,
    EvaluationSettings,
    PretrainConfig,
    PrivacyConfig,
    PrivacySettings,
    PrivacyUnit,
    SpeedConfig,
    TrainingSettings,
    TrialConfig,
)
from trainables.errors import UserError

SearchMode = Literal["grid", "optuna", "private_selection", "proxy"]
Objective = Literal["auroc", "auroc_gap_sex", "auroc_gap_age"]  # validation split, selected epoch
OptunaSampler = Literal["tpe", "random"]
TrialCountDistribution = Literal["logarithmic", "geometric", "negative_binomial", "poisson"]
EarlyStoppingMethod = Literal["asha"]


class SpecError(UserError, ValueError):
    """A sweep file is invalid; the message names the field, the value and the fix."""


@dataclass(frozen=True, kw_only=True)
class DataSpec(DataSettings):
    """``data:``: the trial settings (`DataSettings`: image_size, input_mean, input_std) and the sweep's datasets.

    Attributes:
        train: one dataset or a list (a grid axis: each trial trains on one; `TrialConfig.dataset`).
        external: datasets whose test split every trial is also evaluated on (a trial's own training set excepted).
        root: folder of the prepared datasets (``<root>/<dataset>/<size>/``; `TrialConfig.data_root`, resolved).
        synthetic_images: images per synthetic dataset (None: the generator's default).
    """

    train: tuple[str, ...]
    external: tuple[str, ...] = ()
    root: str = "data"
    synthetic_images: int | None = None


@dataclass(frozen=True)
class ResourcesSpec:
    cpu: float = 1
    gpu: float = 0
    max_concurrent: int = 0  # 0: as many as the cluster's resources allow
    max_failures: int = 2


@dataclass(frozen=True)
class OptunaSpec:
    """`search: optuna`: per (model, dataset, init, target epsilon) cell, an Optuna study over these ranges.

    Each range is named after the trial field it sets and is ``[low, high]`` (searched; log scale for all but
    epochs) or ``[value]`` (fixed)."""

    trials_per_target: int = 8
    max_concurrent: int = 2
    objectives: tuple[Objective, ...] = ("auroc",)
    noise_multiplier: tuple[float, ...] = (0.3, 5.0)
    expected_batch_size: tuple[int, ...] = (16, 256)
    epochs: tuple[int, ...] = (1, 5)
    lr: tuple[float, ...] = (1e-4, 1e-2)
    max_grad_norm: tuple[float, ...] = (0.5, 5.0)
    sampler: OptunaSampler = "tpe"
    seed: int = 0
    max_proposals: int = 200  # infeasible proposals tolerated per launched trial before giving up

    RANGES = ("noise_multiplier", "expected_batch_size", "epochs", "lr", "max_grad_norm")


@dataclass(frozen=True)
class SelectionSpec:
    """`search: private_selection` (Papernot & Steinke 2022): per (model, dataset, init, target epsilon) cell, a secret
    number of candidate trials K from ``distribution`` with mean ``mean_trials`` (``shape``: eta of
    ``negative_binomial`` only), each with hyperparameters drawn at random; only the best (by validation) is released.

    ``lr`` and ``max_grad_norm`` are ``[low, high]`` (drawn log-uniformly) or ``[value]`` (fixed);
    ``expected_batch_size`` and ``epochs`` are lists of choices (one drawn uniformly; every combination is
    calibrated in advance, `trainables.privacy.selection.plan_selection`)."""

    distribution: TrialCountDistribution = "logarithmic"
    mean_trials: float = 4.0
    shape: float | None = None
    lr: tuple[float, ...] = (1e-4, 1e-2)
    max_grad_norm: tuple[float, ...] = (0.5, 5.0)
    expected_batch_size: tuple[int, ...] = (PrivacyConfig.expected_batch_size,)
    epochs: tuple[int, ...] = (PrivacyConfig.epochs,)

    RANGES = ("lr", "max_grad_norm")
    CHOICES = ("expected_batch_size", "epochs")


@dataclass(frozen=True)
class ProxySpec:
    """`search: proxy`: phase 1 runs the sweep's grid on the public dataset ``dataset`` with TAN scaling (Sander et al.,
    ICML 2023): each grid point's private reference plan (B_ref = ``privacy.expected_batch_size``, its steps S, its
    calibrated sigma_ref) is simulated at expected batch ``batch_size`` (B_sim) with sigma_sim = sigma_ref x B_sim /
    B_ref for the same S steps; phase 2 trains each cell's ``top_k`` best proxy candidates (by validation) on the
    private data (`sweeps.proxy`)."""

    dataset: str = ""
    batch_size: int = 16
    top_k: int = 1


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """ASHA on the per-epoch validation macro AUROC (off unless this section is given)."""

    method: EarlyStoppingMethod = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class AuditSpec:
    """``audit:`` settings of `dpsweep audit`: the one-run audit of Steinke, Nasr & Jagielski 2023.

    One audit per kind per private (model, dataset, init, target epsilon) cell, on its first grid point. ``m`` is the
    exposure knob (more canaries, each its own Poisson-subsampled record; its power limit is printed per audit as the
    epsilon ceiling); ``confidence`` is for all the command's audits together (Bonferroni bounds, Holm refutations)."""

    kind: tuple[Literal["white_box", "black_box"], ...] = ("white_box",)
    m: int = 1000
    confidence: float = 0.95
    target_epsilon: tuple[float, ...] = ()  # which private targets to audit; empty: all of them
    real_records: int | None = None  # white-box: train on the first this many real records (None: all)


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None  # default: sqlite:///<runs>/mlflow.db
    experiment: str | None = None  # default: the sweep's name


@dataclass(frozen=True)
class GridAxes:
    """The trial fields a grid sweeps, besides model, dataset and init: each named after the field it sets. An
    axis the sweep file leaves out sweeps the field's default alone (declared once, in `trainables.config`).

    ``max_grad_norm`` maps every model to its clip norms (a YAML list applies to every model)."""

    target_epsilon: tuple[float, ...]
    max_grad_norm: dict[str, tuple[float, ...]]
    lr: tuple[float, ...] = (TrialConfig.lr,)
    seed: tuple[int, ...] = (TrialConfig.seed,)
    privacy_unit: tuple[PrivacyUnit, ...] = (PrivacyConfig.privacy_unit,)
    train_fraction: tuple[float, ...] = (TrialConfig.train_fraction,)


@dataclass(frozen=True)
class TrialName:
    """A trial's key and its MLflow run name, written from the same parts (so distinct keys keep distinct names).

    Attributes:
        key: unique in the sweep: Ray's trial point, the ``dpsweep.trial_key`` tag, the tables' ``trial`` column
            (``random-eps8-clip1-lr0.002-seed0``).
        run_name: short, for the MLflow runs list (``random ε8 c1 lr0.002 s0``).
    """

    key: str
    run_name: str

    def then(self, key_part: str, name_part: str) -> TrialName:
        """This name followed by one more part: ``then("-t007", " t007")``."""
        return TrialName(self.key + key_part, self.run_name + name_part)


@dataclass(frozen=True)
class GridCell:
    """One (model, dataset, init, target epsilon) combination: the grid's outer axes, and one Optuna study.

    ``prefix`` is ``<model>-`` and ``<dataset>-`` when the sweep has several of them (`SweepSpec.cells`)."""

    model: str
    dataset: str
    init: str
    target_epsilon: float
    prefix: str = ""

    @property
    def name(self) -> TrialName:
        """``<prefix><init>-eps<eps>`` (``eps8``, ``eps0.5``, ``epsinf``), named ``<prefix><init> ε<eps>`` (``ε∞``)."""
        private = not math.isinf(self.target_epsilon)
        eps = f"{self.target_epsilon:g}" if private else "inf"
        stem = f"{self.prefix}{self.init}"
        return TrialName(f"{stem}-eps{eps}", f"{stem} ε{eps if private else '∞'}")

    @property
    def key(self) -> str:
        return self.name.key


@dataclass(frozen=True)
class GridPoint:
    """One trial of a grid (or an Optuna proposal): its cell and the values of the inner axes."""

    cell: GridCell
    max_grad_norm: float
    lr: float
    seed: int
    privacy_unit: PrivacyUnit
    train_fraction: float = TrialConfig.train_fraction

    @property
    def model(self) -> str:
        return self.cell.model

    @property
    def dataset(self) -> str:
        return self.cell.dataset

    @property
    def init(self) -> str:
        return self.cell.init

    @property
    def target_epsilon(self) -> float:
        return self.cell.target_epsilon


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep. ``source`` is the file it came from (for messages and relative paths).

    ``privacy``, ``training``, ``evaluation``, ``speed`` and ``data`` hold the settings every trial shares;
    ``axes`` the grid axes; ``pretrain`` carries the data section's input normalization."""

    name: str
    data: DataSpec
    models: tuple[str, ...]  # YAML `model:` (one name or a list) or `models:`
    inits: tuple[str, ...]
    privacy: PrivacySettings
    axes: GridAxes
    training: TrainingSettings = field(default_factory=TrainingSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    pretrain: PretrainConfig | None = None
    init_weights: dict[str, str] = field(default_factory=dict)
    search: SearchMode = "grid"
    optuna: OptunaSpec | None = None
    selection: SelectionSpec | None = None
    proxy: ProxySpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    audit: AuditSpec | None = None
    runs: str = "runs"
    description: str = ""
    source: str = ""

    def cells(self) -> list[GridCell]:
        """model x dataset x init x target epsilon: the grid's outer axes, and Optuna mode's studies, in a stable
        order. Their keys name the model and the dataset when the sweep has several."""
        axes = itertools.product(self.models, self.data.train, self.inits, self.axes.target_epsilon)
        return [GridCell(m, d, i, e, self._cell_prefix(m, d)) for m, d, i, e in axes]

    def _cell_prefix(self, model: str, dataset: str) -> str:
        return (f"{model}-" if len(self.models) > 1 else "") + (f"{dataset}-" if len(self.data.train) > 1 else "")

    def grid(self) -> list[GridPoint]:
        """The grid points: model x dataset x init x epsilon x clip x lr x seed x privacy unit x train fraction, in a
        stable order."""
        return [
            GridPoint(cell, max_grad_norm=c, lr=lr, seed=s, privacy_unit=u, train_fraction=f)
            for cell in self.cells()
            for c in self.axes.max_grad_norm[cell.model]
            for lr in self.axes.lr
            for s in self.axes.seed
            for u in self.axes.privacy_unit
            for f in self.axes.train_fraction
        ]

    def init_weights_for(self, init: str, model: str) -> str | None:
        """The weight file given for ``init`` (``{model}`` in it is replaced by the architecture)."""
        path = self.init_weights.get(init)
        return None if path is None else path.replace("{model}", model)

    def trial_config(
        self, point: GridPoint, *, data_root: str, init_weights: str | None = None, **privacy: Any
    ) -> TrialConfig:
        """The config of the trial at ``point``: the sweep's settings and the point's values in one construction.

        Args:
            point: a grid point, or the values of an Optuna proposal.
            data_root: the folder of the prepared datasets (resolved by the planner).
            init_weights: the resolved weight file of the point's init (None: random, or timm's own cache).
            privacy: `PrivacyConfig` fields the planner derives (``noise_multiplier``, ``sample_rate``, ``steps``,
                ``label_count_noise_multiplier``) or an Optuna proposal sets (``expected_batch_size``,
                ``epochs``); the others are the sweep's ``privacy:`` settings. Only a patient-level point keeps
                the sweep's ``max_images_per_patient``.

        Raises:
            ConfigError: the trial breaks an invariant of its config (`trainables.config`).
        """
        patient = point.privacy_unit == "patient"
        return TrialConfig(
            **_values(self.data, DataSettings),
            **_values(self.training),
            **_values(self.evaluation),
            sweep=self.name,
            dataset=point.dataset,
            data_root=data_root,
            model=point.model,
            init=point.init,
            init_weights=init_weights,
            lr=point.lr,
            seed=point.seed,
            train_fraction=point.train_fraction,
            privacy=PrivacyConfig(
                **{
                    **_values(self.privacy),
                    "max_images_per_patient": self.privacy.max_images_per_patient if patient else None,
                    **privacy,
                    "target_epsilon": point.target_epsilon,
                    "max_grad_norm": point.max_grad_norm,
                    "privacy_unit": point.privacy_unit,
                }
            ),
            speed=self.speed,
            external_datasets=tuple(name for name in self.data.external if name != point.dataset),
        )


def _values(settings: Any, kind: type | None = None) -> dict[str, Any]:
    """The fields of ``kind`` (default: the settings' own class) with the settings' values."""
    return {f.name: getattr(settings, f.name) for f in fields(kind or type(settings))}
