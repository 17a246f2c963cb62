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
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from trainables.privacy.accounting import ACCOUNTANTS
from trainables.privacy.engine import GRAD_SAMPLE_MODES

SEARCH_MODES = ("grid",)
PRIVACY_UNITS = ("image",)
POS_WEIGHTS = ("uniform", "train")
MODEL_SELECTIONS = ("best_val", "last")


class SpecError(ValueError):
    """A sweep file is invalid; the message names the field, the value and the fix."""


@dataclass(frozen=True)
class DataSpec:
    train: str
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
    grad_sample_mode: str = "hooks"
    device: str = "auto"
    max_physical_batch_size: int = 64
    threads: int = 1
    eval_batch_size: int = 256


@dataclass(frozen=True)
class TrackingSpec:
    uri: str | None = None  # default: sqlite:///<runs>/mlflow.db
    experiment: str | None = None  # default: the sweep's name


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep. ``source`` is the file it came from (for messages and relative paths)."""

    name: str
    data: DataSpec
    model: str
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
    runs: str = "runs"
    description: str = ""
    source: str = ""

    def grid(self) -> list[dict[str, Any]]:
        """The grid points: init x epsilon x clip x lr x seed, in a stable order."""
        axes = itertools.product(self.inits, self.privacy.epsilons, self.privacy.clip_norms,
                                 self.training.learning_rates, self.training.seeds)
        return [dict(init=i, target_epsilon=e, max_grad_norm=c, lr=lr, seed=s) for i, e, c, lr, s in axes]


SECTIONS: dict[str, type] = {
    "data": DataSpec, "pretrain": PretrainSpec, "privacy": PrivacySpec, "training": TrainingSpec,
    "evaluation": EvaluationSpec, "resources": ResourcesSpec, "speed": SpeedSpec, "tracking": TrackingSpec,
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
    top = {f.name: f for f in fields(SweepSpec) if f.name != "source"}
    _reject_unknown(raw, top, "", source)
    values: dict[str, Any] = {"source": source}
    for key, value in raw.items():
        if key in SECTIONS:
            if value is None and key == "pretrain":
                values[key] = None
                continue
            if not isinstance(value, dict):
                raise SpecError(f"{source}: `{key}` must be a mapping of settings, got {value!r}")
            values[key] = _build(SECTIONS[key], value, key, source)
        else:
            values[key] = _coerce(value, top[key].type, key, source)
    for required in ("name", "data", "model", "inits", "privacy"):
        if required not in values:
            raise SpecError(f"{source}: required field `{required}` is missing")
    spec = SweepSpec(**values)
    _validate(spec)
    return spec


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
        if kind.startswith("dict["):
            if not isinstance(value, dict):
                raise TypeError
            return {str(k): str(v) for k, v in value.items()}
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
    _require(len(p.epsilons) > 0, spec, "privacy.epsilons is empty; list targets such as [1, 3, 8, .inf]")
    for i, eps in enumerate(p.epsilons):
        _require(eps > 0 and not math.isnan(eps), spec,
                 f"privacy.epsilons[{i}] = {eps} must be > 0 (use .inf for the non-private baseline)")
    _require(0 < p.delta < 1, spec, f"privacy.delta = {p.delta} must be in (0, 1), and below 1/N_train")
    for i, clip in enumerate(p.clip_norms):
        _require(clip > 0 and math.isfinite(clip), spec,
                 f"privacy.clip_norms[{i}] = {clip} must be a finite number > 0")
    _require(p.expected_batch_size >= 1, spec, f"privacy.expected_batch_size = {p.expected_batch_size} must be >= 1")
    _require(p.epochs >= 1, spec, f"privacy.epochs = {p.epochs} must be >= 1")
    _require(p.accountant in ACCOUNTANTS, spec, f"privacy.accountant = {p.accountant!r}; choose one of {ACCOUNTANTS}")
    _require(p.privacy_unit in PRIVACY_UNITS, spec,
             f"privacy.privacy_unit = {p.privacy_unit!r}; supported: {PRIVACY_UNITS} (patient-level is planned)")
    _require(not p.secure_mode, spec,
             "privacy.secure_mode = true needs torchcsprng, which is not supported yet; set it to false")
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
    for field_name, name in [("data.train", spec.data.train),
                             *((f"data.external[{i}]", n) for i, n in enumerate(spec.data.external))]:
        try:
            check_dataset_name(name)
        except ValueError as error:
            raise SpecError(f"{spec.source}: {field_name}: {error}") from None
    for i, init in enumerate(spec.inits):
        try:
            timm_tag_for(init, spec.model)
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
            timm_tag_for(spec.pretrain.init, spec.model)
        except ValueError as error:
            raise SpecError(f"{spec.source}: pretrain: {error}") from None
        _require(spec.pretrain.init != "domain", spec, "pretrain.init cannot be 'domain' (it is what pretrain makes)")
        _require(spec.pretrain.dataset != spec.data.train, spec,
                 f"pretrain.dataset = {spec.pretrain.dataset!r} is the private training set; pretraining must use "
                 "a public dataset, or the domain init leaks the private data outside DP")
