"""Run a sweep: plan it (data, inits, sigma per target), then Ray Tune + MLflow, then the trial tables.

    SweepSpec --plan_sweep--> SweepPlan (prepared data, calibrated sigma, resolved inits, one TrialConfig
    per grid point; every user error raised here, before Ray starts) --run_sweep--> Tuner.fit() or
    Tuner.restore() --> runs/<sweep>/trials.parquet, epochs.parquet (+ MLflow parent/child runs)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.tables import EPOCHS_FILE, TRIALS_FILE, build_tables, provenance
from sweeps.spec import SpecError, SweepSpec
from trainables import metrics as M
from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
from trainables.data.cache import MANIFEST_FILE
from trainables.data.registry import ensure_prepared
from trainables.models import InitError, ResolvedInit, resolve_init
from trainables.pretrain import CHECKPOINT_FILE, PretrainConfig, pretrain_dir, run_pretrain
from trainables.privacy.accounting import (
    calibrate_noise_multiplier,
    sample_rate_and_steps,
    validate_privacy_parameters,
)

STATE_FILE = "sweep.json"
CALIBRATION_CACHE = "calibration_cache.json"


@dataclass(frozen=True)
class SweepPaths:
    """Absolute locations of everything a sweep reads and writes."""

    runs_root: Path
    data_root: Path
    tracking_uri: str

    @classmethod
    def for_spec(cls, spec: SweepSpec, runs: str | None = None, data: str | None = None) -> SweepPaths:
        runs_root = Path(runs or os.environ.get("DPSWEEP_RUNS") or spec.runs).resolve()
        data_root = Path(data or os.environ.get("DPSWEEP_DATA") or spec.data.root).resolve()
        uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_root / 'mlflow.db'}"
        return cls(runs_root, data_root, uri)

    def sweep_dir(self, spec: SweepSpec) -> Path:
        return self.runs_root / spec.name

    @property
    def ray_storage(self) -> Path:
        return self.runs_root / "ray"


@dataclass(frozen=True)
class PlannedTrial:
    """One grid point, ready for Ray: its key, config, resolved init, and what MLflow records."""

    key: str
    config: TrialConfig
    init: ResolvedInit
    params: dict[str, Any]
    tags: dict[str, str]

    def as_ray_point(self) -> dict[str, Any]:
        return {"key": self.key, "trial": self.config.to_flat(), "init": asdict(self.init),
                "params": self.params, "tags": self.tags}


@dataclass(frozen=True)
class DatasetPlan:
    """A training set's size and, for the sweep's batch size and epochs, its sampling rate and step count.

    ``estimated``: the dataset is not prepared (dry runs only); ``n_train`` is then the documented estimate of
    `sweeps.estimate.ESTIMATED_TRAIN_IMAGES`, and sigma is recalibrated on the real N when the sweep runs."""

    name: str
    n_train: int
    sample_rate: float
    steps: int
    estimated: bool = False


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    paths: SweepPaths
    trials: list[PlannedTrial]  # grid mode; empty for search: optuna (trials are proposed while it runs)
    datasets: dict[str, DatasetPlan]
    noise_multipliers: dict[tuple[str, float], float] = field(default_factory=dict)  # (dataset, eps) -> sigma
    inits: dict[tuple[str, str], ResolvedInit] = field(default_factory=dict)  # (model, init) -> weights
    notes: tuple[str, ...] = ()  # dry run: what must be fixed before the sweep can run
    pretrain_n: int | None = None  # training images of the pretrain dataset (the domain init), if any

    @property
    def n_trials(self) -> int:
        if self.spec.search == "optuna":
            return len(self.spec.cells()) * self.spec.optuna.trials_per_target
        return len(self.trials)


def trial_key(spec: SweepSpec, point: dict[str, Any]) -> str:
    """``<init>-eps<eps>-clip<C>-lr<lr>-seed<seed>``, prefixed by the model and dataset when the sweep has
    several of them (``convnext_small-chexpert-imagenet-eps1-...``)."""
    eps = "inf" if math.isinf(point["target_epsilon"]) else f"{point['target_epsilon']:g}"
    key = f"{point['init']}-eps{eps}-clip{point['max_grad_norm']:g}-lr{point['lr']:g}-seed{point['seed']}"
    return cell_prefix(spec, point["model"], point["dataset"]) + key


def cell_prefix(spec: SweepSpec, model: str, dataset: str) -> str:
    return (f"{model}-" if len(spec.models) > 1 else "") + (f"{dataset}-" if len(spec.data.train) > 1 else "")


def spec_fingerprint(spec: SweepSpec) -> str:
    """Hash of everything that defines the sweep's trials (not where its file lives)."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("source", "description")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(spec: SweepSpec, paths: SweepPaths, *, run_pretrain_stage: bool = True, dry_run: bool = False,
               log=print) -> SweepPlan:
    """Everything that can fail because of the user's input, checked before any trial starts.

    ``dry_run``: nothing is trained or required: unprepared real datasets use their documented size estimate
    and missing weights become notes (`SweepPlan.notes`) instead of errors."""
    from sweeps.estimate import ESTIMATED_TRAIN_IMAGES

    notes: list[str] = []
    datasets: dict[str, DatasetPlan] = {}
    p = spec.privacy
    pretrain_n = None
    for name in (*spec.data.train, *spec.data.external, *([spec.pretrain.dataset] if spec.pretrain else [])):
        try:
            ensure_prepared(name, paths.data_root, spec.data.image_size, spec.data.synthetic_images)
        except (FileNotFoundError, ValueError) as error:
            if not (dry_run and name in ESTIMATED_TRAIN_IMAGES):
                raise SpecError(f"{spec.source}: data: {error}") from None
            notes.append(str(error))
            n_train, estimated = ESTIMATED_TRAIN_IMAGES[name], True
        else:
            manifest = pd.read_parquet(paths.data_root / name / str(spec.data.image_size) / MANIFEST_FILE,
                                       columns=["split"])
            n_train, estimated = int((manifest["split"] == "train").sum()), False
        if name in spec.data.train:
            datasets[name] = _dataset_plan(spec, name, n_train, estimated)
        if spec.pretrain is not None and name == spec.pretrain.dataset:
            pretrain_n = n_train
    noise: dict[tuple[str, float], float] = {}
    for dataset in datasets.values():
        for i, eps in enumerate(p.epsilons):
            try:
                validate_privacy_parameters(eps, p.delta, dataset.n_train, dataset.sample_rate, dataset.steps)
            except ValueError as error:
                raise SpecError(f"{spec.source}: privacy.epsilons[{i}] / privacy.delta ({dataset.name}): "
                                f"{error}") from None
            if spec.search == "grid":
                noise[(dataset.name, eps)] = calibrate_noise_multiplier(
                    eps, p.delta, dataset.sample_rate, dataset.steps, accountant=p.accountant,
                    tolerance=p.calibration_tolerance, cache_path=paths.runs_root / CALIBRATION_CACHE,
                )
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
    provenance_tags = {f"dpsweep.{k}": v for k, v in provenance().items()}
    trials = []
    if spec.search == "grid":
        for point in spec.grid():
            dataset = datasets[point["dataset"]]
            trials.append(make_trial(
                spec, paths, dataset, inits[(point["model"], point["init"])], point, trial_key(spec, point),
                noise_multiplier=noise[(dataset.name, point["target_epsilon"])],
                expected_batch_size=p.expected_batch_size, epochs=p.epochs, provenance_tags=provenance_tags,
            ))
    return SweepPlan(spec, paths, trials, datasets, noise, inits, tuple(dict.fromkeys(notes)), pretrain_n)


def _dataset_plan(spec: SweepSpec, name: str, n_train: int, estimated: bool = False) -> DatasetPlan:
    q, steps = sample_rate_and_steps(n_train, spec.privacy.expected_batch_size, spec.privacy.epochs)
    return DatasetPlan(name, n_train, q, steps, estimated)


def make_trial(spec: SweepSpec, paths: SweepPaths, dataset: DatasetPlan, init: ResolvedInit, point: dict[str, Any],
               key: str, *, noise_multiplier: float, expected_batch_size: int, epochs: int,
               provenance_tags: dict[str, str], extra_params: dict[str, Any] | None = None) -> PlannedTrial:
    """One trial (grid point or Optuna proposal): its config, MLflow params and tags.

    ``point`` has model, dataset, init, target_epsilon, max_grad_norm, lr, seed."""
    p = spec.privacy
    eps = point["target_epsilon"]
    private = math.isfinite(eps)
    sample_rate, steps = sample_rate_and_steps(dataset.n_train, expected_batch_size, epochs)
    external = tuple(name for name in spec.data.external if name != dataset.name)
    config = TrialConfig(
        sweep=spec.name, dataset=dataset.name, data_root=str(paths.data_root), image_size=spec.data.image_size,
        model=point["model"], init=point["init"], init_weights=init.weights, lr=point["lr"], seed=point["seed"],
        privacy=PrivacyConfig(
            target_epsilon=eps, delta=p.delta, max_grad_norm=point["max_grad_norm"],
            expected_batch_size=expected_batch_size, epochs=epochs, accountant=p.accountant,
            privacy_unit=p.privacy_unit, secure_mode=p.secure_mode, noise_multiplier=noise_multiplier,
            sample_rate=sample_rate if private else 0.0, steps=steps,
        ),
        speed=SpeedConfig(**asdict(spec.speed)), weight_decay=spec.training.weight_decay,
        input_mean=spec.data.input_mean, input_std=spec.data.input_std,
        pos_weight=spec.training.pos_weight, external_datasets=external,
        model_selection=spec.training.model_selection, eval_test_every_epoch=spec.evaluation.test_every_epoch,
        n_boot=spec.evaluation.n_boot, age_edges=spec.evaluation.age_edges,
        calibration_tolerance=p.calibration_tolerance,
    )
    params = {
        "init": point["init"], "target_epsilon": eps, "noise_multiplier": noise_multiplier,
        "sample_rate": config.privacy.sample_rate, "steps": steps, "delta": p.delta, "accountant": p.accountant,
        "max_grad_norm": point["max_grad_norm"], "lr": point["lr"], "seed": point["seed"], "model": point["model"],
        "privacy_unit": p.privacy_unit, "expected_batch_size": expected_batch_size, "epochs": epochs,
        "dataset": dataset.name, "n_train": dataset.n_train, "image_size": spec.data.image_size,
        "pos_weight": spec.training.pos_weight, "grad_sample_mode": spec.speed.grad_sample_mode,
        "secure_mode": p.secure_mode, "search": spec.search, **(extra_params or {}),
    }
    tags = {"dpsweep.privacy_unit": p.privacy_unit, "dpsweep.accountant": p.accountant,
            "dpsweep.private": str(private).lower(), "dpsweep.pos_weight": spec.training.pos_weight,
            "dpsweep.init": point["init"], "dpsweep.model": point["model"], "dpsweep.dataset": dataset.name,
            "dpsweep.secure_mode": str(p.secure_mode).lower(), "dpsweep.search": spec.search, **provenance_tags}
    return PlannedTrial(key, config, init, params, tags)


def _resolve(spec: SweepSpec, paths: SweepPaths, model: str, init: str, run_pretrain_stage: bool,
             log) -> ResolvedInit:
    domain_checkpoint = None
    if init == "domain":
        domain_checkpoint = ensure_pretrained(spec, paths, model, run_pretrain_stage, log)
    try:
        return resolve_init(init, model, spec.init_weights_for(init, model), domain_checkpoint)
    except InitError as error:
        raise SpecError(f"{spec.source}: inits: {error}") from None


def ensure_pretrained(spec: SweepSpec, paths: SweepPaths, model: str, run_if_missing: bool = True,
                      log=print) -> Path:
    """The domain init's checkpoint for ``model``; runs the pretrain stage first when it is absent."""
    assert spec.pretrain is not None
    pretrain = PretrainConfig(**asdict(spec.pretrain), input_mean=spec.data.input_mean,
                              input_std=spec.data.input_std)
    out_dir = pretrain_dir(paths.runs_root, pretrain, model, spec.data.image_size)
    checkpoint = out_dir / CHECKPOINT_FILE
    if checkpoint.exists() or not run_if_missing:
        return checkpoint
    try:
        start = resolve_init(pretrain.init, model, spec.init_weights_for(pretrain.init, model))
    except InitError as error:
        raise SpecError(f"{spec.source}: pretrain.init: {error}") from None
    log(f"pretrain: {model} on {pretrain.dataset} from {pretrain.init} -> {out_dir}")
    return run_pretrain(pretrain, start, model, spec.data.image_size, paths.data_root, out_dir,
                        threads=max(1, os.cpu_count() or 1))


def run_sweep(spec: SweepSpec, paths: SweepPaths, *, address: str | None = None, fresh: bool = False,
              log=print) -> pd.DataFrame:
    """Run (or resume) a sweep end to end and return its trial table."""
    sweep_dir = paths.sweep_dir(spec)
    state_file = sweep_dir / STATE_FILE
    fingerprint = spec_fingerprint(spec)
    if fresh:
        _remove_sweep(spec, paths)
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state["fingerprint"] != fingerprint:
            raise SpecError(
                f"{spec.source}: a sweep named {spec.name!r} already exists in {paths.runs_root} with other settings; "
                "change `name`, or run again with --fresh to delete the old sweep's results"
            )
        if state.get("status") == "complete" and (sweep_dir / TRIALS_FILE).exists():
            log(f"sweep {spec.name!r} is complete; nothing to run (use --fresh to run it again)")
            return pd.read_parquet(sweep_dir / TRIALS_FILE)

    plan = plan_sweep(spec, paths, log=log)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_state(state_file, fingerprint, "running")
    log(describe_plan(plan))

    import mlflow.tracking
    import ray
    from mlflow.entities import Param
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from sweeps.tracking import (
        MlflowSweepCallback,
        ProgressCallback,
        finish_parent,
        get_or_create_experiment,
        get_or_create_parent_run,
    )
    from trainables.trial import dp_trial

    # Ray's TensorBoard logger warns on every infinite epsilon (the non-private baseline): keep only the
    # CSV/JSON result logs, which Ray's results read. Per-epoch checkpoints with num_to_keep=1 force a state
    # snapshot on each report; that is intended here (tiny state), so Ray's warning about it is off.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment or spec.name,
                                             paths.runs_root / "mlartifacts")
    parent = get_or_create_parent_run(client, experiment_id, spec.name,
                                      {"dpsweep.fingerprint": fingerprint, "dpsweep.spec": spec.source})
    client.log_batch(parent, params=[Param(k, str(v)) for k, v in sweep_params(plan).items()])
    ray_address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            # address="local": always a private Ray, never one an earlier `ray start` left in /tmp/ray.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    trainable = tune.with_resources(dp_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    experiment_path = paths.ray_storage / spec.name
    if tune.Tuner.can_restore(str(experiment_path)):
        log(f"resuming sweep {spec.name!r} from {experiment_path}")
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        callback = MlflowSweepCallback(paths.tracking_uri, experiment_id, parent, spec.name)
        tuner = tune.Tuner(
            trainable,
            param_space=({"point": tune.grid_search([t.as_ray_point() for t in plan.trials])}
                         if spec.search == "grid" else {}),
            tune_config=_tune_config(plan),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(paths.ray_storage),
                callbacks=[callback, ProgressCallback(), CSVLoggerCallback(), JsonLoggerCallback()],
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            ),
        )
    tuner.fit()
    trials, epochs = build_tables(experiment_records(experiment_path), run_ids(client, experiment_id, parent))
    trials.to_parquet(sweep_dir / TRIALS_FILE, index=False)
    epochs.to_parquet(sweep_dir / EPOCHS_FILE, index=False)
    complete = (len(trials) == plan.n_trials and trials["status"].isin(ENDED).all())
    _write_state(state_file, fingerprint, "complete" if complete else "incomplete")
    summary = {}
    for dataset, cost in tuning_costs(trials).items():
        summary[M.TUNING_EPSILON if len(spec.data.train) == 1 else f"{M.TUNING_EPSILON}/{dataset}"] = cost.epsilon
    finish_parent(paths.tracking_uri, parent, "FINISHED" if complete else "FAILED", summary=summary,
                  artifacts=[sweep_dir / TRIALS_FILE, sweep_dir / EPOCHS_FILE])
    return trials


ENDED = ("TERMINATED", "STOPPED")
"""Trial statuses that need no more work: finished, or stopped early by the scheduler (ASHA)."""


def _tune_config(plan: SweepPlan):
    """Grid: one Ray trial per grid point. Optuna: `PrivateOptunaSearch` behind a concurrency limit.
    Either may use ASHA early stopping on the validation macro AUROC the trial would select so far (reported every
    epoch and in the final report, as Ray requires of a scheduler's metric)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    spec = plan.spec
    scheduler = None
    if spec.early_stopping is not None:
        max_epochs = max(spec.optuna.epochs) if spec.search == "optuna" else spec.privacy.epochs
        # stop_last_trials=False: a trial that reaches its last epoch still sends its final evaluation.
        scheduler = ASHAScheduler(time_attr=M.EPOCH, metric=M.VAL_SELECTED_AUROC_MACRO, mode="max", max_t=max_epochs,
                                  grace_period=spec.early_stopping.grace_period,
                                  reduction_factor=spec.early_stopping.reduction_factor, stop_last_trials=False)
    if spec.search == "grid":
        return tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent or None, scheduler=scheduler)
    searcher = ConcurrencyLimiter(optuna_searcher(plan), max_concurrent=spec.optuna.max_concurrent)
    return tune.TuneConfig(search_alg=searcher, num_samples=plan.n_trials, scheduler=scheduler)


def optuna_searcher(plan: SweepPlan):
    """The sweep's `sweeps.search.PrivateOptunaSearch` (studies persisted in ``runs/<sweep>/optuna.db``)."""
    from sweeps.search import Cell, PrivateOptunaSearch, Ranges

    spec, o = plan.spec, plan.spec.optuna
    cells = [Cell(cell_prefix(spec, c["model"], c["dataset"]) + _cell_key(c), c["model"], c["dataset"], c["init"],
                  c["target_epsilon"], plan.datasets[c["dataset"]].n_train) for c in spec.cells()]
    ranges = Ranges(o.noise_multiplier, o.expected_batch_size, o.epochs, o.learning_rate, o.clip_norm)
    factory = OptunaTrialFactory(plan.spec, plan.paths, plan.datasets, plan.inits,
                                 {f"dpsweep.{k}": v for k, v in provenance().items()})
    sweep_dir = plan.paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return PrivateOptunaSearch(
        cells, factory, ranges=ranges, objectives=o.objectives, trials_per_cell=o.trials_per_target,
        delta=spec.privacy.delta, accountant=spec.privacy.accountant, sampler=o.sampler, seed=o.seed,
        max_proposals=o.max_proposals, study_prefix=spec.name, storage_url=f"sqlite:///{sweep_dir / OPTUNA_DB}",
    )


OPTUNA_DB = "optuna.db"


def _cell_key(cell: dict[str, Any]) -> str:
    eps = "inf" if math.isinf(cell["target_epsilon"]) else f"{cell['target_epsilon']:g}"
    return f"{cell['init']}-eps{eps}"


@dataclass(frozen=True)
class OptunaTrialFactory:
    """Turns an Optuna proposal for a cell into the same Ray trial point grid mode runs (picklable: Ray saves
    the searcher with the experiment)."""

    spec: SweepSpec
    paths: SweepPaths
    datasets: dict[str, DatasetPlan]
    inits: dict[tuple[str, str], ResolvedInit]
    provenance_tags: dict[str, str]

    def __call__(self, cell, proposal: dict[str, Any]) -> dict[str, Any]:
        private = math.isfinite(cell.target_epsilon)
        point = {"model": cell.model, "dataset": cell.dataset, "init": cell.init,
                 "target_epsilon": cell.target_epsilon, "max_grad_norm": proposal.get("max_grad_norm", 0.0),
                 "lr": proposal["lr"], "seed": self.spec.training.seeds[0]}
        trial = make_trial(
            self.spec, self.paths, self.datasets[cell.dataset], self.inits[(cell.model, cell.init)], point,
            f"{cell.key}-t{proposal['optuna_number']:03d}",
            noise_multiplier=proposal["noise_multiplier"] if private else 0.0,
            expected_batch_size=int(proposal["expected_batch_size"]), epochs=int(proposal["epochs"]),
            provenance_tags=self.provenance_tags,
            extra_params={"optuna_trial": proposal["optuna_number"], "planned_epsilon": proposal["planned_epsilon"]},
        )
        return {"point": trial.as_ray_point()}


def tuning_costs(trials: pd.DataFrame) -> dict[str, Any]:
    """Per private training set: epsilon of releasing the best trial after the whole sweep (`tuning_cost`)."""
    if "dataset" not in trials or trials.empty:
        return {}
    costs = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        cost = tuning_cost(group)
        if cost is not None:
            costs[str(dataset)] = cost
    return costs


def tuning_cost(trials: pd.DataFrame):
    """Epsilon of releasing the best trial after the whole grid (RDP composition of every private trial run
    on the same data: the grid's trial count is fixed, so Papernot-Steinke random-count bounds do not apply).
    None when the sweep has no private trial. Trials stopped early are counted with their planned steps (an
    upper bound). For ``search: optuna`` see `sweeps.search` and docs/sweep-spec.md: Optuna picks each trial's
    parameters from earlier results, which this fixed-schedule composition does not cover; the summary then
    also states the basic-composition bound, which does."""
    from trainables.privacy.tuning import TrialMechanism, tuning_epsilon

    ran = trials[trials["status"] != "INCOMPLETE"] if "status" in trials else trials
    private = ran[ran["noise_multiplier"] > 0]
    if private.empty:
        return None
    q = float(private["sample_rate"].iloc[0])  # non-private rows carry q = 0; their sigma 0 is what matters
    mechanisms = [TrialMechanism(float(r.noise_multiplier), float(r.sample_rate) or q, int(r.steps))
                  for r in ran.itertuples()]
    return tuning_epsilon(mechanisms, float(private["delta"].iloc[0]), "fixed",
                          private_trials_only=len(private) < len(ran))


def adaptive_tuning_bounds(trials: pd.DataFrame) -> dict[str, str]:
    """Per dataset of a ``search: optuna`` sweep: the basic-composition bound (Dwork, Kenthapadi, McSherry,
    Mironov, Naor 2006; holds for adaptively chosen mechanisms, Dwork and Roth 2014, Thm. 3.16) of the k
    private trials that ran, each (target epsilon, delta)-DP by construction: (k x max target, k x delta)."""
    if "search" not in trials or not (trials["search"] == "optuna").any():
        return {}
    ran = trials[(trials["status"] != "INCOMPLETE") & (trials["noise_multiplier"] > 0)]
    bounds = {}
    for dataset, group in ran.groupby("dataset", sort=False):
        k, eps, delta = len(group), float(group["target_epsilon"].max()), float(group["delta"].iloc[0])
        bounds[str(dataset)] = (f"epsilon <= {k * eps:.4g} at delta = {k * delta:.3g} (basic composition of {k} "
                                f"trials, each (epsilon <= {eps:g}, delta = {delta:g})-DP; private trials only)")
    return bounds


def trial_record(point: dict[str, Any], final: dict[str, Any], history: pd.DataFrame | None, status: str,
                 error: str | None) -> dict[str, Any]:
    """One trial as a plain record for `analysis.tables.build_tables` (analysis never imports Ray).

    ``status``: TERMINATED (final report received), STOPPED (stopped early by ASHA: no final evaluation), ERROR
    (failed after its retries) or INCOMPLETE (pending or running when the driver stopped; a resumed sweep
    continues it).
    """
    from trainables.trial import is_final_report

    finished = is_final_report(final)
    epoch_rows = []
    if history is not None and len(history):
        # Epoch rows: those without the final report's marker (Ray sets `done` on a stopped trial's last epoch).
        if M.BEST_EPOCH in history:
            history = history[history[M.BEST_EPOCH].isna()]
        epoch_rows = history.to_dict("records")
    return {"key": point["key"], "status": "TERMINATED" if finished and status != "ERROR" else status,
            "error": error, "params": point["params"], "tags": point["tags"], "final": final if finished else {},
            "epochs": epoch_rows}


def experiment_records(experiment: Path) -> list[dict[str, Any]]:
    """Records of every trial in a Ray experiment folder, finished or not."""
    from ray.tune import ExperimentAnalysis

    from trainables.trial import is_final_report

    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        # Ray marks a trial TERMINATED when it returned or when the scheduler stopped it; only the first sent
        # the final report (trial_record turns that into TERMINATED).
        status = {"ERROR": "ERROR", "TERMINATED": "STOPPED"}.get(trial.status, "INCOMPLETE")
        error = f"failed; see {getattr(trial, 'path', trial.trial_id)}" if trial.status == "ERROR" else None
        history = frames.get(trial.trial_id)
        final = trial.last_result or {}
        if not is_final_report(final) and status != "ERROR":
            # The driver's snapshot of results can lag the trial's own checkpoint (a driver killed right after a
            # trial finished): the final checkpoint then holds the final report and the whole epoch history.
            saved = _final_checkpoint(Path(trial.path))
            if saved is not None:
                final, history = saved
        records.append(trial_record(trial.config["point"], final, history, status, error))
    return records


def _final_checkpoint(trial_dir: Path) -> tuple[dict[str, Any], pd.DataFrame | None] | None:
    """The final report (``final.json``) and epoch history of a trial's final checkpoint, if it wrote one."""
    from trainables.trial import FINAL_FILE

    found = sorted(trial_dir.glob(f"checkpoint_*/{FINAL_FILE}"))
    if not found:
        return None
    epochs_file = found[-1].parent / "epochs.parquet"
    history = pd.read_parquet(epochs_file) if epochs_file.exists() else None
    return json.loads(found[-1].read_text()), history


def rebuild_tables(spec: SweepSpec, paths: SweepPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and epoch tables from the sweep's Ray experiment folder, finished or not (`dpsweep table`).

    Works on a partially finished, interrupted or resumed sweep: trials that never sent their final report are
    INCOMPLETE, failed ones ERROR, early-stopped ones STOPPED. Writes ``trials.parquet`` and ``epochs.parquet``
    and returns them.
    """
    experiment = paths.ray_storage / spec.name
    if not experiment.exists():
        raise SpecError(f"no Ray results for sweep {spec.name!r} at {experiment}; run `dpsweep sweep {spec.source}`")
    records = experiment_records(experiment)
    mlflow_runs = {}
    try:
        import mlflow.tracking

        client = mlflow.tracking.MlflowClient(paths.tracking_uri)
        experiment_meta = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
        if experiment_meta is not None:
            from sweeps.tracking import ROLE_TAG, SWEEP_TAG

            parents = client.search_runs([experiment_meta.experiment_id],
                                         f"tags.`{SWEEP_TAG}` = '{spec.name}' and tags.`{ROLE_TAG}` = 'sweep'")
            if parents:
                mlflow_runs = run_ids(client, experiment_meta.experiment_id, parents[0].info.run_id)
    except Exception as error:  # noqa: BLE001 - tables are still useful without run ids; say so
        print(f"warning: MLflow run ids not added ({error})")
    trials, epochs = build_tables(records, mlflow_runs)
    sweep_dir = paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    trials.to_parquet(sweep_dir / TRIALS_FILE, index=False)
    epochs.to_parquet(sweep_dir / EPOCHS_FILE, index=False)
    return trials, epochs


def run_ids(client, experiment_id: str, parent: str) -> dict[str, str]:
    from sweeps.tracking import PARENT_TAG, TRIAL_KEY_TAG

    runs = client.search_runs([experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'", max_results=10000)
    return {r.data.tags[TRIAL_KEY_TAG]: r.info.run_id for r in runs if TRIAL_KEY_TAG in r.data.tags}


def sweep_params(plan: SweepPlan) -> dict[str, Any]:
    """Sweep-wide settings recorded on the parent run."""
    spec, p = plan.spec, plan.spec.privacy
    datasets = list(plan.datasets.values())
    return {"model": ",".join(spec.models), "dataset": ",".join(spec.data.train),
            "external": ",".join(spec.data.external), "inits": ",".join(spec.inits),
            "epsilons": ",".join(f"{e:g}" for e in p.epsilons), "delta": p.delta, "accountant": p.accountant,
            "epochs": p.epochs, "expected_batch_size": p.expected_batch_size,
            "n_train": ",".join(str(d.n_train) for d in datasets),
            "sample_rate": ",".join(f"{d.sample_rate:g}" for d in datasets),
            "steps": ",".join(str(d.steps) for d in datasets), "n_trials": plan.n_trials,
            "privacy_unit": p.privacy_unit, "search": spec.search, "secure_mode": p.secure_mode}


def describe_plan(plan: SweepPlan) -> str:
    spec, p = plan.spec, plan.spec.privacy
    lines = [f"sweep {spec.name!r}: {plan.n_trials} trials ({spec.search}) of {', '.join(spec.models)} "
             f"(delta={p.delta:g}, accountant={p.accountant})"]
    for dataset in plan.datasets.values():
        size = f"N_train~{dataset.n_train} (estimate: not prepared)" if dataset.estimated else \
            f"N_train={dataset.n_train}"
        lines.append(f"  {dataset.name}: {size}")
        if spec.search == "optuna":
            continue
        lines[-1] += f", q={dataset.sample_rate:.5g}, steps={dataset.steps}"
        for eps in p.epsilons:
            sigma = plan.noise_multipliers.get((dataset.name, eps))
            lines.append(f"    target epsilon {eps:g}: noise multiplier {sigma:.4f}" if math.isfinite(eps)
                         else "    target epsilon inf: non-private baseline (no clipping, no noise)")
    if spec.search == "optuna":
        o = spec.optuna
        lines.append(f"  optuna: {len(spec.cells())} studies (model x dataset x init x epsilon) x "
                     f"{o.trials_per_target} trials, objectives {list(o.objectives)}, at most {o.max_concurrent} "
                     f"at once; searched: sigma {list(o.noise_multiplier)}, batch {list(o.expected_batch_size)}, "
                     f"epochs {list(o.epochs)}, lr {list(o.learning_rate)}, clip {list(o.clip_norm)}")
    return "\n".join(lines)


def dry_run_report(plan: SweepPlan) -> str:
    """What `dpsweep sweep --dry-run` prints: the plan, each trial with its sigma, GPU-hours, open issues."""
    from sweeps.estimate import describe_gpu_hours, trial_gpu_seconds

    spec = plan.spec
    lines = [describe_plan(plan)]
    total, unknown, bases = 0.0, [], set()
    if spec.search == "grid":
        for trial in plan.trials:
            privacy = trial.config.privacy
            lines.append(f"  {trial.key}: sigma={privacy.noise_multiplier:.4f}, q={privacy.sample_rate:.5g}, "
                         f"steps={privacy.steps}")
            estimate = trial_gpu_seconds(trial.config.model, spec.data.image_size, spec.speed.grad_sample_mode,
                                         plan.datasets[trial.config.dataset].n_train, privacy.expected_batch_size,
                                         privacy.steps, privacy.epochs, privacy.is_private)
            if estimate is None:
                unknown.append(trial.config.model)
            else:
                total += estimate[0]
                bases.add(f"{trial.config.model}: {estimate[1]}")
    else:
        epochs = max(spec.optuna.epochs)
        for cell in spec.cells():
            n_train = plan.datasets[cell["dataset"]].n_train
            estimate = trial_gpu_seconds(cell["model"], spec.data.image_size, spec.speed.grad_sample_mode, n_train,
                                         1, epochs * n_train, epochs, math.isfinite(cell["target_epsilon"]))
            if estimate is None:
                unknown.append(cell["model"])
            else:
                total += estimate[0] * spec.optuna.trials_per_target
                bases.add(f"{cell['model']}: {estimate[1]}, at the largest epochs {epochs}")
    if spec.pretrain is not None and "domain" in spec.inits and plan.pretrain_n:
        for model in spec.models:  # the pretrain stage: non-private, once per model (cached afterwards)
            estimate = trial_gpu_seconds(model, spec.data.image_size, "non-private", plan.pretrain_n, 1, 0,
                                         spec.pretrain.epochs, private=False)
            if estimate is not None and not Path(plan.inits[(model, "domain")].weights or "").is_file():
                total += estimate[0]
                lines.append(f"  pretrain stage ({model} on {spec.pretrain.dataset}, {spec.pretrain.epochs} epochs, "
                             f"non-private): ~{estimate[0] / 3600:,.0f} GPU-hours, run once before the trials")
    lines.append(describe_gpu_hours(total, unknown, bases))
    if plan.notes:
        lines.append("before running it for real:")
        lines.extend(f"  - {note}" for note in plan.notes)
    return "\n".join(lines)


def _write_state(path: Path, fingerprint: str, status: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fingerprint, "status": status}, indent=2))


def _remove_sweep(spec: SweepSpec, paths: SweepPaths) -> None:
    """--fresh: delete the sweep's tables and Ray state (MLflow runs are kept, the parent is recreated)."""
    for folder in (paths.sweep_dir(spec), paths.ray_storage / spec.name):
        if folder.exists():
            shutil.rmtree(folder)
    import mlflow.tracking

    from sweeps.tracking import ROLE_TAG, SWEEP_TAG

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment or spec.name)
    if experiment is not None:
        for run in client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{spec.name}'"):
            client.set_tag(run.info.run_id, SWEEP_TAG, f"{spec.name} (replaced)")
            if run.data.tags.get(ROLE_TAG) == "sweep":
                client.set_terminated(run.info.run_id, "KILLED")
