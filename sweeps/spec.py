"""SweepSpec: the sweep file's schema, validated at the edge, and its expansion into trial grid points.

A sweep file is YAML (reference: ``docs/sweep-spec.md``). Its sections reuse the trial's own config classes, so
a setting has one name from the YAML to the optimizer: ``privacy:`` is a `PrivacyConfig` whose grid axes
``target_epsilon`` and ``max_grad_norm`` are lists, ``speed:`` a `SpeedConfig`, ``pretrain:`` a `PretrainConfig`;
``training.lr`` and ``training.seed`` are the grid axes of `TrialConfig.lr` and `TrialConfig.seed`; each
``optuna:`` range is named after the field it searches. Closed sets are the `Literal` types of
`trainables.config`, checked in one place (`_coerce`).

Any problem raises `SpecError` naming the field path, the value and the fix, before Ray or any trial starts.
Checks that need the data (delta < 1/N) or the weights (missing checkpoint files) run in `sweeps.plan`, still
before any trial.
"""

from __future__ import annotations

import difflib
import itertools
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from trainables.config import PretrainConfig, PrivacyConfig, PrivacyUnit, SpeedConfig
from trainables.errors import UserError

SearchMode = Literal["grid", "optuna"]
Objective = Literal["auroc", "auroc_gap_sex", "auroc_gap_age"]  # validation split, selected epoch
OptunaSampler = Literal["tpe", "random"]
EarlyStoppingMethod = Literal["asha"]

RENAMED = {
    "privacy.epsilons": "privacy.target_epsilon",
    "privacy.clip_norms": "privacy.max_grad_norm",
    "training.learning_rates": "training.lr",
    "training.seeds": "training.seed",
    "optuna.learning_rate": "optuna.lr",
    "optuna.clip_norm": "optuna.max_grad_norm",
}
"""Spellings of earlier versions: refused with the new name (every field is named after the setting it sets)."""


class SpecError(UserError, ValueError):
    """A sweep file is invalid; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class DataSpec:
    train: tuple[str, ...]  # one dataset or a list (a grid axis); each trial trains on one
    external: tuple[str, ...] = ()
    root: str = "data"
    image_size: int = 64
    synthetic_images: int | None = None  # images per synthetic dataset (None: the generator's default)
    input_mean: float = 0.0  # inputs are (x - mean) / std with x in [0, 1]; 0 and 1 = the study's plain [0, 1]
    input_std: float = 1.0


@dataclass(frozen=True)
class TrainingSpec:
    """``training:`` besides its grid axes ``lr`` and ``seed`` (`GridAxes`); names are `TrialConfig`'s."""

    weight_decay: float = 0.01
    pos_weight: Literal["uniform", "train"] = "uniform"
    model_selection: Literal["best_val", "last"] = "best_val"


@dataclass(frozen=True)
class EvaluationSpec:
    n_boot: int = 1000
    age_edges: tuple[float, ...] = (0, 40, 70, 100)
    test_every_epoch: bool = True


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
class EarlyStoppingSpec:
    """ASHA on the per-epoch validation macro AUROC (off unless this section is given)."""

    method: EarlyStoppingMethod = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class AuditSpec:
    """``audit:`` settings of `dpsweep audit`: the one-run audit of Steinke, Nasr & Jagielski 2023.

    One audit per kind per private (model, dataset, init, target epsilon) cell, on its first grid point."""

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
    """The trial fields a grid sweeps, besides model, dataset and init: each named after the field it sets.

    ``max_grad_norm`` maps every model to its clip norms (a YAML list applies to every model)."""

    target_epsilon: tuple[float, ...]
    max_grad_norm: dict[str, tuple[float, ...]]
    lr: tuple[float, ...] = (1e-3,)
    seed: tuple[int, ...] = (0,)
    privacy_unit: tuple[PrivacyUnit, ...] = ("image",)


@dataclass(frozen=True)
class GridPoint:
    """One trial of a grid: the values of every axis."""

    model: str
    dataset: str
    init: str
    target_epsilon: float
    max_grad_norm: float
    lr: float
    seed: int
    privacy_unit: PrivacyUnit = "image"


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep. ``source`` is the file it came from (for messages and relative paths).

    ``privacy`` is the sweep-wide `PrivacyConfig` (its ``target_epsilon`` and ``max_grad_norm`` are set per trial
    from ``axes``); ``pretrain`` carries the data section's input normalization."""

    name: str
    data: DataSpec
    models: tuple[str, ...]  # YAML `model:` (one name or a list) or `models:`
    inits: tuple[str, ...]
    privacy: PrivacyConfig
    axes: GridAxes
    training: TrainingSpec = field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    pretrain: PretrainConfig | None = None
    init_weights: dict[str, str] = field(default_factory=dict)
    search: SearchMode = "grid"
    optuna: OptunaSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    audit: AuditSpec | None = None
    runs: str = "runs"
    description: str = ""
    source: str = ""

    def cells(self) -> list[dict[str, Any]]:
        """model x dataset x init x target epsilon: the grid's outer axes, and Optuna mode's studies."""
        axes = itertools.product(self.models, self.data.train, self.inits, self.axes.target_epsilon)
        return [dict(model=m, dataset=d, init=i, target_epsilon=e) for m, d, i, e in axes]

    def grid(self) -> list[GridPoint]:
        """The grid points: model x dataset x init x epsilon x clip x lr x seed x privacy unit, in a stable order."""
        return [
            GridPoint(**cell, max_grad_norm=c, lr=lr, seed=s, privacy_unit=u)
            for cell in self.cells()
            for c in self.axes.max_grad_norm[cell["model"]]
            for lr in self.axes.lr
            for s in self.axes.seed
            for u in self.axes.privacy_unit
        ]

    def init_weights_for(self, init: str, model: str) -> str | None:
        """The weight file given for ``init`` (``{model}`` in it is replaced by the architecture)."""
        path = self.init_weights.get(init)
        return None if path is None else path.replace("{model}", model)


SECTIONS: dict[str, type] = {
    "data": DataSpec,
    "pretrain": PretrainConfig,
    "privacy": PrivacyConfig,
    "training": TrainingSpec,
    "evaluation": EvaluationSpec,
    "resources": ResourcesSpec,
    "speed": SpeedConfig,
    "tracking": TrackingSpec,
    "optuna": OptunaSpec,
    "early_stopping": EarlyStoppingSpec,
    "audit": AuditSpec,
}
OPTIONAL_SECTIONS = ("pretrain", "optuna", "early_stopping", "audit")
AXES: dict[str, tuple[str, Any]] = {
    "privacy.target_epsilon": ("target_epsilon", tuple[float, ...]),
    "privacy.max_grad_norm": ("max_grad_norm", tuple[float, ...]),
    "training.lr": ("lr", tuple[float, ...]),
    "training.seed": ("seed", tuple[int, ...]),
    "privacy.privacy_unit": ("privacy_unit", tuple[PrivacyUnit, ...]),
}
"""Grid axes given inside their sections: field path -> (`GridAxes` field, type)."""
NOT_SETTABLE = {
    **{
        f"privacy.{name}": "it is derived by the planner from the data and the target epsilon"
        for name in PrivacyConfig.DERIVED
    },
    "pretrain.input_mean": "the pretrain stage uses data.input_mean",
    "pretrain.input_std": "it is data.input_std",
}


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; raise `SpecError` on any problem."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"sweep file {path} does not exist; pass a path such as sweeps/smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: malformed YAML{where}: {getattr(error, 'problem', error)}; fix the syntax") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of sections (name, data, model, ...), got {type(raw).__name__}")
    return parse_spec(raw, source=str(path))


def parse_spec(raw: dict[str, Any], source: str = "<dict>") -> SweepSpec:
    """Build a validated `SweepSpec` from a plain dict (the parsed YAML)."""
    raw = dict(raw)
    if "model" in raw:
        if "models" in raw:
            raise SpecError(f"{source}: give either `model` or `models`, not both")
        raw["models"] = raw.pop("model")
    top = {f.name: f for f in fields(SweepSpec) if f.name not in ("source", "axes")}
    _reject_unknown(raw, top, "", source)
    top_types = typing.get_type_hints(SweepSpec)
    values: dict[str, Any] = {"source": source}
    axes: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SECTIONS:
            values[key] = _coerce(value, top_types[key], key, source)
            continue
        if value is None and key in OPTIONAL_SECTIONS:
            values[key] = None
            continue
        if not isinstance(value, dict):
            raise SpecError(f"{source}: `{key}` must be a mapping of settings, got {value!r}")
        section = dict(value)
        for path, (axis, kind) in AXES.items():
            if path.startswith(f"{key}.") and path.split(".")[1] in section:
                given = section.pop(path.split(".")[1])
                if axis == "max_grad_norm" and isinstance(given, dict):
                    axes[axis] = _clip_norms_by_model(given, source)
                else:
                    axes[axis] = _coerce(given, kind, path, source)
        values[key] = _build(SECTIONS[key], section, key, source)
    for required in ("name", "data", "models", "inits", "privacy"):
        if required not in values:
            shown = "model" if required == "models" else required
            raise SpecError(f"{source}: required field `{shown}` is missing")
    if values.get("search") == "optuna":
        for name in OptunaSpec.RANGES:
            for section in ("privacy", "training"):
                if name in (raw.get(section) or {}):
                    raise SpecError(
                        f"{source}: `{section}.{name}` is a grid setting; with `search: optuna` give the "
                        f"range `optuna.{name}` instead (e.g. [low, high], or [value] to fix it)"
                    )
        values.setdefault("optuna", OptunaSpec())
        axes.setdefault("max_grad_norm", {})  # searched: `optuna.max_grad_norm`
    if "target_epsilon" not in axes:
        raise SpecError(
            f"{source}: required field `privacy.target_epsilon` is missing; list targets such as [1, 3, 8, .inf]"
        )
    clips = axes.get("max_grad_norm", (1.0,))
    if not isinstance(clips, dict):
        clips = dict.fromkeys(values["models"], clips)
    axes["max_grad_norm"] = clips
    if values.get("pretrain") is not None and "data" in values:
        data = values["data"]
        values["pretrain"] = replace(values["pretrain"], input_mean=data.input_mean, input_std=data.input_std)
    spec = SweepSpec(**values, axes=GridAxes(**axes))
    from sweeps.validate import validate

    validate(spec)
    return spec


def _clip_norms_by_model(given: dict[Any, Any], source: str) -> dict[str, tuple[float, ...]]:
    """``privacy.max_grad_norm: {convnext_small: 4, convnext_tiny: 3.5}``: one clip list per model."""
    if not given:
        raise SpecError(f"{source}: `privacy.max_grad_norm` is an empty mapping; give {{model: C}} or a list")
    return {
        str(model): _coerce(value, tuple[float, ...], f"privacy.max_grad_norm.{model}", source)
        for model, value in given.items()
    }


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        path = f"{prefix}.{key}"
        if path in NOT_SETTABLE:
            raise SpecError(f"{source}: `{path}` cannot be set in a sweep file: {NOT_SETTABLE[path]}; remove it")
    _reject_unknown(raw, known, prefix + ".", source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}", source) for k, v in raw.items()}
    missing = [n for n, f in known.items() if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SpecError(f"{source}: required field `{prefix}.{missing[0]}` is missing")
    return cls(**kwargs)


def _reject_unknown(raw: dict[str, Any], known: dict[str, Any], prefix: str, source: str) -> None:
    for key in raw:
        path = f"{prefix}{key}"
        if path in RENAMED:
            raise SpecError(
                f"{source}: `{path}` was renamed `{RENAMED[path]}` (each field is named after the trial "
                f"setting it sets); rename it in the sweep file"
            )
        if path in AXES:
            continue
        if key not in known:
            candidates = [*known, *(axis.split(".")[1] for axis in AXES if axis.startswith(prefix) and prefix)]
            close = difflib.get_close_matches(str(key), candidates, n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known fields: {sorted(candidates)}"
            raise SpecError(f"{source}: unknown field `{path}`{hint}")


def _coerce(value: Any, kind: Any, where: str, source: str) -> Any:
    """Convert a YAML value to the field's type (`typing.get_type_hints`), or raise `SpecError` naming it."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (kind,) = [a for a in args if a is not type(None)]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if value is None:
        raise SpecError(f"{source}: `{where}` must not be empty")
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise SpecError(f"{source}: {where} = {value!r}; choose one of {args}")
        return value
    if origin is tuple:
        items = value if isinstance(value, list) else [value]
        return tuple(_coerce(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(items))
    try:
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind is str:
            if isinstance(value, dict | list):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise SpecError(f"{source}: `{where}` = {value!r} is not a valid {getattr(kind, '__name__', kind)}") from None
    raise AssertionError(f"unhandled type {kind} for {where}")
