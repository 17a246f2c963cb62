"""Sweep-level fault tolerance, tested by killing real processes.

One tiny sweep (two private trials of 3 epochs, trained side by side) runs in `dpsweep sweep` subprocesses on a
local Ray of its own (a private ``RAY_TMPDIR``; each command in a process session of its own) and is interrupted
three ways:

1. **worker kill**: the Ray worker process running one trial is SIGKILLed after the trial's first epoch
   checkpoint. Ray (``FailureConfig(max_failures)``) restarts the trial from that checkpoint in a new worker, in
   the same driver run; the other trial, not held up, finishes first.
2. **driver kill**: right after that other trial's final report, while the restarted one is training, the
   driver's whole process group (driver, GCS, raylet, workers) is SIGKILLed, as when a machine loses power under
   ``make sweep``. ``dpsweep table`` then shows what is on disk.
3. **Ctrl-C**: ``dpsweep sweep`` run again resumes the sweep; once the interrupted trial has reported one more
   epoch, the process group gets SIGINT, as a terminal's Ctrl-C sends it. Ray Tune saves its state and stops, the
   driver exits with status 1 (sweep incomplete), and ``dpsweep sweep`` run a third time finishes the sweep.

While the first run holds the sweep's lock, a second `dpsweep sweep` of the same file exits 2 naming the first's PID
(`sweeps.lock`); the run after the driver kill takes over the killed driver's stale lock, and Ctrl-C releases it.

The sweep must end as an uninterrupted one would: every trial TERMINATED and trained once (no epoch reported to
Ray twice, no metric logged to MLflow twice at a step, no finished trial trained again), one MLflow parent run and
one child run per trial key, each trial's privacy ledger at exactly the planned steps and
``epsilon_spent(sigma, q, steps)``, and, since resuming is bit-exact on CPU, exactly the final metrics of the same
trial trained without interruption.

A trial that Ray restarts after its final report (should its saved state miss the trial's end) reports the same
final result again without training, and MLflow gets it once; the last two tests pin that path without Ray.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from sweeps.spec import SweepSpec, parse_spec
from tests.ray_files import read_json
from tests.sweeps.points import tiny_point
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.names import PARENT_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_KEY_TAG, TRIALS_FILE
from trainables.point import POINT, TrialPoint
from trainables.privacy.accounting import epsilon_spent
from trainables.train import SCRUBBED, SECRET_KEYS, train_trial
from trainables.trial import DONE, FINAL_FILE, NODE_ID

DPSWEEP = Path(sys.executable).with_name("dpsweep")
NAME = "faults"
EPOCHS = 3
COMMAND_TIMEOUT_S = 240
STOP_GRACE_S = 10
POLL_S = 0.1
SETTLE_S = 0.2  # after a report, for the experiment-state save Tune makes at the end of the same loop iteration

# 200 images: 150 training images, 10 Poisson batches of expected size 16 per epoch; each trial takes one CPU, and
# `dpsweep sweep` starts a local Ray with all CPUs, so the two trials train side by side (given 2 cores).
SPEC = tiny_yaml(
    name="faults",
    data={"synthetic_images": 200},
    # reproducible noise: the test replays trials from their configs to compare bit for bit
    privacy={"target_epsilon": [2, 4], "expected_batch_size": 16, "epochs": 3, "reproducible_noise": True},
    resources={"max_failures": 2},
)

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Running `dpsweep` and finding what it started


class SweepFolder:
    """One sweep's runs folder and the `dpsweep` commands run on it, each in a process session of its own.

    Every Ray process the commands start is found by the command's process group (the driver, GCS, raylet and
    agents stay in it) or by the private Ray temp folder in its command line or environment (Ray's workers run in
    process sessions of their own, so neither a group kill nor a terminal's Ctrl-C reaches them); `kill_all` ends
    exactly those processes.
    """

    def __init__(self, root: Path):
        self.root = root
        self.runs = root / "runs"
        self.data = root / "data"
        self.spec_file = root / f"{NAME}.yaml"
        self.spec_file.write_text(SPEC)
        self.spec: SweepSpec = parse_spec(yaml.safe_load(self.spec_file.read_text()), source=str(self.spec_file))
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="dpsw-ft-", dir="/tmp"))  # short: Ray's sockets live there
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "DPSWEEP_RUNS", "DPSWEEP_DATA")
        }
        self.env.update(
            RAY_TMPDIR=str(self.ray_tmp),
            HF_HUB_OFFLINE="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONUNBUFFERED="1",
        )
        self.groups: list[int] = []

    def start(self, command: str, log_name: str) -> subprocess.Popen:
        args = [str(DPSWEEP), command, str(self.spec_file), "--runs", str(self.runs), "--data", str(self.data)]
        with (self.root / log_name).open("w") as log:
            process = subprocess.Popen(
                args, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.groups.append(process.pid)  # a session leader's pid is its group id, also after it exits
        return process

    def run(self, command: str, log_name: str) -> tuple[int, str]:
        """Run a command to its end; its exit status and output."""
        process = self.start(command, log_name)
        try:
            returncode = process.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"`dpsweep {command}` ran over {COMMAND_TIMEOUT_S} s:\n{self.log(log_name)}") from None
        return returncode, (self.root / log_name).read_text()

    def log(self, log_name: str, lines: int = 40) -> str:
        return "\n".join((self.root / log_name).read_text().splitlines()[-lines:])

    def owns(self, pid: int) -> bool:
        return pid in self.processes()

    def processes(self) -> set[int]:
        """Live (non-zombie) processes started for this folder."""
        found = set()
        marker = str(self.ray_tmp).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                state, _ppid, pgid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if state == "Z":
                    continue
                if int(pgid) in self.groups or marker in (entry / "cmdline").read_bytes():
                    found.add(int(entry.name))
                elif marker in (entry / "environ").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue  # exited meanwhile, or not ours to read
        return found

    def kill_all(self) -> None:
        """SIGKILL every process of this folder (the whole driver process group first) and wait until all are gone."""
        deadline = time.monotonic() + STOP_GRACE_S
        while (alive := self.processes()) and time.monotonic() < deadline:
            for group in self.groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in alive:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        assert not self.processes(), f"processes {sorted(self.processes())} outlived SIGKILL"

    def wait_until_gone(self) -> set[int]:
        """Wait (a while) for this folder's processes to end by themselves; those still alive."""
        deadline = time.monotonic() + STOP_GRACE_S
        while (alive := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.2)
        return alive

    def cleanup(self) -> None:
        self.kill_all()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    # What the sweep wrote

    @property
    def experiment(self) -> Path:
        return self.runs / "ray" / NAME

    def trials_on_disk(self) -> dict[str, TrialOnDisk]:
        """Each trial's Ray folder, by trial key (a trial's folder appears when it starts)."""
        trials = {}
        for params in self.experiment.glob("*/params.json"):
            key = read_json(params)["point"]["key"]  # Ray may still be writing it
            trials[key] = TrialOnDisk.read(key, params.parent)
        return trials

    def trials_table(self) -> pd.DataFrame:
        return pd.read_parquet(self.runs / NAME / TRIALS_FILE).set_index("trial")


@dataclass(frozen=True)
class TrialOnDisk:
    """A trial's Ray folder: the results the driver logged (``result.json``) and its checkpoint folders."""

    key: str
    folder: Path
    results: list[dict[str, Any]]

    @classmethod
    def read(cls, key: str, folder: Path) -> TrialOnDisk:
        results = []
        result_file = folder / "result.json"
        if result_file.exists():
            for line in result_file.read_text().splitlines():
                try:
                    results.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line being written
        return cls(key, folder, results)

    @property
    def epoch_results(self) -> list[dict[str, Any]]:
        return [r for r in self.results if not r.get(DONE)]

    @property
    def final_results(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r.get(DONE)]

    @property
    def epochs(self) -> list[int]:
        return [r[M.EPOCH] for r in self.epoch_results]

    @property
    def pids(self) -> list[int]:
        return [r["pid"] for r in self.results]

    def point(self) -> dict[str, Any]:
        """The grid point Ray gave the trial (its flat TrialConfig and resolved init)."""
        return read_json(self.folder / "params.json")["point"]

    def final_file(self) -> Path | None:
        found = sorted(self.folder.glob(f"checkpoint_*/{FINAL_FILE}"))
        return found[-1] if found else None


def wait_for(
    condition: Callable[[], T | None], driver: subprocess.Popen, sweep: SweepFolder, log_name: str, what: str
) -> T:
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while True:
        value = condition()
        if value:
            return value
        assert driver.poll() is None, f"the driver exited ({driver.returncode}) before {what}:\n{sweep.log(log_name)}"
        assert time.monotonic() < deadline, f"no {what} within {COMMAND_TIMEOUT_S} s:\n{sweep.log(log_name)}"
        time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------------
# The interrupted sweep


@dataclass(frozen=True)
class Interrupted:
    """The sweep and snapshots taken at each interruption (trial folders by key)."""

    sweep: SweepFolder
    worker_killed_key: str
    killed_worker_pid: int
    at_worker_kill: dict[str, TrialOnDisk]
    finished_key: str
    training_key: str
    at_driver_kill: dict[str, TrialOnDisk]
    final_file_at_driver_kill: bytes
    driver_kill_returncode: int
    ray_status_at_driver_kill: dict[str, str]
    table_returncode: int
    table_output: str
    table_at_driver_kill: pd.DataFrame
    at_ctrl_c: dict[str, TrialOnDisk]
    ctrl_c_returncode: int
    ctrl_c_output: str
    state_after_ctrl_c: dict[str, Any]
    left_after_ctrl_c: set[int]
    returncode: int
    output: str
    left_after_end: set[int]
    trials: pd.DataFrame
    on_disk: dict[str, TrialOnDisk]
    num_failures: dict[str, int]
    checkpoints_after_ctrl_c: dict[str, set[str]]
    checkpoints_at_end: dict[str, set[str]]
    first_driver_pid: int
    second_returncode: int
    second_output: str


def checkpoint_keys(experiment: Path) -> dict[str, set[str]]:
    """The keys of every epoch checkpoint (``state.pt``) in the experiment, by its folder relative to it."""
    return {
        str(path.relative_to(experiment)): set(torch.load(path, map_location="cpu", weights_only=False))
        for path in experiment.rglob(M.CHECKPOINT_STATE_FILE)
    }


def ray_trials(experiment: Path) -> dict[str, Any]:
    """Ray's saved view of each trial (status, failures), by trial key."""
    from ray.tune import ExperimentAnalysis

    return {trial.config["point"]["key"]: trial for trial in ExperimentAnalysis(str(experiment)).trials}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Interrupted:
    sweep = SweepFolder(tmp_path_factory.mktemp("faults"))
    try:
        # Run 1: SIGKILL one trial's worker after its first epoch; SIGKILL the whole driver process group right
        # after the other trial's final report.
        driver = sweep.start("sweep", "run1.log")
        lock = sweep.runs / NAME / M.SWEEP_LOCK_FILE
        wait_for(lock.exists, driver, sweep, "run1.log", "the sweep's lock")
        second_returncode, second_output = sweep.run("sweep", "second.log")  # the same sweep, while it runs

        def first_epoch_reported() -> TrialOnDisk | None:
            return next((t for t in sweep.trials_on_disk().values() if t.epochs and not t.final_results), None)

        victim = wait_for(first_epoch_reported, driver, sweep, "run1.log", "a first epoch checkpoint")
        at_worker_kill = sweep.trials_on_disk()
        pid = victim.pids[-1]
        assert sweep.owns(pid), f"trial {victim.key} reported from pid {pid}, which is not this sweep's Ray worker"
        assert list(victim.folder.glob("checkpoint_*")), "a reported epoch comes with its checkpoint"
        os.kill(pid, signal.SIGKILL)

        def one_finished_one_training() -> tuple[TrialOnDisk, TrialOnDisk] | None:
            trials = sweep.trials_on_disk().values()
            finished = [t for t in trials if t.final_results and t.final_file() is not None]
            training = [t for t in trials if t.epochs and not t.final_results]
            return (finished[0], training[0]) if finished and training else None

        finished, training = wait_for(
            one_finished_one_training, driver, sweep, "run1.log", "one finished trial and one with an epoch checkpoint"
        )
        time.sleep(SETTLE_S)
        at_driver_kill = sweep.trials_on_disk()
        final_file_at_driver_kill = at_driver_kill[finished.key].final_file().read_bytes()
        sweep.kill_all()
        driver_kill_returncode = driver.wait(timeout=30)
        first_driver = driver
        ray_status_at_driver_kill = {key: trial.status for key, trial in ray_trials(sweep.experiment).items()}
        table_returncode, table_output = sweep.run("table", "table.log")
        table_at_driver_kill = sweep.trials_table()

        # Run 2: resume, then Ctrl-C (SIGINT to the process group) once the training trial reports another epoch.
        driver = sweep.start("sweep", "run2.log")
        epochs_before = len(at_driver_kill[training.key].epochs)
        wait_for(
            lambda: len(sweep.trials_on_disk()[training.key].epochs) > epochs_before,
            driver,
            sweep,
            "run2.log",
            "an epoch after the resume",
        )
        time.sleep(SETTLE_S)
        at_ctrl_c = sweep.trials_on_disk()
        os.killpg(driver.pid, signal.SIGINT)
        try:
            ctrl_c_returncode = driver.wait(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"Ctrl-C did not stop the sweep:\n{sweep.log('run2.log')}") from None
        state_after_ctrl_c = json.loads((sweep.runs / NAME / "sweep.json").read_text())
        checkpoints_after_ctrl_c = checkpoint_keys(sweep.experiment)
        left_after_ctrl_c = sweep.wait_until_gone()
        sweep.kill_all()

        # Run 3: resume to the end.
        returncode, output = sweep.run("sweep", "run3.log")
        assert returncode == 0, f"the last `dpsweep sweep` exited {returncode}:\n{sweep.log('run3.log')}"
        left_after_end = sweep.wait_until_gone()
        num_failures = {key: trial.run_metadata.num_failures for key, trial in ray_trials(sweep.experiment).items()}
        yield Interrupted(
            sweep,
            victim.key,
            pid,
            at_worker_kill,
            finished.key,
            training.key,
            at_driver_kill,
            final_file_at_driver_kill,
            driver_kill_returncode,
            ray_status_at_driver_kill,
            table_returncode,
            table_output,
            table_at_driver_kill,
            at_ctrl_c,
            ctrl_c_returncode,
            (sweep.root / "run2.log").read_text(),
            state_after_ctrl_c,
            left_after_ctrl_c,
            returncode,
            output,
            left_after_end,
            sweep.trials_table(),
            sweep.trials_on_disk(),
            num_failures,
            checkpoints_after_ctrl_c,
            checkpoint_keys(sweep.experiment),
            first_driver.pid,
            second_returncode,
            second_output,
        )
    finally:
        sweep.cleanup()


# ----------------------------------------------------------------------------------------------------
# Each interruption


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_killed_worker_trial_is_restarted_from_its_checkpoint_in_the_same_driver_run(interrupted):
    run = interrupted
    key = run.worker_killed_key
    assert run.num_failures == {k: int(k == key) for k in run.num_failures}, run.num_failures
    # The killed process reported the epochs up to the kill; a new one continued from the last checkpoint.
    reported = len(run.at_worker_kill[key].epochs)
    assert 1 <= reported < EPOCHS
    trial = run.on_disk[key]
    assert trial.pids[:reported] == [run.killed_worker_pid] * reported
    assert run.killed_worker_pid not in trial.pids[reported:]
    restored = trial.results[reported]
    assert restored[M.EPOCH] == reported + 1
    assert restored["training_iteration"] == reported + 1 and restored["iterations_since_restore"] == 1
    assert run.training_key == key, "the restarted trial was still training when the other one finished"


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_table_after_a_driver_kill_marks_the_finished_trial_terminated_and_the_other_incomplete(interrupted):
    run = interrupted
    assert run.driver_kill_returncode == -signal.SIGKILL
    assert run.table_returncode == 0, run.table_output
    status = run.table_at_driver_kill["status"].to_dict()
    assert status == {run.finished_key: "TERMINATED", run.training_key: "INCOMPLETE"}, status
    assert run.table_at_driver_kill.loc[run.finished_key, M.EPSILON] == run.trials.loc[run.finished_key, M.EPSILON]


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_a_second_sweep_of_a_running_sweep_exits_2_naming_the_first_ones_pid(interrupted):
    run = interrupted
    assert run.second_returncode == 2, run.second_output[-3000:]
    assert f"sweep {NAME!r} is in use by pid {run.first_driver_pid} on host" in run.second_output
    assert "Traceback" not in run.second_output
    # the driver it refused trained each trial once (`test_every_trial_ran_each_epoch_once...`)


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_the_killed_drivers_lock_is_taken_over_and_ctrl_c_releases_the_lock(interrupted):
    run = interrupted
    stale = f"taking over the stale lock of a command no longer running (pid {run.first_driver_pid} on host"
    assert stale in run.ctrl_c_output
    assert "taking over" not in run.output, "the run stopped by Ctrl-C left its lock behind"
    assert not (run.sweep.runs / NAME / M.SWEEP_LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_killed_driver_resumes_without_training_the_finished_trial_again(interrupted):
    run = interrupted
    assert f"resuming sweep {NAME!r}" in run.ctrl_c_output
    finished, before = run.on_disk[run.finished_key], run.at_driver_kill[run.finished_key]
    assert finished.epoch_results == before.epoch_results
    assert finished.final_file().read_bytes() == run.final_file_at_driver_kill
    assert sorted(p.name for p in finished.folder.glob("checkpoint_*")) == [before.final_file().parent.name]
    # The final report carries Ray's `done`: Tune ends the trial on it and saves the end with the final checkpoint,
    # so the resumed sweep does not restart the trial (were it restarted, it would report the same result again).
    restarted = run.ray_status_at_driver_kill[run.finished_key] != "TERMINATED"
    assert len(finished.final_results) == 1 + restarted, run.ray_status_at_driver_kill
    # The interrupted trial went on from its last checkpoint, in a new worker.
    before = run.at_driver_kill[run.training_key].epoch_results
    trial = run.on_disk[run.training_key]
    assert 1 <= len(before) < EPOCHS and trial.epoch_results[: len(before)] == before
    assert set(trial.pids[len(before) :]).isdisjoint(r["pid"] for r in before)


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_ctrl_c_stops_the_sweep_cleanly_and_running_it_again_finishes_it(interrupted):
    run = interrupted
    assert run.ctrl_c_returncode == 1, run.ctrl_c_output[-3000:]  # `dpsweep sweep`: 1 = not every trial finished
    assert run.state_after_ctrl_c["status"] == "incomplete"
    assert not run.left_after_ctrl_c, "Ray processes outlived the interrupted driver"
    assert f"resuming sweep {NAME!r}" in run.output
    epochs_at_ctrl_c = run.at_ctrl_c[run.training_key].epoch_results
    trial = run.on_disk[run.training_key]
    assert trial.epoch_results[: len(epochs_at_ctrl_c)] == epochs_at_ctrl_c
    assert set(trial.pids[len(epochs_at_ctrl_c) :]).isdisjoint(r["pid"] for r in epochs_at_ctrl_c)


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_an_interrupted_trial_keeps_its_secrets_until_its_sweep_completes(interrupted):
    """The sweep that Ctrl-C ended incomplete left the interrupted trial's checkpoint resumable (run 3 resumed it
    exactly); once the sweep is complete, no checkpoint keeps generator states (`sweeps.scrub`). This sweep's noise is
    reproducible: its checkpoints carry generator states but no secret seeds (`test_secret_noise.py` has those)."""
    run = interrupted
    folder = run.on_disk[run.training_key].folder.name
    kept = [keys for path, keys in run.checkpoints_after_ctrl_c.items() if Path(path).parts[0] == folder]
    assert kept and all(set(SECRET_KEYS) <= keys and SCRUBBED not in keys for keys in kept), kept
    for checkpoint, keys in run.checkpoints_at_end.items():  # Ray keeps only a finished trial's final checkpoint
        assert SCRUBBED in keys and not set(SECRET_KEYS) & keys, checkpoint


# ----------------------------------------------------------------------------------------------------
# The end result


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_every_trial_ran_each_epoch_once_and_ends_at_its_planned_ledger(interrupted):
    trials, spec = interrupted.trials, interrupted.sweep.spec
    assert sorted(trials.index) == sorted(f"random-eps{e:g}-clip1-lr0.002-seed0" for e in spec.axes.target_epsilon)
    assert (trials["status"] == "TERMINATED").all(), trials[["status", "error"]]
    for key, row in trials.iterrows():
        planned = epsilon_spent(
            row["noise_multiplier"], row["sample_rate"], int(row["steps"]), row["delta"], row["accountant"]
        )
        assert row[M.STEPS] == row["steps"] and row[M.EPSILON] == planned, key
        assert row["target_epsilon"] - spec.privacy.calibration_tolerance <= planned <= row["target_epsilon"]
        trial = interrupted.on_disk[key]
        # One report per epoch, in order, at the accountant's epsilon after that epoch's steps; one final result.
        assert trial.epochs == list(range(1, EPOCHS + 1)), f"{key}: epochs reported {trial.epochs}"
        steps_per_epoch = int(row["steps"]) // EPOCHS
        for result in trial.epoch_results:
            steps = steps_per_epoch * result[M.EPOCH]
            assert result[M.STEPS] == steps
            assert result[M.EPSILON] == epsilon_spent(
                row["noise_multiplier"], row["sample_rate"], steps, row["delta"], row["accountant"]
            )
        assert len({final_metrics(r) for r in trial.final_results}) == 1, f"{key}: final results differ"


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_mlflow_has_one_parent_and_one_child_per_trial_with_one_point_per_step(interrupted):
    client = MlflowClient(f"sqlite:///{interrupted.sweep.runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(NAME)
    runs = client.search_runs([experiment.experiment_id], f"tags.`{SWEEP_TAG}` = '{NAME}'")
    parents = [r for r in runs if r.data.tags[ROLE_TAG] == "sweep"]
    children = [r for r in runs if r.data.tags[ROLE_TAG] == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(r.data.tags[TRIAL_KEY_TAG] for r in children) == sorted(interrupted.trials.index)
    for child in children:
        key = child.data.tags[TRIAL_KEY_TAG]
        assert child.data.tags[PARENT_TAG] == parents[0].info.run_id
        assert child.info.status == "FINISHED", key
        for metric in child.data.metrics:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert len(steps) == len(set(steps)), f"{key}: {metric} logged more than once at a step: {sorted(steps)}"
        epochs = client.get_metric_history(child.info.run_id, M.EPOCH)
        assert sorted((m.step, m.value) for m in epochs) == [(e, e) for e in range(1, EPOCHS + 1)], key
        assert child.data.metrics[M.EPSILON] == interrupted.trials.loc[key, M.EPSILON]


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus on a frozen input
def test_interrupted_trials_end_exactly_like_uninterrupted_ones(interrupted):
    # Each trial was interrupted (worker kill; driver kill and Ctrl-C): train it again here, without a stop.
    for key, trial in interrupted.on_disk.items():
        point = TrialPoint.from_ray(trial.point())
        reference = train_trial(point.config, point.init, report=lambda metrics, state: None).metrics
        reported = json.loads(final_metrics(trial.final_results[-1]))
        differ = {k: (v, reference[k]) for k, v in reported.items() if not same_number(v, reference[k])}
        assert not differ, f"{key}: final metrics differ from an uninterrupted run: {differ}"


@pytest.mark.slow
@pytest.mark.heavy  # `make test-all`
def test_no_ray_process_outlives_a_dpsweep_command(interrupted):
    assert not interrupted.left_after_ctrl_c and not interrupted.left_after_end


def final_metrics(result: dict[str, Any]) -> str:
    """A final result's metrics as sorted JSON (there NaN equals NaN), without its timing (`M.SYSTEM_PREFIX`: two
    runs of one trial differ in it and nowhere else)."""
    return json.dumps(
        {k: v for k, v in result.items() if "/" in k and k != NODE_ID and not k.startswith(M.SYSTEM_PREFIX)},
        sort_keys=True,
    )


def same_number(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ----------------------------------------------------------------------------------------------------
# A finished trial restarted: the trainable and the MLflow callback, without Ray


def test_a_finished_trial_restarted_reports_its_final_result_again_without_training(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ray import tune

    from trainables import trial as trial_module
    from trainables.trial import dp_trial

    final = {M.EPSILON: 1.99, M.TEST_AUROC_MACRO: 0.7, M.BEST_EPOCH: 3, NODE_ID: "node", DONE: True}
    (tmp_path / FINAL_FILE).write_text(json.dumps(final))
    checkpoint = tune.Checkpoint.from_directory(str(tmp_path))
    reports = []

    def no_training(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(
        trial_module,
        "tune",
        SimpleNamespace(
            get_checkpoint=lambda: checkpoint,
            Checkpoint=tune.Checkpoint,
            report=lambda metrics, checkpoint=None: reports.append((metrics, checkpoint)),
        ),
    )
    monkeypatch.setattr(trial_module, "train_trial", no_training)
    dp_trial({POINT: tiny_point(2.0, sweep=NAME).to_ray()})
    assert reports == [(final, None)]  # the same result; the final checkpoint stays Ray's latest, not saved again
    assert sorted(p.name for p in tmp_path.iterdir()) == [FINAL_FILE]


def test_a_final_result_reported_again_is_logged_once(tmp_path):
    """A trial that finished before a restart reports its final result again (from its final checkpoint); neither
    the same driver nor a resumed one (Ray unpickles the callback) logs it a second time."""
    import pickle
    from types import SimpleNamespace

    from sweeps.tracking import MlflowSweepCallback, get_or_create_experiment, get_or_create_parent_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, NAME, tmp_path / "artifacts")
    parent = get_or_create_parent_run(client, experiment, NAME, {})
    trial = SimpleNamespace(trial_id="t0", config={POINT: tiny_point(1.0, sweep=NAME, key="k").to_ray()})
    epoch = {M.EPOCH: 1, M.EPSILON: 0.5, M.STEPS: 9, DONE: False}
    final = {M.EPSILON: 0.5, M.STEPS: 9, M.BEST_EPOCH: 1, M.TEST_AUROC_MACRO: 0.7, DONE: True}
    # Ray stamps every report with the time it was made (MLflow drops only exact duplicates, same time included).
    reports = [{**result, "timestamp": time} for time, result in enumerate((epoch, final, epoch, final, epoch, final))]

    callback = MlflowSweepCallback(uri, experiment, parent)
    for result in reports[:4]:
        callback.on_trial_result(0, [], trial, result)
    resumed = pickle.loads(pickle.dumps(callback))
    for result in reports[4:]:
        resumed.on_trial_result(0, [], trial, result)

    (child,) = client.search_runs([experiment], f"tags.`{TRIAL_KEY_TAG}` = 'k'")
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, key))
        for key in child.data.metrics
    }
    assert history == {
        M.EPOCH: [(1, 1)],
        M.EPSILON: [(0, 0.5), (1, 0.5)],
        M.STEPS: [(0, 9), (1, 9)],
        M.BEST_EPOCH: [(0, 1)],
        M.TEST_AUROC_MACRO: [(0, 0.7)],
    }
