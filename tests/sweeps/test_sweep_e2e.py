"""One tiny end-to-end sweep on a real local Ray: plan, pretrain, trials, MLflow, tables, no duplicates."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from sweeps.launch import run_sweep
from sweeps.plan import trial_name
from tests.sweeps.local_sweep import local_sweep
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import PARENT_TAG, ROLE_TAG, SWEEP_TAG

pytestmark = pytest.mark.slow

TINY = tiny_yaml(
    data={"external": ["synthetic-b"]},
    inits=["random", "domain"],
    pretrain={"dataset": "synthetic-source", "epochs": 1, "lr": 0.002, "batch_size": 128},
    evaluation={"n_boot": 20},
)


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    with local_sweep(tmp_path_factory, TINY, "tiny.yaml") as sweep:
        yield sweep


def test_every_grid_point_finishes_within_its_budget(tiny_sweep):
    spec, _, trials = tiny_sweep
    assert len(trials) == len(spec.grid()) == 4
    assert (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    assert len(private) == 2
    assert (private[M.EPSILON] <= private["target_epsilon"]).all()
    assert (private[M.EPSILON] >= private["target_epsilon"] - spec.privacy.calibration_tolerance).all()
    # the independent accountant agrees (RDP vs RDP) and PLD is no looser
    assert (abs(private[M.EPSILON_CROSS_CHECK_RDP] - private[M.EPSILON]) < 0.05 * private[M.EPSILON]).all()
    assert (private[M.EPSILON_CROSS_CHECK_PLD] <= private[M.EPSILON] + 1e-6).all()
    # every image-level private trial also states its guarantee for its largest training patient (k images)
    assert (private[M.PATIENT_IMAGES] >= 1).all()
    assert (private[M.EPSILON_PATIENT] >= private[M.EPSILON_CROSS_CHECK_PLD]).all()
    baseline = trials[~trials["target_epsilon"].map(math.isfinite)]
    assert baseline[M.EPSILON].map(math.isinf).all()
    for column in (
        M.TEST_AUROC_MACRO,
        M.auroc_gap("test", "age"),
        M.auroc_gap("test", "sex"),
        M.external_auroc("synthetic-b"),
        "noise_multiplier",
        "git_commit",
        "torch_version",
    ):
        assert trials[column].notna().all(), column


def test_epoch_table_has_an_increasing_epsilon_trajectory(tiny_sweep):
    _, paths, trials = tiny_sweep
    epochs = pd.read_parquet(paths.runs_root / "tiny" / "epochs.parquet")
    assert len(epochs) == len(trials) * 2
    for _, trajectory in epochs[epochs["target_epsilon"].map(math.isfinite)].groupby("trial"):
        eps = trajectory.sort_values("epoch")[M.EPSILON].to_numpy()
        assert (eps[1:] > eps[:-1]).all() and eps[-1] <= trajectory["target_epsilon"].iloc[0]


def test_mlflow_has_one_parent_and_one_finished_child_per_trial(tiny_sweep):
    _, paths, trials = tiny_sweep
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = 'tiny'")
    parents = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    children = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    assert len(parents) == 1 and len(children) == len(trials)
    assert {r.data.tags[PARENT_TAG] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    child = children[0]
    for param in (
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
    ):
        assert param in child.data.params
    assert M.TEST_AUROC_MACRO in child.data.metrics
    assert len(client.get_metric_history(child.info.run_id, M.VAL_AUROC_MACRO)) == 2
    # through dpsweep's resolver: MLflow's client resolves mlflow-artifacts:/ locations only through a server
    artifacts = {a.path for a in run_artifacts(client, paths.tracking_uri, child.info.run_id)}
    assert {"evaluation/groups.parquet", "evaluation/bootstrap.parquet", "evaluation/epochs.parquet"} <= artifacts
    assert set(trials["mlflow_run_id"]) == {r.info.run_id for r in children}


def test_running_again_duplicates_nothing(tiny_sweep, capsys):
    spec, paths, trials = tiny_sweep
    again = run_sweep(spec, paths)
    assert "is complete" in capsys.readouterr().out
    pd.testing.assert_frame_equal(again, trials)
    client = MlflowClient(paths.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    assert len(client.search_runs([experiment.experiment_id])) == len(trials) + 1


def test_summary_states_the_privacy_cost_of_the_whole_search(tiny_sweep):
    from sweeps.tuning_cost import tuning_cost

    _, paths, trials = tiny_sweep
    cost = tuning_cost(trials)
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    assert cost.epsilon > private[M.EPSILON].max()  # two private trials composed cost more than either
    assert cost.n_non_private_excluded == 2 and "Private trials only" in cost.sentence
    client = MlflowClient(paths.tracking_uri)
    parent = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")[
        0
    ]
    assert parent.data.metrics[M.TUNING_EPSILON] == pytest.approx(cost.epsilon)


def test_dpsweep_table_from_ray_writes_the_files_the_sweep_wrote(tiny_sweep, tmp_path, capsys):
    """One way back from Ray: `dpsweep table --source ray` into a fresh sweep folder writes the same set of files as
    the end of the sweep (tables and evaluation tables; the sweep's own state file aside), with the same contents."""
    import shutil

    from sweeps.cli import main

    spec, paths, trials = tiny_sweep
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY)
    sweep_dir = paths.sweep_dir(spec)
    at_the_end = sweep_dir.with_name("tiny-at-the-end")
    sweep_dir.rename(at_the_end)
    try:
        runs, data = str(paths.runs_root), str(paths.data_root)
        assert main(["table", str(spec_file), "--runs", runs, "--data", data, "--source", "ray"]) == 0
        out = capsys.readouterr().out
        assert f"from Ray results at {paths.ray_experiment(spec)}" in out and "privacy of releasing the best" in out
        written = sorted(p.name for p in sweep_dir.iterdir())
        assert written == sorted(p.name for p in at_the_end.iterdir() if p.name != M.SWEEP_STATE_FILE)
        tables = [M.TRIALS_FILE, M.EPOCHS_FILE, M.GROUPS_FILE, M.BOOTSTRAP_FILE, M.PREDICTIONS_FILE]
        assert written == sorted([*tables, M.LEDGER_SUMMARY_FILE])
        for file in tables:
            pd.testing.assert_frame_equal(pd.read_parquet(sweep_dir / file), pd.read_parquet(at_the_end / file))
        ledger_now, ledger_then = (json.loads((d / M.LEDGER_SUMMARY_FILE).read_text()) for d in (sweep_dir, at_the_end))
        assert ledger_now["synthetic-a"]["epsilon_rdp"] == ledger_then["synthetic-a"]["epsilon_rdp"] > 0
        pd.testing.assert_frame_equal(pd.read_parquet(sweep_dir / M.TRIALS_FILE), trials)
        epochs = pd.read_parquet(sweep_dir / M.EPOCHS_FILE)
        assert len(epochs) == len(trials) * 2 and not any(c.startswith("config/") for c in epochs.columns)
    finally:
        shutil.rmtree(sweep_dir, ignore_errors=True)
        at_the_end.rename(sweep_dir)


def test_child_runs_release_headlines_and_no_fake_epsilon(tiny_sweep):
    """What a trial releases to MLflow: at most 40 headline metrics, a private run's epsilon exactly its trial's
    accounted epsilon (per epoch too), a non-private run no epsilon at all; the rest in artifact tables."""
    spec, paths, trials = tiny_sweep
    run_names = {name.key: name.run_name for name in (trial_name(spec, point) for point in spec.grid())}
    client = MlflowClient(paths.tracking_uri)
    epochs = pd.read_parquet(paths.runs_root / "tiny" / "epochs.parquet")
    rows = trials.set_index("trial")
    for key, run_id in zip(trials["trial"], trials["mlflow_run_id"], strict=True):
        run, row = client.get_run(run_id), rows.loc[key]
        metrics, params, tags = run.data.metrics, run.data.params, run.data.tags
        assert len(metrics) <= M.MAX_HEADLINES and all(M.is_headline(k) for k in metrics), sorted(metrics)
        assert M.external_auroc("synthetic-b") in metrics and M.test_auroc("pneumonia") not in metrics
        assert not any(math.isinf(v) or abs(v) >= 1e300 for v in metrics.values())
        assert not any("epsilon" in k for k in tags)
        history = client.get_metric_history(run_id, M.EPSILON)
        trajectory = epochs[epochs["trial"] == key].sort_values("epoch")[M.EPSILON].tolist()
        if math.isfinite(row["target_epsilon"]):
            assert (params[M.BUDGET_PARAM], tags[M.PRIVATE_TAG]) == (f"eps={row['target_epsilon']:g}", "true")
            for name in (M.EPSILON, M.EPSILON_AT_BEST_EPOCH, M.EPSILON_CROSS_CHECK_PLD, M.EPSILON_PATIENT):
                assert metrics[name] == row[name], name  # the accounted epsilon, bit for bit
            assert [m.value for m in sorted(history, key=lambda m: m.step) if m.step > 0] == trajectory
        else:
            assert (params[M.BUDGET_PARAM], tags[M.PRIVATE_TAG]) == ("non-private", "false")
            assert not [k for k in metrics if "epsilon" in k] and not history
            assert all(math.isinf(e) for e in trajectory)
        assert run.info.run_name == run_names[key] and len(run.info.run_name) < len(key)
        files = {a.path.removeprefix("evaluation/") for a in run_artifacts(client, paths.tracking_uri, run_id)}
        assert {"metrics.parquet", "metrics.csv"} <= files
        for table in ("groups", "bootstrap", "epochs", "predictions"):  # each with the preview the UI shows
            assert {f"{table}.parquet", f"{table}.csv"} <= files, (table, files)
    parent = client.get_run(trials["mlflow_run_id"].iloc[0]).data.tags[PARENT_TAG]
    assert all(math.isfinite(v) and abs(v) < 1e300 for v in client.get_run(parent).data.metrics.values())


def run_artifacts(client, tracking_uri, run_id):
    from analysis.mlflow_source import run_artifact_repository

    return run_artifact_repository(client, tracking_uri, run_id).list_artifacts("evaluation")


def test_a_moved_runs_folder_keeps_tables_report_and_ui_artifacts(tiny_sweep, tmp_path, capsys):
    """runs/ (mlflow.db and mlartifacts/) moved to another path, the old one gone: `dpsweep table --source mlflow`
    gives the Ray path's tables, `dpsweep report` logs to the parent run there, and the UI `dpsweep ui` starts
    serves the artifacts from the new place."""
    import shutil

    from sweeps.cli import main

    spec, paths, trials = tiny_sweep
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY)
    moved = tmp_path / "moved" / "runs"
    top = str(paths.runs_root)
    # MLflow alone: not the Ray results (ray/) nor the tables (tiny/)
    shutil.copytree(paths.runs_root, moved, ignore=lambda d, _: ["ray", "tiny"] if d == top else [])
    away = paths.runs_root.with_name("runs-away")
    paths.runs_root.rename(away)
    try:
        assert main(["table", str(spec_file), "--runs", str(moved), "--source", "mlflow"]) == 0
        assert "from MLflow runs at sqlite:///" + str(moved) in capsys.readouterr().out
        rebuilt = pd.read_parquet(moved / "tiny" / "trials.parquet").set_index("trial").sort_index()
        expected = trials.set_index("trial").sort_index()
        shared = [c for c in expected.columns if c in rebuilt.columns and c != "error"]
        assert set(rebuilt.columns) == set(expected.columns) - {"ray/node_id"}
        pd.testing.assert_frame_equal(rebuilt[shared], expected[shared])
        assert len(pd.read_parquet(moved / "tiny" / "bootstrap.parquet"))  # evaluation tables from the artifacts

        assert main(["report", str(spec_file), "--runs", str(moved)]) == 0
        assert "report logged to MLflow: mlflow-artifacts:/tiny/" in capsys.readouterr().out
        parent = trials_parent(moved)
        logged = moved / "mlartifacts" / "tiny" / parent / "artifacts" / "report" / "index.html"
        assert logged.read_bytes() == (moved / "tiny" / "report" / "index.html").read_bytes()

        run_id = trials["mlflow_run_id"].iloc[0]
        served = served_artifact(moved, run_id, "evaluation/metrics.csv")
        assert (
            served["evaluation/metrics.csv"]
            == (moved / "mlartifacts" / "tiny" / run_id / "artifacts" / "evaluation" / "metrics.csv").read_bytes()
        )
        listed = {f["path"] for f in json.loads(served["list"])["files"]}  # what the artifact view lists
        assert {"evaluation/metrics.csv", "evaluation/groups.csv", "evaluation/predictions.parquet"} <= listed
    finally:
        away.rename(paths.runs_root)


def trials_parent(runs):
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'")[0].info.run_id


def served_artifact(runs, run_id: str, path: str) -> dict[str, bytes]:
    """One artifact as the UI of `dpsweep ui` serves it (``/get-artifact``, what its artifact view fetches), and
    (``list``) its listing of the artifact's folder."""
    import os
    import signal
    import subprocess
    import time
    import urllib.parse
    import urllib.request

    from sweeps.cli import ui_command
    from tests.ports import free_port

    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        ui_command(runs, port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    query = urllib.parse.urlencode({"run_id": run_id, "path": path})
    folder = urllib.parse.urlencode({"run_id": run_id, "path": path.rsplit("/", 1)[0]})
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/get-artifact?{query}", timeout=5) as reply:
                    served = {path: reply.read()}
                break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, "the MLflow UI did not answer"
                time.sleep(0.5)
        with urllib.request.urlopen(f"{url}/ajax-api/2.0/mlflow/artifacts/list?{folder}", timeout=30) as reply:
            served["list"] = reply.read()
        return served
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_non_private_train_loss_stays_in_the_sweeps_own_table(tiny_sweep, tmp_path):
    """A non-private trial's train/loss (computed on the private training images, no mechanism) is in epochs.parquet
    and nowhere in the shared MLflow experiment: no child-run metric, no column of a logged epoch table."""
    from analysis.mlflow_source import download, run_artifact_repository

    spec, paths, trials = tiny_sweep
    epochs = pd.read_parquet(paths.sweep_dir(spec) / M.EPOCHS_FILE)
    baseline = epochs[~epochs["target_epsilon"].map(math.isfinite)]
    assert len(baseline) and baseline[M.TRAIN_LOSS].notna().all()
    client = MlflowClient(paths.tracking_uri)
    parent = client.get_run(trials["mlflow_run_id"].iloc[0]).data.tags[PARENT_TAG]
    logged = [(run_id, f"evaluation/{M.EPOCHS_FILE}") for run_id in trials["mlflow_run_id"]] + [(parent, M.EPOCHS_FILE)]
    for run_id, path in logged:
        assert M.TRAIN_LOSS not in client.get_run(run_id).data.metrics
        assert not client.get_metric_history(run_id, M.TRAIN_LOSS)
        repository = run_artifact_repository(client, paths.tracking_uri, run_id)
        table = pd.read_parquet(download(repository, path, tmp_path / run_id))
        assert len(table) and M.TRAIN_LOSS not in table.columns, path
        twin = download(repository, path.replace(".parquet", ".csv"), tmp_path / run_id)
        assert M.TRAIN_LOSS not in Path(twin).read_text().splitlines()[0]


def release_leaks(out: Path, keys: set[str], numbers: np.ndarray) -> list[str]:
    """Files under ``out`` that hold one of the trial ``keys`` or one of ``numbers`` (exactly, in a parquet cell, or
    written at full precision in a text file)."""
    leaks = []
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            cells = table.select_dtypes("number").to_numpy(dtype=float).ravel()
            if ("trial" in table and not keys.isdisjoint(table["trial"])) or np.isin(cells, numbers).any():
                leaks.append(str(path))
        elif path.suffix in (".csv", ".md", ".html", ".tex", ".svg"):
            text = path.read_text(encoding="utf-8")
            if any(key in text for key in keys) or any(repr(float(n)) in text for n in numbers):
                leaks.append(str(path))
        else:
            assert path.suffix in (".png", ".safetensors"), path  # figures and weights: nothing else is released
    return leaks


def test_a_release_holds_no_number_of_a_non_private_trial(tiny_sweep, tmp_path, capsys):
    """`dpsweep release --models` on the sweep: no file holds a baseline's key or numbers (test and external AUROC,
    per-epoch validation AUROC, train/loss), PRIVACY.md names each trial's, the tuning and the ledger epsilon, the
    weights are the final checkpoints' and nothing else of the checkpoints is copied. With --include-non-private the
    same check finds the baselines, and the bundle's epsilon is inf."""
    from analysis.tables import ray_trial_folders
    from sweeps.cli import main
    from sweeps.ledger import ledger_lines
    from sweeps.release import PRIVACY_FILE, epsilon_text
    from sweeps.tuning_cost import tuning_cost
    from trainables.data.ledger import read_ledger
    from trainables.models import create_model, load_weights, resolve_init
    from trainables.privacy.ledger import compose_ledger

    spec, paths, trials = tiny_sweep
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(TINY)
    command = ["release", str(spec_file), "--runs", str(paths.runs_root), "--data", str(paths.data_root)]
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    baseline = trials[~trials["target_epsilon"].map(math.isfinite)]
    epochs = pd.read_parquet(paths.sweep_dir(spec) / M.EPOCHS_FILE)
    baseline_epochs = epochs[epochs["trial"].isin(baseline["trial"])]
    numbers = np.concatenate(
        [
            baseline[[M.TEST_AUROC_MACRO, M.external_auroc("synthetic-b")]].to_numpy(dtype=float).ravel(),
            baseline_epochs[[M.VAL_AUROC_MACRO, M.TRAIN_LOSS]].to_numpy(dtype=float).ravel(),
        ]
    )
    assert len(numbers) == 2 * 2 + 2 * 2 * 2 and np.isfinite(numbers).all()
    keys = set(baseline["trial"])

    out = tmp_path / "bundle"
    assert main([*command, "--out", str(out), "--models"]) == 0
    assert "epsilon of the bundle: synthetic-a" in capsys.readouterr().out
    assert release_leaks(out, keys, numbers) == []
    released = pd.read_parquet(out / "tables" / M.TRIALS_FILE)
    assert sorted(released["trial"]) == sorted(private["trial"])
    assert not {"mlflow_run_id", "data_root", "init_weights"} & set(released.columns)
    assert not any(
        c == M.TRAIN_LOSS or c.startswith(M.SYSTEM_PREFIX) for c in pd.read_parquet(out / "tables" / M.EPOCHS_FILE)
    )
    assert not (out / "tables" / M.PREDICTIONS_FILE).exists()  # row-level test data: only with --predictions

    privacy = (out / PRIVACY_FILE).read_text()
    assert privacy.splitlines()[2].startswith("**Epsilon of this bundle: ")
    for key, epsilon in zip(private["trial"], private[M.EPSILON], strict=True):
        assert f"| `{key}` | TERMINATED | image | 2 | {epsilon_text(epsilon)} |" in privacy
    tuning = tuning_cost(private).epsilon
    assert f"epsilon {epsilon_text(tuning)} at delta {spec.privacy.delta:g} (2 trials)" in privacy
    assert f"**Epsilon of this bundle: {epsilon_text(tuning)} on synthetic-a**" in privacy
    entries = read_ledger(paths.data_root, "synthetic-a")
    ledger = "; ".join(ledger_lines(compose_ledger(entries, spec.privacy.delta))) if entries else "no runs recorded"
    assert f"- `synthetic-a`: {ledger}" in privacy
    for words in (
        "one training image",
        "add/remove adjacency",
        f"`{spec.privacy.accountant}`",
        "Per-image predictions",
    ):
        assert words in privacy, words
    listed = {line[3:-1] for line in privacy.split("## Files in this bundle")[1].splitlines() if line.startswith("- `")}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}

    finals = {folder.key: folder.final_checkpoint() for folder in ray_trial_folders(paths.ray_experiment(spec))}
    names = set(create_model(spec.models[0], resolve_init("random", spec.models[0])).state_dict())
    assert sorted(p.name for p in (out / "models").iterdir()) == sorted(f"{k}.safetensors" for k in private["trial"])
    for key in private["trial"]:
        weights = out / "models" / f"{key}.safetensors"
        assert weights.read_bytes() == (finals[key] / M.FINAL_WEIGHTS_FILE).read_bytes()
        assert set(load_weights(weights)) == names
    assert not {M.FINAL_FILE, M.CHECKPOINT_STATE_FILE, M.RAY_PARAMS_FILE} & {p.name for p in out.rglob("*")}

    everything = tmp_path / "everything"
    assert main([*command, "--out", str(everything), "--include-non-private", "--predictions"]) == 0
    assert "epsilon of the bundle: synthetic-a inf" in capsys.readouterr().out
    privacy = (everything / PRIVACY_FILE).read_text()
    assert privacy.splitlines()[2].startswith("**Epsilon of this bundle: inf.**")
    assert all(f"`{key}` (non-private baseline)" in privacy for key in keys)
    leaks = release_leaks(everything, keys, numbers)
    assert str(everything / "tables" / M.TRIALS_FILE) in leaks and str(everything / "tables" / "trials.csv") in leaks
    assert (everything / "tables" / M.PREDICTIONS_FILE).exists()
