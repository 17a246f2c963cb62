"""Checks of a parsed sweep file that need no data (`validate`, called by `sweeps.spec.parse_spec`).

Two layers. The sweep's own rules live here: grid axes (empty, repeated), names and registries (models, datasets,
inits), resources, the pretrain dataset, Optuna, the audit, and the privacy units' sweep-wide rules. A single
trial's rules (ranges, and pairs such as the patient unit's cap and the physical batch) live in the config classes
(`trainables.config`), checked on construction wherever a config is built; here they run on the config of every
grid point, or in Optuna mode on each range's ends, so every trial's checks pass before Ray starts. `spec_error`
turns a config's `ConfigError` into a `SpecError` naming the sweep file's field (``training.lr[1]``). Each failure
names the field, the value and the fix.

Everything but the names is checked without numpy, pandas, torch or Opacus (the rdp accountant's epsilon floor is
spelled out here, `rdp_epsilon_floor`), so a mistake in a sweep file is reported in well under a second; the dataset,
model and init names, which need the registries (pandas; timm and torch), come last (`_validate_names`).

Imports the sweep's types (`sweeps.schema`), never its parser (`sweeps.spec`).
"""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import fields
from typing import Any

from sweeps.schema import (
    AuditSpec,
    GridPoint,
    Objective,
    OptunaSpec,
    ResourcesSpec,
    SelectionSpec,
    SpecError,
    SweepSpec,
)
from trainables.config import (
    MAX_SEED,
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
    """The sweep's rules, then every trial's config checks (`_validate_trials`), then the dataset, model and init
    names (`_validate_names`). The names need the registries (pandas; timm, and torch with it), whose imports take
    seconds: they come last, so that every other mistake is reported in a fraction of that."""
    axes = spec.axes
    _require(
        len(spec.name) <= 100 and SWEEP_NAME.fullmatch(spec.name) is not None,
        spec,
        f"name = {spec.name!r} must be a non-empty folder name of at most 100 letters, digits, '.', '_' and '-', "
        "starting with a letter or digit (it names runs/<name>/, which --fresh deletes), e.g. smoke-v2",
    )
    for where, folder, default in (("runs", spec.runs, "runs"), ("data.root", spec.data.root, "data")):
        _require(folder.strip() != "", spec, f"{where} is empty; name a folder, or leave it out (default {default})")
    _require(len(spec.models) > 0, spec, "model is empty; name a timm architecture such as convnext_small")
    _require(len(set(spec.models)) == len(spec.models), spec, f"model lists a name twice: {list(spec.models)}")
    grid_axes = [
        ("privacy.target_epsilon", axes.target_epsilon),
        ("training.lr", axes.lr),
        ("training.seed", axes.seed),
        ("inits", spec.inits),
        ("privacy.privacy_unit", axes.privacy_unit),
        ("data.train_fraction", axes.train_fraction),
        *(
            (f"privacy.max_grad_norm.{m}" if len(axes.max_grad_norm) > 1 else "privacy.max_grad_norm", clips)
            for m, clips in axes.max_grad_norm.items()
        ),
    ]
    for where, values in grid_axes:
        _require(
            spec.search not in GRID_SEARCHES and where.startswith("privacy.max_grad_norm") or len(values) > 0,
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
    if spec.search in GRID_SEARCHES:
        for model in spec.models:
            _require(
                model in axes.max_grad_norm,
                spec,
                f"privacy.max_grad_norm has no entry for model {model!r}; add `{model}: C` to the mapping",
            )
    _require(len(axes.seed) > 0, spec, "training.seed is empty; give at least one seed, e.g. [0]")
    _validate_resources(spec, spec.resources)
    _require(len(spec.inits) > 0, spec, "inits is empty; list inits such as [random, domain]")
    _require(len(spec.data.train) > 0, spec, "data.train is empty; name the dataset(s) to train on")
    _require(
        len(set(spec.data.train)) == len(spec.data.train),
        spec,
        f"data.train lists a dataset twice: {list(spec.data.train)}",
    )
    external = spec.data.external
    twice = sorted({name for name in external if external.count(name) > 1})
    _require(
        not twice,
        spec,
        f"data.external = {list(external)} lists {twice} twice: each is evaluated once; remove the repeat",
    )
    for name, weights in spec.init_weights.items():
        _require(
            weights.strip() != "",
            spec,
            f"init_weights.{name} is empty; give the weight file (.safetensors or .pth), or remove the entry",
        )
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
    _validate_reachable(spec)
    _validate_names(spec)


SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
"""A sweep's name: a plain folder name (``runs/<name>/``), never ``..`` or a path."""
MAX_FAILURES = 100
"""The most retries `resources.max_failures` may ask for (Ray reads -1 as "retry forever")."""
MAX_CANARIES = 100_000
"""The most canaries of an audit (``audit.m``)."""
MAX_SYNTHETIC_IMAGES = 1_000_000
"""The most images of a synthetic dataset (the twin is for tests and demos; real training sets have < 200 000)."""


def _validate_names(spec: SweepSpec) -> None:
    """The datasets are in the registry (`trainables.data.registry`), the synthetic ones' size in range; the models
    are timm architectures, the inits (and the pretrain stage's) resolve for every model."""
    from trainables.data.registry import check_dataset_name

    pretrain = [("pretrain.dataset", spec.pretrain.dataset)] if spec.pretrain is not None else []
    proxy = [("proxy.dataset", spec.proxy.dataset)] if spec.proxy is not None else []
    for field_name, name in [
        *((f"data.train[{i}]", n) for i, n in enumerate(spec.data.train)),
        *((f"data.external[{i}]", n) for i, n in enumerate(spec.data.external)),
        *pretrain,
        *proxy,
    ]:
        try:
            check_dataset_name(name)
        except ValueError as error:
            raise SpecError(f"{spec.source}: {field_name}: {error}") from None
    _validate_synthetic_images(spec, spec.data.synthetic_images)
    from trainables.models import InitError, timm_tag_for

    for i, model in enumerate(spec.models):
        _validate_model_name(spec, f"model[{i}]" if len(spec.models) > 1 else "model", model)
    for model in spec.models:
        for i, init in enumerate(spec.inits):
            try:
                timm_tag_for(init, model)
            except InitError as error:
                raise SpecError(f"{spec.source}: inits[{i}]: {error}") from None
        if spec.pretrain is not None:
            try:
                timm_tag_for(spec.pretrain.init, model)
            except InitError as error:
                raise SpecError(f"{spec.source}: pretrain.init: {error}") from None


def _validate_resources(spec: SweepSpec, resources: ResourcesSpec) -> None:
    cpu = resources.cpu
    _require(
        math.isfinite(cpu) and cpu > 0,
        spec,
        f"resources.cpu = {cpu!r} must be a finite number > 0: the CPUs each trial reserves, e.g. 1",
    )
    _require_ray_share(spec, "resources.cpu", cpu)
    _validate_gpu_share(spec, resources.gpu)
    _require(
        resources.max_concurrent >= 0,
        spec,
        f"resources.max_concurrent = {resources.max_concurrent} must be a whole number >= 0: the most trials at "
        "once, or 0 for as many as the cluster's resources allow (there is no -1)",
    )
    failures = resources.max_failures
    _require(
        failures >= 0,
        spec,
        f"resources.max_failures = {failures}: Ray reads a negative number as 'retry a failing trial forever', so a "
        "trial that fails every time would never end; give the retries of a failed trial, a whole number from 0 to "
        f"{MAX_FAILURES} (default 2)",
    )
    _require(
        failures <= MAX_FAILURES,
        spec,
        f"resources.max_failures = {failures} retries of a failed trial is more than {MAX_FAILURES}: a trial that "
        "fails every time would be retried for hours; give a whole number from 0 to "
        f"{MAX_FAILURES} (default 2)",
    )


def _validate_synthetic_images(spec: SweepSpec, n_images: int | None) -> None:
    """``data.synthetic_images`` is in the generator's range."""
    from trainables.data.synthetic import MIN_IMAGES

    _require(
        n_images is None or MIN_IMAGES <= n_images <= MAX_SYNTHETIC_IMAGES,
        spec,
        f"data.synthetic_images = {n_images} must be a whole number from {MIN_IMAGES} (the generator's smallest "
        f"cohort) to {MAX_SYNTHETIC_IMAGES}, or left out for the generator's default (2500)",
    )


RDP_ORDERS: tuple[float, ...] = (*(1 + x / 10 for x in range(1, 100)), *range(12, 64))
"""The Renyi orders the ``rdp`` accountant minimises over: Opacus's `RDPAccountant.DEFAULT_ALPHAS` (a test ties
them), spelled out here so that checking a sweep file needs no Opacus (nor torch)."""


def rdp_epsilon_floor(delta: float) -> float:
    """The least epsilon the ``rdp`` accountant reports at ``delta``, however much noise is added: Opacus's
    conversion from Renyi DP (`opacus.accountants.analysis.rdp.get_privacy_spent`) with every order's divergence
    0 (infinite noise), ``min over orders a of (log(1/delta) - log a) / (a - 1) + log((a - 1) / a)``. A target at
    or below it cannot be calibrated, whatever the data (delta 6e-6: 0.111; 1e-10: 0.289)."""
    return min((-math.log(delta) - math.log(a)) / (a - 1) + math.log((a - 1) / a) for a in RDP_ORDERS)


def _validate_reachable(spec: SweepSpec) -> None:
    """Every private target lies above the ``rdp`` accountant's floor at the sweep's delta (`rdp_epsilon_floor`)."""
    p = spec.privacy
    if p.accountant != "rdp":
        return
    floor = rdp_epsilon_floor(p.delta)
    for i, eps in enumerate(spec.axes.target_epsilon):
        _require(
            not is_private(eps) or eps > floor,
            spec,
            f"privacy.target_epsilon[{i}] = {eps:g} cannot be reached: at privacy.delta = {p.delta:g} the rdp "
            f"accountant certifies no epsilon below {floor:.4g}, however much noise is added; raise the target "
            "above it, raise delta (still well below 1/N_train), or use privacy.accountant: prv",
        )


SWEEP_FILE_PATHS: dict[str, str] = {
    **{f.name: f"data.{f.name}" for f in fields(DataSettings)},
    **{f.name: f"training.{f.name}" for f in fields(TrainingSettings)},
    **{f.name: f"evaluation.{f.name}" for f in fields(EvaluationSettings)},
    "lr": "training.lr",
    "seed": "training.seed",
    "train_fraction": "data.train_fraction",
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


SELECTION_PATHS = {
    "lr": "selection.lr",
    "privacy.max_grad_norm": "selection.max_grad_norm",
    "privacy.expected_batch_size": "selection.expected_batch_size",
    "privacy.epochs": "selection.epochs",
}
"""The trial fields a private selection draws: their paths."""


def _validate_selection_trials(spec: SweepSpec) -> None:
    """A private selection's candidates at the low and the high end of every range and choice."""
    s = spec.selection
    assert s is not None
    for cell in spec.cells():
        for end in (0, -1):
            point = GridPoint(
                cell,
                max_grad_norm=s.max_grad_norm[end],
                lr=s.lr[end],
                seed=spec.axes.seed[0],
                privacy_unit=spec.axes.privacy_unit[0],
            )
            try:
                spec.trial_config(
                    point,
                    data_root=spec.data.root,
                    init_weights=spec.init_weights_for(point.init, point.model),
                    expected_batch_size=sorted(s.expected_batch_size)[end],
                    epochs=sorted(s.epochs)[end],
                )
            except ConfigError as error:
                path = SELECTION_PATHS.get(error.field) or _axis_path(spec, point, error.field)
                raise spec_error(error, spec.source, path) from None


def _validate_trials(spec: SweepSpec) -> None:
    """Every trial's config checks (`trainables.config`), before Ray starts: a grid builds the config of each grid
    point; Optuna mode builds each cell's at the low and at the high end of every range. The planner's derived
    fields (sigma, q, steps, the label-count release's default) need the data: `sweeps.plan` fills them."""
    data_root = spec.data.root
    if spec.search in GRID_SEARCHES:
        for point in spec.grid():
            init_weights = spec.init_weights_for(point.init, point.model)
            try:
                spec.trial_config(point, data_root=data_root, init_weights=init_weights)
            except ConfigError as error:
                raise spec_error(error, spec.source, _axis_path(spec, point, error.field)) from None
        return
    if spec.selection is not None:
        _validate_selection_trials(spec)
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
        "train_fraction": ("data.train_fraction", axes.train_fraction, point.train_fraction),
        "dataset": ("data.train", spec.data.train, point.dataset),
        "model": ("model", spec.models, point.model),
        "init": ("inits", spec.inits, point.init),
    }
    if field not in values or values[field][2] not in values[field][1]:
        return None
    path, axis, value = values[field]
    return f"{path}[{axis.index(value)}]"


GPU_SHARE_STEP = 1e-4
"""Ray counts resource shares (CPUs and GPUs) in steps of 0.0001 (`ray_constants.MIN_RESOURCE_GRANULARITY`)."""


def _require_one_seed(spec: SweepSpec, why: str) -> None:
    """A search that runs each cell (or study) once: ``why`` says so and gives the fix."""
    _require(len(spec.axes.seed) == 1, spec, f"training.seed = {list(spec.axes.seed)}: {why}")


def _require_whole_split(spec: SweepSpec, why: str) -> None:
    """A search that trains on the whole training split (no data-scale axis): ``why`` says so."""
    _require(
        spec.axes.train_fraction == (1.0,),
        spec,
        f"data.train_fraction = {list(spec.axes.train_fraction)}: {why}; remove data.train_fraction, or use "
        "search: grid to sweep the data scale",
    )


def _require_ray_share(spec: SweepSpec, where: str, amount: float) -> None:
    """Ray counts resources in steps of `GPU_SHARE_STEP` and rounds anything finer."""
    shares = amount / GPU_SHARE_STEP
    _require(
        abs(shares - round(shares)) < 1e-6,
        spec,
        f"{where} = {amount!r} has more than 4 decimals, which Ray rounds; give "
        f"{math.floor(shares + 1e-6) * GPU_SHARE_STEP:.4f} (rounded down, so that as many trials fit)",
    )


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
    _require_ray_share(spec, "resources.gpu", gpu)


NO_PATIENT_IDS: dict[str, str] = {"vindr-cxr": "VinDr-CXR publishes no patient ids (each image is its own patient)"}
"""Datasets whose patient ids are not real: a patient-level guarantee on them would be an image-level one."""


def _validate_units(spec: SweepSpec) -> None:
    """``privacy.privacy_unit`` (a grid axis) and ``privacy.max_images_per_patient``: the sweep-wide rules. A
    patient-level trial's own (the cap given and within the physical batch) are its config's. Optuna searches one
    unit: its studies are cells without a unit axis (`sweeps.search.study_cells`)."""
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
        spec.search == "grid" or len(units) == 1,
        spec,
        f"privacy.privacy_unit = {list(units)}: search: {spec.search} runs one study per cell for one privacy unit; "
        "give one unit (image or patient), or use search: grid to compare both",
    )


def _validate_audit(spec: SweepSpec, audit: AuditSpec) -> None:
    private = [e for e in spec.axes.target_epsilon if is_private(e)]
    _require(
        len(audit.kind) >= 1 and len(set(audit.kind)) == len(audit.kind),
        spec,
        f"audit.kind = {list(audit.kind)}: give white_box, black_box or both, once each",
    )
    _require(audit.m >= 10, spec, f"audit.m = {audit.m} canaries must be >= 10 (the study-scale audit uses 1000)")
    _require(
        audit.m <= MAX_CANARIES,
        spec,
        f"audit.m = {audit.m} canaries is more than {MAX_CANARIES} (each is a record the audit holds and trains on); "
        "the study-scale audit uses 1000",
    )
    _require(0 < audit.confidence < 1, spec, f"audit.confidence = {audit.confidence} must be in (0, 1), e.g. 0.95")
    _require(
        audit.real_records is None or audit.real_records >= 1,
        spec,
        f"audit.real_records = {audit.real_records} must be >= 1 (or left out: all training records)",
    )
    _require(spec.search == "grid", spec, "an `audit:` section needs search: grid (it audits planned grid points)")
    _require(bool(private), spec, "an `audit:` section needs a private target in privacy.target_epsilon")
    _require(
        len(set(audit.target_epsilon)) == len(audit.target_epsilon),
        spec,
        f"audit.target_epsilon = {list(audit.target_epsilon)} lists a target twice: each is audited once; remove "
        "the repeat",
    )
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
    """The pretrain stage's dataset is neither a private training set nor an external test set (it and ``init``
    are checked against the registries with the other names, `_validate_names`)."""
    _require(
        pretrain.dataset not in spec.data.train,
        spec,
        f"pretrain.dataset = {pretrain.dataset!r} is a private training set (data.train); pretraining "
        "must use a public dataset, or the domain init leaks the private data outside DP",
    )
    _require(
        pretrain.dataset not in spec.data.external,
        spec,
        f"pretrain.dataset = {pretrain.dataset!r} is an external test set (data.external): a domain init trained on "
        "it has seen that set, so its AUROC there would not be external; pretrain on another public dataset, or "
        f"remove {pretrain.dataset!r} from data.external",
    )


def _validate_selection(spec: SweepSpec) -> None:
    """`search: private_selection`: the trial count's distribution, the ranges and choices, and what the bound
    needs (private targets only, one seed, a guarantee for every candidate)."""
    from trainables.privacy.selection import TrialCount

    s = spec.selection
    assert s is not None
    try:
        TrialCount(s.distribution, s.mean_trials, s.shape)
    except ValueError as error:
        field = "selection.shape" if "shape" in str(error) else "selection.mean_trials"
        value = s.shape if field == "selection.shape" else s.mean_trials
        raise SpecError(
            f"{spec.source}: {field} = {value!r} does not fit selection.distribution = {s.distribution!r} ({error}); "
            + (
                "give a finite shape > 0 for negative_binomial, or leave `shape` out for the others"
                if field == "selection.shape"
                else "give the expected number of candidates per cell, e.g. 4 (at least 1)"
            )
        ) from None
    for name in s.RANGES:
        bounds = getattr(s, name)
        _require(
            len(bounds) in (1, 2)
            and all(b > 0 and math.isfinite(b) for b in bounds)
            and list(bounds) == sorted(bounds),
            spec,
            f"selection.{name} = {list(bounds)}: give [low, high] with 0 < low <= high (drawn log-uniformly), or "
            "[value]",
        )
    for name in s.CHOICES:
        choices = getattr(s, name)
        _require(
            len(choices) >= 1 and all(c >= 1 for c in choices) and len(set(choices)) == len(choices),
            spec,
            f"selection.{name} = {list(choices)}: give one or more distinct whole numbers >= 1 to choose from",
        )
    for i, eps in enumerate(spec.axes.target_epsilon):
        _require(
            is_private(eps),
            spec,
            f"privacy.target_epsilon[{i}] = {eps:g}: search: private_selection selects among private candidates only "
            "(a non-private baseline has no epsilon to calibrate against the selection); remove it and run "
            "baselines in a grid sweep",
        )
    _require_one_seed(spec, "search: private_selection uses one seed per cell; give one")
    _require_whole_split(spec, "search: private_selection selects on the whole training split")
    _require(
        not spec.privacy.reproducible_noise,
        spec,
        "privacy.reproducible_noise = True: a private selection needs candidates with a guarantee (replayable noise "
        "has none); set it to false",
    )


GRID_SEARCHES = ("grid", "proxy")
"""The searches whose trials are the grid's points (`search: proxy` runs its grid on public data first)."""


def _validate_proxy(spec: SweepSpec) -> None:
    """`search: proxy`: the public dataset (named, not trained on privately), B_sim, top_k, and what the two phases
    cannot do (`sweeps.proxy`)."""
    proxy = spec.proxy
    _require(
        proxy is not None and proxy.dataset != "",
        spec,
        "search: proxy needs `proxy.dataset`: the public dataset phase 1 tunes on (e.g. synthetic-source, or a public "
        "chest X-ray set); add a `proxy:` section with `dataset: <name>`",
    )
    assert proxy is not None
    _require(
        proxy.dataset not in spec.data.train,
        spec,
        f"proxy.dataset = {proxy.dataset!r} is one of data.train {list(spec.data.train)}: phase 1 trains on it without "
        "any privacy accounting, so it must be public data the sweep does not protect; name another (public) dataset",
    )
    _require(
        isinstance(proxy.batch_size, int) and not isinstance(proxy.batch_size, bool) and proxy.batch_size >= 1,
        spec,
        f"proxy.batch_size = {proxy.batch_size!r} must be a whole number >= 1 (the expected batch B_sim of the proxy "
        "runs; sigma is scaled by B_sim / privacy.expected_batch_size), e.g. 16",
    )
    _require(
        isinstance(proxy.top_k, int) and not isinstance(proxy.top_k, bool) and proxy.top_k >= 1,
        spec,
        f"proxy.top_k = {proxy.top_k!r} must be a whole number >= 1: 1 trains each cell's best proxy candidate once at "
        "its target; k > 1 runs a private selection among the top k (K from the `selection:` section)",
    )
    if proxy.top_k > 1:
        _require_one_seed(
            spec, "proxy.top_k > 1 runs a private selection with one seed per cell; give one seed, or use top_k: 1"
        )
        _validate_trial_count(spec)
    else:
        _require(
            spec.selection is None,
            spec,
            "a `selection:` section is given but proxy.top_k = 1 (one private trial per cell, no selection); set "
            "proxy.top_k above 1 for a private selection among the top k, or remove the section",
        )
    _require(
        spec.optuna is None,
        spec,
        "`optuna:` cannot be used with `search: proxy`: phase 1 runs the sweep's grid on the public dataset; remove "
        "the `optuna:` section, or use search: optuna",
    )
    _require(
        spec.early_stopping is None,
        spec,
        "`early_stopping:` (ASHA) cannot be used with `search: proxy`: phase 1 ranks every proxy candidate by its "
        "selected validation AUROC, and phase 2 runs one trial per cell to its planned steps; remove the section",
    )
    for i, eps in enumerate(spec.axes.target_epsilon):
        _require(
            is_private(eps),
            spec,
            f"privacy.target_epsilon[{i}] = {eps:g}: search: proxy simulates private runs (TAN scaling of their "
            "noise), and a non-private baseline has no noise to scale; remove it and run baselines in a grid sweep",
        )
    _require(
        spec.axes.privacy_unit == ("image",),
        spec,
        f"privacy.privacy_unit = {list(spec.axes.privacy_unit)}: search: proxy simulates image-level runs on the "
        "public dataset; use privacy_unit: image, or search: grid",
    )
    _require_whole_split(spec, "search: proxy plans each cell on the whole training split")


def _validate_trial_count(spec: SweepSpec) -> None:
    """The ``selection:`` section's distribution of K (its defaults without one) is one the selection bound takes."""
    from trainables.privacy.selection import TrialCount

    s = spec.selection or SelectionSpec()
    try:
        TrialCount(s.distribution, s.mean_trials, s.shape)
    except ValueError as error:
        raise SpecError(
            f"{spec.source}: selection.mean_trials = {s.mean_trials!r} / selection.shape = {s.shape!r} do not fit "
            f"selection.distribution = {s.distribution!r} ({error}); e.g. mean_trials: 4"
        ) from None


def _validate_search(spec: SweepSpec) -> None:
    o, stop = spec.optuna, spec.early_stopping
    _require(
        spec.selection is None or spec.search in ("private_selection", "proxy"),
        spec,
        f"a `selection:` section is given but search = {spec.search!r}; set `search: private_selection`, or remove "
        "the section",
    )
    _require(
        spec.proxy is None or spec.search == "proxy",
        spec,
        f"a `proxy:` section is given but search = {spec.search!r}; set `search: proxy`, or remove the section",
    )
    if spec.search == "private_selection":
        _validate_selection(spec)
    elif spec.search == "proxy":
        _validate_proxy(spec)
    elif spec.search == "grid":
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
        top_seed = MAX_SEED - (len(spec.cells()) - 1)
        _require(
            0 <= o.seed <= top_seed,
            spec,
            f"optuna.seed = {o.seed} must be a whole number from 0 to {top_seed} (study i's sampler is seeded "
            "optuna.seed + i, and samplers take seeds below 2**32), e.g. 0",
        )
        _require(
            len(o.objectives) >= 1 and len(set(o.objectives)) == len(o.objectives),
            spec,
            f"optuna.objectives = {list(o.objectives)}: give one or more distinct objectives from "
            f"{typing.get_args(Objective)}",
        )
        _require_one_seed(spec, "search: optuna uses one seed per study; give one")
        _require_whole_split(spec, "search: optuna trains on the whole training split")
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
        epochs = max(o.epochs) if o is not None else spec.privacy.epochs
        where = "the largest of optuna.epochs" if o is not None else "privacy.epochs"
        _require(
            stop.grace_period <= epochs,
            spec,
            f"early_stopping.grace_period = {stop.grace_period} is more than {where} = {epochs}: ASHA would never "
            f"stop a trial (Ray refuses it); give at most {epochs}, or remove the `early_stopping:` section",
        )
        _require(
            stop.reduction_factor >= 2,
            spec,
            f"early_stopping.reduction_factor = {stop.reduction_factor} must be >= 2 (ASHA keeps 1/reduction_factor "
            "of the trials at each rung), e.g. 2 or 3",
        )
