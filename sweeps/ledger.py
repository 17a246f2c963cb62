"""The privacy ledger from the driver's side: recording runs before they start, and the ledger in words.

`trainables.privacy.ledger` composes, `trainables.data.ledger` stores; this module decides what a sweep records (every
trial it creates, at its planned steps, before Ray runs it; audit runs; the runs a ``--fresh`` replaces) and how the
dataset's total reads in the summary and `dpsweep ledger`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sweeps.schema import SweepSpec
from trainables import names as N
from trainables.config import PrivacyConfig
from trainables.data.ledger import append_entries, ledger_dir, now, read_ledger, writer
from trainables.point import TrialPoint
from trainables.privacy.ledger import LedgerEntry, LedgerKind, LedgerTotal, compose_ledger, entry_for

if TYPE_CHECKING:
    from sweeps.selection import CellSelection
    from trainables.privacy.selection import SelectionPlan

__all__ = [
    "PlannedRun",
    "SweepLedger",
    "describe_ledger",
    "ledger_lines",
    "ledger_metrics",
    "ledger_totals",
    "sweep_ledger_text",
    "write_ledger_summary",
    "mark_runs",
    "record_runs",
    "recorded_runs",
]


@dataclass(frozen=True)
class PlannedRun:
    """A mechanism run about to be created on a dataset's training split.

    Attributes:
        run: its ledger id (unique per run: a resumed run keeps it, a ``--fresh`` rerun gets a new one).
        sweep, trial: who makes it (the sweep and the trial key; audits ``<kind>:<audited trial key>``).
        privacy: its planned privacy config (`trainables.privacy.planning.plan_privacy`).
        patient_images: the training split's largest images per patient (None when not known).
        selection: a private selection's plan (the run is the whole cell, `privacy` its first candidate); None for
            an ordinary run.
    """

    run: str
    sweep: str
    trial: str
    privacy: PrivacyConfig
    patient_images: int | None
    selection: SelectionPlan | None = None


@dataclass(frozen=True)
class SweepLedger:
    """What one sweep instance records in its datasets' ledgers (picklable: the Optuna factory holds one).

    Attributes:
        data_root: the prepared-data folder (each dataset's ledger lives under it).
        sweep: the sweep's name.
        instance: the id of this run of the sweep, drawn when it first starts and kept on resume (``sweep.json``);
            ``--fresh`` draws a new one, so a rerun's trials are new runs while a resumed trial is the same run.
        patient_images: per training set, its largest number of images of one patient (None when unknown).
    """

    data_root: str
    sweep: str
    instance: str
    patient_images: dict[str, int | None]

    def run_id(self, trial_key: str) -> str:
        return f"{self.sweep}/{self.instance}/{trial_key}"

    def record(self, trials: Iterable[TrialPoint]) -> int:
        """Record trials before they run, each at its planned privacy (once: a resumed trial is known)."""
        by_dataset: dict[str, list[PlannedRun]] = {}
        for trial in trials:
            dataset = trial.config.dataset
            by_dataset.setdefault(dataset, []).append(
                PlannedRun(
                    run=self.run_id(trial.key),
                    sweep=self.sweep,
                    trial=trial.key,
                    privacy=trial.config.privacy,
                    patient_images=self.patient_images.get(dataset),
                )
            )
        return sum(record_runs(self.data_root, dataset, runs) for dataset, runs in by_dataset.items())

    def record_selection(self, cells: Iterable[CellSelection]) -> int:
        """Record each cell of a private selection before its candidates run, once, as one run (its key the cell's):
        the ledger sees the selection, never how many candidates it ran."""
        by_dataset: dict[str, list[PlannedRun]] = {}
        for cell in cells:
            dataset = cell.cell.dataset
            first = next(iter(cell.plan.candidates.values()))
            by_dataset.setdefault(dataset, []).append(
                PlannedRun(
                    run=self.run_id(cell.key),
                    sweep=self.sweep,
                    trial=cell.key,
                    privacy=first,
                    patient_images=self.patient_images.get(dataset),
                    selection=cell.plan,
                )
            )
        return sum(record_runs(self.data_root, dataset, runs) for dataset, runs in by_dataset.items())

    def mark(self, datasets: Iterable[str], statuses: dict[str, str], instance: str | None = None) -> None:
        """Append a status row for each of this sweep's recorded runs whose trial key is in ``statuses`` and whose
        status changes (``instance``: another instance of the sweep, e.g. the one ``--fresh`` replaces)."""
        prefix = f"{self.sweep}/{instance or self.instance}/"
        for dataset in dict.fromkeys(datasets):
            latest: dict[str, LedgerEntry] = {}
            for entry in read_ledger(self.data_root, dataset):
                if entry.run.startswith(prefix):
                    latest[entry.run] = entry
            changed: dict[str, list[LedgerEntry]] = {}
            for entry in latest.values():
                status = statuses.get(entry.trial, statuses.get("*"))
                if status is not None and status != entry.status:
                    changed.setdefault(status, []).append(entry)
            for status, entries in changed.items():
                mark_runs(self.data_root, dataset, entries, status)


def ledger_totals(data_root: str | Path, datasets: Iterable[str]) -> dict[str, LedgerTotal]:
    """Each dataset's ledger composed (`compose_ledger`)."""
    return {dataset: compose_ledger(read_ledger(data_root, dataset)) for dataset in dict.fromkeys(datasets)}


def ledger_metrics(spec: SweepSpec, data_root: str | Path) -> dict[str, float]:
    """The parent run's ``privacy/ledger_epsilon`` per training set (``/<dataset>`` suffixed with several), where the
    ledger holds an image-level private run."""
    totals = ledger_totals(data_root, spec.data.train)
    return {
        N.LEDGER_EPSILON if len(spec.data.train) == 1 else f"{N.LEDGER_EPSILON}/{dataset}": total.epsilon_rdp
        for dataset, total in totals.items()
        if total.private_runs > total.patient_level_runs
    }


def write_ledger_summary(path: Path, data_root: str | Path, datasets: Iterable[str]) -> Path:
    """``runs/<sweep>/ledger.json``: each training set's ledger total when the sweep ended (the report reads it;
    `dpsweep ledger` gives the current one)."""
    summary = {
        dataset: {"written": now(), **dataclasses.asdict(total)}
        for dataset, total in ledger_totals(data_root, datasets).items()
    }
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def recorded_runs(data_root: str | Path, dataset: str) -> set[str]:
    """The run ids already in the dataset's ledger."""
    return {entry.run for entry in read_ledger(data_root, dataset)}


def record_runs(
    data_root: str | Path,
    dataset: str,
    runs: Iterable[PlannedRun],
    *,
    kind: LedgerKind = "trial",
    status: str = "planned",
) -> int:
    """Append one row per run not yet in the dataset's ledger; returns how many were appended. Runs already recorded
    are left alone (a resumed sweep records nothing twice)."""
    known = recorded_runs(data_root, dataset)
    user, host = writer()
    time = now()
    entries = [
        _with_selection(
            entry_for(
                planned.privacy,
                run=planned.run,
                kind=kind,
                sweep=planned.sweep,
                trial=planned.trial,
                status=status,
                patient_images=planned.patient_images,
                time=time,
                user=user,
                host=host,
            ),
            planned.selection,
        )
        for planned in runs
        if planned.run not in known
    ]
    append_entries(data_root, dataset, entries)
    return len(entries)


def _with_selection(entry: LedgerEntry, selection: SelectionPlan | None) -> LedgerEntry:
    """The entry of a private selection's cell: its count's mean and shape and its distinct candidates."""
    if selection is None:
        return entry
    shape = selection.count.dp_shape
    return dataclasses.replace(
        entry,
        selection_mean=float(selection.count.mean),
        selection_shape=None if math.isinf(shape) else shape,
        selection_candidates=tuple(
            (float(p.noise_multiplier), float(p.sample_rate), int(p.steps)) for p in selection.candidates.values()
        ),
    )


def mark_runs(data_root: str | Path, dataset: str, runs: Sequence[LedgerEntry], status: str) -> None:
    """Append a status row (e.g. ``replaced``) for each of ``runs`` (their mechanism is already recorded)."""
    if not runs:
        return
    user, host = writer()
    time = now()
    append_entries(
        data_root,
        dataset,
        [dataclasses.replace(run, status=status, time=time, user=user, host=host) for run in runs],
    )


def ledger_lines(total: LedgerTotal) -> list[str]:
    """The composition in a few lines (no heading)."""
    if total.runs == 0:
        return ["no run recorded yet"]
    sweeps = ", ".join(f"{name} {count}" for name, count in total.by_sweep.items())
    lines = [
        f"{total.runs} runs ({total.private_runs} with a DP guarantee, {total.non_private_runs} without) "
        f"from {len(total.by_sweep)} sweep(s): {sweeps}",
    ]
    image_runs = total.private_runs - total.patient_level_runs
    selection = math.isnan(total.epsilon_pld)  # PLD cannot account a private selection (`compose_ledger`)
    if image_runs and selection:
        lines.append(
            f"image level (add/remove one image, N public): epsilon {_eps(total.epsilon_rdp)} (RDP) at delta "
            f"{total.delta:g}; PLD and replace-one not computed (a private selection's bound is RDP only)"
        )
    elif image_runs:
        lines.append(
            f"image level (add/remove one image, N public): epsilon {_eps(total.epsilon_rdp)} (RDP), "
            f"{_eps(total.epsilon_pld)} (PLD) at delta {total.delta:g}; replace-one {_eps(total.epsilon_replace_one)} "
            "(PLD)"
        )
    if total.epsilon_patient is None and selection:
        lines.append("patient level: not computed (a private selection is accounted at the image level only)")
    elif total.epsilon_patient is None:
        lines.append("patient level: unknown (an image-level run did not record its images per patient)")
    elif total.private_runs:
        lines.append(f"patient level (add/remove one patient with all images): epsilon {_eps(total.epsilon_patient)}")
    if total.non_private_runs:
        lines.append(
            f"{total.non_private_runs} run(s) without a DP guarantee (non-private or reproducible_noise) trained on "
            "this split: the totals hold only for releases holding none of their outputs"
        )
    statuses = ", ".join(f"{status} {count}" for status, count in sorted(total.statuses.items()))
    lines.append(f"latest status: {statuses}")
    return lines


def sweep_ledger_text(data_root: str | Path, datasets: Iterable[str], width: int = 100) -> str:
    """The summary's lines on each training set's ledger, beside the sweep's own tuning cost."""
    lines = []
    for dataset, total in ledger_totals(data_root, datasets).items():
        intro = (
            f"privacy ledger of {dataset} (every run recorded on its training split: this sweep, other sweeps, "
            f"audits, replaced runs; `dpsweep ledger {dataset}`): "
        )
        body = "; ".join(ledger_lines(total)[:-1] or ledger_lines(total))
        lines.append(textwrap.fill(intro + body, width, subsequent_indent="  ", break_on_hyphens=False))
    return "\n".join(lines)


def describe_ledger(data_root: str | Path, dataset: str, delta: float | None = None) -> str:
    """What `dpsweep ledger DATASET` prints."""
    entries = read_ledger(data_root, dataset)
    total = compose_ledger(entries, delta)
    head = f"privacy ledger of {dataset} ({ledger_dir(data_root, dataset)}, {len(entries)} rows):"
    body = [textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    ") for line in ledger_lines(total)]
    meaning = (
        "  The epsilon of publishing anything from every run recorded here together: every sweep, audit and replaced "
        "run on this training split, each at its planned steps, by anyone. A sweep's own tuning epsilon is at most "
        "this. The ledger never shrinks; see docs/design.md (the privacy ledger) for what resets it."
    )
    return "\n".join([head, *body, textwrap.fill(meaning, 100, subsequent_indent="  ")])


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"
