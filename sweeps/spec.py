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
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from trainables.config import PretrainConfig, PrivacyConfig, SpeedConfig
from trainables.errors import UserError

SearchMode = Literal["grid", "optuna"]
Objective = Literal["auroc", "auroc_gap_sex", "auroc_gap_age"]  # validation split, selected epoch
OptunaSampler = Literal["tpe", "random"]
EarlyStoppingMethod = Literal["asha"]

RENAMED = {
    "privacy.epsilons": "privacy.target_epsilon", "privacy.clip_norms": "privacy.max_grad_norm",
    "training.learning_rates": "training.lr", "training.seeds": "training.seed",
    "optuna.learning_rate": "optuna.lr", "optuna.clip_norm": "optuna.max_grad_norm",
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
        """The grid points: model x dataset x init x epsilon x clip x lr x seed, in a stable order."""
        return [GridPoint(**cell, max_grad_norm=c, lr=lr, seed=s) for cell in self.cells()
                for c in self.axes.max_grad_norm[cell["model"]] for lr in self.axes.lr for s in self.axes.seed]

    def init_weights_for(self, init: str, model: str) -> str | None:
        """The weight file given for ``init`` (``{model}`` in it is replaced by the architecture)."""
        path = self.init_weights.get(init)
        return None if path is None else path.replace("{model}", model)


SECTIONS: dict[str, type] = {
    "data": DataSpec, "pretrain": PretrainConfig, "privacy": PrivacyConfig, "training": TrainingSpec,
    "evaluation": EvaluationSpec, "resources": ResourcesSpec, "speed": SpeedConfig, "tracking": TrackingSpec,
    "optuna": OptunaSpec, "early_stopping": EarlyStoppingSpec, "audit": AuditSpec,
}
OPTIONAL_SECTIONS = ("pretrain", "optuna", "early_stopping", "audit")
AXES: dict[str, tuple[str, Any]] = {
    "privacy.target_epsilon": ("target_epsilon", tuple[float, ...]),
    "privacy.max_grad_norm": ("max_grad_norm", tuple[float, ...]),
    "training.lr": ("lr", tuple[float, ...]),
    "training.seed": ("seed", tuple[int, ...]),
}
"""Grid axes given inside their sections: field path -> (`GridAxes` field, type)."""
NOT_SETTABLE = {
    **{f"privacy.{name}": "it is derived by the planner from the data and the target epsilon"
       for name in PrivacyConfig.DERIVED},
    "pretrain.input_mean": "the pretrain stage uses data.input_mean", "pretrain.input_std": "it is data.input_std",
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
                    raise SpecError(f"{source}: `{section}.{name}` is a grid setting; with `search: optuna` give the "
                                    f"range `optuna.{name}` instead (e.g. [low, high], or [value] to fix it)")
        values.setdefault("optuna", OptunaSpec())
        axes.setdefault("max_grad_norm", {})  # searched: `optuna.max_grad_norm`
    if "target_epsilon" not in axes:
        raise SpecError(f"{source}: required field `privacy.target_epsilon` is missing; list targets such as "
                        "[1, 3, 8, .inf]")
    clips = axes.get("max_grad_norm", (1.0,))
    if not isinstance(clips, dict):
        clips = dict.fromkeys(values["models"], clips)
    axes["max_grad_norm"] = clips
    if values.get("pretrain") is not None and "data" in values:
        data = values["data"]
        values["pretrain"] = replace(values["pretrain"], input_mean=data.input_mean, input_std=data.input_std)
    spec = SweepSpec(**values, axes=GridAxes(**axes))
    _validate(spec)
    return spec


def _clip_norms_by_model(given: dict[Any, Any], source: str) -> dict[str, tuple[float, ...]]:
    """``privacy.max_grad_norm: {convnext_small: 4, convnext_tiny: 3.5}``: one clip list per model."""
    if not given:
        raise SpecError(f"{source}: `privacy.max_grad_norm` is an empty mapping; give {{model: C}} or a list")
    return {str(model): _coerce(value, tuple[float, ...], f"privacy.max_grad_norm.{model}", source)
            for model, value in given.items()}


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        path = f"{prefix}.{key}"
        if path in NOT_SETTABLE:
            raise SpecError(f"{source}: `{path}` cannot be set in a sweep file: {NOT_SETTABLE[path]}; remove it")
    _reject_unknown(raw, known, prefix + ".", source)
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}", source) for k, v in raw.items()}
    missing = [n for n, f in known.items()
               if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SpecError(f"{source}: required field `{prefix}.{missing[0]}` is missing")
    return cls(**kwargs)


def _reject_unknown(raw: dict[str, Any], known: dict[str, Any], prefix: str, source: str) -> None:
    for key in raw:
        path = f"{prefix}{key}"
        if path in RENAMED:
            raise SpecError(f"{source}: `{path}` was renamed `{RENAMED[path]}` (each field is named after the trial "
                            f"setting it sets); rename it in the sweep file")
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


def _require(condition: bool, spec: SweepSpec, message: str) -> None:
    if not condition:
        raise SpecError(f"{spec.source}: {message}")


def _validate(spec: SweepSpec) -> None:
    """Field checks that need no data: ranges, names, consistency."""
    from trainables.data.registry import check_dataset_name
    from trainables.models import InitError, timm_tag_for

    p, axes = spec.privacy, spec.axes
    _require(bool(spec.name) and "/" not in spec.name, spec, f"name = {spec.name!r} must be a non-empty folder name")
    _require(len(spec.models) > 0, spec, "model is empty; name a timm architecture such as convnext_small")
    _require(len(set(spec.models)) == len(spec.models), spec, f"model lists a name twice: {list(spec.models)}")
    for i, model in enumerate(spec.models):
        _validate_model_name(spec, f"model[{i}]" if len(spec.models) > 1 else "model", model)
    grid_axes = [("privacy.target_epsilon", axes.target_epsilon), ("training.lr", axes.lr),
                 ("training.seed", axes.seed), ("inits", spec.inits),
                 *((f"privacy.max_grad_norm.{m}" if len(axes.max_grad_norm) > 1 else "privacy.max_grad_norm", clips)
                   for m, clips in axes.max_grad_norm.items())]
    for where, values in grid_axes:
        _require(spec.search == "optuna" and where.startswith("privacy.max_grad_norm") or len(values) > 0, spec,
                 f"{where} is empty, which makes a sweep of no trials; give at least one value")
        repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
        _require(not repeated, spec, f"{where} = {list(values)} lists {repeated} twice: two trials would share one "
                 "key, one MLflow run and be composed twice into the tuning cost; remove the repeat")
    _require(len(axes.target_epsilon) > 0, spec,
             "privacy.target_epsilon is empty; list targets such as [1, 3, 8, .inf]")
    for i, eps in enumerate(axes.target_epsilon):
        _require(eps > 0 and not math.isnan(eps), spec,
                 f"privacy.target_epsilon[{i}] = {eps} must be > 0 (use .inf for the non-private baseline)")
    _require(0 < p.delta < 1, spec, f"privacy.delta = {p.delta} must be in (0, 1), and below 1/N_train")
    for model, clips in axes.max_grad_norm.items():
        _require(model in spec.models, spec,
                 f"privacy.max_grad_norm.{model}: {model!r} is not one of the sweep's models {list(spec.models)}")
        where = f"privacy.max_grad_norm.{model}" if len(set(map(tuple, axes.max_grad_norm.values()))) > 1 \
            else "privacy.max_grad_norm"
        for i, clip in enumerate(clips):
            _require(clip > 0 and math.isfinite(clip), spec, f"{where}[{i}] = {clip} must be a finite number > 0")
    if spec.search == "grid":
        for model in spec.models:
            _require(model in axes.max_grad_norm, spec,
                     f"privacy.max_grad_norm has no entry for model {model!r}; add `{model}: C` to the mapping")
    _require(p.expected_batch_size >= 1, spec, f"privacy.expected_batch_size = {p.expected_batch_size} must be >= 1")
    _require(p.epochs >= 1, spec, f"privacy.epochs = {p.epochs} must be >= 1")
    sigma_c = p.label_count_noise_multiplier
    _require(sigma_c is None or spec.training.pos_weight == "train", spec,
             f"privacy.label_count_noise_multiplier = {sigma_c} is set but training.pos_weight is "
             f"{spec.training.pos_weight!r}; it is the noise of the label counts that `pos_weight: train` releases: "
             "remove it, or set training.pos_weight: train")
    _require(sigma_c is None or (sigma_c > 0 and math.isfinite(sigma_c)), spec,
             f"privacy.label_count_noise_multiplier = {sigma_c} must be a finite number > 0: exact label counts of "
             "the private training set would make every record's loss depend on the others' labels outside the "
             "accounted mechanism; leave it out for the default (20)")
    _require(not (p.secure_mode and p.reproducible_noise), spec,
             "privacy.secure_mode and privacy.reproducible_noise are both true: secure mode draws secret noise, "
             "reproducible noise replays the published seed; keep one (reproducible_noise is for debugging only)")
    _require(0 < p.calibration_tolerance < 1, spec,
             f"privacy.calibration_tolerance = {p.calibration_tolerance} must be in (0, 1)")
    for i, lr in enumerate(axes.lr):
        _require(lr > 0, spec, f"training.lr[{i}] = {lr} must be > 0")
    _require(len(axes.seed) > 0, spec, "training.seed is empty; give at least one seed, e.g. [0]")
    _require(spec.speed.max_physical_batch_size >= 1, spec, "speed.max_physical_batch_size must be >= 1")
    _require(spec.speed.threads >= 1, spec, "speed.threads must be >= 1")
    _require(spec.resources.cpu > 0, spec, f"resources.cpu = {spec.resources.cpu} must be > 0")
    _require(spec.resources.gpu >= 0, spec, f"resources.gpu = {spec.resources.gpu} must be >= 0")
    _require(spec.data.image_size >= 32, spec, f"data.image_size = {spec.data.image_size} must be >= 32")
    _require(spec.data.input_std > 0, spec, f"data.input_std = {spec.data.input_std} must be > 0")
    edges = spec.evaluation.age_edges
    _require(len(edges) >= 2 and list(edges) == sorted(set(edges)), spec,
             f"evaluation.age_edges = {list(edges)} must be strictly increasing, e.g. [0, 40, 70, 100]")
    _require(spec.evaluation.n_boot >= 0, spec, "evaluation.n_boot must be >= 0")
    _require(len(spec.inits) > 0, spec, "inits is empty; list inits such as [random, domain]")
    _require(len(spec.data.train) > 0, spec, "data.train is empty; name the dataset(s) to train on")
    _require(len(set(spec.data.train)) == len(spec.data.train), spec,
             f"data.train lists a dataset twice: {list(spec.data.train)}")
    for field_name, name in [*((f"data.train[{i}]", n) for i, n in enumerate(spec.data.train)),
                             *((f"data.external[{i}]", n) for i, n in enumerate(spec.data.external))]:
        try:
            check_dataset_name(name)
        except ValueError as error:
            raise SpecError(f"{spec.source}: {field_name}: {error}") from None
    for model in spec.models:
        for i, init in enumerate(spec.inits):
            try:
                timm_tag_for(init, model)
            except InitError as error:
                raise SpecError(f"{spec.source}: inits[{i}]: {error}") from None
    for name in spec.init_weights:
        _require(name in spec.inits or (spec.pretrain is not None and name == spec.pretrain.init), spec,
                 f"init_weights.{name} names an init that the sweep does not use; inits are {list(spec.inits)}")
    if "domain" in spec.inits:
        _require(spec.pretrain is not None, spec,
                 "init 'domain' needs a `pretrain:` section (dataset: a public source dataset) to make it")
    if spec.pretrain is not None:
        _validate_pretrain(spec, spec.pretrain)
    _validate_search(spec)
    if spec.audit is not None:
        _validate_audit(spec, spec.audit)


def _validate_audit(spec: SweepSpec, audit: AuditSpec) -> None:
    private = [e for e in spec.axes.target_epsilon if math.isfinite(e)]
    _require(len(audit.kind) >= 1 and len(set(audit.kind)) == len(audit.kind), spec,
             f"audit.kind = {list(audit.kind)}: give white_box, black_box or both, once each")
    _require(audit.m >= 10, spec, f"audit.m = {audit.m} canaries must be >= 10 (the study-scale audit uses 1000)")
    _require(0 < audit.confidence < 1, spec, f"audit.confidence = {audit.confidence} must be in (0, 1), e.g. 0.95")
    _require(audit.real_records is None or audit.real_records >= 1, spec,
             f"audit.real_records = {audit.real_records} must be >= 1 (or left out: all training records)")
    _require(spec.search == "grid", spec, "an `audit:` section needs search: grid (it audits planned grid points)")
    _require(bool(private), spec, "an `audit:` section needs a private target in privacy.target_epsilon")
    for i, eps in enumerate(audit.target_epsilon):
        _require(eps in private, spec, f"audit.target_epsilon[{i}] = {eps:g} is not one of the sweep's private "
                 f"targets {private}")


def _validate_model_name(spec: SweepSpec, where: str, model: str) -> None:
    import timm

    if not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models("convnext*") + ["test_convnext"], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else " (see timm.list_models())"
        raise SpecError(f"{spec.source}: {where} = {model!r} is not a timm architecture{hint}")


def _validate_pretrain(spec: SweepSpec, pretrain: PretrainConfig) -> None:
    from trainables.data.registry import check_dataset_name
    from trainables.models import timm_tag_for

    try:
        check_dataset_name(pretrain.dataset)
        for model in spec.models:
            timm_tag_for(pretrain.init, model)
    except ValueError as error:
        raise SpecError(f"{spec.source}: pretrain: {error}") from None
    _require(pretrain.init != "domain", spec, "pretrain.init cannot be 'domain' (it is what pretrain makes)")
    _require(pretrain.epochs >= 1, spec, f"pretrain.epochs = {pretrain.epochs} must be >= 1")
    _require(pretrain.lr > 0, spec, f"pretrain.lr = {pretrain.lr} must be > 0, e.g. 0.001")
    _require(pretrain.batch_size >= 1, spec, f"pretrain.batch_size = {pretrain.batch_size} must be >= 1, e.g. 64")
    _require(pretrain.weight_decay >= 0, spec, f"pretrain.weight_decay = {pretrain.weight_decay} must be >= 0")
    _require(pretrain.dataset not in spec.data.train, spec,
             f"pretrain.dataset = {pretrain.dataset!r} is a private training set (data.train); pretraining "
             "must use a public dataset, or the domain init leaks the private data outside DP")


def _validate_search(spec: SweepSpec) -> None:
    o, stop = spec.optuna, spec.early_stopping
    if spec.search == "grid":
        _require(o is None, spec, "an `optuna:` section is given but search = 'grid'; set `search: optuna`, "
                 "or remove the section")
    else:
        assert o is not None
        _require(o.trials_per_target >= 1, spec, f"optuna.trials_per_target = {o.trials_per_target} must be >= 1")
        _require(o.max_concurrent >= 1, spec, f"optuna.max_concurrent = {o.max_concurrent} must be >= 1")
        _require(o.max_proposals >= 1, spec, f"optuna.max_proposals = {o.max_proposals} must be >= 1")
        _require(len(o.objectives) >= 1 and len(set(o.objectives)) == len(o.objectives), spec,
                 f"optuna.objectives = {list(o.objectives)}: give one or more distinct objectives from "
                 f"{typing.get_args(Objective)}")
        _require(len(spec.axes.seed) == 1, spec,
                 f"training.seed = {list(spec.axes.seed)}: search: optuna uses one seed per study; give one")
        for name in OptunaSpec.RANGES:
            bounds = getattr(o, name)
            _require(len(bounds) in (1, 2) and all(b > 0 and math.isfinite(b) for b in bounds)
                     and list(bounds) == sorted(bounds), spec,
                     f"optuna.{name} = {list(bounds)}: give [low, high] with 0 < low <= high, or [value]")
    if stop is not None:
        _require(stop.grace_period >= 1, spec, f"early_stopping.grace_period = {stop.grace_period} must be >= 1 epoch")
        _require(stop.reduction_factor >= 2, spec,
                 f"early_stopping.reduction_factor = {stop.reduction_factor} must be >= 2")
