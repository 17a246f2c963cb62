"""The privacy ledger of one prepared dataset: every mechanism run on its training split, and their composition.

A trial's epsilon covers that trial; a sweep's tuning epsilon covers the selection among its own trials. Neither
covers what else ran on the same private training split: other sweeps, runs replaced by ``--fresh``, the audit's
training runs, label-count releases. The ledger does. Each `LedgerEntry` is one mechanism run that touched the
training split, recorded when the run is created (before it trains), at its **planned** steps: a run's stopping
point (ASHA, a failure, a kill) may depend on the data, so the bound fixed in advance is the planned one.
`compose_ledger` composes every run that could have released something:

* **Image level** (records are images, add/remove adjacency with N public): the runs of image-level trials and
  audits, each ``ComposedDpEvent([GaussianDpEvent(sigma_c)] if it released label counts, SelfComposedDpEvent(
  PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps))``, composed with dp-accounting's RDP accountant and its
  PLD accountant (both add/remove; PLD also replace-one, `LedgerTotal.epsilon_replace_one`). Patient-level runs
  are not in this number (their records are patients): they are in the patient-level one.
* **Patient level** (records are patients): every private run seen at the patient level
  (`trainables.privacy.units.composed_patient_epsilon`): a patient-level run at k = 1, an image-level run at k =
  the training split's largest images per patient (recorded with the run), each label-count release as a Gaussian
  with its noise multiplier divided by k (a patient's k images move the counts by at most k times one image's
  sensitivity). Only when every image-level run recorded its k.

* **Private selection** (`search: private_selection`): a cell's candidates are one run, recorded once whatever their
  secret number K: ``RepeatAndSelectDpEvent(candidate, E[K], shape)`` (Papernot & Steinke), the candidate being the
  composition of the cell's distinct planned candidate mechanisms (exactly the candidate when there is one shape; an
  upper bound of their order-wise maximum otherwise). dp-accounting's PLD cannot account it: with such a run the PLD
  and replace-one totals are NaN and the patient-level one is None; the RDP total holds.

A run without a DP guarantee (a non-private baseline, or a ``reproducible_noise`` trial whose noise is replayable
from its logged seed) cannot be composed: it is counted apart (`LedgerTotal.non_private_runs`) and the totals hold
only for releases that contain none of its outputs. The ledger never forgets: rows are appended, never rewritten
(`trainables.data.ledger`); a run appears once per status change and is composed once.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from dp_accounting import dp_event

from trainables.config import PrivacyConfig

__all__ = ["LEDGER_KINDS", "LedgerEntry", "LedgerKind", "LedgerTotal", "compose_ledger", "entry_for"]

LedgerKind = Literal["trial", "audit"]
LEDGER_KINDS: tuple[str, ...] = ("trial", "audit")


@dataclass(frozen=True, kw_only=True)
class LedgerEntry:
    """One mechanism run on a dataset's training split (one row of its ledger).

    Attributes:
        run: the run's identity; rows with the same ``run`` describe one run (its status over time) and are composed
            once, with the mechanism of its first row.
        kind: ``trial`` (a sweep's trial, its label-count release included) or ``audit`` (a `dpsweep audit` run).
        sweep: the sweep (or audit) that made the run.
        trial: the trial key within the sweep (audits: ``<kind>:<audited trial key>``).
        status: what happened to the run when the row was written (``planned``, ``finished``, ``replaced``, ...).
        private: whether the run has a DP guarantee (False for non-private and ``reproducible_noise`` runs).
        privacy_unit: ``image`` or ``patient``: what one record of the run is.
        noise_multiplier, sample_rate, steps: the run's planned DP-SGD (sigma, q per record, planned steps).
        label_count_noise_multiplier: sigma_c of the run's label-count release, or None.
        patient_images: k, the training split's largest number of images per patient (the patient-level view of an
            image-level run); None when unknown.
        delta: the run's delta.
        accountant: the accountant the run calibrated with (the composition uses dp-accounting's).
        time: when the row was written (UTC, ISO 8601).
        user, host: who wrote the row, where.
        selection_mean, selection_shape: a private selection's E[K] and its count's shape (dp-accounting's: 0
            logarithmic, 1 geometric, eta; None for Poisson, whose shape is infinite); mean None: an ordinary run.
        selection_candidates: a private selection's distinct planned candidates, (sigma, q, steps) each; the
            mechanism fields then hold the first.
    """

    run: str
    kind: LedgerKind
    sweep: str
    trial: str
    status: str
    private: bool
    privacy_unit: Literal["image", "patient"]
    noise_multiplier: float
    sample_rate: float
    steps: int
    label_count_noise_multiplier: float | None
    patient_images: int | None
    delta: float
    accountant: str
    time: str
    user: str
    host: str
    selection_mean: float | None = None
    selection_shape: float | None = None
    selection_candidates: tuple[tuple[float, float, int], ...] = ()

    def __post_init__(self) -> None:
        # JSON gives lists back: the candidates as the tuples they were written from
        object.__setattr__(
            self, "selection_candidates", tuple((float(s), float(q), int(n)) for s, q, n in self.selection_candidates)
        )
        if (self.selection_mean is None) != (not self.selection_candidates):
            raise ValueError("a private selection needs both its mean number of runs and its candidates")
        if not self.run:
            raise ValueError("a ledger entry needs a run id")
        if self.kind not in LEDGER_KINDS:
            raise ValueError(f"ledger kind {self.kind!r} is not one of {LEDGER_KINDS}")
        if self.privacy_unit not in ("image", "patient"):
            raise ValueError(f"privacy_unit {self.privacy_unit!r} must be image or patient")
        if self.private:
            if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
                raise ValueError(f"a private run needs a noise multiplier > 0, got {self.noise_multiplier!r}")
            if not 0 < self.sample_rate <= 1:
                raise ValueError(f"a private run needs a sample rate in (0, 1], got {self.sample_rate!r}")
        if not (isinstance(self.steps, numbers.Integral) and self.steps >= 0):
            raise ValueError(f"steps={self.steps!r} must be a whole number >= 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta!r} must be in (0, 1)")
        if self.patient_images is not None and self.patient_images < 1:
            raise ValueError(f"patient_images={self.patient_images!r} must be >= 1")

    @property
    def is_selection(self) -> bool:
        return self.selection_mean is not None

    def dp_event(self) -> dp_event.DpEvent:
        """The run as a dp-accounting event at its own unit: its label-count release, then its steps (private runs
        only); a private selection's ``RepeatAndSelectDpEvent`` of its candidates (module docstring)."""
        if self.selection_mean is not None:
            candidates = [
                _run_event(sigma, q, steps, self.label_count_noise_multiplier)
                for sigma, q, steps in dict.fromkeys(self.selection_candidates)
            ]
            inner = candidates[0] if len(candidates) == 1 else dp_event.ComposedDpEvent(candidates)
            shape = math.inf if self.selection_shape is None else float(self.selection_shape)
            return dp_event.RepeatAndSelectDpEvent(inner, float(self.selection_mean), shape)
        return _run_event(self.noise_multiplier, self.sample_rate, self.steps, self.label_count_noise_multiplier)


def _run_event(
    noise_multiplier: float, sample_rate: float, steps: int, label_count_noise_multiplier: float | None
) -> dp_event.DpEvent:
    """One run's event: its label-count release, then its steps."""
    events: list[dp_event.DpEvent] = []
    if label_count_noise_multiplier is not None:
        events.append(dp_event.GaussianDpEvent(float(label_count_noise_multiplier)))
    if steps:
        step = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
        events.append(dp_event.SelfComposedDpEvent(step, int(steps)))
    if not events:
        return dp_event.NoOpDpEvent()
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)


def entry_for(
    privacy: PrivacyConfig,
    *,
    run: str,
    kind: LedgerKind,
    sweep: str,
    trial: str,
    status: str,
    patient_images: int | None,
    time: str,
    user: str,
    host: str,
) -> LedgerEntry:
    """The ledger entry of a run planned with ``privacy`` (`trainables.privacy.planning.plan_privacy`)."""
    from trainables.privacy.guarantee import has_dp_guarantee

    return LedgerEntry(
        run=run,
        kind=kind,
        sweep=sweep,
        trial=trial,
        status=status,
        private=has_dp_guarantee(privacy),
        privacy_unit=privacy.privacy_unit,
        noise_multiplier=float(privacy.noise_multiplier),
        sample_rate=float(privacy.sample_rate),
        steps=int(privacy.steps),
        label_count_noise_multiplier=privacy.label_count_noise_multiplier,
        patient_images=patient_images,
        delta=float(privacy.delta),
        accountant=privacy.accountant,
        time=time,
        user=user,
        host=host,
    )


@dataclass(frozen=True)
class LedgerTotal:
    """The composition of a ledger's runs at one delta.

    Attributes:
        delta: the delta the epsilons are at (default: the smallest delta of the private runs).
        runs: distinct runs in the ledger; ``private_runs`` of them have a guarantee, ``non_private_runs`` do not.
        epsilon_rdp: image-level runs composed with dp-accounting's RDP accountant (add/remove); 0 when none.
        epsilon_pld: the same with its PLD accountant (add/remove, pessimistic, discretization 1e-4); NaN with a
            private selection among the runs (PLD cannot account one).
        epsilon_replace_one: the same with PLD under replace-one adjacency (the reading that a public N implies);
            NaN likewise.
        epsilon_patient: every private run at the patient level (PLD); None when an image-level run lacks k, or with
            a private selection among the runs.
        patient_level_runs: private runs whose records are patients (in ``epsilon_patient`` only).
        statuses: rows' latest status per run, counted.
        by_sweep: distinct runs per sweep.
    """

    delta: float
    runs: int
    private_runs: int
    non_private_runs: int
    epsilon_rdp: float
    epsilon_pld: float
    epsilon_replace_one: float
    epsilon_patient: float | None
    patient_level_runs: int
    statuses: dict[str, int] = field(default_factory=dict)
    by_sweep: dict[str, int] = field(default_factory=dict)


def compose_ledger(entries: Sequence[LedgerEntry], delta: float | None = None) -> LedgerTotal:
    """Compose every run of a ledger (module docstring). Rows of one run count once, with its first row's
    mechanism; its latest row's status is reported.

    Raises:
        ValueError: ``delta`` outside (0, 1), or no delta to compose at (no private run and none given).
    """
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.privacy_accountant import NeighboringRelation
    from dp_accounting.rdp import RdpAccountant

    first: dict[str, LedgerEntry] = {}
    latest: dict[str, LedgerEntry] = {}
    for entry in entries:
        first.setdefault(entry.run, entry)
        latest[entry.run] = entry
    runs = list(first.values())
    private = [r for r in runs if r.private]
    if delta is None:
        if not private:
            delta = min((r.delta for r in runs), default=1e-6)
        else:
            delta = min(r.delta for r in private)
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")
    image = [r for r in private if r.privacy_unit == "image"]
    rdp = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    pld = PLDAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    replace = PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for run in image:
        event = run.dp_event()
        for accountant in (rdp,) if run.is_selection else (rdp, pld, replace):
            accountant.compose(event)
    pld_known = not any(run.is_selection for run in image)
    return LedgerTotal(
        delta=float(delta),
        runs=len(runs),
        private_runs=len(private),
        non_private_runs=len(runs) - len(private),
        epsilon_rdp=float(rdp.get_epsilon(delta)) if image else 0.0,
        epsilon_pld=(float(pld.get_epsilon(delta)) if image else 0.0) if pld_known else math.nan,
        epsilon_replace_one=(float(replace.get_epsilon(delta)) if image else 0.0) if pld_known else math.nan,
        epsilon_patient=_patient_level_epsilon(private, delta),
        patient_level_runs=sum(r.privacy_unit == "patient" for r in private),
        statuses=dict(Counter(latest[r.run].status for r in runs)),
        by_sweep=dict(Counter(r.sweep for r in runs)),
    )


def _patient_level_epsilon(private: Sequence[LedgerEntry], delta: float) -> float | None:
    """Every private run for one patient (`trainables.privacy.units.composed_patient_epsilon`)."""
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    if any((r.privacy_unit == "image" and r.patient_images is None) or r.is_selection for r in private):
        return None
    mechanisms = [
        PatientMechanism(r.noise_multiplier, r.sample_rate, r.steps, _k(r), r.label_count_noise_multiplier)
        for r in private
    ]
    return composed_patient_epsilon(mechanisms, delta)


def _k(run: LedgerEntry) -> int:
    """Records of one patient in the run: 1 for a patient-level run, its largest images per patient otherwise."""
    return 1 if run.privacy_unit == "patient" else int(run.patient_images or 1)
