"""No secret left behind, without Ray: the driver's callback scrubs an ended trial's checkpoints (and only an ended
trial's), the end of a complete sweep scrubs every trial, ``--fresh`` deletes them, and a stopped trial that Ray
restarts from its scrubbed checkpoint trains nothing. The sweeps themselves: `test_secret_noise.py` (ASHA and a
killed trial) and `test_fault_tolerance.py` (a killed driver)."""

from __future__ import annotations

import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from opacus.accountants import RDPAccountant
from torch import nn

from analysis.tables import ray_part_dir
from sweeps.launch import _remove_sweep
from sweeps.plan import SweepPaths
from sweeps.scrub import ScrubSecretsCallback, scrub_ended_trials
from sweeps.spec import parse_spec
from tests.factories import pinned_config
from tests.secret_bytes import found_in, generator_spellings, seed_spellings
from tests.sweeps.points import tiny_point
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.data.labels import LABELS
from trainables.names import DONE, FINAL_FILE
from trainables.point import POINT
from trainables.privacy.randomness import generator_from_seed, secret_seed
from trainables.train import SCRUBBED, SECRET_KEYS, SWEEP_COMPLETE, TrainState

EPOCH_REPORT = {M.EPOCH: 1, M.VAL_SELECTED_AUROC_MACRO: 0.5, DONE: True}  # ASHA stopped the trial after it
FINAL_REPORT = {M.EPOCH: 2, M.BEST_EPOCH: 1, DONE: True}


def write_checkpoint(path: Path) -> set[bytes]:
    """A private trial's epoch checkpoint at ``path``, with fresh secret seeds; returns their spellings."""
    seeds = {"sampler": secret_seed(), "noise": secret_seed()}
    model = nn.Linear(3, len(LABELS))
    state = TrainState(
        pinned_config(),
        model,
        torch.optim.AdamW(model.parameters()),
        RDPAccountant(),
        generator_from_seed(seeds["sampler"]),
        generator_from_seed(seeds["noise"]),
        seeds,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state.state_dict(), path)
    spellings = generator_spellings(state.sampler_rng.get_state()) | generator_spellings(state.noise_rng.get_state())
    return spellings | {s for seed in seeds.values() for s in seed_spellings(seed)}


def trial_folder(root: Path) -> tuple[Path, set[bytes]]:
    """A trial folder as Ray leaves it after a driver killed in the wrong instant: two epoch checkpoints (the older
    not deleted yet) and a final one."""
    spellings = write_checkpoint(root / "checkpoint_000000" / M.CHECKPOINT_STATE_FILE)
    spellings |= write_checkpoint(root / "checkpoint_000001" / M.CHECKPOINT_STATE_FILE)
    (root / "checkpoint_000002").mkdir()
    (root / "checkpoint_000002" / FINAL_FILE).write_text("{}")
    return root, spellings


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def states(folder: Path) -> list[dict[str, Any]]:
    return [torch.load(p, weights_only=False) for p in sorted(folder.rglob(M.CHECKPOINT_STATE_FILE))]


@pytest.mark.parametrize(
    ("hook", "last_result", "ended"),
    [
        ("on_trial_complete", EPOCH_REPORT, M.STOPPED),
        ("on_trial_complete", FINAL_REPORT, M.TERMINATED),
        ("on_trial_error", {M.EPOCH: 1}, M.ERROR),
    ],
    ids=["stopped", "terminated", "error"],
)
def test_an_ended_trial_loses_every_secret_of_every_checkpoint(tmp_path, hook, last_result, ended):
    folder, spellings = trial_folder(tmp_path / "trial")
    assert found_in(folder.rglob(M.CHECKPOINT_STATE_FILE), spellings)  # the scan sees them before
    trial = SimpleNamespace(path=str(folder), status="RUNNING", last_result=last_result)  # Ray sets the status after
    getattr(pickle.loads(pickle.dumps(ScrubSecretsCallback())), hook)(0, [trial], trial)  # as Ray restores it
    scrubbed = states(folder)
    assert len(scrubbed) == 2 and all(s[SCRUBBED] == ended and not set(SECRET_KEYS) & set(s) for s in scrubbed)
    assert not found_in(files(folder), spellings)
    assert (folder / "checkpoint_000002" / FINAL_FILE).read_text() == "{}"


def test_an_unreadable_checkpoint_of_an_ended_trial_is_deleted(tmp_path):
    """A copy cut short by a dying worker (never registered by Ray): it cannot be resumed, its bytes hold secrets."""
    folder, _ = trial_folder(tmp_path / "trial")
    cut = folder / "checkpoint_000001" / M.CHECKPOINT_STATE_FILE
    cut.write_bytes(cut.read_bytes()[:4000])
    trial = SimpleNamespace(path=str(folder), status="RUNNING", last_result={M.EPOCH: 1})
    ScrubSecretsCallback().on_trial_error(0, [trial], trial)
    assert not cut.exists() and [s[SCRUBBED] for s in states(folder)] == [M.ERROR]


def test_a_trial_that_ray_recovers_keeps_its_secrets(tmp_path):
    """A worker that dies is not an end: Ray restarts the trial from its checkpoint, which must resume exactly."""
    folder, spellings = trial_folder(tmp_path / "trial")
    before = {p: p.read_bytes() for p in folder.rglob(M.CHECKPOINT_STATE_FILE)}
    trial = SimpleNamespace(path=str(folder), status="RUNNING", last_result={M.EPOCH: 1})
    ScrubSecretsCallback().on_trial_recover(0, [trial], trial)
    assert {p: p.read_bytes() for p in before} == before


def test_the_end_of_a_complete_sweep_scrubs_every_trial(tmp_path):
    experiment = tmp_path / "ray" / "sweep"
    spellings = set()
    for name in ("trial_a", "trial_b", "extension-1/trial_c"):  # an extension's trials: inside the sweep's folder
        spellings |= trial_folder(experiment / name)[1]
    (experiment / "experiment_state-2026.json").write_text("{}")
    assert len(scrub_ended_trials(experiment, complete=True)) == 6
    assert all(s[SCRUBBED] == SWEEP_COMPLETE for s in states(experiment))
    assert not found_in(files(experiment), spellings)
    assert scrub_ended_trials(experiment, complete=True) == []  # scrubbed once
    assert scrub_ended_trials(tmp_path / "ray" / "never-ran", complete=True) == []


def test_fresh_deletes_every_checkpoint_of_the_sweep(tmp_path):
    spec = parse_spec(yaml.safe_load(tiny_yaml()), source="tiny.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    _, spellings = trial_folder(paths.ray_experiment(spec) / "dp_trial_0")
    spellings |= trial_folder(ray_part_dir(paths.ray_experiment(spec), 1) / "dp_trial_1")[1]  # an extension's
    paths.sweep_dir(spec).mkdir(parents=True)
    (paths.sweep_dir(spec) / M.SWEEP_STATE_FILE).write_text("{}")
    (paths.sweep_dir(spec) / M.SWEEP_LOCK_FILE).write_text("{}")  # the lock of the run that starts over: kept
    _remove_sweep(spec, paths)
    assert not paths.ray_experiment(spec).exists()
    assert [p.name for p in paths.sweep_dir(spec).iterdir()] == [M.SWEEP_LOCK_FILE]
    assert not found_in(files(paths.runs_root), spellings)


@pytest.mark.parametrize(("ended", "trains"), [(M.STOPPED, False), (M.ERROR, True)], ids=["stopped", "error"])
def test_a_trial_restarted_from_its_scrubbed_checkpoint(tmp_path, monkeypatch, ended, trains):
    """Stopped by ASHA, but a killed driver had not saved the stop: Ray restarts it and it trains nothing, reports
    nothing (Ray keeps its last epoch report: STOPPED again). Any other scrubbed trial goes on to the resume, which
    `TrainState.load_state_dict` refuses (`test_resume.py`)."""
    from ray import tune

    from sweeps.scrub import scrub_trial
    from trainables import trial as trial_module
    from trainables.trial import dp_trial

    checkpoint = tmp_path / "checkpoint_000000"
    write_checkpoint(checkpoint / M.CHECKPOINT_STATE_FILE)
    scrub_trial(tmp_path, ended)
    reports, resumed = [], []
    monkeypatch.setattr(
        trial_module,
        "tune",
        SimpleNamespace(
            get_checkpoint=lambda: tune.Checkpoint.from_directory(str(checkpoint)),
            Checkpoint=tune.Checkpoint,
            report=lambda metrics, checkpoint=None: reports.append(metrics),
        ),
    )

    def train_trial(cfg, init, report, state):
        resumed.append(state[SCRUBBED])
        raise RuntimeError("stands in for the refused resume")

    monkeypatch.setattr(trial_module, "train_trial", train_trial)
    if trains:
        with pytest.raises(RuntimeError, match="refused resume"):
            dp_trial({POINT: tiny_point(2.0).to_ray()})
    else:
        dp_trial({POINT: tiny_point(2.0).to_ray()})
    assert resumed == ([ended] if trains else []) and reports == []
