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
class SweepPlan:
    spec: SweepSpec
    paths: SweepPaths
    trials: list[PlannedTrial]
    n_train: int
    sample_rate: float
    steps: int
    noise_multipliers: dict[float, float] = field(default_factory=dict)


def trial_key(point: dict[str, Any]) -> str:
    eps = "inf" if math.isinf(point["target_epsilon"]) else f"{point['target_epsilon']:g}"
    return f"{point['init']}-eps{eps}-clip{point['max_grad_norm']:g}-lr{point['lr']:g}-seed{point['seed']}"


def spec_fingerprint(spec: SweepSpec) -> str:
    """Hash of everything that defines the sweep's trials (not where its file lives)."""
    settings = {k: v for k, v in asdict(spec).items() if k not in ("source", "description")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(spec: SweepSpec, paths: SweepPaths, *, run_pretrain_stage: bool = True, log=print) -> SweepPlan:
    """Everything that can fail because of the user's input, checked before any trial starts."""
    image_size = spec.data.image_size
    for name in (spec.data.train, *spec.data.external, *([spec.pretrain.dataset] if spec.pretrain else [])):
        try:
            ensure_prepared(name, paths.data_root, image_size, spec.data.synthetic_images)
        except (FileNotFoundError, ValueError) as error:
            raise SpecError(f"{spec.source}: data: {error}") from None
    manifest = pd.read_parquet(paths.data_root / spec.data.train / str(image_size) / MANIFEST_FILE, columns=["split"])
    n_train = int((manifest["split"] == "train").sum())
    p = spec.privacy
    sample_rate, steps = sample_rate_and_steps(n_train, p.expected_batch_size, p.epochs)
    noise: dict[float, float] = {}
    for i, eps in enumerate(p.epsilons):
        try:
            validate_privacy_parameters(eps, p.delta, n_train, sample_rate, steps)
        except ValueError as error:
            raise SpecError(f"{spec.source}: privacy.epsilons[{i}] / privacy.delta: {error}") from None
        noise[eps] = calibrate_noise_multiplier(
            eps, p.delta, sample_rate, steps, accountant=p.accountant, tolerance=p.calibration_tolerance,
            cache_path=paths.runs_root / CALIBRATION_CACHE,
        )
    inits = {name: _resolve(spec, paths, name, run_pretrain_stage, log) for name in spec.inits}
    common = provenance()
    trials = []
    for point in spec.grid():
        eps = point["target_epsilon"]
        config = TrialConfig(
            sweep=spec.name, dataset=spec.data.train, data_root=str(paths.data_root), image_size=image_size,
            model=spec.model, init=point["init"], init_weights=inits[point["init"]].weights, lr=point["lr"],
            seed=point["seed"],
            privacy=PrivacyConfig(
                target_epsilon=eps, delta=p.delta, max_grad_norm=point["max_grad_norm"],
                expected_batch_size=p.expected_batch_size, epochs=p.epochs, accountant=p.accountant,
                privacy_unit=p.privacy_unit, secure_mode=p.secure_mode, noise_multiplier=noise[eps],
                sample_rate=sample_rate if math.isfinite(eps) else 0.0, steps=steps,
            ),
            speed=SpeedConfig(**asdict(spec.speed)), weight_decay=spec.training.weight_decay,
            input_mean=spec.data.input_mean, input_std=spec.data.input_std,
            pos_weight=spec.training.pos_weight, external_datasets=spec.data.external,
            model_selection=spec.training.model_selection, eval_test_every_epoch=spec.evaluation.test_every_epoch,
            n_boot=spec.evaluation.n_boot, age_edges=spec.evaluation.age_edges,
            calibration_tolerance=p.calibration_tolerance,
        )
        params = {
            "init": point["init"], "target_epsilon": eps, "noise_multiplier": noise[eps],
            "sample_rate": config.privacy.sample_rate, "steps": steps, "delta": p.delta, "accountant": p.accountant,
            "max_grad_norm": point["max_grad_norm"], "lr": point["lr"], "seed": point["seed"], "model": spec.model,
            "privacy_unit": p.privacy_unit, "expected_batch_size": p.expected_batch_size, "epochs": p.epochs,
            "dataset": spec.data.train, "n_train": n_train, "image_size": image_size,
            "pos_weight": spec.training.pos_weight, "grad_sample_mode": spec.speed.grad_sample_mode,
        }
        tags = {"dpsweep.privacy_unit": p.privacy_unit, "dpsweep.accountant": p.accountant,
                "dpsweep.private": str(math.isfinite(eps)).lower(), "dpsweep.pos_weight": spec.training.pos_weight,
                "dpsweep.init": point["init"], **{f"dpsweep.{k}": v for k, v in common.items()}}
        trials.append(PlannedTrial(trial_key(point), config, inits[point["init"]], params, tags))
    return SweepPlan(spec, paths, trials, n_train, sample_rate, steps, noise)


def _resolve(spec: SweepSpec, paths: SweepPaths, init: str, run_pretrain_stage: bool, log) -> ResolvedInit:
    domain_checkpoint = None
    if init == "domain":
        domain_checkpoint = ensure_pretrained(spec, paths, run_pretrain_stage, log)
    try:
        return resolve_init(init, spec.model, spec.init_weights.get(init), domain_checkpoint)
    except InitError as error:
        raise SpecError(f"{spec.source}: inits: {error}") from None


def ensure_pretrained(spec: SweepSpec, paths: SweepPaths, run_if_missing: bool = True, log=print) -> Path:
    """The domain init's checkpoint; runs the pretrain stage first when it is absent."""
    assert spec.pretrain is not None
    pretrain = PretrainConfig(**asdict(spec.pretrain), input_mean=spec.data.input_mean,
                              input_std=spec.data.input_std)
    out_dir = pretrain_dir(paths.runs_root, pretrain, spec.model, spec.data.image_size)
    checkpoint = out_dir / CHECKPOINT_FILE
    if checkpoint.exists() or not run_if_missing:
        return checkpoint
    try:
        start = resolve_init(pretrain.init, spec.model, spec.init_weights.get(pretrain.init))
    except InitError as error:
        raise SpecError(f"{spec.source}: pretrain.init: {error}") from None
    log(f"pretrain: {spec.model} on {pretrain.dataset} from {pretrain.init} -> {out_dir}")
    return run_pretrain(pretrain, start, spec.model, spec.data.image_size, paths.data_root, out_dir,
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
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    trainable = tune.with_resources(dp_trial, {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    experiment_path = paths.ray_storage / spec.name
    if tune.Tuner.can_restore(str(experiment_path)):
        log(f"resuming sweep {spec.name!r} from {experiment_path}")
        tuner = tune.Tuner.restore(str(experiment_path), trainable, resume_errored=True)
    else:
        callback = MlflowSweepCallback(paths.tracking_uri, experiment_id, parent, spec.name)
        tuner = tune.Tuner(
            trainable,
            param_space={"point": tune.grid_search([t.as_ray_point() for t in plan.trials])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent or None),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(paths.ray_storage),
                callbacks=[callback, ProgressCallback(), CSVLoggerCallback(), JsonLoggerCallback()],
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            ),
        )
    results = tuner.fit()
    trials, epochs = build_tables(results_to_records(results), run_ids(client, experiment_id, parent))
    trials.to_parquet(sweep_dir / TRIALS_FILE, index=False)
    epochs.to_parquet(sweep_dir / EPOCHS_FILE, index=False)
    complete = bool(len(trials)) and (trials["status"] == "TERMINATED").all() and len(trials) == len(plan.trials)
    _write_state(state_file, fingerprint, "complete" if complete else "incomplete")
    cost = tuning_cost(trials)
    summary = {} if cost is None else {M.TUNING_EPSILON: cost.epsilon}
    finish_parent(paths.tracking_uri, parent, "FINISHED" if complete else "FAILED", summary=summary,
                  artifacts=[sweep_dir / TRIALS_FILE, sweep_dir / EPOCHS_FILE])
    return trials


def tuning_cost(trials: pd.DataFrame):
    """Epsilon of releasing the best trial after the whole grid (RDP composition of every private trial run
    on the same data: the grid's trial count is fixed, so Papernot-Steinke random-count bounds do not apply).
    None when the sweep has no private trial."""
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


def trial_record(point: dict[str, Any], final: dict[str, Any], history: pd.DataFrame | None, status: str,
                 error: str | None) -> dict[str, Any]:
    """One trial as a plain record for `analysis.tables.build_tables` (analysis never imports Ray).

    ``status``: TERMINATED (final report received), ERROR (failed after its retries) or INCOMPLETE (pending or
    running when the driver stopped; a resumed sweep continues it).
    """
    from trainables.trial import DONE

    finished = bool(final.get(DONE))
    epoch_rows = []
    if history is not None and len(history):
        done = history[DONE].fillna(False).astype(bool) if DONE in history else False
        epoch_rows = history[~done].to_dict("records")
    return {"key": point["key"], "status": "TERMINATED" if finished and status != "ERROR" else status,
            "error": error, "params": point["params"], "tags": point["tags"], "final": final if finished else {},
            "epochs": epoch_rows}


def results_to_records(results) -> list[dict[str, Any]]:
    """Records of a finished `Tuner.fit()`."""
    return [
        trial_record(result.config["point"], result.metrics or {}, result.metrics_dataframe,
                     "ERROR" if result.error is not None else "INCOMPLETE",
                     None if result.error is None else str(result.error).splitlines()[0][:500])
        for result in results
    ]


def rebuild_tables(spec: SweepSpec, paths: SweepPaths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and epoch tables from the sweep's Ray experiment folder, finished or not (`dpsweep table`).

    Works on a partially finished, interrupted or resumed sweep: trials that never sent their final report are
    INCOMPLETE, failed ones ERROR. Writes ``trials.parquet`` and ``epochs.parquet`` and returns them.
    """
    from ray.tune import ExperimentAnalysis

    experiment = paths.ray_storage / spec.name
    if not experiment.exists():
        raise SpecError(f"no Ray results for sweep {spec.name!r} at {experiment}; run `dpsweep sweep {spec.source}`")
    analysis = ExperimentAnalysis(str(experiment))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        status = {"ERROR": "ERROR"}.get(trial.status, "INCOMPLETE")
        error = f"failed; see {getattr(trial, 'path', trial.trial_id)}" if trial.status == "ERROR" else None
        history = frames.get(trial.trial_id)
        records.append(trial_record(trial.config["point"], trial.last_result or {}, history, status, error))
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
    return {"model": spec.model, "dataset": spec.data.train, "external": ",".join(spec.data.external),
            "inits": ",".join(spec.inits), "epsilons": ",".join(f"{e:g}" for e in p.epsilons), "delta": p.delta,
            "accountant": p.accountant, "epochs": p.epochs, "expected_batch_size": p.expected_batch_size,
            "n_train": plan.n_train, "sample_rate": plan.sample_rate, "steps": plan.steps,
            "n_trials": len(plan.trials), "privacy_unit": p.privacy_unit}


def describe_plan(plan: SweepPlan) -> str:
    p = plan.spec.privacy
    lines = [f"sweep {plan.spec.name!r}: {len(plan.trials)} trials on {plan.spec.data.train} "
             f"(N_train={plan.n_train}, q={plan.sample_rate:.5f}, steps={plan.steps}, delta={p.delta:g}, "
             f"accountant={p.accountant})"]
    for eps, sigma in plan.noise_multipliers.items():
        lines.append(f"  target epsilon {eps:g}: noise multiplier {sigma:.4f}" if math.isfinite(eps)
                     else "  target epsilon inf: non-private baseline (no clipping, no noise)")
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
