"""A sweep tracked through a real MLflow tracking server, read back over plain HTTP.

As on a cluster, the sweep's tracking URI is the server's ``http://`` address (the server keeps runs in a
sqlite file); the checks then use only MLflow's REST API (``/api/2.0/mlflow/...``) through `urllib`, as
any other client of the server would. Everything listens on the loopback interface.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from sweeps.launch import run_sweep
from sweeps.plan import SweepPaths
from sweeps.spec import SweepSpec, parse_spec
from tests.ports import LOOPBACK, free_port
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_KEY_TAG
from trainables.trial import NODE_ID

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).with_name("mlflow")
START_TIMEOUT_S = 60
STOP_GRACE_S = 10

# random init x target epsilon {2, inf}: one private trial and its non-private baseline, 2 epochs each.
SPEC = tiny_yaml(name="served")


@dataclass(frozen=True)
class ServedSweep:
    """A finished sweep and the server that tracked it.

    Attributes:
        spec: the sweep that ran.
        trials: its trial table (as `run_sweep` returned it).
        url: the server's base URL, ``http://127.0.0.1:<port>``.
        root: the folder holding the server's store and ``server-artifacts/`` (its ``--artifacts-destination``).
    """

    spec: SweepSpec
    trials: pd.DataFrame
    url: str
    root: Path


def rest(
    url: str, endpoint: str, query: dict[str, Any] | None = None, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One MLflow REST call: GET with ``query`` parameters, or POST of a JSON ``body``; the decoded reply."""
    address = f"{url}/api/2.0/mlflow/{endpoint}"
    if query:
        address += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{address} answered {error.code}: {error.read().decode()[:1000]}") from None


class MlflowServer:
    """``mlflow server`` on a free loopback port, keeping runs in a sqlite file, in a process session of its own.

    Args:
        folder: holds the sqlite file (``server.db``), the server's default artifact root and its log.
    """

    def __init__(self, folder: Path):
        self.url = f"http://{LOOPBACK}:{free_port()}"
        self.log = folder / "server.log"
        self.command = [
            str(MLFLOW),
            "server",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            str(folder / "server-artifacts"),
            "--host",
            LOOPBACK,
            "--port",
            self.url.rsplit(":", 1)[1],
            "--workers",
            "1",
        ]
        # MLflow's job runner (7 huey consumer processes, for GenAI evaluation jobs) is of no use to a sweep
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                self.command, cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait_until_ready(self) -> None:
        """Poll ``/health`` until the server answers; fail with its log if it exits or stays silent."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:  # refused while starting (URLError and timeouts are OSErrors)
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"`{' '.join(self.command)}` did not answer on {self.url}/health within {START_TIMEOUT_S} s "
                    f"(exit status {self.process.poll()}):\n{self.log.read_text()[-3000:]}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to the server's process group (it forks a worker); SIGKILL to what is left after a grace period."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the server if it hung, or a worker that outlived it
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory) -> Iterator[ServedSweep]:
    import ray

    root = tmp_path_factory.mktemp("served")
    server = MlflowServer(root)
    try:
        raw = yaml.safe_load(SPEC)
        raw["tracking"] = {"uri": server.url}
        spec = parse_spec(raw, source="served.yaml")
        paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
        assert paths.tracking_uri == server.url
        # Ready before Ray starts: Ray binds random ports and once took the one picked for the server.
        server.wait_until_ready()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            trials = run_sweep(spec, paths)
        finally:
            ray.shutdown()
        yield ServedSweep(spec, trials, server.url, root)
    finally:
        server.stop()


def search_runs(served: ServedSweep) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The sweep's parent run and its child runs, found by name and tag over HTTP."""
    experiment = rest(served.url, "experiments/get-by-name", {"experiment_name": served.spec.name})["experiment"]
    reply = rest(
        served.url,
        "runs/search",
        body={
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.`{SWEEP_TAG}` = '{served.spec.name}'",
            "max_results": 100,
        },
    )
    runs = reply.get("runs", [])
    parents = [r for r in runs if tags_of(r)[ROLE_TAG] == "sweep"]
    children = [r for r in runs if tags_of(r)[ROLE_TAG] == "trial"]
    assert len(parents) == 1 and len(parents) + len(children) == len(runs), [tags_of(r) for r in runs]
    return parents[0], children


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params_of(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def metrics_of(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def test_the_server_holds_the_experiment_and_a_finished_parent_run(served_sweep):
    experiment = rest(served_sweep.url, "experiments/get-by-name", {"experiment_name": served_sweep.spec.name})[
        "experiment"
    ]
    assert experiment["name"] == "served" and experiment["lifecycle_stage"] == "active"
    # artifacts go through the server (proxied, relative to its --artifacts-destination), never to this machine's
    # absolute paths
    assert experiment["artifact_location"] == "mlflow-artifacts:/served"
    assert any((served_sweep.root / "server-artifacts" / "served").rglob("metrics.parquet"))
    assert not (served_sweep.root / "runs" / "mlartifacts").exists()
    parent, _ = search_runs(served_sweep)
    assert parent["info"]["status"] == "FINISHED"
    assert PARENT_TAG not in tags_of(parent)
    params = params_of(parent)
    assert params["n_trials"] == "2" and params["target_epsilon"] == "2,inf" and params["model"] == "test_convnext"


def test_one_finished_child_per_trial_points_at_the_parent_with_its_params_and_metrics(served_sweep):
    trials = served_sweep.trials.set_index("trial")
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    parent, children = search_runs(served_sweep)
    by_key = {tags_of(c)[TRIAL_KEY_TAG]: c for c in children}
    assert sorted(by_key) == sorted(trials.index) and len(children) == len(trials) == 2
    for key, child in by_key.items():
        row = trials.loc[key]
        assert tags_of(child)[PARENT_TAG] == parent["info"]["run_id"]
        assert child["info"]["run_id"] == row["mlflow_run_id"]
        assert child["info"]["status"] == "FINISHED"
        params = params_of(child)
        assert float(params["target_epsilon"]) == row["target_epsilon"]
        assert float(params["noise_multiplier"]) == row["noise_multiplier"]
        assert params["init"] == "random" and params["accountant"] == "rdp" and params["steps"] == str(row["steps"])
        metrics = metrics_of(child)
        assert metrics[M.TEST_AUROC_MACRO] == pytest.approx(row[M.TEST_AUROC_MACRO], rel=1e-12)
        assert 0 <= metrics[M.TEST_AUROC_MACRO] <= 1
        if math.isfinite(row["target_epsilon"]):
            assert metrics[M.EPSILON] == row[M.EPSILON] and params[M.BUDGET_PARAM] == f"eps={row['target_epsilon']:g}"
        else:  # a non-private run carries no epsilon, not a stand-in for infinity
            assert not [k for k in metrics if "epsilon" in k] and params[M.BUDGET_PARAM] == "non-private"
        assert tags_of(child)[M.PRIVATE_TAG] == str(math.isfinite(row["target_epsilon"])).lower()
        assert len(metrics) <= M.MAX_HEADLINES and all(M.is_headline(k) for k in metrics)
        assert metrics[M.EPOCH] == served_sweep.spec.privacy.epochs
        # the trial table keeps the worker's node id; MLflow holds numbers only
        assert isinstance(row[NODE_ID], str) and row[NODE_ID]
        assert NODE_ID not in metrics


def test_each_child_has_one_metric_point_per_epoch_and_its_evaluation_tables(served_sweep):
    _, children = search_runs(served_sweep)
    epochs = served_sweep.spec.privacy.epochs
    for child in children:
        run_id = child["info"]["run_id"]
        history = rest(served_sweep.url, "metrics/get-history", {"run_id": run_id, "metric_key": M.VAL_AUROC_MACRO})
        assert sorted(m["step"] for m in history["metrics"]) == list(range(1, epochs + 1))
        listed = rest(served_sweep.url, "artifacts/list", {"run_id": run_id, "path": "evaluation"})
        files = {f["path"] for f in listed.get("files", [])}
        assert {"evaluation/groups.parquet", "evaluation/bootstrap.parquet", "evaluation/epochs.parquet"} <= files
        assert {"evaluation/metrics.parquet", "evaluation/metrics.csv", "evaluation/groups.csv"} <= files
