"""Checks of a parsed sweep file that need no data (`validate`, called by `sweeps.spec.parse_spec`).

Two layers. The sweep's own rules live here: grid axes (empty, repeated), names and registries (models, datasets,
inits), resources, the pretrain dataset, Optuna, the audit, and the privacy units' sweep-wide rules. A single
trial's rules (ranges, and pairs such as the patient unit with ``pos_weight: train``) live in the config classes
(`trainables.config`), checked on construction wherever a config is built; here they run on the config of every
grid point, or in Optuna mode on each range's ends, so every trial's checks pass before Ray starts. `spec_error`
turns a config's `ConfigError` into a `SpecError` naming the sweep file's field (``training.lr[1]``). Each failure
names the field, the value and the fix.

Imports the sweep's types (`sweeps.schema`), never its parser (`sweeps.spec`).
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import fields
from typing import Any

from sweeps.schema import AuditSpec, GridPoint, Objective, OptunaSpec, SpecError, SweepSpec
from trainables.config import (
    ConfigError,
    DataSettings,
    EvaluationSettings,
    PretrainConfig,
    TrainingSettings,
    is_private,
    shown,
)


def _require(condition: bool, spec: SweepSpec, message: str) -> None:
    if not condition:
        raise SpecError(f"{spec.source}: {message}")


def validate(spec: SweepSpec) -> None:
    """The sweep's rules, then every trial's config checks (`_validate_trials`)."""
    from trainables.data.registry import check_dataset_name
    from trainables.models import InitError, timm_tag_for

    axes = spec.axes
    _require(bool(spec.name) and "/" not in spec.name, spec, f"name = {spec.name!r} must be a non-empty folder name")
    _require(len(spec.models) > 0, spec, "model is empty; name a timm architecture such as convnext_small")
    _require(len(set(spec.models)) == len(spec.models), spec, f"model lists a name twice: {list(spec.models)}")
    for i, model in enumerate(spec.models):
        _validate_model_name(spec, f"model[{i}]" if len(spec.models) > 1 else "model", model)
    grid_axes = [
        ("privacy.target_epsilon", axes.target_epsilon),
        ("training.lr", axes.lr),
        ("training.seed", axes.seed),
        ("inits", spec.inits),
        ("privacy.privacy_unit", axes.privacy_unit),
        *(
            (f"privacy.max_grad_norm.{m}" if len(axes.max_grad_norm) > 1 else "privacy.max_grad_norm", clips)
            for m, clips in axes.max_grad_norm.items()
        ),
    ]
    for where, values in grid_axes:
        _require(
            spec.search == "optuna" and where.startswith("privacy.max_grad_norm") or len(values) > 0,
            spec,
            f"{where} is empty, which makes a sweep of no trials; give at least one value",
        )
        repeated = sorted({v for v in values if list(values).count(v) > 1}, key=str)
        _require(
            not repeated,
            spec,
            f"{where} = {list(values)} lists {repeated} twice: two trials would share one "
            "key, one MLflow run and be composed twice into the tuning cost; remove the repeat",
        )
    _require(
        len(axes.target_epsilon) > 0, spec, "privacy.target_epsilon is empty; list targets such as [1, 3, 8, .inf]"
    )
    for model in axes.max_grad_norm:
        _require(
            model in spec.models,
            spec,
            f"privacy.max_grad_norm.{model}: {model!r} is not one of the sweep's models {list(spec.models)}",
        )
    if spec.search == "grid":
        for model in spec.models:
            _require(
                model in axes.max_grad_norm,
                spec,
                f"privacy.max_grad_norm has no entry for model {model!r}; add `{model}: C` to the mapping",
            )
    _require(len(axes.seed) > 0, spec, "training.seed is empty; give at least one seed, e.g. [0]")
    _require(spec.resources.cpu > 0, spec, f"resources.cpu = {spec.resources.cpu} must be > 0")
    _validate_gpu_share(spec, spec.resources.gpu)
    _require(len(spec.inits) > 0, spec, "inits is empty; list inits such as [random, domain]")
    _require(len(spec.data.train) > 0, spec, "data.train is empty; name the dataset(s) to train on")
    _require(
        len(set(spec.data.train)) == len(spec.data.train),
        spec,
        f"data.train lists a dataset twice: {list(spec.data.train)}",
    )
    for field_name, name in [
        *((f"data.train[{i}]", n) for i, n in enumerate(spec.data.train)),
        *((f"data.external[{i}]", n) for i, n in enumerate(spec.data.external)),
    ]:
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
        _require(
            name in spec.inits or (spec.pretrain is not None and name == spec.pretrain.init),
            spec,
            f"init_weights.{name} names an init that the sweep does not use; inits are {list(spec.inits)}",
        )
    if "domain" in spec.inits:
        _require(
            spec.pretrain is not None,
            spec,
            "init 'domain' needs a `pretrain:` section (dataset: a public source dataset) to make it",
        )
    if spec.pretrain is not None:
        _validate_pretrain(spec, spec.pretrain)
    _validate_search(spec)
    _validate_units(spec)
    if spec.audit is not None:
        _validate_audit(spec, spec.audit)
    _validate_trials(spec)


SWEEP_FILE_PATHS: dict[str, str] = {
    **{f.name: f"data.{f.name}" for f in fields(DataSettings)},
    **{f.name: f"training.{f.name}" for f in fields(TrainingSettings)},
    **{f.name: f"evaluation.{f.name}" for f in fields(EvaluationSettings)},
    "lr": "training.lr",
    "seed": "training.seed",
    "dataset": "data.train",
    "external_datasets": "data.external",
    "data_root": "data.root",
    "sweep": "name",
    "init": "inits",
}
"""The sweep file's path of a top-level `TrialConfig` field (``privacy.*``, ``speed.*``, ``pretrain.*``, ``model`` and
``init_weights`` are spelled alike in both)."""

OPTUNA_PATHS = {
    "lr": "optuna.lr",
    "privacy.max_grad_norm": "optuna.max_grad_norm",
    "privacy.noise_multiplier": "optuna.noise_multiplier",
    "privacy.expected_batch_size": "optuna.expected_batch_size",
    "privacy.epochs": "optuna.epochs",
}
"""The trial fields an Optuna proposal sets: their ranges' paths."""


def spec_error(error: ConfigError, source: str, path: str | None = None) -> SpecError:
    """A config's `ConfigError` as the sweep file's `SpecError`: the same value and fix, at the sweep file's path
    (``path``, by default the field's in `SWEEP_FILE_PATHS`)."""
    where = path or SWEEP_FILE_PATHS.get(error.field, error.field)
    return SpecError(f"{source}: {where} = {shown(error.value)}{error.problem}")


def _validate_trials(spec: SweepSpec) -> None:
    """Every trial's config checks (`trainables.config`), before Ray starts: a grid builds the config of each grid
    point; Optuna mode builds each cell's at the low and at the high end of every range. The planner's derived
    fields (sigma, q, steps, the label-count release's default) need the data: `sweeps.plan` fills them."""
    data_root = spec.data.root
    if spec.search == "grid":
        for point in spec.grid():
            init_weights = spec.init_weights_for(point.init, point.model)
            try:
                spec.trial_config(point, data_root=data_root, init_weights=init_weights)
            except ConfigError as error:
                raise spec_error(error, spec.source, _axis_path(spec, point, error.field)) from None
        return
    o = spec.optuna
    assert o is not None
    for cell in spec.cells():
        private = is_private(cell.target_epsilon)
        for end in (0, -1):
            point = GridPoint(
                cell,
                max_grad_norm=o.max_grad_norm[end] if private else 0.0,
                lr=o.lr[end],
                seed=spec.axes.seed[0],
                privacy_unit=spec.axes.privacy_unit[0],
            )
            try:
                spec.trial_config(
                    point,
                    data_root=data_root,
                    init_weights=spec.init_weights_for(point.init, point.model),
                    expected_batch_size=o.expected_batch_size[end],
                    epochs=o.epochs[end],
                    noise_multiplier=o.noise_multiplier[end] if private else 0.0,
                )
            except ConfigError as error:
                path = OPTUNA_PATHS.get(error.field) or _axis_path(spec, point, error.field)
                raise spec_error(error, spec.source, path) from None


def _axis_path(spec: SweepSpec, point: GridPoint, field: str) -> str | None:
    """``axis[i]``: the sweep file's path of the grid-axis value ``point`` has for the trial field ``field`` (None:
    not a grid axis)."""
    axes = spec.axes
    clips = f"privacy.max_grad_norm.{point.model}" if len(set(axes.max_grad_norm.values())) > 1 else None
    values: dict[str, tuple[str, tuple[Any, ...], Any]] = {
        "privacy.target_epsilon": ("privacy.target_epsilon", axes.target_epsilon, point.target_epsilon),
        "privacy.max_grad_norm": (
            clips or "privacy.max_grad_norm",
            axes.max_grad_norm.get(point.model, ()),
            point.max_grad_norm,
        ),
        "privacy.privacy_unit": ("privacy.privacy_unit", axes.privacy_unit, point.privacy_unit),
        "lr": ("training.lr", axes.lr, point.lr),
        "seed": ("training.seed", axes.seed, point.seed),
        "dataset": ("data.train", spec.data.train, point.dataset),
        "model": ("model", spec.models, point.model),
        "init": ("inits", spec.inits, point.init),
    }
    if field not in values or values[field][2] not in values[field][1]:
        return None
    path, axis, value = values[field]
    return f"{path}[{axis.index(value)}]"


GPU_SHARE_STEP = 1e-4
"""Ray counts resource shares in steps of 0.0001 (`ray_constants.MIN_RESOURCE_GRANULARITY`)."""


def _validate_gpu_share(spec: SweepSpec, gpu: float) -> None:
    """``resources.gpu``: GPUs per trial. 0 (CPU trials), a share of one GPU in (0, 1] (0.25: four trials on each
    GPU, Ray packs ``floor(1 / gpu)`` of them), or a whole number of GPUs; Ray rejects fractions above 1."""
    fix = (
        "give 0 for CPU trials, a share of one GPU such as 0.5 or 0.25 (two or four trials per GPU; "
        "`dpsweep sweep --dry-run` says how many fit in memory), or a whole number such as 1 or 2"
    )
    _require(math.isfinite(gpu) and gpu >= 0, spec, f"resources.gpu = {gpu!r} must be a finite number >= 0; {fix}")
    _require(
        gpu <= 1 or gpu.is_integer(),
        spec,
        f"resources.gpu = {gpu!r}: more than one GPU per trial must be a whole number (Ray cannot split a "
        f"trial over {gpu!r} GPUs); {fix}",
    )
    shares = gpu / GPU_SHARE_STEP
    _require(
        abs(shares - round(shares)) < 1e-6,
        spec,
        f"resources.gpu = {gpu!r} has more than 4 decimals, which Ray rounds; give "
        f"{math.floor(shares + 1e-6) * GPU_SHARE_STEP:.4f} (rounded down, so that as many trials fit on a GPU)",
    )


NO_PATIENT_IDS: dict[str, str] = {"vindr-cxr": "VinDr-CXR publishes no patient ids (each image is its own patient)"}
"""Datasets whose patient ids are not real: a patient-level guarantee on them would be an image-level one."""


def _validate_units(spec: SweepSpec) -> None:
    """``privacy.privacy_unit`` (a grid axis) and ``privacy.max_images_per_patient``: the sweep-wide rules. A
    patient-level trial's own (the cap given and within the physical batch; no ``pos_weight: train``) are its
    config's."""
    cap, units = spec.privacy.max_images_per_patient, spec.axes.privacy_unit
    if "patient" not in units:
        _require(
            cap is None,
            spec,
            f"privacy.max_images_per_patient = {cap} is set but privacy.privacy_unit is "
            f"{list(units)}; it caps a patient-level trial's images: remove it, or add `patient` to the unit",
        )
        return
    for name in spec.data.train:
        _require(
            name not in NO_PATIENT_IDS,
            spec,
            f"privacy.privacy_unit: patient on data.train {name!r}: {NO_PATIENT_IDS.get(name)}, so a "
            "patient-level guarantee cannot be given there; train it with privacy_unit: image",
        )
    _require(
        spec.search == "grid",
        spec,
        "privacy.privacy_unit: patient needs search: grid (Optuna's feasibility checks count images); use a grid",
    )
    _require(
        spec.audit is None,
        spec,
        "an `audit:` section audits image-level records; remove it from a sweep with privacy.privacy_unit: patient",
    )


def _validate_audit(spec: SweepSpec, audit: AuditSpec) -> None:
    private = [e for e in spec.axes.target_epsilon if is_private(e)]
    _require(
        len(audit.kind) >= 1 and len(set(audit.kind)) == len(audit.kind),
        spec,
        f"audit.kind = {list(audit.kind)}: give white_box, black_box or both, once each",
    )
    _require(audit.m >= 10, spec, f"audit.m = {audit.m} canaries must be >= 10 (the study-scale audit uses 1000)")
    _require(0 < audit.confidence < 1, spec, f"audit.confidence = {audit.confidence} must be in (0, 1), e.g. 0.95")
    _require(
        audit.real_records is None or audit.real_records >= 1,
        spec,
        f"audit.real_records = {audit.real_records} must be >= 1 (or left out: all training records)",
    )
    _require(spec.search == "grid", spec, "an `audit:` section needs search: grid (it audits planned grid points)")
    _require(bool(private), spec, "an `audit:` section needs a private target in privacy.target_epsilon")
    for i, eps in enumerate(audit.target_epsilon):
        _require(
            eps in private,
            spec,
            f"audit.target_epsilon[{i}] = {eps:g} is not one of the sweep's private targets {private}",
        )


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
    _require(
        pretrain.dataset not in spec.data.train,
        spec,
        f"pretrain.dataset = {pretrain.dataset!r} is a private training set (data.train); pretraining "
        "must use a public dataset, or the domain init leaks the private data outside DP",
    )


def _validate_search(spec: SweepSpec) -> None:
    o, stop = spec.optuna, spec.early_stopping
    if spec.search == "grid":
        _require(
            o is None,
            spec,
            "an `optuna:` section is given but search = 'grid'; set `search: optuna`, or remove the section",
        )
    else:
        assert o is not None
        _require(o.trials_per_target >= 1, spec, f"optuna.trials_per_target = {o.trials_per_target} must be >= 1")
        _require(o.max_concurrent >= 1, spec, f"optuna.max_concurrent = {o.max_concurrent} must be >= 1")
        _require(o.max_proposals >= 1, spec, f"optuna.max_proposals = {o.max_proposals} must be >= 1")
        _require(
            len(o.objectives) >= 1 and len(set(o.objectives)) == len(o.objectives),
            spec,
            f"optuna.objectives = {list(o.objectives)}: give one or more distinct objectives from "
            f"{typing.get_args(Objective)}",
        )
        _require(
            len(spec.axes.seed) == 1,
            spec,
            f"training.seed = {list(spec.axes.seed)}: search: optuna uses one seed per study; give one",
        )
        for name in OptunaSpec.RANGES:
            bounds = getattr(o, name)
            _require(
                len(bounds) in (1, 2)
                and all(b > 0 and math.isfinite(b) for b in bounds)
                and list(bounds) == sorted(bounds),
                spec,
                f"optuna.{name} = {list(bounds)}: give [low, high] with 0 < low <= high, or [value]",
            )
    if stop is not None:
        _require(stop.grace_period >= 1, spec, f"early_stopping.grace_period = {stop.grace_period} must be >= 1 epoch")
        _require(
            stop.reduction_factor >= 2, spec, f"early_stopping.reduction_factor = {stop.reduction_factor} must be >= 2"
        )
