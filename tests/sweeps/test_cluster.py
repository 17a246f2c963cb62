"""A sweep on a real two-node Ray cluster on localhost, joined through `run_sweep(..., address=...)`.

Two ``ray start`` nodes (a head and a worker, one CPU each) form the cluster; every trial asks for one CPU,
so at most one trial runs per node and the grid has to use both. The driver is a separate Python process
that calls `run_sweep` with the head's address, as ``dpsweep sweep --address`` does against a remote
cluster. Token authentication stays on, with a token made for this test and handed to every process in
``RAY_AUTH_TOKEN`` (``~/.ray/auth_token`` is neither read nor written). A joining node or driver must be
given ``RAY_AUTH_MODE=token`` itself: Ray 2.60 turns token mode on by itself only for a head node or for
``ray.init()`` without an address.

The nodes run in process sessions of their own, under a temp folder of their own; the finalizer stops
exactly those processes. ``ray stop`` is not used: it stops every Ray process of the user on the machine
(other tests' instances, a sweep running beside the tests).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sweeps.spec import SweepSpec, parse_spec
from tests.ports import LOOPBACK, free_port
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import TRIALS_FILE
from trainables.trial import NODE_ID

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # `make test-all`

RAY = Path(sys.executable).with_name("ray")
OBJECT_STORE_BYTES = 200 * 1024**2  # per node; Ray's default (30% of RAM per node) is far more than needed
START_TIMEOUT_S = 120
DRIVER_TIMEOUT_S = 300
STOP_GRACE_S = 5  # the GCS server ignores SIGTERM for longer than a test should wait

# random init x target epsilon {2, 8} x seed {0, 1}: 4 trials of one CPU on 2 one-CPU nodes.
SPEC = tiny_yaml(name="cluster", privacy={"target_epsilon": [2, 8], "epochs": 1}, training={"seed": [0, 1]})

# The driver process: wait until both nodes have joined, run the sweep against the cluster, and write down
# which cluster it was connected to. Arguments: spec file, runs folder, data folder, address, output file.
DRIVER = """
import json, sys, time
import ray
from sweeps.launch import run_sweep
from sweeps.plan import SweepPaths
from sweeps.spec import load_spec

spec_file, runs, data, address, out = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + 60
while sum(node["Alive"] for node in ray.nodes()) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
ray.shutdown()

spec = load_spec(spec_file)
run_sweep(spec, SweepPaths.for_spec(spec, runs=runs, data=data), address=address)
seen = {"gcs_address": ray.get_runtime_context().gcs_address,
        "node_ids": sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])}
ray.shutdown()
with open(out, "w") as file:
    json.dump(seen, file)
"""


@dataclass(frozen=True)
class ClusterSweep:
    """What the driver's sweep wrote, and the cluster it saw.

    Attributes:
        spec: the sweep that ran.
        trials: its ``trials.parquet``.
        port: the head node's GCS port, which the driver was told to join.
        driver_gcs_address: ``host:port`` of the GCS the driver was connected to after the sweep (Ray
            replaces the loopback host by the machine's address).
        node_ids: hex ids of the cluster's alive nodes after the sweep.
    """

    spec: SweepSpec
    trials: pd.DataFrame
    port: int
    driver_gcs_address: str
    node_ids: frozenset[str]


class LocalRayCluster:
    """Ray nodes started with ``ray start`` on this machine, each in a process session of its own.

    A node's processes (GCS, raylet, agents and the workers the raylet forks) stay in the process group of
    the ``ray start`` command that made them, which is what `stop` signals; anything that left the group
    is still found by this cluster's private temp folder on its command line.

    Args:
        root: a new, empty folder with a short path (a node's Unix sockets live under it; 107 bytes at most).
        env: the environment of every node process.
    """

    def __init__(self, root: Path, env: dict[str, str]):
        self.root = root
        self.env = env
        self.groups: list[int] = []

    def start_node(self, name: str, *args: str) -> None:
        """Run ``ray start <args>`` for one node and wait until the node is up (the command returns)."""
        log = self.root / f"{name}.log"
        command = [
            str(RAY),
            "start",
            *args,
            f"--node-ip-address={LOOPBACK}",
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            f"--temp-dir={self.root / name}",
            "--disable-usage-stats",
        ]
        with log.open("w") as out:
            process = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.groups.append(process.pid)  # the session leader's pid is the group id, also after it exits
        try:
            returncode = process.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`{' '.join(command)}` did not return in {START_TIMEOUT_S} s; see {log}") from None
        assert returncode == 0, f"`{' '.join(command)}` exited {returncode}:\n{log.read_text()[-3000:]}"

    def processes(self) -> set[int]:
        """Live (non-zombie) processes of this cluster: in one of its process groups, or naming its folder."""
        found = set()
        marker = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            state, _ppid, pgid = stat.rsplit(")", 1)[1].split()[:3]
            if state != "Z" and (int(pgid) in self.groups or marker in cmdline):
                found.add(int(entry.name))
        return found

    def stop(self) -> None:
        """SIGTERM to every process of the cluster, SIGKILL to whatever is left after a grace period."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.processes():
                return
        raise AssertionError(f"Ray processes {sorted(self.processes())} of the test cluster outlived SIGKILL")


@pytest.fixture(scope="module")
def cluster_sweep(tmp_path_factory) -> Iterator[ClusterSweep]:
    work = tmp_path_factory.mktemp("cluster")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    cluster = LocalRayCluster(Path(tempfile.mkdtemp(prefix="dpsweep-ray-", dir="/tmp")), env)
    port = free_port()
    address = f"{LOOPBACK}:{port}"
    try:
        cluster.start_node("head", "--head", f"--port={port}", "--include-dashboard=false")
        cluster.start_node("worker", f"--address={address}")

        spec_file = work / "cluster.yaml"
        spec_file.write_text(SPEC)
        runs, seen_file, log = work / "runs", work / "driver.json", work / "driver.log"
        command = [sys.executable, "-c", DRIVER, str(spec_file), str(runs), str(work / "data"), address, str(seen_file)]
        with log.open("w") as out:
            driver = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=DRIVER_TIMEOUT_S)
        assert driver.returncode == 0, f"the driver exited {driver.returncode}:\n{log.read_text()[-5000:]}"
        seen = json.loads(seen_file.read_text())
        spec = parse_spec(yaml.safe_load(SPEC), source=str(spec_file))
        trials = pd.read_parquet(runs / spec.name / TRIALS_FILE)
        yield ClusterSweep(spec, trials, port, seen["gcs_address"], frozenset(seen["node_ids"]))
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


def test_the_driver_joins_the_given_cluster_and_every_trial_finishes(cluster_sweep):
    trials = cluster_sweep.trials
    assert cluster_sweep.driver_gcs_address.endswith(f":{cluster_sweep.port}")
    assert len(cluster_sweep.node_ids) == 2
    assert len(trials) == len(cluster_sweep.spec.grid()) == 4
    assert (trials["status"] == "TERMINATED").all(), trials[["trial", "status", "error"]]
    grid = sorted(zip(trials["target_epsilon"], trials["seed"], strict=True))
    assert grid == [(2.0, 0), (2.0, 1), (8.0, 0), (8.0, 1)]
    tolerance = cluster_sweep.spec.privacy.calibration_tolerance
    assert (trials[M.EPSILON] <= trials["target_epsilon"]).all()
    assert (trials[M.EPSILON] >= trials["target_epsilon"] - tolerance).all()
    assert trials[M.TEST_AUROC_MACRO].map(math.isfinite).all()


def test_trials_ran_on_both_nodes(cluster_sweep):
    node_of_trial = cluster_sweep.trials.set_index("trial")[NODE_ID]
    assert node_of_trial.notna().all(), node_of_trial
    assert set(node_of_trial) == cluster_sweep.node_ids, node_of_trial
