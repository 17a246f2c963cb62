"""`search: optuna`: Optuna (through Ray Tune's OptunaSearch) searches sigma, batch size, epochs, lr and clip.

The sweep's cells (model x dataset x init x target epsilon) each get their own Optuna study, persisted in
``runs/<sweep>/optuna.db`` (study ``<sweep>/<cell>``). One Ray Tune searcher, `PrivateOptunaSearch`, hands
out trials round-robin over the cells, ``optuna.trials_per_target`` per cell, behind Ray's
``ConcurrencyLimiter``.

**Feasibility comes first.** Every proposal (noise multiplier sigma, expected batch size B, epochs, lr, clip)
is checked with the sweep's accountant before it becomes a trial: planned as any trial is
(`trainables.privacy.planning.plan_privacy`: q = 1/ceil(N/B), steps = epochs x ceil(N/B)), a proposal whose planned
epsilon exceeds the cell's target is never trained. It is told to Optuna as a pruned trial carrying the constraint
``epsilon - target`` (> 0: infeasible), so the TPE sampler learns to avoid that region (Optuna's constrained TPE),
and the next proposal is drawn; ``optuna.max_proposals`` infeasible proposals in a row stop the sweep with a message.
The launched trial then runs with the trial-side budget guards as in grid mode (it refuses a sigma that
spends more than its target).

**Objectives** are validation-split numbers of the epoch the trial selects (never test): ``auroc`` (macro
AUROC, maximized), ``auroc_gap_sex`` / ``auroc_gap_age`` (subgroup macro-AUROC gap, minimized). Several
objectives make a multi-objective study. Early-stopped trials (ASHA) are told with their last epoch's
validation values.

**Resume.** Ray saves this searcher with the experiment; `Tuner.restore` brings back every cell's study
(and the Optuna storage holds every finished trial), so an interrupted search continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from trainables import names as M
from trainables.config import PrivacyConfig, is_private
from trainables.privacy.planning import plan_privacy, planned_epsilon
from trainables.trial import is_final_report

TRAINING_ITERATION = "training_iteration"
CONSTRAINT = "epsilon_over_target"


def objective_keys(objective: str, selected: bool) -> str:
    """The metric an objective reads: the final report's selected-epoch value, or an epoch report's value."""
    attribute = objective.removeprefix("auroc_gap_")
    if objective == "auroc":
        return M.VAL_SELECTED_AUROC_MACRO if selected else M.VAL_AUROC_MACRO
    return M.val_selected_auroc_gap(attribute) if selected else M.auroc_gap("val", attribute)


def objective_mode(objective: str) -> str:
    return "max" if objective == "auroc" else "min"


@dataclass(frozen=True)
class Cell:
    """One Optuna study: a (model, dataset, init, target epsilon) combination, its training-set size and its privacy
    config before planning (`sweeps.plan.cell_privacy`: delta, accountant, tolerance, label-count release); each
    proposal sets its batch size, epochs and sigma."""

    key: str
    model: str
    dataset: str
    init: str
    target_epsilon: float
    n_train: int
    privacy: PrivacyConfig


@dataclass(frozen=True)
class Ranges:
    """What Optuna searches: ``(low, high)`` pairs (searched) or one value (fixed)."""

    noise_multiplier: tuple[float, ...]
    expected_batch_size: tuple[int, ...]
    epochs: tuple[int, ...]
    lr: tuple[float, ...]
    max_grad_norm: tuple[float, ...]


class FeasibleOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch for one cell, which never returns a proposal the accountant rejects."""

    def __init__(self, cell: Cell, ranges: Ranges, *, max_proposals: int, **kwargs):
        self.cell, self.ranges = cell, ranges
        self.max_proposals = max_proposals
        self.infeasible = 0
        super().__init__(space=self._space, **kwargs)

    def _space(self, trial) -> dict[str, Any]:
        r, private = self.ranges, is_private(self.cell.target_epsilon)
        values = {
            "expected_batch_size": _suggest(trial, "expected_batch_size", r.expected_batch_size, log=True),
            "epochs": _suggest(trial, "epochs", r.epochs, log=False),
            "lr": _suggest(trial, "lr", r.lr, log=True),
        }
        if private:
            values["noise_multiplier"] = _suggest(trial, "noise_multiplier", r.noise_multiplier, log=True)
            values["max_grad_norm"] = _suggest(trial, "max_grad_norm", r.max_grad_norm, log=True)
        return values

    def planned_epsilon(self, proposal: dict[str, Any]) -> float:
        """Epsilon the proposal would spend over its planned steps (inf for the non-private baseline)."""
        if not is_private(self.cell.target_epsilon):
            return math.inf
        privacy = dataclasses.replace(
            self.cell.privacy,
            expected_batch_size=int(proposal["expected_batch_size"]),
            epochs=int(proposal["epochs"]),
        )
        return planned_epsilon(
            plan_privacy(privacy, self.cell.n_train, noise_multiplier=float(proposal["noise_multiplier"]))
        )

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for _ in range(self.max_proposals):
            proposal = super().suggest(trial_id)
            epsilon = self.planned_epsilon(proposal)
            ot_trial = self._ot_trials[trial_id]
            if not is_private(self.cell.target_epsilon) or epsilon <= self.cell.target_epsilon:
                ot_trial.set_user_attr("planned_epsilon", epsilon)
                return {**proposal, "optuna_number": ot_trial.number, "planned_epsilon": epsilon}
            # Never trained: tell Optuna it violates the privacy constraint, then draw again.
            ot_trial.set_user_attr("planned_epsilon", epsilon)
            ot_trial.set_constraint(CONSTRAINT, epsilon - self.cell.target_epsilon)
            self._ot_study.tell(ot_trial, state=_pruned())
            del self._ot_trials[trial_id]
            self.infeasible += 1
        raise RuntimeError(
            f"optuna: {self.max_proposals} proposals in a row for {self.cell.key} spend more than epsilon "
            f"{self.cell.target_epsilon:g}; widen optuna.noise_multiplier upwards or lower optuna.epochs / "
            "optuna.expected_batch_size"
        )


class PrivateOptunaSearch(Searcher):
    """Round-robin over the cells' `FeasibleOptunaSearch` studies; returns whole dpsweep trial points.

    Args:
        cells: the studies, in a stable order.
        make_point: ``(cell, proposal) -> {"point": ...}``, the same trial point grid mode runs.
        objectives: objective names (`sweeps.schema.Objective`).
        trials_per_cell: trials launched per cell.
        study_prefix: Optuna study names are ``<study_prefix>/<cell key>``.
        storage_url: Optuna RDB storage (e.g. ``sqlite:///runs/<sweep>/optuna.db``), or None for in-memory.
    """

    def __init__(
        self,
        cells: list[Cell],
        make_point: Callable[[Cell, dict[str, Any]], dict[str, Any]],
        *,
        ranges: Ranges,
        objectives: tuple[str, ...],
        trials_per_cell: int,
        sampler: str,
        seed: int,
        max_proposals: int,
        study_prefix: str,
        storage_url: str | None,
    ):
        self.objectives = objectives
        metrics = [f"objective/{o}" for o in objectives]
        modes = [objective_mode(o) for o in objectives]
        # No metric at the Ray level: trials report validation keys that this class maps to the objectives
        # (Ray would otherwise insist that every report carries "objective/...").
        super().__init__(metric=None, mode=None)
        self.cells, self.make_point, self.trials_per_cell = cells, make_point, trials_per_cell
        self.storage_url = storage_url
        self.searchers = {
            cell.key: FeasibleOptunaSearch(
                cell,
                ranges,
                max_proposals=max_proposals,
                metric=metrics if len(metrics) > 1 else metrics[0],
                mode=modes if len(modes) > 1 else modes[0],
                sampler=_sampler(sampler, seed + i),
                study_name=f"{study_prefix}/{cell.key}",
                storage=_storage(storage_url),
            )
            for i, cell in enumerate(cells)
        }
        self.launched = {cell.key: 0 for cell in cells}
        self.trial_cell: dict[str, str] = {}

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are fixed by the sweep file's objectives

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_cells = [c for c in self.cells if self.launched[c.key] < self.trials_per_cell]
        if not open_cells:
            return Searcher.FINISHED
        cell = min(open_cells, key=lambda c: self.launched[c.key])  # round-robin, stable order on ties
        proposal = self.searchers[cell.key].suggest(trial_id)
        self.launched[cell.key] += 1
        self.trial_cell[trial_id] = cell.key
        return self.make_point(cell, proposal)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        values = self._objective_values(result, selected=False)
        if values is not None and len(self.objectives) == 1:
            self.searchers[self.trial_cell[trial_id]].on_trial_result(
                trial_id, {**values, TRAINING_ITERATION: result.get(TRAINING_ITERATION, 0)}
            )

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        if trial_id not in self.trial_cell:
            return
        values = None
        if result:
            values = self._objective_values(result, selected=is_final_report(result))
        # An objective that is undefined (NaN: e.g. a validation split without two evaluable age groups) makes the
        # trial FAIL in Optuna, which the samplers ignore; PRUNED would need intermediate values.
        self.searchers[self.trial_cell[trial_id]].on_trial_complete(trial_id, values, error=error or values is None)

    def _objective_values(self, result: dict[str, Any], selected: bool) -> dict[str, float] | None:
        values = {}
        for objective in self.objectives:
            value = result.get(objective_keys(objective, selected))
            if value is None or not math.isfinite(float(value)):
                return None
            values[f"objective/{objective}"] = float(value)
        return values

    @property
    def infeasible(self) -> int:
        """Proposals rejected by the accountant so far (never trained)."""
        return sum(s.infeasible for s in self.searchers.values())

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "wb") as file:
            pickle.dump(self.__dict__, file)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as file:
            self.__dict__.update(pickle.load(file))


def _suggest(trial, name: str, bounds: tuple, log: bool):
    if len(bounds) == 1:
        return bounds[0]
    low, high = bounds
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, float(low), float(high), log=log)


def _pruned():
    from optuna.trial import TrialState

    return TrialState.PRUNED


def _sampler(name: str, seed: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)  # reads each trial's privacy constraint


def _storage(url: str | None):
    if url is None:
        return None
    import optuna

    return optuna.storages.RDBStorage(url)
