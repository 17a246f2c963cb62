"""`search: private_selection`: tuning whose privacy cost is the one reported (Papernot & Steinke, ICLR 2022).

Per cell (model x dataset x init x target epsilon):

    plan_selections --> CellSelection (single-run epsilon, each candidate shape's sigma, the tuning-inclusive epsilon
                        <= the target; `trainables.privacy.selection.plan_selection`)
    SelectionRun.prepare (launch) --> K and each candidate's lr, clip, B, epochs drawn with secret randomness,
                        kept only in the private draws file (`DRAWS_FILE`, in the sweep's Ray folder)
    Ray runs every candidate to its planned steps, with no MLflow logging and no per-trial console line
    SelectionRun.publish --> per cell the best candidate by validation (`SELECTION_METRIC`) is the one trial released:
                        its MLflow child run (replayed from its stored reports and final checkpoint by the sweep's
                        own `sweeps.tracking.MlflowSweepCallback`), its row in the tables, ``selection.json``

What stays private (``runs/ray/<sweep>/``, like the trials' checkpoints): the draws file, every candidate's Ray folder
and reports, Ray's own trial ids and names (they carry a running index). What is public: the plan (distribution,
E[K], shape, the candidate shapes and their sigma, q, steps, the single-run and the tuning-inclusive epsilon) and the
winner, whose key carries a random id (``<cell>-sel<hex>``), never an index. A Poisson cell may draw K = 0: it
releases no winner (the output "nothing", which the theorem covers). The privacy ledger records each cell once, as
its selection (`sweeps.ledger.SweepLedger.record_selection`), never its K candidates.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sweeps.plan import DatasetPlan, SweepPaths, SweepPlan, cell_privacy, make_trial, provenance_tags
from sweeps.schema import GridCell, GridPoint, SelectionSpec, SpecError, SweepSpec
from trainables import names as N
from trainables.config import PrivacyUnit
from trainables.point import POINT, TrialPoint
from trainables.privacy.selection import (
    SelectionPlan,
    TrialCount,
    plan_mechanisms,
    plan_selection,
    selection_rdp_epsilon,
)
from trainables.privacy.tuning import TrialMechanism

if TYPE_CHECKING:
    from sweeps.ledger import SweepLedger

DRAWS_FILE = "selection-draws.json"
"""The secret draws (each cell's candidates), in the sweep's Ray experiment folder: private storage, never
published; read back only to resume."""
PUBLIC_FILE = N.SELECTION_FILE
"""``runs/<sweep>/selection.json``: the public plan of each cell and its winner (`SelectionRun.public_summary`)."""
SELECTION_METRIC = N.VAL_SELECTED_AUROC_MACRO
"""What picks a cell's winner: the validation macro AUROC of the selected epoch (the grid's selection metric)."""
WITHHELD = "withheld (private selection)"
"""The value of the winner's Ray trial id tag: Ray's ids carry a running index, which would count the candidates."""


def trial_count(selection: SelectionSpec) -> TrialCount:
    """The distribution of each cell's number of candidates K."""
    return TrialCount(selection.distribution, selection.mean_trials, selection.shape)


@dataclass(frozen=True)
class CellSelection:
    """One cell's calibrated private selection.

    Attributes:
        cell: the cell.
        unit: its privacy unit (the sweep's one).
        n_records: N of the unit on the cell's training set.
        plan: the calibration (`SelectionPlan`: tuning-inclusive and single-run epsilon, each candidate shape's
            planned privacy, the count's distribution).
    """

    cell: GridCell
    unit: PrivacyUnit
    n_records: int
    plan: SelectionPlan

    @property
    def key(self) -> str:
        return self.cell.key

    def public(self) -> dict[str, Any]:
        """The cell's public plan (what the dry run prints and ``selection.json`` holds), without its K."""
        count = self.plan.count
        return {
            "cell": self.key,
            "model": self.cell.model,
            "dataset": self.cell.dataset,
            "init": self.cell.init,
            "target_epsilon": self.cell.target_epsilon,
            "epsilon": self.plan.epsilon,
            "single_run_epsilon": self.plan.single_run_epsilon,
            "distribution": count.distribution,
            "mean_trials": count.mean,
            "shape": count.shape,
            "candidates": [
                {
                    "expected_batch_size": batch,
                    "epochs": epochs,
                    "noise_multiplier": p.noise_multiplier,
                    "sample_rate": p.sample_rate,
                    "steps": p.steps,
                    "label_count_noise_multiplier": p.label_count_noise_multiplier,
                }
                for (batch, epochs), p in self.plan.candidates.items()
            ],
        }

    def describe(self) -> str:
        """``random-eps2: target 2, single-run epsilon 1.62, tuning-inclusive 1.99 (logarithmic, E[K]=4)``."""
        count = self.plan.count
        shape = f", shape {count.shape:g}" if count.distribution == "negative_binomial" and count.shape else ""
        sigmas = ", ".join(f"B={b} E={e}: sigma {p.noise_multiplier:.4f}" for (b, e), p in self.plan.candidates.items())
        return (
            f"{self.key}: target {self.cell.target_epsilon:g}, single-run epsilon {self.plan.single_run_epsilon:.4g}, "
            f"tuning-inclusive epsilon {self.plan.epsilon:.4g} ({count.distribution}, E[K]={count.mean:g}{shape}); "
            f"{sigmas}"
        )


def plan_selections(
    spec: SweepSpec, datasets: dict[str, DatasetPlan], cache_path: Path | None = None
) -> dict[str, CellSelection]:
    """Calibrate every cell (`plan_selection`): each candidate shape (B, E) of ``selection.expected_batch_size`` x
    ``selection.epochs`` at one single-run epsilon, so the cell's tuning-inclusive epsilon is at most its target.

    Raises:
        SpecError: a target the selection cannot meet (naming the target and the mean number of trials).
    """
    selection = spec.selection
    assert selection is not None
    count = trial_count(selection)
    shapes = list(itertools.product(selection.expected_batch_size, selection.epochs))
    unit = spec.axes.privacy_unit[0]
    plans: dict[str, CellSelection] = {}
    for cell in spec.cells():
        n_records = datasets[cell.dataset].n_records(unit)
        try:
            plan = plan_selection(
                cell_privacy(spec, cell.target_epsilon, unit), n_records, shapes, count, cache_path=cache_path
            )
        except ValueError as error:
            raise SpecError(
                f"{spec.source}: privacy.target_epsilon = {cell.target_epsilon:g} with selection.mean_trials = "
                f"{selection.mean_trials:g} ({cell.dataset}): {error}"
            ) from None
        plans[cell.key] = CellSelection(cell, unit, n_records, plan)
    return plans


@dataclass(frozen=True)
class Candidate:
    """One candidate trial of a cell, as drawn (secret: the list of a cell's candidates reveals its K).

    Attributes:
        cell: the cell's key.
        id: a random hex id (the trial key's suffix: no running index).
        lr, max_grad_norm: drawn log-uniformly from their ranges (or fixed).
        expected_batch_size, epochs: drawn uniformly from their choices.
    """

    cell: str
    id: str
    lr: float
    max_grad_norm: float
    expected_batch_size: int
    epochs: int


def secret_generator() -> np.random.Generator:
    """A generator seeded from the operating system's randomness, never from the sweep's seed or anything logged."""
    return np.random.default_rng(secrets.randbits(128))


def draw_trial_count(count: TrialCount, rng: np.random.Generator) -> int:
    """One cell's K (secret; a test replaces this function to know K)."""
    return count.draw(rng)


def _log_uniform(bounds: Sequence[float], rng: np.random.Generator) -> float:
    low, high = float(bounds[0]), float(bounds[-1])
    return low if low == high else float(math.exp(rng.uniform(math.log(low), math.log(high))))


def draw_candidates(
    spec: SweepSpec, selections: dict[str, CellSelection], rng: np.random.Generator | None = None
) -> list[Candidate]:
    """Each cell's K (`draw_trial_count`) and its candidates' hyperparameters, drawn independently of any data or
    result (the theorem's non-adaptive candidates), from secret randomness (`secret_generator`)."""
    selection = spec.selection
    assert selection is not None
    rng = rng or secret_generator()
    candidates = []
    for key, cell in selections.items():
        ids: set[str] = set()
        for _ in range(draw_trial_count(cell.plan.count, rng)):
            candidate_id = secrets.token_hex(3)
            while candidate_id in ids:
                candidate_id = secrets.token_hex(3)
            ids.add(candidate_id)
            candidates.append(
                Candidate(
                    cell=key,
                    id=candidate_id,
                    lr=_log_uniform(selection.lr, rng),
                    max_grad_norm=_log_uniform(selection.max_grad_norm, rng),
                    expected_batch_size=int(rng.choice(selection.expected_batch_size)),
                    epochs=int(rng.choice(selection.epochs)),
                )
            )
    return candidates


def write_private(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON readable by its owner only (the draws are private material, like the trials' checkpoints)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(payload, out)


@dataclass(frozen=True)
class SelectionOutcome:
    """What a private selection's run released (`SelectionRun.finish`).

    Attributes:
        released: the winners' trial keys (the only trials in the tables and MLflow).
        ended: every candidate ended (the sweep is complete).
        metrics: the parent run's selection metrics (`SelectionRun.summary_metrics`).
    """

    released: set[str]
    ended: bool
    metrics: dict[str, float]


@dataclass(frozen=True)
class SelectionRun:
    """A private-selection sweep's candidates and, once they ran, its winners (`prepare`, then `publish`).

    Attributes:
        plan: the sweep's plan (its `SweepPlan.selections`).
        candidates: every cell's candidates (secret).
        points: their trial points, in the candidates' order.
    """

    plan: SweepPlan
    candidates: tuple[Candidate, ...]
    points: tuple[TrialPoint, ...]

    @classmethod
    def prepare(cls, plan: SweepPlan) -> SelectionRun:
        """The candidates: read back from the private draws file when the sweep resumes, otherwise drawn now
        (`draw_candidates`) and written there before any trial runs."""
        spec = plan.spec
        path = plan.paths.ray_experiment(spec) / DRAWS_FILE
        if path.is_file():
            candidates = [Candidate(**row) for row in json.loads(path.read_text())["candidates"]]
        else:
            candidates = draw_candidates(spec, plan.selections)
            write_private(path, {"candidates": [asdict(c) for c in candidates]})
        tags = provenance_tags()
        points = tuple(_point(plan, candidate, tags) for candidate in candidates)
        return cls(plan, tuple(candidates), points)

    def cell_of(self) -> dict[str, str]:
        """Candidate trial key -> its cell's key."""
        return {point.key: c.cell for point, c in zip(self.points, self.candidates, strict=True)}

    def record(self, ledger: SweepLedger) -> int:
        """Each cell in its dataset's privacy ledger, once, as its selection (never its candidates)."""
        return ledger.record_selection(self.plan.selections.values())

    def tuner(self, trainable: Any, folder: Path) -> Any:
        """The Ray Tuner of the candidates: no MLflow callback (nothing of a candidate is logged while it runs), a
        console line per finished cell only (`CellProgressCallback`), no early stopping."""
        from ray import tune
        from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

        from sweeps.scrub import ScrubSecretsCallback
        from sweeps.tracking import CellProgressCallback

        spec = self.plan.spec
        if tune.Tuner.can_restore(str(folder)):
            return tune.Tuner.restore(str(folder), trainable, resume_errored=True)
        return tune.Tuner(
            trainable,
            param_space={POINT: tune.grid_search([point.to_ray() for point in self.points])},
            tune_config=tune.TuneConfig(max_concurrent_trials=spec.resources.max_concurrent or None),
            run_config=tune.RunConfig(
                name=folder.name,
                storage_path=str(folder.parent),
                callbacks=[
                    CellProgressCallback(self.cell_of(), list(self.plan.selections)),
                    CSVLoggerCallback(),  # type: ignore[no-untyped-call]  # Ray leaves its __init__ unannotated
                    JsonLoggerCallback(),  # type: ignore[no-untyped-call]  # Ray leaves its __init__ unannotated
                    ScrubSecretsCallback(),
                ],
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            ),
        )

    def run(self, trainable: Any) -> None:
        """Run (or resume) every candidate (`tuner`); nothing when no cell drew one (Poisson K = 0 everywhere)."""
        if self.points:
            self.tuner(trainable, self.plan.paths.ray_experiment(self.plan.spec)).fit()

    def ended(self, experiment: Path) -> bool:
        """Whether every candidate ended (finished or failed after its retries): only then are winners picked."""
        if not self.points:
            return True
        statuses = candidate_statuses(experiment)
        return all(statuses.get(point.key) in (N.TERMINATED, N.ERROR) for point in self.points)

    def winners(self, experiment: Path) -> dict[str, str | None]:
        """Cell key -> its best candidate's key by `SELECTION_METRIC` (finished candidates only; the first drawn
        wins a tie), or None where no candidate finished (a Poisson K = 0, or every candidate failed)."""
        from sweeps.results import experiment_records

        scores = {
            record.key: float(record.final[SELECTION_METRIC])
            for record in experiment_records(experiment)
            if record.status == N.TERMINATED and math.isfinite(record.final.get(SELECTION_METRIC, math.nan))
        }
        best: dict[str, str | None] = dict.fromkeys(self.plan.selections)
        for point, candidate in zip(self.points, self.candidates, strict=True):
            current = best[candidate.cell]
            if point.key in scores and (current is None or scores[point.key] > scores[current]):
                best[candidate.cell] = point.key
        return best

    def publish(self, experiment: Path, tracking_uri: str, experiment_id: str, parent: str) -> dict[str, str | None]:
        """Log each cell's winner, and only it, as a child run of the sweep's parent (`publish_winner`); returns the
        winners (`winners`)."""
        from sweeps.tracking import MlflowSweepCallback

        winners = self.winners(experiment)
        callback = MlflowSweepCallback(tracking_uri, experiment_id, parent)
        folders = _trial_folders(experiment)
        for key in winners.values():
            if key is not None:
                publish_winner(callback, folders[key])
        return winners

    def finish(self, experiment_id: str, parent: str, ledger: SweepLedger) -> SelectionOutcome:
        """The end of the candidates' run: once every candidate ended, each cell's winner is picked and published
        (`publish`), ``selection.json`` written and the cells marked finished in the ledger; until then nothing is
        released."""
        paths, spec = self.plan.paths, self.plan.spec
        experiment = paths.ray_experiment(spec)
        if not self.ended(experiment):
            return SelectionOutcome(set(), False, self.summary_metrics())
        winners = self.publish(experiment, paths.tracking_uri, experiment_id, parent)
        write_public_summary(paths.sweep_dir(spec), self.public_summary(winners))
        ledger.mark(spec.data.train, dict.fromkeys(self.plan.selections, "finished"))
        return SelectionOutcome({key for key in winners.values() if key is not None}, True, self.summary_metrics())

    def public_summary(self, winners: dict[str, str | None]) -> dict[str, Any]:
        """``selection.json``: the sweep's distribution and each cell's public plan and winner (never K)."""
        spec = self.plan.spec
        assert spec.selection is not None
        return {
            "distribution": spec.selection.distribution,
            "mean_trials": spec.selection.mean_trials,
            "shape": spec.selection.shape,
            "cells": [{**cell.public(), "winner": winners.get(key)} for key, cell in self.plan.selections.items()],
        }

    def summary_metrics(self) -> dict[str, float]:
        """The parent run's metrics: each cell's tuning-inclusive and single-run epsilon, and per training set the
        composition of its cells' selections (`privacy/tuning_epsilon`)."""
        metrics: dict[str, float] = {}
        for key, cell in self.plan.selections.items():
            metrics[f"{N.SELECTION_EPSILON}/{key}"] = cell.plan.epsilon
            metrics[f"{N.SELECTION_SINGLE_RUN_EPSILON}/{key}"] = cell.plan.single_run_epsilon
        metrics.update(selection_tuning_epsilons(self.plan.spec, list(self.plan.selections.values())))
        return metrics


def selection_tuning_epsilons(spec: SweepSpec, cells: Sequence[CellSelection]) -> dict[str, float]:
    """Per training set, the RDP composition of its cells' selections: the epsilon of releasing every cell's winner
    (``privacy/tuning_epsilon``, ``/<dataset>`` suffixed with several datasets)."""
    by_dataset: dict[str, list[tuple[list[TrialMechanism], TrialCount]]] = {}
    for cell in cells:
        by_dataset.setdefault(cell.cell.dataset, []).append((plan_mechanisms(cell.plan), cell.plan.count))
    return {
        (N.TUNING_EPSILON if len(spec.data.train) == 1 else f"{N.TUNING_EPSILON}/{dataset}"): selection_rdp_epsilon(
            plans, spec.privacy.delta
        )
        for dataset, plans in by_dataset.items()
    }


def released_selection_epsilons(sweep_dir: Path, released: set[str], delta: float) -> dict[str, float]:
    """Per training set, the RDP composition of the selections of the cells whose winner is in ``released`` (read from
    ``selection.json``): the epsilon of publishing those winners (`dpsweep release`)."""
    path = sweep_dir / PUBLIC_FILE
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    by_dataset: dict[str, list[tuple[list[TrialMechanism], TrialCount]]] = {}
    for cell in summary["cells"]:
        if cell["winner"] in released:
            count = TrialCount(cell["distribution"], cell["mean_trials"], cell["shape"])
            mechanisms = [
                TrialMechanism(
                    c["noise_multiplier"],
                    c["sample_rate"],
                    c["steps"],
                    label_count_noise_multiplier=c["label_count_noise_multiplier"],
                )
                for c in cell["candidates"]
            ]
            by_dataset.setdefault(cell["dataset"], []).append((mechanisms, count))
    return {dataset: selection_rdp_epsilon(cells, delta) for dataset, cells in by_dataset.items()}


def _point(plan: SweepPlan, candidate: Candidate, tags: dict[str, str]) -> TrialPoint:
    """A candidate's trial (`sweeps.plan.make_trial`): its cell's planned privacy for its shape, its drawn lr and clip,
    key ``<cell>-sel<id>``."""
    spec = plan.spec
    selection = plan.selections[candidate.cell]
    point = GridPoint(
        selection.cell,
        max_grad_norm=candidate.max_grad_norm,
        lr=candidate.lr,
        seed=spec.axes.seed[0],
        privacy_unit=selection.unit,
    )
    return make_trial(
        spec,
        plan.paths,
        plan.datasets[selection.cell.dataset],
        plan.inits[(selection.cell.model, selection.cell.init)],
        point,
        selection.cell.name.then(f"-sel{candidate.id}", f" sel{candidate.id}"),
        privacy=selection.plan.candidates[(candidate.expected_batch_size, candidate.epochs)],
        provenance_tags=tags,
    )


def candidate_statuses(experiment: Path) -> dict[str, str]:
    """Candidate key -> its status in the Ray experiment (TERMINATED, ERROR, STOPPED or INCOMPLETE)."""
    from sweeps.results import experiment_records

    return {record.key: record.status for record in experiment_records(experiment)}


def _trial_folders(experiment: Path) -> dict[str, Path]:
    from analysis.tables import ray_trial_folders

    return {folder.key: folder.path for folder in ray_trial_folders(experiment)}


@dataclass(frozen=True)
class _ReplayedTrial:
    """What `sweeps.tracking.MlflowSweepCallback` reads of a Ray trial, for a winner that ran without it."""

    config: dict[str, Any]
    trial_id: str
    checkpoint: Any


def publish_winner(callback: Any, folder: Path) -> None:
    """Log a finished candidate as the sweep's callback would have while it ran: its child run (point's name, tags and
    params; Ray's trial id withheld), every epoch's report, the final report and the final checkpoint's tables."""
    from ray.tune import Checkpoint

    from analysis.tables import RayTrialFolder

    ray_folder = RayTrialFolder(folder)
    final = ray_folder.final_checkpoint()
    config = json.loads((folder / N.RAY_PARAMS_FILE).read_text())
    trial = _ReplayedTrial(config, WITHHELD, Checkpoint.from_directory(str(final)) if final is not None else None)
    callback.on_trial_start(0, [], trial)
    for line in (folder / N.RAY_RESULT_FILE).read_text().splitlines():
        if line.strip():
            callback.on_trial_result(0, [], trial, json.loads(line))
    callback.on_trial_complete(0, [], trial)


def write_public_summary(sweep_dir: Path, summary: dict[str, Any]) -> Path:
    path = sweep_dir / PUBLIC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    return path


def read_winners(sweep_dir: Path) -> set[str] | None:
    """The released winners' keys from ``selection.json``; None when the sweep has none (not a private selection)."""
    path = sweep_dir / PUBLIC_FILE
    if not path.is_file():
        return None
    return {cell["winner"] for cell in json.loads(path.read_text())["cells"] if cell["winner"]}


def summary_lines(sweep_dir: Path) -> list[str]:
    """The console summary's private-selection lines: the distribution, and per cell the tuning-inclusive and the
    single-run epsilon and whether it released a winner (never how many candidates ran)."""
    path = sweep_dir / PUBLIC_FILE
    if not path.is_file():
        return []
    summary = json.loads(path.read_text())
    shape = f", shape {summary['shape']:g}" if summary.get("shape") is not None else ""
    lines = [
        f"private selection (Papernot & Steinke 2022): a secret number of candidates per cell, "
        f"{summary['distribution']} with E[K]={summary['mean_trials']:g}{shape}; only each cell's best candidate "
        "by validation is released, and its epsilon is the whole cell's (tuning included):"
    ]
    for cell in summary["cells"]:
        released = cell["winner"] or "none released (no candidate finished)"
        lines.append(
            f"  {cell['cell']}: tuning-inclusive epsilon {cell['epsilon']:.4g} (target {cell['target_epsilon']:g}), "
            f"single-run epsilon {cell['single_run_epsilon']:.4g}; released {released}"
        )
    return lines


def selection_paths_note(paths: SweepPaths, spec: SweepSpec) -> str:
    """Where the private material of a private selection stays (said once when the sweep starts)."""
    return (
        f"private selection: candidates run under {paths.ray_experiment(spec)} (private storage: their number, "
        f"reports and checkpoints are never published); only each cell's winner is logged and tabled"
    )


def describe_selections(plan: SweepPlan) -> list[str]:
    """The plan's private-selection lines (dry run and start of a sweep): the distribution and per cell its target,
    single-run epsilon, tuning-inclusive epsilon and each candidate shape's sigma; E[K], never a drawn K."""
    spec = plan.spec
    selection = spec.selection
    assert selection is not None
    ranges = ", ".join(f"{name} {list(getattr(selection, name))}" for name in (*selection.RANGES, *selection.CHOICES))
    lines = [
        f"  private selection: per cell a secret number of candidates K ({selection.distribution}, "
        f"E[K]={selection.mean_trials:g}"
        + (f", shape {selection.shape:g}" if selection.shape is not None else "")
        + f"), each drawn from {ranges}; only each cell's best by validation is released"
    ]
    lines.extend(f"    {cell.describe()}" for cell in plan.selections.values())
    return lines
