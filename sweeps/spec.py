"""SweepSpec: the sweep file's schema, validated at the edge, and its expansion into trial grid points.

A sweep file is YAML with the sections below (every key optional unless marked required; see
``docs/sweep-spec.md`` for the reference). Any problem raises `SpecError` naming the field path, the value
and the fix, before Ray or any trial starts. Checks that need the data (delta < 1/N) or the weights
(missing checkpoint files) run in `sweeps.launch.plan_sweep`, still before any trial.
"""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from trainables.privacy.accounting import ACCOUNTANTS
from trainables.privacy.engine import GRAD_SAMPLE_MODES

SEARCH_MODES = ("grid", "optuna")
OBJECTIVES = ("auroc", "auroc_gap_sex", "auroc_gap_age")  # optuna objectives (validation split, selected epoch)
OPTUNA_SAMPLERS = ("tpe", "random")
EARLY_STOPPING = ("asha",)
PRIVACY_UNITS = ("image",)
POS_WEIGHTS = ("uniform", "train")
MODEL_SELECTIONS = ("best_val", "last")


class SpecError(ValueError):
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
class PretrainSpec:
    dataset: str
    init: str = "random"
    epochs: int = 4
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class PrivacySpec:
    epsilons: tuple[float, ...]
    delta: float = 6e-6
    accountant: str = "rdp"
    clip_norms: tuple[float, ...] = (1.0,)
    clip_norms_by_model: dict[str, tuple[float, ...]] = field(default_factory=dict)  # `clip_norms` as a mapping
    expected_batch_size: int = 32
    epochs: int = 3
    privacy_unit: str = "image"
    secure_mode: bool = False
    calibration_tolerance: float = 0.01


@dataclass(frozen=True)
class TrainingSpec:
    learning_rates: tuple[float, ...] = (1e-3,)
    weight_decay: float = 0.01
    seeds: tuple[int, ...] = (0,)
    pos_weight: str = "uniform"
    model_selection: str = "best_val"


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
class SpeedSpec:
    grad_sample_mode: str = "bk"
    device: str = "auto"
    max_physical_batch_size: int = 64
    threads: int = 1
    eval_batch_size: int = 256


@dataclass(frozen=True)
class OptunaSpec:
    """`search: optuna`: per (model, dataset, init, target epsilon) cell, an Optuna study over these ranges.

    Each range is ``[low, high]`` (searched; log scale for all but epochs) or ``[value]`` (fixed)."""

    trials_per_target: int = 8
    max_concurrent: int = 2
    objectives: tuple[str, ...] = ("auroc",)
    noise_multiplier: tuple[float, ...] = (0.3, 5.0)
    expected_batch_size: tuple[int, ...] = (16, 256)
    epochs: tuple[int, ...] = (1, 5)
    learning_rate: tuple[float, ...] = (1e-4, 1e-2)
    clip_norm: tuple[float, ...] = (0.5, 5.0)
    sampler: str = "tpe"
    seed: int = 0
    max_proposals: int = 200  # infeasible proposals tolerated per launched trial before giving up


@dataclass(frozen=True)
class EarlyStoppingSpec:
    """ASHA on the per-epoch validation macro AUROC (off unless this section is given)."""

    method: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None  # default: sqlite:///<runs>/mlflow.db
    experiment: str | None = None  # default: the sweep's name


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep. ``source`` is the file it came from (for messages and relative paths)."""

    name: str
    data: DataSpec
    models: tuple[str, ...]  # YAML `model:` (one name or a list) or `models:`
    inits: tuple[str, ...]
    privacy: PrivacySpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    speed: SpeedSpec = field(default_factory=SpeedSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    pretrain: PretrainSpec | None = None
    init_weights: dict[str, str] = field(default_factory=dict)
    search: str = "grid"
    optuna: OptunaSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None
    runs: str = "runs"
    description: str = ""
    source: str = ""

    def clip_norms_for(self, model: str) -> tuple[float, ...]:
        return self.privacy.clip_norms_by_model.get(model, self.privacy.clip_norms)

    def cells(self) -> list[dict[str, Any]]:
        """model x dataset x init x target epsilon: the grid's outer axes, and Optuna mode's studies."""
        axes = itertools.product(self.models, self.data.train, self.inits, self.privacy.epsilons)
        return [dict(model=m, dataset=d, init=i, target_epsilon=e) for m, d, i, e in axes]

    def grid(self) -> list[dict[str, Any]]:
        """The grid points: model x dataset x init x epsilon x clip x lr x seed, in a stable order."""
        return [dict(cell, max_grad_norm=c, lr=lr, seed=s) for cell in self.cells()
                for c in self.clip_norms_for(cell["model"])
                for lr in self.training.learning_rates for s in self.training.seeds]

    def init_weights_for(self, init: str, model: str) -> str | None:
        """The weight file given for ``init`` (``{model}`` in it is replaced by the architecture)."""
        path = self.init_weights.get(init)
        return None if path is None else path.replace("{model}", model)


SECTIONS: dict[str, type] = {
    "data": DataSpec, "pretrain": PretrainSpec, "privacy": PrivacySpec, "training": TrainingSpec,
    "evaluation": EvaluationSpec, "resources": ResourcesSpec, "speed": SpeedSpec, "tracking": TrackingSpec,
    "optuna": OptunaSpec, "early_stopping": EarlyStoppingSpec,
}
OPTIONAL_SECTIONS = ("pretrain", "optuna", "early_stopping")
GRID_AXES_REPLACED_BY_OPTUNA = {
    "privacy.clip_norms": "optuna.clip_norm", "training.learning_rates": "optuna.learning_rate",
    "privacy.expected_batch_size": "optuna.expected_batch_size", "privacy.epochs": "optuna.epochs",
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
    top = {f.name: f for f in fields(SweepSpec) if f.name != "source"}
    _reject_unknown(raw, top, "", source)
    values: dict[str, Any] = {"source": source}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None and key in OPTIONAL_SECTIONS:
                values[key] = None
                continue
            if not isinstance(value, dict):
                raise SpecError(f"{source}: `{key}` must be a mapping of settings, got {value!r}")
            by_model = None
            if key == "privacy" and isinstance(value.get("clip_norms"), dict):
                value, by_model = _split_clip_norms_by_model(value, source)
            if key == "privacy" and "clip_norms_by_model" in value:
                raise SpecError(f"{source}: unknown field `privacy.clip_norms_by_model`; give `privacy.clip_norms` "
                                "as a mapping {model: clip} instead")
            values[key] = _build(SECTIONS[key], value, key, source)
            if by_model is not None:
                values[key] = replace(values[key], clip_norms_by_model=by_model)
        else:
            values[key] = _coerce(value, top[key].type, key, source)
    if raw.get("search") == "optuna":
        for axis, replacement in GRID_AXES_REPLACED_BY_OPTUNA.items():
            section, name = axis.split(".")
            if name in (raw.get(section) or {}):
                raise SpecError(f"{source}: `{axis}` is a grid setting; with `search: optuna` give the range "
                                f"`{replacement}` instead (e.g. [low, high], or [value] to fix it)")
        values.setdefault("optuna", OptunaSpec())
    for required in ("name", "data", "models", "inits", "privacy"):
        if required not in values:
            shown = "model" if required == "models" else required
            raise SpecError(f"{source}: required field `{shown}` is missing")
    spec = SweepSpec(**values)
    _validate(spec)
    return spec


def _split_clip_norms_by_model(privacy: dict[str, Any], source: str) -> tuple[dict[str, Any], dict]:
    """``privacy.clip_norms: {convnext_small: 4, convnext_tiny: 3.5}``: one clip list per model."""
    privacy = dict(privacy)
    by_model = {str(model): _coerce(value, "tuple[float, ...]", f"privacy.clip_norms.{model}", source)
                for model, value in privacy.pop("clip_norms").items()}
    if not by_model:
        raise SpecError(f"{source}: `privacy.clip_norms` is an empty mapping; give {{model: clip}} or a list")
    privacy["clip_norms"] = [c for clips in by_model.values() for c in clips]  # range-checked like a list
    return privacy, by_model


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str):
    known = {f.name: f for f in fields(cls)}
    _reject_unknown(raw, known, prefix + ".", source)
    kwargs = {k: _coerce(v, known[k].type, f"{prefix}.{k}", source) for k, v in raw.items()}
    missing = [n for n, f in known.items()
               if n not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise SpecError(f"{source}: required field `{prefix}.{missing[0]}` is missing")
    return cls(**kwargs)


def _reject_unknown(raw: dict[str, Any], known: dict[str, Any], prefix: str, source: str) -> None:
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"; did you mean `{prefix}{close[0]}`?" if close else f"; known fields: {sorted(known)}"
            raise SpecError(f"{source}: unknown field `{prefix}{key}`{hint}")


def _coerce(value: Any, annotation: str, where: str, source: str) -> Any:
    """Convert a YAML value to the field's annotated type (annotations are strings: postponed evaluation)."""
    kind = annotation.replace(" ", "")
    optional = kind.endswith("|None")
    kind = kind.removesuffix("|None")
    if value is None:
        if optional:
            return None
        raise SpecError(f"{source}: `{where}` must not be empty")
    try:
        if kind.startswith("tuple["):
            inner = kind[len("tuple[") : -len(",...]")]
            items = value if isinstance(value, list) else [value]
            return tuple(_coerce(v, inner, f"{where}[{i}]", source) for i, v in enumerate(items))
        if kind == "dict[str,str]":
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
        if kind.startswith("dict["):  # filled by a dedicated parser (e.g. privacy.clip_norms as a mapping)
            raise TypeError
        if kind == "float":
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise TypeError
            return value
        if kind == "str":
            if isinstance(value, dict | list):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        raise SpecError(f"{source}: `{where}` = {value!r} is not a valid {kind}") from None
    raise AssertionError(f"unhandled annotation {annotation} for {where}")


def _require(condition: bool, spec: SweepSpec, message: str) -> None:
    if not condition:
        raise SpecError(f"{spec.source}: {message}")


def _validate(spec: SweepSpec) -> None:
    """Field checks that need no data: ranges, names, consistency."""
    from trainables.data.registry import check_dataset_name
    from trainables.models import InitError, timm_tag_for

    p, t = spec.privacy, spec.training
    _require(spec.search in SEARCH_MODES, spec, f"search = {spec.search!r}; choose one of {SEARCH_MODES}")
    _require(bool(spec.name) and "/" not in spec.name, spec, f"name = {spec.name!r} must be a non-empty folder name")
    _require(len(spec.models) > 0, spec, "model is empty; name a timm architecture such as convnext_small")
    _require(len(set(spec.models)) == len(spec.models), spec, f"model lists a name twice: {list(spec.models)}")
    _require(len(p.epsilons) > 0, spec, "privacy.epsilons is empty; list targets such as [1, 3, 8, .inf]")
    for i, eps in enumerate(p.epsilons):
        _require(eps > 0 and not math.isnan(eps), spec,
                 f"privacy.epsilons[{i}] = {eps} must be > 0 (use .inf for the non-private baseline)")
    _require(0 < p.delta < 1, spec, f"privacy.delta = {p.delta} must be in (0, 1), and below 1/N_train")
    for i, clip in enumerate(p.clip_norms):
        _require(clip > 0 and math.isfinite(clip), spec,
                 f"privacy.clip_norms[{i}] = {clip} must be a finite number > 0")
    for model in p.clip_norms_by_model:
        _require(model in spec.models, spec,
                 f"privacy.clip_norms.{model}: {model!r} is not one of the sweep's models {list(spec.models)}")
    if p.clip_norms_by_model:
        for model in spec.models:
            _require(model in p.clip_norms_by_model, spec,
                     f"privacy.clip_norms has no entry for model {model!r}; add `{model}: C` to the mapping")
    _require(p.expected_batch_size >= 1, spec, f"privacy.expected_batch_size = {p.expected_batch_size} must be >= 1")
    _require(p.epochs >= 1, spec, f"privacy.epochs = {p.epochs} must be >= 1")
    _require(p.accountant in ACCOUNTANTS, spec, f"privacy.accountant = {p.accountant!r}; choose one of {ACCOUNTANTS}")
    _require(p.privacy_unit in PRIVACY_UNITS, spec,
             f"privacy.privacy_unit = {p.privacy_unit!r}; supported: {PRIVACY_UNITS} (patient-level is planned)")
    _require(0 < p.calibration_tolerance < 1, spec,
             f"privacy.calibration_tolerance = {p.calibration_tolerance} must be in (0, 1)")
    for i, lr in enumerate(t.learning_rates):
        _require(lr > 0, spec, f"training.learning_rates[{i}] = {lr} must be > 0")
    _require(len(t.seeds) > 0, spec, "training.seeds is empty; give at least one seed, e.g. [0]")
    _require(t.pos_weight in POS_WEIGHTS, spec, f"training.pos_weight = {t.pos_weight!r}; choose one of {POS_WEIGHTS}")
    _require(t.model_selection in MODEL_SELECTIONS, spec,
             f"training.model_selection = {t.model_selection!r}; choose one of {MODEL_SELECTIONS}")
    _require(spec.speed.grad_sample_mode in GRAD_SAMPLE_MODES, spec,
             f"speed.grad_sample_mode = {spec.speed.grad_sample_mode!r}; choose one of {GRAD_SAMPLE_MODES} "
             "(stock Opacus hooks/ghost are wrong on ConvNeXt)")
    _require(spec.speed.max_physical_batch_size >= 1, spec, "speed.max_physical_batch_size must be >= 1")
    _require(spec.speed.device in ("auto", "cpu", "cuda"), spec,
             f"speed.device = {spec.speed.device!r}; choose auto, cpu or cuda")
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
        try:
            check_dataset_name(spec.pretrain.dataset)
            for model in spec.models:
                timm_tag_for(spec.pretrain.init, model)
        except ValueError as error:
            raise SpecError(f"{spec.source}: pretrain: {error}") from None
        _require(spec.pretrain.init != "domain", spec, "pretrain.init cannot be 'domain' (it is what pretrain makes)")
        _require(spec.pretrain.dataset not in spec.data.train, spec,
                 f"pretrain.dataset = {spec.pretrain.dataset!r} is a private training set (data.train); pretraining "
                 "must use a public dataset, or the domain init leaks the private data outside DP")
    _validate_search(spec)


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
        _require(o.sampler in OPTUNA_SAMPLERS, spec, f"optuna.sampler = {o.sampler!r}; choose one of {OPTUNA_SAMPLERS}")
        _require(len(o.objectives) >= 1 and len(set(o.objectives)) == len(o.objectives), spec,
                 f"optuna.objectives = {list(o.objectives)}: give one or more distinct objectives from {OBJECTIVES}")
        for i, objective in enumerate(o.objectives):
            _require(objective in OBJECTIVES, spec,
                     f"optuna.objectives[{i}] = {objective!r}; choose from {OBJECTIVES} (all on the validation split)")
        _require(len(spec.training.seeds) == 1, spec,
                 f"training.seeds = {list(spec.training.seeds)}: search: optuna uses one seed per study; give one")
        for name in ("noise_multiplier", "expected_batch_size", "epochs", "learning_rate", "clip_norm"):
            bounds = getattr(o, name)
            _require(len(bounds) in (1, 2) and all(b > 0 and math.isfinite(b) for b in bounds)
                     and list(bounds) == sorted(bounds), spec,
                     f"optuna.{name} = {list(bounds)}: give [low, high] with 0 < low <= high, or [value]")
    if stop is not None:
        _require(stop.method in EARLY_STOPPING, spec,
                 f"early_stopping.method = {stop.method!r}; choose one of {EARLY_STOPPING}")
        _require(stop.grace_period >= 1, spec, f"early_stopping.grace_period = {stop.grace_period} must be >= 1 epoch")
        _require(stop.reduction_factor >= 2, spec,
                 f"early_stopping.reduction_factor = {stop.reduction_factor} must be >= 2")
