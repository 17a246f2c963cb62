"""`search: optuna`: Optuna (through Ray Tune's OptunaSearch) searches sigma, batch size, epochs, lr and clip.

The sweep's cells (model x dataset x init x target epsilon) each get their own Optuna study, persisted in
``runs/<sweep>/optuna.db`` (study ``<sweep>/<cell>``). One Ray Tune searcher, `PrivateOptunaSearch`, hands
out trials round-robin over the cells, ``optuna.trials_per_target`` per cell, behind Ray's
``ConcurrencyLimiter``; `launch` gets it from `optuna_searcher`.

    SweepSpec.cells --study_cells--> [StudyCell] --FeasibleOptunaSearch.propose--> Proposal
    --OptunaTrialFactory (sweeps.plan.make_trial, as in grid mode)--> TrialPoint --to_ray--> Ray

The ranges are the ``optuna:`` section's (`sweeps.schema.OptunaSpec`, named after the trial fields they set).

**Feasibility comes first.** Every proposal (noise multiplier sigma, expected batch size B, epochs, lr, clip)
is checked with the sweep's accountant before it becomes a trial: planned as any trial is
(`trainables.privacy.planning.plan_privacy`: q = 1/ceil(N/B), steps = epochs x ceil(N/B), N the cell's records:
training images, or training patients for ``privacy_unit: patient``, with B then in patients), a proposal whose planned
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
from typing import TYPE_CHECKING, Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sweeps.ledger import SweepLedger
from sweeps.plan import DatasetPlan, SweepPaths, SweepPlan, cell_privacy, make_trial, provenance_tags
from sweeps.schema import GridCell, GridPoint, OptunaSampler, OptunaSpec, SweepSpec
from trainables import names as M
from trainables.config import PrivacyConfig, PrivacyUnit, is_private
from trainables.models import ResolvedInit
from trainables.point import POINT, TrialPoint
from trainables.privacy.planning import plan_privacy, planned_epsilon
from trainables.trial import is_final_report

if TYPE_CHECKING:
    import optuna

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
class StudyCell:
    """One Optuna study: a grid cell (model, dataset, init, target epsilon) at the sweep's privacy unit, the number of
    records N it plans over (training images, or training patients: `sweeps.plan.DatasetPlan.n_records`) and its
    privacy config before planning (`sweeps.plan.cell_privacy`: delta, accountant, tolerance, label-count release,
    the unit and its image cap); each proposal sets its batch size, epochs and sigma."""

    cell: GridCell
    n_records: int
    privacy: PrivacyConfig

    @property
    def privacy_unit(self) -> PrivacyUnit:
        return self.privacy.privacy_unit

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A searcher saved before patient-level studies (Ray's experiment state) named N ``n_train``: its images.
        if "n_train" in state:
            state = {**{k: v for k, v in state.items() if k != "n_train"}, "n_records": state["n_train"]}
        self.__dict__.update(state)

    @property
    def key(self) -> str:
        return self.cell.key


@dataclass(frozen=True)
class Proposal:
    """A proposal the accountant accepted (`FeasibleOptunaSearch.propose`): the values Optuna chose, its Optuna trial
    number and the epsilon its plan spends (inf for the non-private baseline, which searches no sigma and no clip)."""

    number: int
    expected_batch_size: int
    epochs: int
    lr: float
    noise_multiplier: float | None
    max_grad_norm: float | None
    planned_epsilon: float


def study_cells(spec: SweepSpec, datasets: dict[str, DatasetPlan]) -> list[StudyCell]:
    """The sweep's studies, one per cell (`SweepSpec.cells`), in its stable order, at the sweep's one privacy unit
    (`sweeps.validate` refuses an Optuna sweep with two)."""
    (unit,) = spec.axes.privacy_unit
    return [
        StudyCell(c, datasets[c.dataset].n_records(unit), cell_privacy(spec, c.target_epsilon, unit))
        for c in spec.cells()
    ]


def optuna_searcher(plan: SweepPlan, ledger: SweepLedger | None = None) -> PrivateOptunaSearch:
    """The sweep's searcher: one study per cell, persisted in ``runs/<sweep>/optuna.db``, proposing the trials that
    `OptunaTrialFactory` makes (and records in the datasets' privacy ledgers before they run, given ``ledger``)."""
    spec = plan.spec
    assert spec.optuna is not None
    sweep_dir = plan.paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    return PrivateOptunaSearch(
        study_cells(spec, plan.datasets),
        OptunaTrialFactory(spec, plan.paths, plan.datasets, plan.inits, provenance_tags(), ledger),
        settings=spec.optuna,
        study_prefix=spec.name,
        storage_url=f"sqlite:///{sweep_dir / M.OPTUNA_DB_FILE}",
    )


@dataclass(frozen=True)
class OptunaTrialFactory:
    """Turns an accepted proposal for a study into a trial, made as grid mode makes one (`sweeps.plan.make_trial`);
    picklable: Ray saves the searcher with the experiment."""

    spec: SweepSpec
    paths: SweepPaths
    datasets: dict[str, DatasetPlan]
    inits: dict[tuple[str, str], ResolvedInit]
    provenance_tags: dict[str, str]
    ledger: SweepLedger | None = None
    """Where each trial is recorded before Ray runs it (the training set's privacy ledger); None in tests."""

    def __call__(self, study: StudyCell, proposal: Proposal) -> TrialPoint:
        cell = study.cell
        point = GridPoint(
            cell,
            max_grad_norm=proposal.max_grad_norm or 0.0,  # the baseline clips nothing
            lr=proposal.lr,
            seed=self.spec.axes.seed[0],
            privacy_unit=study.privacy_unit,
        )
        dataset = self.datasets[cell.dataset]
        privacy = dataclasses.replace(
            study.privacy, expected_batch_size=proposal.expected_batch_size, epochs=proposal.epochs
        )
        number = f"{proposal.number:03d}"
        trial = make_trial(
            self.spec,
            self.paths,
            dataset,
            self.inits[(cell.model, cell.init)],
            point,
            cell.name.then(f"-t{number}", f" t{number}"),
            privacy=plan_privacy(privacy, study.n_records, noise_multiplier=proposal.noise_multiplier),
            provenance_tags=self.provenance_tags,
            extra_params={"optuna_trial": proposal.number, "planned_epsilon": proposal.planned_epsilon},
        )
        if self.ledger is not None:
            self.ledger.record([trial])
        return trial


MakeTrial = Callable[[StudyCell, Proposal], TrialPoint]
"""What turns an accepted proposal into a trial (`OptunaTrialFactory`)."""


class FeasibleOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch for one study, which never proposes what the accountant rejects (`propose`).

    Args:
        cell: the study's cell.
        settings: the sweep's ``optuna:`` section: its ranges and ``max_proposals``.
        kwargs: `OptunaSearch`'s (metric, mode, sampler, study name, storage).
    """

    def __init__(self, cell: StudyCell, settings: OptunaSpec, **kwargs: Any):
        self.cell, self.settings = cell, settings
        self.infeasible = 0
        super().__init__(space=self._space, **kwargs)

    @property
    def private(self) -> bool:
        return is_private(self.cell.cell.target_epsilon)

    def _space(self, trial: optuna.Trial) -> dict[str, float | int]:
        o = self.settings
        values = {
            "expected_batch_size": _suggest(trial, "expected_batch_size", o.expected_batch_size, log=True),
            "epochs": _suggest(trial, "epochs", o.epochs, log=False),
            "lr": _suggest(trial, "lr", o.lr, log=True),
        }
        if self.private:
            values["noise_multiplier"] = _suggest(trial, "noise_multiplier", o.noise_multiplier, log=True)
            values["max_grad_norm"] = _suggest(trial, "max_grad_norm", o.max_grad_norm, log=True)
        return values

    def planned_epsilon(self, values: dict[str, Any]) -> float:
        """Epsilon Optuna's values would spend over their planned steps (inf for the non-private baseline)."""
        if not self.private:
            return math.inf
        privacy = dataclasses.replace(
            self.cell.privacy, expected_batch_size=int(values["expected_batch_size"]), epochs=int(values["epochs"])
        )
        return planned_epsilon(
            plan_privacy(privacy, self.cell.n_records, noise_multiplier=float(values["noise_multiplier"]))
        )

    def propose(self, trial_id: str) -> Proposal:
        """The next proposal within the cell's target; the rejected ones are told to Optuna and never trained.

        Raises:
            RuntimeError: ``optuna.max_proposals`` proposals in a row spend more than the target.
        """
        target = self.cell.cell.target_epsilon
        for _ in range(self.settings.max_proposals):
            values = super().suggest(trial_id)
            assert values is not None  # a define-by-run space always proposes
            epsilon = self.planned_epsilon(values)
            ot_trial = self._ot_trials[trial_id]
            ot_trial.set_user_attr("planned_epsilon", epsilon)
            if not self.private or epsilon <= target:
                sigma, clip = values.get("noise_multiplier"), values.get("max_grad_norm")
                return Proposal(
                    number=ot_trial.number,
                    expected_batch_size=int(values["expected_batch_size"]),
                    epochs=int(values["epochs"]),
                    lr=float(values["lr"]),
                    noise_multiplier=None if sigma is None else float(sigma),
                    max_grad_norm=None if clip is None else float(clip),
                    planned_epsilon=epsilon,
                )
            # Never trained: tell Optuna it violates the privacy constraint, then draw again.
            ot_trial.set_constraint(CONSTRAINT, epsilon - target)
            assert self._ot_study is not None  # set up in __init__: the space and metric are given
            self._ot_study.tell(ot_trial, state=_pruned())
            del self._ot_trials[trial_id]
            self.infeasible += 1
        raise RuntimeError(
            f"optuna: {self.settings.max_proposals} proposals in a row for {self.cell.key} spend more than epsilon "
            f"{target:g}; widen optuna.noise_multiplier upwards or lower optuna.epochs / optuna.expected_batch_size"
        )


class PrivateOptunaSearch(Searcher):
    """Round-robin over the cells' `FeasibleOptunaSearch` studies; suggests whole dpsweep trial points.

    Args:
        cells: the studies, in a stable order.
        make_trial: turns an accepted proposal into the trial (`OptunaTrialFactory`); Ray gets its `TrialPoint.to_ray`
            under ``point``, as in grid mode.
        settings: the sweep's ``optuna:`` section: ranges, objectives (`sweeps.schema.Objective`), trials per cell,
            sampler and its seed (cell i's sampler is seeded ``seed + i``), ``max_proposals``.
        study_prefix: Optuna study names are ``<study_prefix>/<cell key>``.
        storage_url: Optuna RDB storage (e.g. ``sqlite:///runs/<sweep>/optuna.db``), or None for in-memory.
    """

    def __init__(
        self,
        cells: list[StudyCell],
        make_trial: MakeTrial,
        *,
        settings: OptunaSpec,
        study_prefix: str,
        storage_url: str | None,
    ):
        self.objectives = settings.objectives
        metrics = [f"objective/{o}" for o in self.objectives]
        modes = [objective_mode(o) for o in self.objectives]
        # No metric at the Ray level: trials report validation keys that this class maps to the objectives
        # (Ray would otherwise insist that every report carries "objective/...").
        super().__init__(metric=None, mode=None)
        self.cells, self.make_trial, self.trials_per_cell = cells, make_trial, settings.trials_per_target
        self.storage_url = storage_url
        self.searchers = {
            cell.key: FeasibleOptunaSearch(
                cell,
                settings,
                metric=metrics if len(metrics) > 1 else metrics[0],
                mode=modes if len(modes) > 1 else modes[0],
                sampler=_sampler(settings.sampler, settings.seed + i),
                study_name=f"{study_prefix}/{cell.key}",
                storage=_storage(storage_url),
            )
            for i, cell in enumerate(cells)
        }
        self.launched = {cell.key: 0 for cell in cells}
        self.trial_cell: dict[str, str] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict[str, Any], **spec: Any) -> bool:
        return True  # metric and mode are fixed by the sweep file's objectives

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        open_cells = [c for c in self.cells if self.launched[c.key] < self.trials_per_cell]
        if not open_cells:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's end marker is a str
        cell = min(open_cells, key=lambda c: self.launched[c.key])  # round-robin, stable order on ties
        proposal = self.searchers[cell.key].propose(trial_id)
        self.launched[cell.key] += 1
        self.trial_cell[trial_id] = cell.key
        return {POINT: self.make_trial(cell, proposal).to_ray()}

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


def _suggest(trial: optuna.Trial, name: str, bounds: tuple[float, ...] | tuple[int, ...], log: bool) -> float | int:
    """Optuna's value for one range: ``[value]`` fixed, ``[low, high]`` searched (integers for integer bounds)."""
    if len(bounds) == 1:
        return bounds[0]
    low, high = bounds
    if isinstance(low, int) and isinstance(high, int):
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, float(low), float(high), log=log)


def _pruned() -> optuna.trial.TrialState:
    from optuna.trial import TrialState

    return TrialState.PRUNED


def _sampler(name: OptunaSampler, seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)  # reads each trial's privacy constraint


def _storage(url: str | None) -> optuna.storages.RDBStorage | None:
    if url is None:
        return None
    import optuna

    return optuna.storages.RDBStorage(url)
