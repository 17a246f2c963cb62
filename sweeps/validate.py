"""Checks of a parsed sweep file that need no data: ranges, names, consistency (`validate`, called by
`sweeps.spec.parse_spec`). Each failure raises `SpecError` naming the field, the value and the fix."""

from __future__ import annotations

import difflib
import math
import typing

from sweeps.spec import AuditSpec, Objective, OptunaSpec, SpecError, SweepSpec
from trainables.config import PretrainConfig


def _require(condition: bool, spec: SweepSpec, message: str) -> None:
    if not condition:
        raise SpecError(f"{spec.source}: {message}")


def validate(spec: SweepSpec) -> None:
    """Field checks that need no data: ranges, names, consistency."""
    from trainables.data.registry import check_dataset_name
    from trainables.models import InitError, timm_tag_for

    p, axes = spec.privacy, spec.axes
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
    for i, eps in enumerate(axes.target_epsilon):
        _require(
            eps > 0 and not math.isnan(eps),
            spec,
            f"privacy.target_epsilon[{i}] = {eps} must be > 0 (use .inf for the non-private baseline)",
        )
    _require(0 < p.delta < 1, spec, f"privacy.delta = {p.delta} must be in (0, 1), and below 1/N_train")
    for model, clips in axes.max_grad_norm.items():
        _require(
            model in spec.models,
            spec,
            f"privacy.max_grad_norm.{model}: {model!r} is not one of the sweep's models {list(spec.models)}",
        )
        where = (
            f"privacy.max_grad_norm.{model}"
            if len(set(map(tuple, axes.max_grad_norm.values()))) > 1
            else "privacy.max_grad_norm"
        )
        for i, clip in enumerate(clips):
            _require(clip > 0 and math.isfinite(clip), spec, f"{where}[{i}] = {clip} must be a finite number > 0")
    if spec.search == "grid":
        for model in spec.models:
            _require(
                model in axes.max_grad_norm,
                spec,
                f"privacy.max_grad_norm has no entry for model {model!r}; add `{model}: C` to the mapping",
            )
    _require(p.expected_batch_size >= 1, spec, f"privacy.expected_batch_size = {p.expected_batch_size} must be >= 1")
    _require(p.epochs >= 1, spec, f"privacy.epochs = {p.epochs} must be >= 1")
    sigma_c = p.label_count_noise_multiplier
    _require(
        sigma_c is None or spec.training.pos_weight == "train",
        spec,
        f"privacy.label_count_noise_multiplier = {sigma_c} is set but training.pos_weight is "
        f"{spec.training.pos_weight!r}; it is the noise of the label counts that `pos_weight: train` releases: "
        "remove it, or set training.pos_weight: train",
    )
    _require(
        sigma_c is None or (sigma_c > 0 and math.isfinite(sigma_c)),
        spec,
        f"privacy.label_count_noise_multiplier = {sigma_c} must be a finite number > 0: exact label counts of "
        "the private training set would make every record's loss depend on the others' labels outside the "
        "accounted mechanism; leave it out for the default (20)",
    )
    _require(
        not (p.secure_mode and p.reproducible_noise),
        spec,
        "privacy.secure_mode and privacy.reproducible_noise are both true: secure mode draws secret noise, "
        "reproducible noise replays the published seed; keep one (reproducible_noise is for debugging only)",
    )
    _require(
        0 < p.calibration_tolerance < 1,
        spec,
        f"privacy.calibration_tolerance = {p.calibration_tolerance} must be in (0, 1)",
    )
    for i, lr in enumerate(axes.lr):
        _require(lr > 0, spec, f"training.lr[{i}] = {lr} must be > 0")
    _require(len(axes.seed) > 0, spec, "training.seed is empty; give at least one seed, e.g. [0]")
    _require(spec.speed.max_physical_batch_size >= 1, spec, "speed.max_physical_batch_size must be >= 1")
    _require(spec.speed.threads >= 1, spec, "speed.threads must be >= 1")
    _require(
        1 <= spec.speed.pad_multiple <= spec.speed.max_physical_batch_size,
        spec,
        f"speed.pad_multiple = {spec.speed.pad_multiple} must be between 1 and speed.max_physical_batch_size = "
        f"{spec.speed.max_physical_batch_size} (rows a padded chunk is rounded up to; e.g. 8)",
    )
    _require(spec.resources.cpu > 0, spec, f"resources.cpu = {spec.resources.cpu} must be > 0")
    _validate_gpu_share(spec, spec.resources.gpu)
    _require(spec.data.image_size >= 32, spec, f"data.image_size = {spec.data.image_size} must be >= 32")
    _require(spec.data.input_std > 0, spec, f"data.input_std = {spec.data.input_std} must be > 0")
    edges = spec.evaluation.age_edges
    _require(
        len(edges) >= 2 and list(edges) == sorted(set(edges)),
        spec,
        f"evaluation.age_edges = {list(edges)} must be strictly increasing, e.g. [0, 40, 70, 100]",
    )
    _require(spec.evaluation.n_boot >= 0, spec, "evaluation.n_boot must be >= 0")
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
    """``privacy.privacy_unit`` (a grid axis) and ``privacy.max_images_per_patient``."""
    p, units = spec.privacy, spec.axes.privacy_unit
    cap = p.max_images_per_patient
    if "patient" not in units:
        _require(
            cap is None,
            spec,
            f"privacy.max_images_per_patient = {cap} is set but privacy.privacy_unit is "
            f"{list(units)}; it caps a patient-level trial's images: remove it, or add `patient` to the unit",
        )
        return
    _require(
        cap is not None and cap >= 1,
        spec,
        f"privacy.max_images_per_patient = {cap}: a patient-level sweep needs the public cap of images per "
        "patient (patients with more contribute their first ones), a whole number >= 1, e.g. 4",
    )
    assert cap is not None
    _require(
        cap <= spec.speed.max_physical_batch_size,
        spec,
        f"privacy.max_images_per_patient = {cap} > speed.max_physical_batch_size = "
        f"{spec.speed.max_physical_batch_size}: a patient's images are clipped together, so they must fit in one "
        "physical batch; lower the cap or raise the physical batch",
    )
    for name in spec.data.train:
        _require(
            name not in NO_PATIENT_IDS,
            spec,
            f"privacy.privacy_unit: patient on data.train {name!r}: {NO_PATIENT_IDS.get(name)}, so a "
            "patient-level guarantee cannot be given there; train it with privacy_unit: image",
        )
    _require(
        spec.training.pos_weight == "uniform",
        spec,
        "training.pos_weight: train with privacy.privacy_unit: patient: the label-count release counts every "
        "image of a patient, which its per-image sensitivity does not cover; use training.pos_weight: uniform",
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
    _require(
        spec.speed.grad_sample_mode != "bk",
        spec,
        "privacy.privacy_unit: patient with speed.grad_sample_mode = 'bk': the book-keeping engine does not group "
        "per-sample norms by patient yet (a patient's norm is the norm of its summed gradient); set "
        "speed.grad_sample_mode: hooks or functorch",
    )
    _require(
        spec.speed.precision == "fp32" and spec.speed.fixed_shapes != "on",
        spec,
        f"privacy.privacy_unit: patient with speed.precision = {spec.speed.precision!r}, speed.fixed_shapes = "
        f"{spec.speed.fixed_shapes!r}: patient-level steps run in float32 and in chunks of whole patients, never "
        "padded; set speed.precision: fp32 and speed.fixed_shapes: auto or off",
    )


def _validate_audit(spec: SweepSpec, audit: AuditSpec) -> None:
    private = [e for e in spec.axes.target_epsilon if math.isfinite(e)]
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
    _require(pretrain.init != "domain", spec, "pretrain.init cannot be 'domain' (it is what pretrain makes)")
    _require(pretrain.epochs >= 1, spec, f"pretrain.epochs = {pretrain.epochs} must be >= 1")
    _require(pretrain.lr > 0, spec, f"pretrain.lr = {pretrain.lr} must be > 0, e.g. 0.001")
    _require(pretrain.batch_size >= 1, spec, f"pretrain.batch_size = {pretrain.batch_size} must be >= 1, e.g. 64")
    _require(pretrain.weight_decay >= 0, spec, f"pretrain.weight_decay = {pretrain.weight_decay} must be >= 0")
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
