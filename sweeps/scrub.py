"""No secret left behind: the driver removes the mechanism's secrets from the checkpoints of every trial that ended.

A trial's epoch checkpoint (``runs/ray/<sweep>/<trial>/checkpoint_*/state.pt``) holds all a resume needs, the secret
seeds and generator states of its Poisson sampling and noise included (`trainables.privacy.randomness`). Once the
trial has ended nothing resumes it, and those secrets would only let whoever holds the file replay the trial bit for
bit. So the driver scrubs them (`trainables.train.scrub_checkpoint`: secret seeds, sampler, noise and global RNG
states removed; weights, optimizer, ledger and history kept; the file marked so that a resume is refused):

- when a trial ends: TERMINATED (its final checkpoint holds no state; an epoch checkpoint Ray has not deleted yet is
  scrubbed), STOPPED by ASHA, or ERROR after its last retry (`ScrubSecretsCallback`, in the driver);
- at the end of every ``dpsweep sweep`` (`scrub_ended_trials`), again for every trial that Ray's saved state records
  as ended (a checkpoint written after the callback, a sweep started before the callback existed), and for every
  trial of a complete sweep.

A trial that has not ended (INCOMPLETE: pending, or running when the driver stopped) keeps its secrets, so that the
sweep resumes it bit for bit; a worker that dies mid-trial is not an end either (Ray restarts the trial from its
checkpoint). ``dpsweep sweep --fresh`` deletes the sweep's whole Ray folder. Ray's own experiment state (trial
configs and results, searcher and scheduler state) never held a secret.

An ERROR trial is scrubbed too, so running an incomplete sweep again (Ray restarts its ERROR trials) fails such a
trial again with `trainables.train.ScrubbedCheckpointError`, unless it had failed before its first checkpoint. So does
a trial whose worker died on its last attempt: Ray (2.60) saves it as still running, so the trial table calls it
INCOMPLETE, but the driver saw the error and scrubbed it. A STOPPED trial that Ray restarts because a killed driver
had not saved the stop ends again without training (`trainables.trial`). An epoch checkpoint that cannot be read
(a copy a dying worker left unfinished, never registered by Ray) is deleted.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from ray import tune

from trainables import names as N
from trainables.train import SWEEP_COMPLETE, scrub_checkpoint
from trainables.trial import is_final_report

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


def scrub_trial(folder: Path, ended: str) -> list[Path]:
    """Scrub every epoch checkpoint in the trial folder ``folder`` (``checkpoint_*/state.pt``), marking each with
    ``ended`` (how the trial ended). Returns the files rewritten (not those scrubbed already)."""
    # Every state.pt in the folder: Ray's checkpoint_* copies and any staging folder a killed worker left behind.
    return [path for path in sorted(folder.rglob(N.CHECKPOINT_STATE_FILE)) if _scrub(path, ended)]


def _scrub(path: Path, ended: str) -> bool:
    try:
        return scrub_checkpoint(path, ended)
    except FileNotFoundError:  # Ray deleted the checkpoint meanwhile (a newer one replaced it)
        return False
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        if _readable(path):
            raise  # the rewrite failed, not the file
        # A copy cut short by a dying worker, which Ray never registered: it cannot be resumed, but its bytes may
        # hold secrets.
        path.unlink(missing_ok=True)
        return True


def _readable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError):
        return False
    return True


def ended_as(trial: Trial) -> str | None:
    """How a trial of Ray's saved state ended: ``names.ERROR``, ``TERMINATED`` or ``STOPPED`` (`completed_as`);
    None while it has not ended (pending, running, paused)."""
    if trial.status == "ERROR":
        return N.ERROR
    return completed_as(trial) if trial.status == "TERMINATED" else None


def completed_as(trial: Trial) -> str:
    """``names.TERMINATED`` for a trial whose last result is its final report, else ``STOPPED`` (by the
    scheduler, after an epoch report)."""
    return N.TERMINATED if is_final_report(trial.last_result or {}) else N.STOPPED


def scrub_ended_trials(experiment: Path, complete: bool) -> list[Path]:
    """Scrub the checkpoints of every trial of the sweep's Ray experiment folder ``experiment`` (and of its
    extensions, inside it) that has ended, as Ray's saved state records it; with ``complete`` (every trial ended), of
    every trial folder in it. Returns the files rewritten."""
    if not experiment.is_dir():
        return []
    if complete:
        return [path for folder in sorted(experiment.iterdir()) for path in scrub_trial(folder, SWEEP_COMPLETE)]
    from ray.tune import ExperimentAnalysis

    from analysis.tables import ray_experiment_parts, ray_state_saved

    scrubbed = []
    for part in ray_experiment_parts(experiment):  # the sweep's first grid, then each extension
        for trial in ExperimentAnalysis(str(part)).trials if ray_state_saved(part) else []:
            ended = ended_as(trial)
            if ended is not None and trial.path is not None:
                scrubbed += scrub_trial(Path(trial.path), ended)
    return scrubbed


class ScrubSecretsCallback(tune.Callback):
    """Scrubs a trial's checkpoints when it ends (`scrub_trial`): on its completion (finished, or stopped by the
    scheduler) and on its error after the last retry, not on a failure Ray recovers from. Holds no state, so the
    copy Ray pickles with the experiment and restores on a resume is the same."""

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        # Ray calls this before it sets the trial's status to TERMINATED.
        self._scrub(trial, completed_as(trial))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._scrub(trial, N.ERROR)

    @staticmethod
    def _scrub(trial: Trial, ended: str) -> None:
        try:
            folder = trial.path
        except RuntimeError:  # a trial removed before it started has no folder (Ray raises rather than say None)
            return
        if folder is not None:
            scrub_trial(Path(folder), ended)
