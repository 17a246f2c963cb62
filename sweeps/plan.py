"""Plan a sweep: everything a user's input can make fail, checked before any trial starts (no Ray, no MLflow).

    SweepSpec --plan_sweep--> SweepPlan: prepared data (N per training set, and per nested subset of
    ``data.train_fraction``), sigma per (dataset or subset, target epsilon) calibrated on the sweep's accountant,
    resolved inits (running the pretrain stage for ``domain``), and one `TrialConfig` per grid point, built in one
    construction from the sweep's settings and the point (`make_trial`, `SweepSpec.trial_config`).

What ``dpsweep sweep --dry-run`` prints is `sweeps.describe`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from sweeps.schema import TrialName
from sweeps.spec import GridPoint, SpecError, SweepSpec
from trainables import names as N
from trainables.config import PrivacyConfig, PrivacyUnit, is_private
from trainables.data.registry import check_dataset_name, ensure_prepared, prepared_folder
from trainables.data.splits import subset_key, train_subset
from trainables.data.synthetic import SYNTHETIC_DATASETS, sample_cohort
from trainables.models import InitError, ResolvedInit, resolve_init
from trainables.point import TrialPoint, run_tags
from trainables.pretrain import pretrain_dir, run_pretrain
from trainables.privacy.guarantee import guarantee_statement, has_dp_guarantee
from trainables.privacy.label_counts import DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER
from trainables.privacy.planning import check_parameters, plan_privacy, schedule
from trainables.provenance import provenance

Log = Callable[[str], None]


@dataclass(frozen=True)
class SweepPaths:
    """Absolute locations of everything a sweep reads and writes.

    ``runs_field``, ``data_field`` and ``tracking_field`` say where each came from, for messages: the sweep file's
    field (``runs``, ``data.root``, ``tracking.uri``), a flag (``--runs``, ``--data``) or an environment variable
    (``$DPSWEEP_RUNS``, ``$DPSWEEP_DATA``, ``$MLFLOW_TRACKING_URI``); ``tracking_field`` is empty for the default
    store, ``<runs>/mlflow.db``."""

    runs_root: Path
    data_root: Path
    tracking_uri: str
    runs_field: str = field(default="runs", compare=False)
    data_field: str = field(default="data.root", compare=False)
    tracking_field: str = field(default="tracking.uri", compare=False)

    @classmethod
    def for_spec(cls, spec: SweepSpec, runs: str | None = None, data: str | None = None) -> SweepPaths:
        env = os.environ.get
        runs_field, runs_folder = _first_given(
            ("--runs", runs), ("$DPSWEEP_RUNS", env("DPSWEEP_RUNS")), ("runs", spec.runs)
        )
        data_field, data_folder = _first_given(
            ("--data", data), ("$DPSWEEP_DATA", env("DPSWEEP_DATA")), ("data.root", spec.data.root)
        )
        runs_root, data_root = Path(runs_folder).resolve(), Path(data_folder).resolve()
        tracking_field, uri = _first_given(
            ("tracking.uri", spec.tracking.uri),
            ("$MLFLOW_TRACKING_URI", env("MLFLOW_TRACKING_URI")),
            ("", f"sqlite:///{runs_root / 'mlflow.db'}"),
        )
        return cls(runs_root, data_root, uri, runs_field, data_field, tracking_field)

    def sweep_dir(self, spec: SweepSpec) -> Path:
        return self.runs_root / spec.name

    @property
    def ray_storage(self) -> Path:
        return self.runs_root / "ray"

    def ray_experiment(self, spec: SweepSpec) -> Path:
        return self.ray_storage / spec.name


def _first_given(*choices: tuple[str, str | None]) -> tuple[str, str]:
    """The first (where, value) whose value is given (not None or empty); the last one is the default."""
    for where, value in choices:
        if value:
            return where, value
    raise AssertionError("the default is always given")


def plan_key(dataset: str, train_fraction: float = 1.0) -> str:
    """A dataset plan's key in `SweepPlan.privacy_plans` and `SweepPlan.subsets`: the dataset's name for the whole
    training split, ``<name>[train_fraction=<f>]`` for a subset."""
    return dataset if train_fraction == 1 else f"{dataset}[train_fraction={train_fraction:g}]"


@dataclass(frozen=True)
class DatasetPlan:
    """A training set's size and, for the sweep's batch size and epochs, its (image-level) sampling rate and steps.

    ``estimated``: the dataset is not prepared (dry runs only); ``n_train`` and ``n_patients`` are then the documented
    estimates of `sweeps.estimate` and sigma is recalibrated on the real N when the sweep runs. ``n_patients``: the
    training split's distinct patients (the records of ``privacy_unit: patient``); None when the dataset has no real
    patient ids (every patient id is an image id). ``patient_images``: the training split's largest number of images of
    one patient (1 without patient ids; None when estimated), the k of an image-level run's patient-level view in the
    privacy ledger (`trainables.privacy.ledger`)."""

    name: str
    n_train: int
    sample_rate: float
    steps: int
    estimated: bool = False
    n_patients: int | None = None
    patient_images: int | None = None
    train_fraction: float = 1.0
    """The nested subset of the training patients this plan is for (`trainables.data.splits.train_subset`): N,
    N_patients, k, q and steps are the subset's."""

    @property
    def key(self) -> str:
        """`plan_key` of this plan."""
        return plan_key(self.name, self.train_fraction)

    def n_records(self, unit: str) -> int:
        """N of the privacy unit: training images, or training patients."""
        if unit == "image":
            return self.n_train
        if self.n_patients is None:
            raise SpecError(
                f"privacy.privacy_unit: patient on {self.name}: its patient ids are its image ids (no "
                "patient ids), so a patient-level guarantee cannot be given; use privacy_unit: image"
            )
        return self.n_patients


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    paths: SweepPaths
    trials: list[TrialPoint]  # grid mode; empty for search: optuna (trials are proposed while it runs)
    datasets: dict[str, DatasetPlan]  # the whole training splits, by dataset name
    privacy_plans: dict[tuple[str, float, str], PrivacyConfig] = field(default_factory=dict)
    """(dataset plan's key, target epsilon, unit) -> the planned privacy config of that cell (`plan_privacy`; grid
    mode). The key is the dataset's name, or a subset's `DatasetPlan.key`."""
    inits: dict[tuple[str, str], ResolvedInit] = field(default_factory=dict)  # (model, init) -> weights
    notes: tuple[str, ...] = ()  # dry run: what must be fixed before the sweep can run
    pretrain_n: int | None = None  # training images of the pretrain dataset (the domain init), if any
    subsets: dict[str, DatasetPlan] = field(default_factory=dict)
    """The nested training subsets of ``data.train_fraction`` below 1, by `DatasetPlan.key`."""

    def dataset_plan(self, dataset: str, train_fraction: float = 1.0) -> DatasetPlan:
        """The plan of ``dataset``'s training split, or of its subset of ``train_fraction``."""
        if train_fraction == 1:
            return self.datasets[dataset]
        return self.subsets[plan_key(dataset, train_fraction)]

    def dataset_plans(self) -> list[DatasetPlan]:
        """Every dataset plan: each training set, then its subsets in the order of ``data.train_fraction``."""
        return [
            plan
            for name, whole in self.datasets.items()
            for plan in (whole, *(s for s in self.subsets.values() if s.name == name))
        ]

    selections: dict[str, Any] = field(default_factory=dict)
    """search: private_selection: cell key -> its calibrated selection (`sweeps.selection.CellSelection`)."""
    proxy: Any = None
    """search: proxy: its phase-1 plan (`sweeps.proxy.ProxyPlan`: the public dataset and the proxy trials); the
    private trials of phase 2 are made once phase 1 ranked its candidates (`sweeps.proxy.ProxyRun`)."""

    @property
    def n_trials(self) -> int:
        """The trials the sweep runs; for a private selection the trials it releases at most (one per cell): how
        many candidates run is secret."""
        if self.spec.search == "private_selection":
            return len(self.spec.cells())
        if self.proxy is not None:  # phase 1's proxy trials, then one private trial per cell (top_k = 1)
            return len(self.proxy.trials) + len(self.spec.cells())
        if self.spec.search == "optuna":
            assert self.spec.optuna is not None
            return len(self.spec.cells()) * self.spec.optuna.trials_per_target
        return len(self.trials)


def trial_name(spec: SweepSpec, point: GridPoint) -> TrialName:
    """``<init>-eps<eps>-clip<C>-lr<lr>-seed<seed>``, prefixed by the model and dataset when the sweep has
    several of them (``convnext_small-chexpert-imagenet-eps1-...``), followed by ``-image``/``-patient`` when it
    has both privacy units and by ``-frac<f>`` for a training subset (``data.train_fraction`` below 1: a trial on the
    whole split keeps the key it had before the axis existed, so fractions extend a sweep); run name ``<init>
    ε<eps> c<C> lr<lr> s<seed>`` with the same prefix, unit and `` frac<f>``."""
    name = point.cell.name.then(
        f"-clip{point.max_grad_norm:g}-lr{point.lr:g}-seed{point.seed}",
        f" c{point.max_grad_norm:g} lr{point.lr:g} s{point.seed}",
    )
    if len(spec.axes.privacy_unit) > 1:
        name = name.then(f"-{point.privacy_unit}", f" {point.privacy_unit}")
    if point.train_fraction != 1:
        name = name.then(f"-frac{point.train_fraction:g}", f" frac{point.train_fraction:g}")
    return name


def trial_key(spec: SweepSpec, point: GridPoint) -> str:
    """The grid point's key (`trial_name`)."""
    return trial_name(spec, point).key


FINGERPRINT_PRIVACY_PLACEHOLDERS: dict[str, Any] = {
    "target_epsilon": math.inf,
    "max_grad_norm": 1.0,
    "privacy_unit": "image",
    "noise_multiplier": 0.0,
    "sample_rate": 0.0,
    "steps": 0,
}
"""The per-trial fields `SweepSpec.privacy` carried, never read, until it held only the sweep's settings: hashed as
before, so that a sweep started by an earlier dpsweep keeps its fingerprint and resumes."""


def spec_settings(spec: SweepSpec) -> dict[str, Any]:
    """Everything that defines the sweep's trials (not where its file lives, where it is tracked, or how it is
    audited), as plain JSON values: what `spec_fingerprint` hashes and ``sweep.json`` records, so that a later run
    of the sweep can name what changed (`sweeps.state`)."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("source", "description", "audit")}
    if settings["selection"] is None:  # absent from sweeps started before private selection: same fingerprint
        del settings["selection"]
    if settings["proxy"] is None:  # absent from sweeps started before search: proxy: same fingerprint
        del settings["proxy"]
    settings["tracking"] = {k: v for k, v in settings["tracking"].items() if k != "uri"}
    settings["privacy"] = {**FINGERPRINT_PRIVACY_PLACEHOLDERS, **settings["privacy"]}
    if spec.axes.train_fraction == (1.0,):  # the default, as sweeps before the axis: same fingerprint, resumable
        del settings["axes"]["train_fraction"]
    plain: dict[str, Any] = json.loads(_settings_json(settings))
    return plain


def spec_fingerprint(spec: SweepSpec) -> str:
    """Hash of the sweep's settings (`spec_settings`)."""
    return hashlib.sha256(_settings_json(spec_settings(spec)).encode()).hexdigest()[:16]


def _settings_json(settings: dict[str, Any]) -> str:
    return json.dumps(settings, sort_keys=True, default=str)


def plan_sweep(
    spec: SweepSpec, paths: SweepPaths, *, run_pretrain_stage: bool = True, dry_run: bool = False, log: Log = print
) -> SweepPlan:
    """Everything that can fail because of the user's input, checked before any trial starts.

    ``dry_run``: nothing is trained, required or written: synthetic datasets are drawn in memory, unprepared real
    datasets use their documented size estimate, missing weights become notes (`SweepPlan.notes`) instead of errors,
    and calibration works on a temporary copy of the cache (`_calibration_cache`)."""
    with _calibration_cache(paths, dry_run) as cache_path:
        return _plan_sweep(spec, paths, run_pretrain_stage, dry_run, log, cache_path)


@contextlib.contextmanager
def _calibration_cache(paths: SweepPaths, dry_run: bool) -> Iterator[Path]:
    """The calibration cache planning reads and extends: the runs folder's, or for a dry run a temporary copy of it
    (deleted afterwards, so that a dry run writes nothing and still reuses earlier calibrations)."""
    cache = paths.runs_root / N.CALIBRATION_CACHE_FILE
    if not dry_run:
        yield cache
        return
    with tempfile.TemporaryDirectory(prefix="dpsweep-dry-run-") as folder:
        copy = Path(folder) / cache.name
        if cache.is_file():
            shutil.copyfile(cache, copy)
        yield copy


def _plan_sweep(
    spec: SweepSpec, paths: SweepPaths, run_pretrain_stage: bool, dry_run: bool, log: Log, cache_path: Path
) -> SweepPlan:
    notes: list[str] = []
    datasets, subsets, pretrain_n = _dataset_plans(spec, paths, dry_run, notes)
    privacy_plans: dict[tuple[str, float, str], PrivacyConfig] = {}
    plans = (*datasets.values(), *subsets.values())
    for dataset, unit in ((d, u) for d in plans for u in spec.axes.privacy_unit):
        try:
            n_records = dataset.n_records(unit)
        except SpecError as error:
            raise SpecError(f"{spec.source}: {error}") from None
        batch, where = _largest_batch(spec)
        if batch > n_records:
            raise SpecError(
                f"{spec.source}: {where} = {batch} is larger than {dataset.key}'s {n_records} training {unit}s; "
                f"choose at most {n_records}" + _subset_fix(dataset)
            )
        for i, eps in enumerate(spec.axes.target_epsilon):
            privacy = cell_privacy(spec, eps, unit)
            try:
                check_parameters(privacy, n_records)
            except ValueError as error:
                unit_note = "" if unit == "image" else ", N = training patients"
                raise SpecError(
                    f"{spec.source}: privacy.target_epsilon[{i}] / privacy.delta ({dataset.key}{unit_note}): {error}"
                    + _subset_fix(dataset)
                ) from None
            if spec.search in ("grid", "proxy"):
                try:
                    privacy_plans[(dataset.key, eps, unit)] = plan_privacy(privacy, n_records, cache_path=cache_path)
                except ValueError as error:
                    raise SpecError(
                        f"{spec.source}: privacy.target_epsilon[{i}] = {eps:g} ({dataset.key}): no noise "
                        f"multiplier meets it ({error}); raise the target, or lower "
                        "privacy.calibration_tolerance below it"
                    ) from None
    selections = _selections(spec, datasets, cache_path)
    inits: dict[tuple[str, str], ResolvedInit] = {}
    for model in spec.models:
        for name in spec.inits:
            try:
                inits[(model, name)] = _resolve(spec, paths, model, name, run_pretrain_stage and not dry_run, log)
            except SpecError as error:
                if not dry_run:
                    raise
                if name != "domain":
                    notes.append(str(error).removeprefix(f"{spec.source}: "))
                inits[(model, name)] = ResolvedInit(name, "missing", model, None)
    trials = []
    if spec.search == "grid":
        tags = provenance_tags()
        for point in spec.grid():
            key = plan_key(point.dataset, point.train_fraction)
            dataset = datasets[key] if point.train_fraction == 1 else subsets[key]
            trials.append(
                make_trial(
                    spec,
                    paths,
                    dataset,
                    inits[(point.model, point.init)],
                    point,
                    trial_name(spec, point),
                    privacy=privacy_plans[(dataset.key, point.target_epsilon, point.privacy_unit)],
                    provenance_tags=tags,
                )
            )
    proxy = _proxy(spec, paths, datasets, privacy_plans, inits, dry_run, notes)
    return SweepPlan(
        spec,
        paths,
        trials,
        datasets,
        privacy_plans,
        inits,
        tuple(dict.fromkeys(notes)),
        pretrain_n,
        subsets,
        selections,
        proxy,
    )


def _subset_fix(dataset: DatasetPlan) -> str:
    """The fix a subset's planning error adds."""
    if dataset.train_fraction == 1:
        return ""
    return f" (data.train_fraction = {dataset.train_fraction:g} trains on {dataset.n_train} images); or raise it"


def _selections(spec: SweepSpec, datasets: dict[str, DatasetPlan], cache_path: Path) -> dict[str, Any]:
    """A private selection's calibrated cells (`sweeps.selection.plan_selections`); none for other searches."""
    if spec.search != "private_selection":
        return {}
    from sweeps.selection import plan_selections

    return dict(plan_selections(spec, datasets, cache_path))


def _proxy(
    spec: SweepSpec,
    paths: SweepPaths,
    datasets: dict[str, DatasetPlan],
    privacy_plans: dict[tuple[str, float, str], PrivacyConfig],
    inits: dict[tuple[str, str], ResolvedInit],
    dry_run: bool,
    notes: list[str],
) -> Any:
    """A proxy search's phase 1 (`sweeps.proxy.plan_proxy`); None for other searches."""
    if spec.search != "proxy":
        return None
    from sweeps.proxy import plan_proxy

    proxy: Any = plan_proxy(spec, paths, datasets, privacy_plans, inits, dry_run, notes)
    return proxy


def _largest_batch(spec: SweepSpec) -> tuple[int, str]:
    """The largest expected batch a trial may use, and where the sweep file sets it. Optuna: the range's high end, which
    the adaptive tuning bound covers (`sweeps.tuning_cost`); private selection: the largest choice."""
    if spec.optuna is not None:
        return max(spec.optuna.expected_batch_size), "the largest of optuna.expected_batch_size"
    if spec.selection is not None:
        return max(spec.selection.expected_batch_size), "the largest of selection.expected_batch_size"
    return spec.privacy.expected_batch_size, "privacy.expected_batch_size"


def _dataset_plans(
    spec: SweepSpec, paths: SweepPaths, dry_run: bool, notes: list[str]
) -> tuple[dict[str, DatasetPlan], dict[str, DatasetPlan], int | None]:
    """Prepare (for a dry run: draw, read or estimate, `_manifest`) every dataset the sweep reads; plans for the
    training sets, for their subsets (``data.train_fraction`` below 1, by `DatasetPlan.key`) and the pretrain
    dataset's training-split size."""
    from sweeps.estimate import ESTIMATED_TRAIN_IMAGES, ESTIMATED_TRAIN_PATIENTS

    datasets: dict[str, DatasetPlan] = {}
    subsets: dict[str, DatasetPlan] = {}
    fractions = [f for f in spec.axes.train_fraction if f != 1]
    pretrain_n = None
    pretrain = [spec.pretrain.dataset] if spec.pretrain else []
    for name in dict.fromkeys((*spec.data.train, *spec.data.external, *pretrain)):
        try:
            manifest = _manifest(spec, paths, name, dry_run)
        except (FileNotFoundError, ValueError) as error:
            if not (dry_run and name in ESTIMATED_TRAIN_IMAGES):
                raise SpecError(f"{spec.source}: data: {error}") from None
            notes.append(str(error))
            n_train, estimated = ESTIMATED_TRAIN_IMAGES[name], True
            n_patients, patient_images = ESTIMATED_TRAIN_PATIENTS.get(name), None
            train = None
        else:
            train = manifest[manifest["split"] == "train"]
            n_train, estimated = len(train), False
            n_patients, patient_images = _patients(train)
        if name in spec.data.train:
            datasets[name] = _dataset_plan(spec, name, n_train, estimated, n_patients, patient_images)
            for fraction in fractions:
                if train is None:  # estimated: the subset's share of the estimates
                    n_sub = math.ceil(fraction * n_train)
                    patients_sub = None if n_patients is None else math.ceil(fraction * n_patients)
                    plan = _dataset_plan(spec, name, n_sub, True, patients_sub, None, fraction)
                else:
                    keep = train_subset(train["patient_id"].to_numpy(), subset_key(paths.data_root, name), fraction)
                    subset = train[keep]
                    plan = _dataset_plan(spec, name, len(subset), False, *_patients(subset), fraction)
                subsets[plan.key] = plan
        if name in pretrain:
            pretrain_n = n_train
    return datasets, subsets, pretrain_n


def _patients(train: pd.DataFrame) -> tuple[int | None, int]:
    """(N_patients, the largest number of images of one patient) of a training split; (None, 1) without patient
    ids (every patient id an image id)."""
    has_ids = bool((train["patient_id"].astype(str) != train["image_id"].astype(str)).any())
    n_patients = int(train["patient_id"].nunique()) if has_ids else None
    return n_patients, int(train["patient_id"].value_counts().max()) if has_ids and len(train) else 1


def _dataset_plan(
    spec: SweepSpec,
    name: str,
    n_train: int,
    estimated: bool,
    n_patients: int | None,
    patient_images: int | None,
    train_fraction: float = 1.0,
) -> DatasetPlan:
    """The plan of a training set (or subset) of ``n_train`` images: its image-level q and steps."""
    plan = DatasetPlan(name, n_train, 0.0, 0, estimated, n_patients, patient_images, train_fraction)
    if spec.search == "grid" and spec.privacy.expected_batch_size > n_train:
        raise SpecError(
            f"{spec.source}: privacy.expected_batch_size = {spec.privacy.expected_batch_size} is "
            f"larger than {plan.key}'s {n_train} training images; choose at most {n_train}" + _subset_fix(plan)
        )
    q, steps = schedule(spec.privacy, n_train)
    return dataclasses.replace(plan, sample_rate=q, steps=steps)


def _manifest(spec: SweepSpec, paths: SweepPaths, name: str, dry_run: bool) -> pd.DataFrame:
    """A dataset's image list (columns split, image_id, patient_id). The real run prepares the dataset first
    (`ensure_prepared`: a synthetic one is generated); a dry run writes nothing: a synthetic dataset's list is drawn
    in memory (`sample_cohort`: the cohort its preparation would write, without pixels) and a real one's is read
    where it is prepared (`prepared_folder`, else FileNotFoundError as from `ensure_prepared`).

    Raises:
        FileNotFoundError: a real dataset is not prepared.
        ValueError: an unknown dataset, or a real one prepared with an outdated split.
    """
    columns = ["split", "image_id", "patient_id"]
    if not dry_run:
        folder = ensure_prepared(name, paths.data_root, spec.data.image_size, spec.data.synthetic_images)
    elif name in SYNTHETIC_DATASETS:
        return sample_cohort(name, spec.data.synthetic_images)[0][columns]
    else:
        check_dataset_name(name)
        folder = prepared_folder(name, paths.data_root, spec.data.image_size)
    return pd.read_parquet(folder / N.MANIFEST_FILE, columns=columns)


PLANNED_FIELDS = ("expected_batch_size", "epochs", "label_count_noise_multiplier", *PrivacyConfig.DERIVED)
"""What a trial takes from its cell's planned privacy config (`make_trial`)."""


def cell_privacy(spec: SweepSpec, target_epsilon: float, unit: PrivacyUnit) -> PrivacyConfig:
    """The privacy config of one (target, unit) cell before planning (`plan_privacy` fills sigma, q, steps): the
    sweep's settings, the label-count release decided (`label_count_noise_multiplier`) and the image cap kept for
    patient-level trials only. Its clip norm is the field's default: each trial takes only the planned fields
    (`make_trial`), its clip norm is its grid point's."""
    settings = {f.name: getattr(spec.privacy, f.name) for f in fields(spec.privacy)}
    return PrivacyConfig(
        **{
            **settings,
            "max_images_per_patient": spec.privacy.max_images_per_patient if unit == "patient" else None,
            "label_count_noise_multiplier": label_count_noise_multiplier(spec, is_private(target_epsilon)),
        },
        target_epsilon=target_epsilon,
        privacy_unit=unit,
    )


def label_count_noise_multiplier(spec: SweepSpec, private: bool) -> float | None:
    """sigma_c of the label-count release a private ``pos_weight: train`` trial makes (None: no release)."""
    if spec.training.pos_weight != "train" or not private:
        return None
    return spec.privacy.label_count_noise_multiplier or DEFAULT_LABEL_COUNT_NOISE_MULTIPLIER


def provenance_tags() -> dict[str, str]:
    return {f"{N.TAG_PREFIX}{k}": v for k, v in provenance().items()}


def make_trial(
    spec: SweepSpec,
    paths: SweepPaths,
    dataset: DatasetPlan,
    init: ResolvedInit,
    point: GridPoint,
    name: TrialName,
    *,
    privacy: PrivacyConfig,
    provenance_tags: dict[str, str],
    extra_params: dict[str, Any] | None = None,
) -> TrialPoint:
    """One trial (grid point or Optuna proposal), the one place a trial is made: its config
    (`SweepSpec.trial_config` with the planned privacy), MLflow params (`TrialConfig.to_flat` plus the training-set
    size and the search mode), its run's tags (`trainables.point.run_tags`, the privacy setup, ``provenance_tags``)
    and its key and run name (``name``: `trial_name`, or an Optuna proposal's). ``privacy`` is the cell's planned
    config (`plan_privacy` for the point's dataset, target and unit): the trial takes its planned fields; its clip
    norm is the point's."""
    unit = point.privacy_unit
    n_records = dataset.n_records(unit)
    config = spec.trial_config(
        point,
        data_root=str(paths.data_root),
        init_weights=init.weights,
        **{name: getattr(privacy, name) for name in PLANNED_FIELDS},
    )
    p = config.privacy
    guarantee = guarantee_statement(p, n_records, pos_weight=config.pos_weight)
    patients: dict[str, float] = {"n_patients": n_records} if unit == "patient" else {}
    if spec.axes.train_fraction != (1.0,):  # a data-scale sweep: every trial says its fraction and N_patients
        counted = {} if dataset.n_patients is None else {"n_patients": dataset.n_patients}
        patients = {"train_fraction": point.train_fraction, **counted, **patients}
    params = {
        **{k: str(v) if isinstance(v, list) else v for k, v in config.to_flat().items()},
        "n_train": dataset.n_train,
        **patients,
        "search": spec.search,
        N.GUARANTEE: guarantee,
        **(extra_params or {}),
    }
    tags = {
        f"{N.TAG_PREFIX}{k}": v
        for k, v in {
            "privacy_unit": p.privacy_unit,
            "accountant": p.accountant,
            "adjacency": f"add/remove one {p.privacy_unit}; N_{'train' if unit == 'image' else 'patients'} treated as "
            "public",
            "dp_guarantee": str(has_dp_guarantee(p)).lower(),
            "pos_weight": config.pos_weight,
            "init": point.init,
            "model": point.model,
            "dataset": dataset.name,
            "secure_mode": str(p.secure_mode).lower(),
            "reproducible_noise": str(p.reproducible_noise).lower(),
            "search": spec.search,
        }.items()
    }
    return TrialPoint(
        name.key, name.run_name, config, init, params, {**run_tags(name.key, config), **tags, **provenance_tags}
    )


def _resolve(
    spec: SweepSpec, paths: SweepPaths, model: str, init: str, run_pretrain_stage: bool, log: Log
) -> ResolvedInit:
    domain_checkpoint = None
    if init == "domain":
        domain_checkpoint = ensure_pretrained(spec, paths, model, run_pretrain_stage, log)
    try:
        return resolve_init(init, model, spec.init_weights_for(init, model), domain_checkpoint)
    except InitError as error:
        raise SpecError(f"{spec.source}: inits: {error}") from None


def ensure_pretrained(
    spec: SweepSpec, paths: SweepPaths, model: str, run_if_missing: bool = True, log: Log = print
) -> Path:
    """The domain init's checkpoint for ``model``; runs the pretrain stage first when it is absent."""
    pretrain = spec.pretrain
    assert pretrain is not None
    out_dir = pretrain_dir(paths.runs_root, pretrain, model, spec.data.image_size)
    checkpoint = out_dir / N.PRETRAINED_WEIGHTS_FILE
    if checkpoint.exists() or not run_if_missing:
        return checkpoint
    try:
        start = resolve_init(pretrain.init, model, spec.init_weights_for(pretrain.init, model))
    except InitError as error:
        raise SpecError(f"{spec.source}: pretrain.init: {error}") from None
    log(f"pretrain: {model} on {pretrain.dataset} from {pretrain.init} -> {out_dir}")
    return run_pretrain(
        pretrain, start, model, spec.data.image_size, paths.data_root, out_dir, threads=max(1, os.cpu_count() or 1)
    )
