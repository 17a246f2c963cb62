"""Kill-and-resume: a trial killed mid-epoch and resumed from its last epoch checkpoint ends exactly where an
uninterrupted trial ends.

"Exactly" is bit for bit (CPU, one thread): the privacy ledger (epsilon after every epoch and at
the end, DP-SGD step count, the accountant's history), every final and per-epoch metric, the evaluation tables,
the selected weights and the whole final checkpoint (optimizer moments, RNG streams included). This is also
what makes a resume cost no privacy: the steps a killed process ran after its last checkpoint released
nothing, and the resumed process replays them with the same Poisson batches and the same noise (sampler and
noise RNG states come from the checkpoint), so only the planned steps are ever released and accounted.

The DP trial runs in a real process (`resume_worker`), is killed with SIGKILL three steps into epoch 2 and is
resumed by a fresh process; the uninterrupted reference runs in pytest's process, so the comparison spans
processes. Both must draw the same noise, so this trial uses ``privacy.reproducible_noise`` (seeded streams);
that the default mode's secret ``os.urandom`` seeds travel in the checkpoint and resume bit-exactly too is
tested in `test_randomness.py`. Cheaper in-process checks cover a stop after the last epoch's checkpoint, the
non-private baseline, and the refusal of a checkpoint written under another trial configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from tests.asserts import assert_identical
from tests.factories import split_system_metrics, tiny_trial_config
from tests.privacy import resume_worker as worker
from tests.secret_bytes import found_in, generator_spellings, seed_spellings
from trainables import names as M
from trainables.config import TrialConfig
from trainables.data.synthetic import prepare_synthetic
from trainables.models import ResolvedInit, resolve_init
from trainables.privacy.accounting import epsilon_spent
from trainables.train import SCRUBBED, SECRET_KEYS, ScrubbedCheckpointError, scrub_checkpoint

REPO = Path(__file__).resolve().parents[2]
DATASET, IMAGE_SIZE, N_IMAGES = "synthetic-a", 32, 200  # 150 training images
BATCH, EPOCHS, STEPS_PER_EPOCH = 16, 3, 10  # q = 1/ceil(150/16) = 1/10, 30 steps
TARGET_EPSILON, DELTA = 4.0, 1e-5
STOP = worker.StopPoint(after_epoch=1, batch=4)  # halt with 3 steps of epoch 2 done, only in memory
WORKER_TIMEOUT_S = 300
TABLES = ("groups", "bootstrap", "epochs")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare_synthetic(DATASET, root, size=IMAGE_SIZE, n_images=N_IMAGES)
    return root


def trial_config(
    data_root: Path, target_epsilon: float, model_selection: str = "best_val", reproducible_noise: bool = False
) -> TrialConfig:
    """A 3-epoch trial on this module's synthetic site, calibrated like the sweep launcher does it."""
    cfg = tiny_trial_config(
        data_root,
        target_epsilon,
        EPOCHS,
        sweep="resume-test",
        dataset=DATASET,
        image_size=IMAGE_SIZE,
        n_boot=20,
        model_selection=model_selection,
        delta=DELTA,
        max_grad_norm=1.0,
        expected_batch_size=BATCH,
        reproducible_noise=reproducible_noise,
    )
    assert cfg.privacy.steps == EPOCHS * STEPS_PER_EPOCH, "fixture data changed"
    assert cfg.privacy.sample_rate == (1 / STEPS_PER_EPOCH if cfg.privacy.is_private else 0.0)
    return cfg


def random_init() -> ResolvedInit:
    return resolve_init("random", "test_convnext")


# ----------------------------------------------------------------------------------------------------
# The DP trial, killed for real


@dataclass(frozen=True)
class KilledAndResumed:
    """The uninterrupted reference run and the killed-then-resumed run of the same DP trial."""

    cfg: TrialConfig
    reference: Path
    resumed: Path
    killed_pid: int
    killed_returncode: int
    state_at_kill: dict[str, Any]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    return env


def _start_worker(run_dir: Path, log_name: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tests.privacy.resume_worker", str(run_dir), *args]
    with (run_dir / log_name).open("w") as log:
        return subprocess.Popen(command, cwd=REPO, env=_worker_env(), stdout=log, stderr=subprocess.STDOUT)


def _log_tail(run_dir: Path, log_name: str) -> str:
    return "\n".join((run_dir / log_name).read_text().splitlines()[-30:])


def _run_worker(run_dir: Path, log_name: str) -> None:
    process = _start_worker(run_dir, log_name)
    try:
        returncode = process.wait(timeout=WORKER_TIMEOUT_S)
    finally:
        process.kill()
    assert returncode == 0, f"worker in {run_dir} failed ({returncode}):\n{_log_tail(run_dir, log_name)}"


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, data_root) -> KilledAndResumed:
    """Start the DP trial in a worker process, SIGKILL it at `STOP`, resume it in a fresh worker process.

    The uninterrupted reference runs in this (pytest's) process while the doomed worker starts up, so the
    comparison also spans processes; the stop point does not depend on that timing.
    """
    # Final metrics of the last epoch's weights, so that they depend on the steps taken after the resume (with
    # best_val they could come from an epoch checkpointed before the kill and prove nothing about the resume).
    cfg = trial_config(data_root, TARGET_EPSILON, model_selection="last", reproducible_noise=True)
    reference, resumed = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("resumed")
    for run_dir in (reference, resumed):
        worker.write_config(run_dir, cfg, random_init())

    process = _start_worker(
        resumed, "killed.log", "--stop-after-epoch", str(STOP.after_epoch), "--stop-at-batch", str(STOP.batch)
    )
    try:
        worker.run(reference)
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not (resumed / worker.STOPPED_FILE).exists():
            assert process.poll() is None, f"worker died before its stop point:\n{_log_tail(resumed, 'killed.log')}"
            assert time.monotonic() < deadline, "worker never reached its stop point"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        killed_returncode = process.wait(timeout=30)
    finally:
        process.kill()
    state = torch.load(resumed / worker.STATE_FILE, weights_only=False)
    state_at_kill = {"epoch": state["epoch"], "steps": state["steps"], "accountant": state["accountant"]}

    _run_worker(resumed, "resume.log")
    return KilledAndResumed(cfg, reference, resumed, process.pid, killed_returncode, state_at_kill)


@pytest.mark.slow
def test_kill_lands_mid_epoch_after_a_checkpoint_and_resume_continues_from_it(killed_and_resumed):
    run = killed_and_resumed
    privacy = run.cfg.privacy
    assert run.killed_returncode == -signal.SIGKILL
    stopped = json.loads((run.resumed / worker.STOPPED_FILE).read_text())
    assert stopped == {"pid": run.killed_pid, "checkpointed_epoch": 1, "batch": STOP.batch}
    # On disk at the kill: epoch 1's ledger only; the 3 steps of epoch 2 the process had run died with it.
    assert run.state_at_kill["epoch"] == 1
    assert run.state_at_kill["steps"] == STEPS_PER_EPOCH
    assert run.state_at_kill["accountant"]["history"] == [
        (privacy.noise_multiplier, privacy.sample_rate, STEPS_PER_EPOCH)
    ]
    # Epoch 1 was reported by the killed process; epochs 2 and 3 by one resuming process, none twice.
    records = worker.read_epochs(run.resumed)
    assert [r["metrics"][M.EPOCH] for r in records] == [1, 2, 3]
    resumer = records[1]["pid"]
    assert [r["pid"] for r in records] == [run.killed_pid, resumer, resumer] and resumer != run.killed_pid


@pytest.mark.slow
def test_resumed_dp_trial_ends_with_the_uninterrupted_privacy_ledger(killed_and_resumed):
    run = killed_and_resumed
    privacy = run.cfg.privacy
    reference, resumed = (_outputs(d) for d in (run.reference, run.resumed))
    planned = EPOCHS * STEPS_PER_EPOCH
    # The trajectory is the accountant's epsilon after 10, 20, 30 steps; it ends at (not over) the target.
    expected_trajectory = [
        epsilon_spent(privacy.noise_multiplier, privacy.sample_rate, STEPS_PER_EPOCH * epoch, DELTA)
        for epoch in range(1, EPOCHS + 1)
    ]
    for out in (reference, resumed):
        assert out.final[M.STEPS] == out.state["steps"] == planned
        assert out.state["accountant"]["history"] == [(privacy.noise_multiplier, privacy.sample_rate, planned)]
        assert [e[M.EPSILON] for e in out.epochs] == expected_trajectory
        assert out.final[M.EPSILON] == expected_trajectory[-1]
        assert TARGET_EPSILON - run.cfg.privacy.calibration_tolerance <= out.final[M.EPSILON] <= TARGET_EPSILON
    ledger = (M.EPSILON, M.STEPS, M.EPSILON_AT_BEST_EPOCH, M.EPSILON_CROSS_CHECK_RDP, M.EPSILON_CROSS_CHECK_PLD)
    assert {k: resumed.final[k] for k in ledger} == {k: reference.final[k] for k in ledger}
    assert resumed.state["accountant"] == reference.state["accountant"]


@pytest.mark.slow
def test_resumed_dp_trial_ends_with_the_uninterrupted_metrics_weights_and_state(killed_and_resumed):
    reference, resumed = (_outputs(d) for d in (killed_and_resumed.reference, killed_and_resumed.resumed))
    _assert_same_run(resumed, reference)


@pytest.mark.slow
def test_dp_trial_stopped_after_its_last_checkpoint_redoes_only_the_final_evaluation(killed_and_resumed, tmp_path):
    # As if killed between the last epoch's checkpoint and the final report: resuming trains no further step.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in (worker.CONFIG_FILE, worker.STATE_FILE, worker.EPOCHS_FILE):
        shutil.copy(killed_and_resumed.reference / name, run_dir / name)
    worker.run(run_dir)
    assert len(worker.read_epochs(run_dir)) == EPOCHS, "no epoch may be trained or reported again"
    _assert_same_run(_outputs(run_dir), _outputs(killed_and_resumed.reference))


# ----------------------------------------------------------------------------------------------------
# In-process checks: the non-private baseline, and a checkpoint of another trial


def test_resumed_non_private_trial_ends_like_the_uninterrupted_one(data_root, tmp_path):
    cfg = trial_config(data_root, math.inf)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for run_dir in (reference, resumed):
        worker.write_config(run_dir, cfg, random_init())
    worker.run(reference)
    with pytest.raises(worker.Stopped):
        worker.run(resumed, dataclasses.replace(STOP, hang=False))
    assert torch.load(resumed / worker.STATE_FILE, weights_only=False)["epoch"] == STOP.after_epoch
    worker.run(resumed)

    reference_out, resumed_out = _outputs(reference), _outputs(resumed)
    assert [e[M.EPOCH] for e in resumed_out.epochs] == [1, 2, 3]
    assert resumed_out.final[M.STEPS] == EPOCHS * STEPS_PER_EPOCH  # ceil(150/16) shuffled batches per epoch
    assert resumed_out.final[M.EPSILON] == math.inf and resumed_out.state["accountant"] is None
    _assert_same_run(resumed_out, reference_out)


@pytest.fixture(scope="module")
def epoch_1_checkpoint(tmp_path_factory, data_root) -> Path:
    """A run folder of the DP trial stopped right after its epoch-1 checkpoint."""
    run_dir = tmp_path_factory.mktemp("epoch-1")
    worker.write_config(run_dir, trial_config(data_root, TARGET_EPSILON), random_init())
    with pytest.raises(worker.Stopped):
        worker.run(run_dir, worker.StopPoint(after_epoch=1, batch=1, hang=False))
    return run_dir


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"lr": 2e-3},
        {"privacy": {"noise_multiplier": 1.5}},  # another sigma: one ledger would mix two mechanisms
    ],
    ids=["seed", "lr", "noise_multiplier"],
)
def test_checkpoint_of_another_trial_configuration_is_refused(epoch_1_checkpoint, tmp_path, change):
    run_dir = shutil.copytree(epoch_1_checkpoint, tmp_path / "run")
    cfg, _ = worker.read_config(run_dir)
    checkpoint = (run_dir / worker.STATE_FILE).read_bytes()
    other = dataclasses.replace(
        cfg,
        **{k: v for k, v in change.items() if k != "privacy"},
        privacy=dataclasses.replace(cfg.privacy, **change.get("privacy", {})),
    )
    assert other != cfg

    with pytest.raises(ValueError, match="different trial configuration"):
        worker.run(run_dir, cfg=other)
    assert (run_dir / worker.STATE_FILE).read_bytes() == checkpoint, "a refused resume must not touch the checkpoint"
    assert len(worker.read_epochs(run_dir)) == 1 and not (run_dir / worker.FINAL_FILE).exists()


# ----------------------------------------------------------------------------------------------------
# An ended trial's checkpoint: scrubbed of its secrets, then never resumed


def test_scrubbed_checkpoint_keeps_the_model_and_loses_every_secret(epoch_1_checkpoint, tmp_path):
    run_dir = shutil.copytree(epoch_1_checkpoint, tmp_path / "run")
    path = run_dir / worker.STATE_FILE
    before = torch.load(path, weights_only=False)
    secrets = {f"{name} seed": seed_spellings(seed) for name, seed in before["secret_seeds"].items()}
    secrets |= {name: generator_spellings(before[name]) for name in ("sampler_rng", "noise_rng")}
    spellings = set().union(*secrets.values())
    seen = set(found_in([path], spellings)[str(path)])
    assert all(forms & seen for forms in secrets.values()), "the scan must see every secret before"

    assert scrub_checkpoint(path, M.STOPPED)
    after = torch.load(path, weights_only=False)
    assert after[SCRUBBED] == M.STOPPED and not set(SECRET_KEYS) & set(after)
    assert not found_in([path], spellings)
    kept = {k: v for k, v in before.items() if k not in SECRET_KEYS}
    assert_identical({k: v for k, v in after.items() if k != SCRUBBED}, kept, "what a scrubbed checkpoint keeps")
    assert {"model", "best_weights", "optimizer", "accountant", "history"} <= kept.keys()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in epoch_1_checkpoint.iterdir())
    scrubbed = path.read_bytes()
    assert not scrub_checkpoint(path, M.ERROR) and path.read_bytes() == scrubbed  # scrubbed once: the first end stays


def test_a_scrubbed_checkpoint_is_refused_with_the_way_out(epoch_1_checkpoint, tmp_path):
    run_dir = shutil.copytree(epoch_1_checkpoint, tmp_path / "run")
    scrub_checkpoint(run_dir / worker.STATE_FILE, M.ERROR)
    checkpoint = (run_dir / worker.STATE_FILE).read_bytes()
    with pytest.raises(
        ScrubbedCheckpointError,
        match=r"epoch-1 checkpoint of a trial of sweep 'resume-test' cannot be resumed: the trial had ended \(ERROR\), "
        r"so its secret seeds and generator states were removed .*start it afresh \(`dpsweep sweep --fresh`",
    ):
        worker.run(run_dir)
    assert (run_dir / worker.STATE_FILE).read_bytes() == checkpoint
    assert len(worker.read_epochs(run_dir)) == 1 and not (run_dir / worker.FINAL_FILE).exists()


# ----------------------------------------------------------------------------------------------------
# Comparing two runs' outputs


@dataclass(frozen=True)
class RunOutputs:
    final: dict[str, Any]
    epochs: list[dict[str, Any]]
    tables: dict[str, pd.DataFrame]
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]


def _outputs(run_dir: Path) -> RunOutputs:
    return RunOutputs(
        final=split_system_metrics(json.loads((run_dir / worker.FINAL_FILE).read_text()))[0],  # no timing
        epochs=[split_system_metrics(record["metrics"])[0] for record in worker.read_epochs(run_dir)],  # no timing
        tables={name: pd.read_parquet(run_dir / f"{name}.parquet") for name in TABLES},
        weights=torch.load(run_dir / worker.FINAL_MODEL_FILE, weights_only=True),
        state=torch.load(run_dir / worker.STATE_FILE, weights_only=False),
    )


def _assert_same_run(actual: RunOutputs, expected: RunOutputs) -> None:
    assert_identical(actual.final, expected.final, "final metrics")
    assert_identical(actual.epochs, expected.epochs, "epoch metrics")
    for name in TABLES:
        pd.testing.assert_frame_equal(actual.tables[name], expected.tables[name], check_exact=True, obj=name)
    assert_identical(actual.weights, expected.weights, "selected weights")
    assert_identical(actual.state, expected.state, "final checkpoint")
