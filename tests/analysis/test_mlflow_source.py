"""Trial tables rebuilt from the MLflow tracking store alone equal those rebuilt from Ray's results.

Two tiers. Fast: the real `sweeps.tracking.MlflowSweepCallback` writes runs for hand-made trial results (finished,
non-private, failed, running, never reported, and a resumed driver) into a temporary sqlite store, and the tables
read back must equal `build_tables` of the same results given directly, as the Ray path gives them. Slow: a real
two-trial sweep run by `dpsweep sweep` in a subprocess is SIGKILLed (driver and the Ray it started, one process
group) once one trial has finished and the other is running; `dpsweep table --source ray|mlflow` must both mark
them TERMINATED and INCOMPLETE. The sweep is then resumed to the end and both sources must agree on every key,
status, parameter, epsilon, final test AUROC and per-epoch validation AUROC.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis import mlflow_source
from analysis.mlflow_source import parse_param, read_sweep, tables_from_mlflow
from analysis.tables import TableError, TrialRecord, build_tables
from tests.ray_files import read_json
from tests.sweeps.points import tiny_point
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import BOOTSTRAP_FILE, EPOCHS_FILE, GROUPS_FILE, PREDICTIONS_FILE, TRIALS_FILE
from trainables.point import run_tags

SWEEP = "mlsrc"
NODE_ID = "ray/node_id"  # `trainables.trial.NODE_ID`: a string, which MLflow does not store


# --------------------------------------------------------------------------------------------------------------
# Fast tier: the real callback, fake trials.


def point(key: str, epsilon: float) -> dict:
    params = {
        "init": "random",
        "target_epsilon": epsilon,
        "noise_multiplier": 0.0 if math.isinf(epsilon) else 1.25,
        "sample_rate": 0.0 if math.isinf(epsilon) else 0.25,
        "steps": 8,
        "delta": 6e-6,
        "accountant": "rdp",
        "max_grad_norm": 1.0,
        "lr": 0.002,
        "seed": 0,
        "model": "test_convnext",
        "privacy_unit": "image",
        "pos_weight": "uniform",
        "n_train": 256,
    }
    tags = {"dpsweep.git_commit": "abc123", "dpsweep.torch_version": "2.0", "dpsweep.init": "random"}
    made = tiny_point(epsilon, sweep=SWEEP, key=key)  # a real point, with this test's params and tags
    return dataclasses.replace(made, params=params, tags={**run_tags(key, made.config), **tags}).to_ray()


def epoch_result(epoch: int, epsilon: float, val: float) -> dict:
    return {
        M.EPOCH: epoch,
        M.STEPS: 4 * epoch,
        M.TRAIN_LOSS: 0.7 - 0.1 * epoch,
        M.VAL_AUROC_MACRO: val,
        M.EPSILON: epsilon,
        M.TEST_AUROC_MACRO_AT_EPOCH: val - 0.01,
        M.auroc_gap("val", "age"): 0.1 * epoch,
        "done": False,
        "timestamp": 1_700_000_000 + epoch,
        "training_iteration": epoch,
    }


def final_result(epsilon: float, test: float) -> dict:
    return {
        M.TEST_AUROC_MACRO: test,
        M.BEST_EPOCH: 2,
        M.STEPS: 8,
        M.EPSILON: epsilon,
        M.EPSILON_AT_BEST_EPOCH: epsilon,
        M.auroc_gap("test", "age"): 0.125,
        M.test_auroc("pneumonia"): 0.5625,  # detail: in the metrics artifact, not a metric
        M.subgroup_auroc("test", "age", "70-100"): 0.4375,
        M.PATIENT_IMAGES: 3,  # an int outside INTEGER_METRICS: the artifact keeps it an int
        NODE_ID: "f00d",
        "done": True,
        "timestamp": 1_700_000_100,
    }


# key -> (target epsilon, what happens); per-epoch epsilons and AUROCs are arbitrary exact binary fractions.
SCRIPT = {
    "random-eps2": (2.0, "finished"),
    "random-epsinf": (math.inf, "finished"),
    "random-eps8": (8.0, "failed"),
    "random-eps4": (4.0, "running"),
    "random-eps1": (1.0, "started"),
    "random-eps3": (3.0, "stopped"),  # stopped early by ASHA: ended by Ray without a final report
}


def _trial(key: str, index: int) -> SimpleNamespace:
    return SimpleNamespace(config={"point": point(key, SCRIPT[key][0])}, trial_id=f"abc_{index:05d}", checkpoint=None)


def _script_results(key: str) -> tuple[list[dict], dict]:
    epsilon, fate = SCRIPT[key]
    if fate == "started":
        return [], {}
    per_epoch = [epoch_result(e, epsilon if math.isinf(epsilon) else epsilon * e / 2, 0.5 + e / 8) for e in (1, 2)]
    if fate in ("failed", "running", "stopped"):
        return per_epoch[:1], {}
    return per_epoch, final_result(epsilon, 0.75 if math.isinf(epsilon) else 0.625)


@pytest.fixture(scope="module")
def fake_store(tmp_path_factory):
    """Runs logged by the real callback, and the records the Ray path would build from the same results."""
    pytest.importorskip("ray")
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import MlflowSweepCallback, get_or_create_experiment, get_or_create_parent_run

    runs = tmp_path_factory.mktemp("store") / "runs"
    runs.mkdir()
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, SWEEP, runs / "mlartifacts")
    parent = get_or_create_parent_run(client, experiment, SWEEP, {})
    callback = MlflowSweepCallback(uri, experiment, parent)
    trials = {key: _trial(key, i) for i, key in enumerate(SCRIPT)}
    records = []
    for key, trial in trials.items():
        per_epoch, final = _script_results(key)
        callback.on_trial_start(0, [], trial)
        for result in (*per_epoch, *([final] if final else [])):
            callback.on_trial_result(0, [], trial, result)
        fate = SCRIPT[key][1]
        if fate in ("finished", "stopped"):
            callback.on_trial_complete(0, [], trial)
        elif fate == "failed":
            callback.on_trial_error(0, [], trial)
        status = {"finished": "TERMINATED", "failed": "ERROR", "stopped": "STOPPED"}.get(fate, "INCOMPLETE")
        point = trial.config["point"]
        epochs = [{k: v for k, v in r.items() if k != "done"} for r in per_epoch]
        records.append(
            TrialRecord(
                key=point["key"],
                status=status,
                params=point["params"],
                tags=point["tags"],
                final=final or {},
                epochs=epochs,
            )
        )
    # A resumed driver: a new callback re-reads the runs; the finished trial reports its final result again.
    resumed = MlflowSweepCallback(uri, experiment, parent)
    resumed.on_trial_result(0, [], trials["random-eps2"], final_result(2.0, 0.625))
    resumed.on_trial_complete(0, [], trials["random-eps2"])
    return SimpleNamespace(uri=uri, runs=runs, parent=parent, records=records, client=client)


def test_no_infinity_and_no_detail_reaches_the_metrics(fake_store):
    """A non-private run logs no epsilon (no 1e308 stand-in), a private run's epsilon is its trial's; detail metrics
    are only in the run's metrics artifact; the reader still maps a legacy 1e308 back to inf."""
    found = read_sweep(fake_store.uri, SWEEP, SWEEP)
    for key, (target, fate) in SCRIPT.items():
        run = fake_store.client.get_run(found.run_ids[key])
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        assert tags[M.PRIVATE_TAG] == str(math.isfinite(target)).lower()
        assert params[M.BUDGET_PARAM] == ("non-private" if math.isinf(target) else f"eps={target:g}")
        assert not any(abs(v) >= 1e300 or math.isinf(v) for v in metrics.values()), metrics
        assert not any(k.startswith("dpsweep.epsilon") for k in tags)
        if math.isinf(target):
            assert not [k for k in metrics if "epsilon" in k], metrics
        elif fate != "started":
            history = fake_store.client.get_metric_history(run.info.run_id, M.EPSILON)
            expected = [target * e / 2 for e in (1, 2)][: len({m.step for m in history if m.step > 0})]
            assert [m.value for m in sorted(history, key=lambda m: m.step) if m.step > 0] == expected
        assert all(M.is_headline(k) for k in metrics), sorted(metrics)
        assert M.test_auroc("pneumonia") not in metrics
    assert mlflow_source._value(M.EPSILON, M.STORED_INFINITY) == math.inf
    assert mlflow_source._value(M.EPSILON, -M.STORED_INFINITY) == -math.inf


def test_the_parent_run_refuses_an_infinite_summary(tmp_path):
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import finish_parent, get_or_create_experiment, get_or_create_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = get_or_create_parent_run(client, get_or_create_experiment(client, "p", tmp_path), "p", {})
    with pytest.raises(ValueError, match=r"\['privacy/tuning_epsilon'\] is infinite"):
        finish_parent(uri, parent, "FINISHED", summary={M.TUNING_EPSILON: math.inf})
    assert client.get_run(parent).data.metrics == {}
    finish_parent(uri, parent, "FINISHED", summary={M.TUNING_EPSILON: 3.5})
    assert client.get_run(parent).data.metrics == {M.TUNING_EPSILON: 3.5}


def test_no_run_logs_a_training_loss(fake_store):
    """Every epoch report carried ``train/loss`` (a non-private trial's is computed on private images with no
    mechanism): no run holds it, as a metric or in its final metrics artifact."""
    found = read_sweep(fake_store.uri, SWEEP, SWEEP)
    for key, run_id in found.run_ids.items():
        assert M.TRAIN_LOSS not in fake_store.client.get_run(run_id).data.metrics, key
        assert not fake_store.client.get_metric_history(run_id, M.TRAIN_LOSS), key
    for record in found.records:
        assert M.TRAIN_LOSS not in record.final and not any(M.TRAIN_LOSS in epoch for epoch in record.epochs)


def test_child_runs_are_named_by_their_points(fake_store):
    """Each child run has its trial point's run name (the names themselves: `tests.sweeps.test_points`)."""
    found = read_sweep(fake_store.uri, SWEEP, SWEEP)
    names = {fake_store.client.get_run(run_id).info.run_name for run_id in found.run_ids.values()}
    assert names == {f"run {k}" for k in SCRIPT}


def test_tables_equal_those_built_from_the_same_results_directly(fake_store):
    trials, epochs = tables_from_mlflow(fake_store.uri, SWEEP, SWEEP)
    expected_trials, expected_epochs = build_tables(fake_store.records)
    # train/loss never reaches the shared experiment (`sweeps.tracking.NOT_SHARED`): only Ray's tables hold it.
    assert M.TRAIN_LOSS in expected_epochs and M.TRAIN_LOSS not in epochs
    expected_epochs = expected_epochs.drop(columns=M.TRAIN_LOSS)
    assert trials["trial"].tolist() == list(SCRIPT)  # Ray's trial order (trial ids)
    assert dict(zip(trials["trial"], trials["status"], strict=True)) == {
        "random-eps2": "TERMINATED",
        "random-epsinf": "TERMINATED",
        "random-eps8": "ERROR",
        "random-eps4": "INCOMPLETE",
        "random-eps1": "INCOMPLETE",
        "random-eps3": "STOPPED",
    }
    assert set(trials.columns) == set(expected_trials.columns) - {NODE_ID}  # strings never reach MLflow
    shared = [c for c in expected_trials.columns if c not in (NODE_ID, "mlflow_run_id", "error")]
    pd.testing.assert_frame_equal(trials[shared], expected_trials[shared])  # values and dtypes (ints, inf, None)
    pd.testing.assert_frame_equal(epochs[expected_epochs.columns], expected_epochs)
    assert sorted(epochs.columns) == sorted(expected_epochs.columns)
    assert trials.loc[trials["trial"] == "random-epsinf", M.EPSILON].item() == math.inf
    assert trials.loc[trials["trial"] == "random-eps8", "error"].item().startswith("failed; see MLflow run")
    assert trials["error"].isna().sum() == 5


def test_a_moved_store_reads_the_same_tables_and_takes_the_report(fake_store, tmp_path):
    """Artifact locations are ``mlflow-artifacts:/<experiment>``, resolved beside the database: the runs folder
    moved elsewhere (the old path gone) gives the same tables, whose final metrics come from the artifacts."""
    import shutil

    from sweeps.tracking import log_report

    before, before_epochs = tables_from_mlflow(fake_store.uri, SWEEP, SWEEP)
    experiment = fake_store.client.get_experiment_by_name(SWEEP)
    assert experiment.artifact_location == f"mlflow-artifacts:/{SWEEP}"
    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(fake_store.runs, moved)
    away = fake_store.runs.with_name("runs-away")
    fake_store.runs.rename(away)
    try:
        uri = f"sqlite:///{moved / 'mlflow.db'}"
        after, after_epochs = tables_from_mlflow(uri, SWEEP, SWEEP)
        pd.testing.assert_frame_equal(after, before)
        pd.testing.assert_frame_equal(after_epochs, before_epochs)
        assert after.set_index("trial").loc["random-eps2", M.test_auroc("pneumonia")] == 0.5625  # from the artifact

        report = tmp_path / "report"
        (report / "figures").mkdir(parents=True)
        (report / "index.html").write_text("<h1>first</h1>")
        (report / "figures" / "old.svg").write_text("<svg/>")
        logged = log_report(uri, SWEEP, SWEEP, report)
        (report / "figures" / "old.svg").unlink()
        (report / "index.html").write_text("<h1>second</h1>")
        assert log_report(uri, SWEEP, SWEEP, report) == logged
        parent_dir = moved / "mlartifacts" / SWEEP / fake_store.parent / "artifacts" / "report"
        assert (parent_dir / "index.html").read_text() == "<h1>second</h1>"
        assert not (parent_dir / "figures" / "old.svg").exists()  # a re-run replaces the earlier copy
        assert not away.joinpath("mlartifacts", SWEEP, fake_store.parent).exists()
        with pytest.raises(LookupError, match="no MLflow database"):
            log_report(f"sqlite:///{tmp_path / 'none.db'}", SWEEP, SWEEP, report)
        assert not (tmp_path / "none.db").exists()
        with pytest.raises(LookupError, match="no MLflow parent run of sweep 'other'"):
            log_report(uri, SWEEP, "other", report)
    finally:
        away.rename(fake_store.runs)


def test_final_metrics_need_their_artifact(fake_store, tmp_path):
    """The marker without the metrics artifact (a store moved without its artifacts) is a clear error."""
    import shutil

    copy = tmp_path / "runs"
    shutil.copytree(fake_store.runs, copy, ignore=shutil.ignore_patterns("mlartifacts"))
    with pytest.raises(TableError, match="no evaluation/metrics.parquet artifact"):
        tables_from_mlflow(f"sqlite:///{copy / 'mlflow.db'}", SWEEP, SWEEP)


def test_records_name_their_runs(fake_store):
    found = read_sweep(fake_store.uri, SWEEP, SWEEP)
    assert found.parent_run_id == fake_store.parent
    children = fake_store.client.search_runs(
        [fake_store.client.get_experiment_by_name(SWEEP).experiment_id],
        f"tags.`mlflow.parentRunId` = '{fake_store.parent}'",
    )
    assert found.run_ids == {r.data.tags["dpsweep.trial_key"]: r.info.run_id for r in children}


def test_final_metrics_without_their_marker_are_not_a_final_report(fake_store):
    from mlflow.entities import Metric

    run_id = read_sweep(fake_store.uri, SWEEP, SWEEP).run_ids["random-eps4"]
    # The driver died while logging the final report: its first batch arrived, not the marker's.
    fake_store.client.log_batch(run_id, metrics=[Metric(M.TEST_AUROC_MACRO, 0.5, 0, 0)])
    trials, _ = tables_from_mlflow(fake_store.uri, SWEEP, SWEEP)
    row = trials.set_index("trial").loc["random-eps4"]
    assert row["status"] == "INCOMPLETE" and math.isnan(row[M.TEST_AUROC_MACRO])


def test_missing_store_experiment_or_sweep_is_a_clear_error(fake_store, tmp_path):
    missing = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(TableError, match="no MLflow database at"):
        read_sweep(f"sqlite:///{missing}", SWEEP, SWEEP)
    assert not missing.exists()  # reading never creates a store
    with pytest.raises(TableError, match="no MLflow experiment 'other'"):
        read_sweep(fake_store.uri, "other", SWEEP)
    with pytest.raises(TableError, match="no parent run of sweep 'other'"):
        read_sweep(fake_store.uri, SWEEP, "other")


def test_parse_param_inverts_str():
    for value in (3, 0.5, 6e-06, math.inf, -math.inf, True, False, None, "rdp", "uniform", "1e-3x", "[1, 2]"):
        parsed = parse_param(str(value))
        assert parsed == value and type(parsed) is type(value), value
    assert math.isnan(parse_param("nan"))


def test_cli_table_from_mlflow_when_the_ray_folder_is_absent(fake_store, tmp_path, monkeypatch, capsys):
    from sweeps.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DPSWEEP_RUNS", raising=False)
    spec = tmp_path / "mlsrc.yaml"
    spec.write_text(TINY_SPEC.replace("name: tinyml", f"name: {SWEEP}"))
    assert main(["table", str(spec), "--runs", str(fake_store.runs)]) == 0  # auto: no Ray folder -> MLflow
    out = capsys.readouterr().out
    assert "from MLflow runs at sqlite:///" in out and "6 trials" in out
    trials = pd.read_parquet(fake_store.runs / SWEEP / TRIALS_FILE)
    assert len(trials) == len(SCRIPT) and (trials["status"] == "INCOMPLETE").sum() == 2
    assert (fake_store.runs / SWEEP / EPOCHS_FILE).exists()
    assert main(["table", str(spec), "--runs", str(fake_store.runs), "--source", "ray"]) == 2
    assert "no Ray results" in capsys.readouterr().err
    assert main(["table", str(spec), "--runs", str(tmp_path / "empty")]) == 2
    assert "no MLflow database at" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Slow tier: a real sweep, interrupted, then resumed.

TINY_SPEC = tiny_yaml(name="tinyml", data={"synthetic_images": 400}, resources={"max_concurrent": 1})
INTERRUPT_TIMEOUT_S = 240
RESUME_TIMEOUT_S = 240
POLL_S = 0.1
STOP_GRACE_S = 10


class SweepProcess:
    """`dpsweep sweep` in a process session of its own, with Ray's temp folder under ``marker`` (a short
    private path): every process it starts is in its process group or names ``marker`` on its command line."""

    def __init__(self, spec: Path, runs: Path, data: Path, marker: Path, log: Path):
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DPSWEEP_RUNS")}
        env.update(RAY_TMPDIR=str(marker), HF_HUB_OFFLINE="1")
        self.marker, self.log = marker, log
        command = [sys.executable, "-m", "sweeps.cli", "sweep", str(spec), "--runs", str(runs), "--data", str(data)]
        with log.open("a") as out:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=Path(__file__).resolve().parents[2],
            )
        self.group = self.process.pid

    def processes(self) -> set[int]:
        found, marker = set(), str(self.marker).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat, cmdline = (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
            except OSError:
                continue
            state, _ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
            if state != "Z" and (int(pgid) == self.group or marker in cmdline):
                found.add(int(entry.name))
        return found

    def kill(self) -> None:
        """SIGKILL the driver and every process of its Ray at once; wait until none is left."""
        deadline = time.monotonic() + STOP_GRACE_S
        while True:
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.process.poll() is None:
                try:
                    self.process.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
            if not self.processes() and self.process.poll() is not None:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"processes {sorted(self.processes())} of the test sweep outlived SIGKILL")
            time.sleep(0.2)


def trial_folders(ray_dir: Path) -> dict[str, Path]:
    if not ray_dir.is_dir():
        return {}
    folders = {}
    for params in ray_dir.glob("*/params.json"):
        folders[read_json(params)["point"]["key"]] = params.parent  # Ray may still be writing it
    return folders


def finished(folder: Path) -> bool:
    return any(folder.glob("checkpoint_*/final.json"))


@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory):
    """The interrupted sweep's two tables (Ray, MLflow), then the resumed sweep's two tables."""
    work = tmp_path_factory.mktemp("real")
    spec, runs, data = work / "tinyml.yaml", work / "runs", work / "data"
    spec.write_text(TINY_SPEC)
    marker = Path(tempfile.mkdtemp(prefix="dpsw-", dir="/tmp"))
    ray_dir = runs / "ray" / "tinyml"
    out = SimpleNamespace(spec=spec, runs=runs, log=work / "sweep.log")
    sweep = SweepProcess(spec, runs, data, marker, out.log)
    start = time.monotonic()
    try:
        while True:  # one trial finished, the other has written a checkpoint (it is running)
            folders = trial_folders(ray_dir)
            done = [k for k, f in folders.items() if finished(f)]
            running = [k for k, f in folders.items() if not finished(f) and any(f.glob("checkpoint_*"))]
            if done and running:
                break
            assert sweep.process.poll() is None, (
                f"the sweep ended before it could be interrupted:\n{out.log.read_text()[-4000:]}"
            )
            assert time.monotonic() - start < INTERRUPT_TIMEOUT_S, out.log.read_text()[-4000:]
            time.sleep(POLL_S)
        sweep.kill()
        out.interrupt_s = time.monotonic() - start
        out.finished, out.running = done[0], running[0]
        assert not finished(trial_folders(ray_dir)[out.running]), "the running trial finished while being killed"
        out.interrupted = {source: table_via_cli(spec, runs, source) for source in ("ray", "mlflow")}

        resume = SweepProcess(spec, runs, data, marker, out.log)
        try:
            resume.process.wait(timeout=RESUME_TIMEOUT_S)
        finally:
            resume.kill()
        assert resume.process.returncode == 0, out.log.read_text()[-4000:]
        out.resumed = {source: table_via_cli(spec, runs, source) for source in ("ray", "mlflow")}
        out.total_s = time.monotonic() - start
        yield out
    finally:
        sweep.kill()
        import shutil

        shutil.rmtree(marker, ignore_errors=True)


def table_via_cli(spec: Path, runs: Path, source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`dpsweep table SPEC --source SOURCE` (in this process: it starts no Ray) and the tables it wrote (every
    table file removed first: either source writes the evaluation tables too)."""
    from sweeps.cli import main

    sweep_dir = runs / "tinyml"
    for file in (TRIALS_FILE, EPOCHS_FILE, GROUPS_FILE, BOOTSTRAP_FILE, PREDICTIONS_FILE):
        (sweep_dir / file).unlink(missing_ok=True)
    assert main(["table", str(spec), "--runs", str(runs), "--source", source]) == 0
    return pd.read_parquet(sweep_dir / TRIALS_FILE), pd.read_parquet(sweep_dir / EPOCHS_FILE)


@pytest.mark.slow
def test_interrupted_sweep_finished_and_running_trials_from_both_sources(real_sweep):
    for source, (trials, epochs) in real_sweep.interrupted.items():
        status = dict(zip(trials["trial"], trials["status"], strict=True))
        assert status[real_sweep.finished] == "TERMINATED", (source, status)
        assert status[real_sweep.running] == "INCOMPLETE", (source, status)
        row = trials.set_index("trial").loc[real_sweep.finished]
        assert math.isfinite(row[M.TEST_AUROC_MACRO]) and row["mlflow_run_id"], source
        assert len(epochs[epochs["trial"] == real_sweep.finished]) == 2, source


@pytest.mark.slow
def test_resumed_sweep_tables_agree_between_ray_and_mlflow(real_sweep):
    (ray_trials, ray_epochs), (ml_trials, ml_epochs) = real_sweep.resumed["ray"], real_sweep.resumed["mlflow"]
    assert sorted(ray_trials["trial"]) == sorted(ml_trials["trial"]) and len(ml_trials) == 2
    assert (ml_trials["status"] == "TERMINATED").all() and (ray_trials["status"] == "TERMINATED").all()
    assert set(ml_trials.columns) == set(ray_trials.columns) - {NODE_ID}
    ray_trials, ml_trials = (t.set_index("trial").sort_index() for t in (ray_trials, ml_trials))
    params = [
        "init",
        "target_epsilon",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "accountant",
        "max_grad_norm",
        "lr",
        "seed",
        "model",
        "privacy_unit",
        "mlflow_run_id",
        "git_commit",
        "torch_version",
    ]
    exact = [*params, M.EPSILON, M.TEST_AUROC_MACRO, M.BEST_EPOCH, M.EPSILON_AT_BEST_EPOCH, M.auroc_gap("test", "age")]
    pd.testing.assert_frame_equal(ml_trials[exact], ray_trials[exact])
    shared = [c for c in ray_trials.columns if c in ml_trials.columns and c != "error"]
    pd.testing.assert_frame_equal(ml_trials[shared], ray_trials[shared])  # every final metric, dtypes included
    assert ml_trials.loc[ml_trials["target_epsilon"].map(math.isinf), M.EPSILON].map(math.isinf).all()

    keys = ["trial", "epoch"]
    ray_epochs, ml_epochs = (e.sort_values(keys).reset_index(drop=True) for e in (ray_epochs, ml_epochs))
    # MLflow never holds train/loss (`sweeps.tracking.NOT_SHARED`); Ray's table keeps the non-private trial's.
    assert ray_epochs[M.TRAIN_LOSS].notna().any() and M.TRAIN_LOSS not in ml_epochs
    ray_epochs = ray_epochs.drop(columns=M.TRAIN_LOSS)
    assert len(ml_epochs) == 4 and sorted(ml_epochs.columns) == sorted(ray_epochs.columns)
    pd.testing.assert_frame_equal(ml_epochs[ray_epochs.columns], ray_epochs)  # val AUROC, epsilon per epoch, ...


@pytest.mark.slow
def test_resumed_sweep_evaluation_tables_come_from_mlflow_artifacts(real_sweep):
    from analysis.tables import collect_trial_tables

    sweep_dir = real_sweep.runs / "tinyml"
    from_ray = collect_trial_tables(real_sweep.runs / "ray" / "tinyml")
    assert from_ray.predictions is not None
    for file, expected in (
        (GROUPS_FILE, from_ray.groups),
        (BOOTSTRAP_FILE, from_ray.bootstrap),
        (PREDICTIONS_FILE, from_ray.predictions),  # the stored per-image scores travel through MLflow too
    ):
        table, expected = (
            t.sort_values(list(expected.columns), kind="stable").reset_index(drop=True)
            for t in (pd.read_parquet(sweep_dir / file), expected)
        )
        assert len(table) and set(table["trial"]) == set(from_ray.bootstrap["trial"])
        pd.testing.assert_frame_equal(table, expected)
    print(f"interrupted after {real_sweep.interrupt_s:.0f} s; whole fixture {real_sweep.total_s:.0f} s")


@pytest.mark.slow
def test_report_of_the_real_sweep_recomputes_the_logged_gaps_from_stored_predictions(real_sweep):
    """The stored predictions joined with the real cache manifest (`analysis.subgroups`) give back every finished
    trial's logged sex and age AUROC gaps: the rows key the right images and the group definitions agree."""
    from analysis import subgroups
    from analysis.report import write_report
    from analysis.tables import load_tables

    sweep_dir = real_sweep.runs / "tinyml"
    page = write_report(sweep_dir, out_dir=real_sweep.runs / "report").read_text(encoding="utf-8")
    section = page.split("<h2>Intersectional subgroups")[1].split("<h2>")[0]
    assert "not found at" not in section and "No stored predictions" not in section
    assert (real_sweep.runs / "report" / "tables" / "groups_sex_age_bin.csv").is_file()
    tables = load_tables(sweep_dir)
    finished = tables.trials[tables.trials["status"] == "TERMINATED"]
    manifests = subgroups.load_manifests(finished, sorted(tables.evaluation.predictions["dataset"].unique()))
    assert len(finished) >= 2
    for trial in finished.itertuples(index=False):
        key, dataset = trial.trial, trial.dataset
        predictions = tables.evaluation.predictions
        own = predictions[(predictions["trial"] == key) & (predictions["dataset"] == dataset)]
        n_images = finished.loc[finished["trial"] == key, M.n_images("test")].iloc[0]
        assert len(own) == n_images > 0  # every test image scored once
        edges = subgroups.trial_age_edges(tables.trials, key)
        for attribute, by in (("sex", "sex"), ("age", subgroups.AGE_BIN)):
            metrics = subgroups.group_metrics(own, manifests, by=[by], age_edges=edges)
            recomputed = subgroups.group_gaps(metrics, [by])["auroc_gap"].iloc[0]
            logged = finished.loc[finished["trial"] == key, M.auroc_gap("test", attribute)].iloc[0]
            assert recomputed == pytest.approx(logged, abs=1e-6, nan_ok=True), (key, attribute)


def test_parquet_artifacts_get_a_csv_twin_when_small(tmp_path, monkeypatch):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from sweeps import tracking

    monkeypatch.setattr(tracking, "PREVIEW_MAX_ROWS", 3)
    repository = LocalArtifactRepository(str(tmp_path / "artifacts"))
    for name, rows in (("small", 3), ("large", 4)):
        pd.DataFrame({"x": range(rows), "y": [0.5] * rows}).to_parquet(tmp_path / f"{name}.parquet", index=False)
        tracking.log_with_preview(repository, tmp_path / f"{name}.parquet", "evaluation")
    logged = {a.path for a in repository.list_artifacts("evaluation")}
    assert logged == {"evaluation/small.parquet", "evaluation/small.csv", "evaluation/large.parquet"}
    assert (tmp_path / "artifacts" / "evaluation" / "small.csv").read_text() == "x,y\n0,0.5\n1,0.5\n2,0.5\n"
    (tmp_path / "artifacts" / "evaluation" / "small.csv").unlink()  # a driver killed between the two files
    (tmp_path / "artifacts" / "evaluation" / "small.parquet").write_bytes(b"kept")
    tracking.log_with_preview(repository, tmp_path / "small.parquet", "evaluation", skip={"small.parquet"})
    assert (tmp_path / "artifacts" / "evaluation" / "small.parquet").read_bytes() == b"kept"
    assert (tmp_path / "artifacts" / "evaluation" / "small.csv").exists()


def test_a_logged_table_loses_its_training_loss_column(tmp_path):
    """An epoch table (a child run's ``evaluation/epochs.parquet``, the parent run's ``epochs.parquet``) reaches
    the experiment without ``train/loss``, parquet and CSV twin alike; the file on disk keeps it."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from sweeps import tracking

    epochs = pd.DataFrame(
        {"trial": ["b", "b"], M.EPOCH: [1, 2], M.TRAIN_LOSS: [0.7, 0.6], M.VAL_AUROC_MACRO: [0.5, 0.6]}
    )
    epochs.to_parquet(tmp_path / EPOCHS_FILE, index=False)
    repository = LocalArtifactRepository(str(tmp_path / "artifacts"))
    tracking.log_with_preview(repository, tmp_path / EPOCHS_FILE)
    logged = pd.read_parquet(tmp_path / "artifacts" / EPOCHS_FILE)
    pd.testing.assert_frame_equal(logged, epochs.drop(columns=M.TRAIN_LOSS))
    assert M.TRAIN_LOSS not in (tmp_path / "artifacts" / "epochs.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / EPOCHS_FILE), epochs)


def test_artifact_locations_are_relative_to_the_store_where_one_serves_them(tmp_path):
    location = mlflow_source.experiment_artifact_location
    assert location(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny", tmp_path) == "mlflow-artifacts:/tiny"
    assert location("http://127.0.0.1:5000", "my sweep/2", tmp_path) == "mlflow-artifacts:/my_sweep_2"
    assert location("postgresql://u@host/db", "tiny", tmp_path) == (tmp_path / "tiny").as_uri()  # no folder of its own
    assert mlflow_source.local_artifact_root(f"sqlite:///{tmp_path / 'x.db'}") == tmp_path / "mlartifacts"
    repository = mlflow_source.artifact_repository(f"sqlite:///{tmp_path / 'x.db'}", "mlflow-artifacts:/t/r/artifacts")
    assert Path(repository.artifact_dir) == tmp_path / "mlartifacts" / "t" / "r" / "artifacts"
    with pytest.raises(TableError, match="needs a tracking server or a sqlite store"):
        mlflow_source.artifact_repository("postgresql://u@host/db", "mlflow-artifacts:/t/r/artifacts")
