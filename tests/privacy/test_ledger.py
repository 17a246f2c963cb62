"""The ledger's composition (`trainables.privacy.ledger`) against dp-accounting composed by hand, and its rules:
one run counted once, non-private runs apart, patient-level runs in the patient total only."""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from trainables.privacy.ledger import LedgerEntry, compose_ledger
from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

DELTA = 6e-6


def entry(run: str, sigma: float = 1.37109375, q: float = 1 / 56, steps: int = 168, **changes) -> LedgerEntry:
    values = dict(
        run=run,
        kind="trial",
        sweep="smoke",
        trial=run,
        status="planned",
        private=True,
        privacy_unit="image",
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        label_count_noise_multiplier=None,
        patient_images=3,
        delta=DELTA,
        accountant="rdp",
        time="2026-12-07T12:00:00+00:00",
        user="u",
        host="h",
    )
    return LedgerEntry(**(values | changes))


def by_hand(events: list[dp_event.DpEvent], delta: float = DELTA) -> dict[str, float]:
    out = {}
    for name, accountant in (
        ("rdp", RdpAccountant()),
        ("pld", PLDAccountant()),
        ("replace", PLDAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)),
    ):
        for event in events:
            accountant.compose(event)
        out[name] = accountant.get_epsilon(delta)
    return out


def sgd(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)


def test_two_sweeps_an_audit_and_a_label_count_release_compose_as_dp_accounting_does() -> None:
    entries = [
        entry("a/1"),
        entry("a/2", sigma=0.59619140625),
        entry("b/1", sweep="other", label_count_noise_multiplier=20.0),
        entry("audit/1", kind="audit", sweep="smoke-audit", q=1 / 57, steps=171),
    ]
    total = compose_ledger(entries)
    expected = by_hand(
        [
            sgd(1.37109375, 1 / 56, 168),
            sgd(0.59619140625, 1 / 56, 168),
            dp_event.ComposedDpEvent([dp_event.GaussianDpEvent(20.0), sgd(1.37109375, 1 / 56, 168)]),
            sgd(1.37109375, 1 / 57, 171),
        ]
    )
    assert total.epsilon_rdp == pytest.approx(expected["rdp"], rel=1e-12)
    assert total.epsilon_pld == pytest.approx(expected["pld"], rel=1e-12)
    assert total.epsilon_replace_one == pytest.approx(expected["replace"], rel=1e-12)
    assert total.epsilon_replace_one > total.epsilon_pld  # replace-one is the larger reading
    assert (total.runs, total.private_runs, total.non_private_runs, total.delta) == (4, 4, 0, DELTA)
    assert total.by_sweep == {"smoke": 2, "other": 1, "smoke-audit": 1}


def test_a_run_is_composed_once_whatever_its_later_rows_say() -> None:
    once = compose_ledger([entry("a/1")])
    again = compose_ledger([entry("a/1"), entry("a/1", status="finished"), entry("a/1", status="replaced")])
    assert again.epsilon_rdp == once.epsilon_rdp and again.runs == 1
    assert again.statuses == {"replaced": 1}


def test_non_private_runs_are_counted_apart_and_never_composed() -> None:
    baseline = entry("a/inf", private=False, sigma=0.0, q=0.0)
    total = compose_ledger([entry("a/1"), baseline])
    assert (total.private_runs, total.non_private_runs) == (1, 1)
    assert total.epsilon_rdp == compose_ledger([entry("a/1")]).epsilon_rdp
    assert compose_ledger([baseline]).epsilon_rdp == 0.0


def test_patient_level_total_sees_image_runs_at_k_and_their_label_counts_at_sigma_over_k() -> None:
    image = entry("a/1", patient_images=3, label_count_noise_multiplier=20.0)
    patient = entry("p/1", privacy_unit="patient", sigma=1.1, q=1 / 33, steps=99, patient_images=None)
    total = compose_ledger([image, patient])
    assert total.patient_level_runs == 1
    # Image-level totals leave the patient-level run out.
    assert total.epsilon_rdp == pytest.approx(compose_ledger([image]).epsilon_rdp, rel=1e-12)
    without_counts = composed_patient_epsilon(
        [PatientMechanism(1.37109375, 1 / 56, 168, 3), PatientMechanism(1.1, 1 / 33, 99, 1)], DELTA
    )
    assert total.epsilon_patient is not None and total.epsilon_patient > without_counts
    lighter = compose_ledger([dataclasses.replace(image, label_count_noise_multiplier=60.0), patient])
    assert lighter.epsilon_patient is not None and without_counts < lighter.epsilon_patient < total.epsilon_patient
    unknown_k = compose_ledger([dataclasses.replace(image, patient_images=None), patient])
    assert unknown_k.epsilon_patient is None


def test_a_patient_level_label_count_release_is_composed_at_its_own_sigma_c() -> None:
    """A patient-level run's release was noised for the patient sensitivity K sqrt(L) already: one patient sees it
    at sigma_c (k = 1), the same Gaussian its own accountant composed, never at sigma_c / K."""
    from trainables.privacy.units import patient_epsilon

    patient = entry("p/1", privacy_unit="patient", sigma=1.1, q=1 / 33, steps=99, patient_images=None)
    with_counts = dataclasses.replace(patient, label_count_noise_multiplier=20.0)
    total = compose_ledger([with_counts])
    assert total.epsilon_patient == composed_patient_epsilon([PatientMechanism(1.1, 1 / 33, 99, 1, 20.0)], DELTA)
    assert total.epsilon_patient == pytest.approx(
        patient_epsilon(1.1, 1 / 33, 99, DELTA, 1, label_count_noise_multiplier=20.0), rel=1e-12
    )
    # The run's own mechanism: the release as GaussianDpEvent(sigma_c), then its steps (PLD within its rounding).
    own = by_hand([dp_event.GaussianDpEvent(20.0), sgd(1.1, 1 / 33, 99)])["pld"]
    assert total.epsilon_patient == pytest.approx(own, rel=5e-3)
    assert total.epsilon_patient > compose_ledger([patient]).epsilon_patient  # the release costs budget
    at_k = composed_patient_epsilon([PatientMechanism(1.1, 1 / 33, 99, 1, 20.0 / 3)], DELTA)
    assert total.epsilon_patient < at_k  # dividing by K again would double-count the cap


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"run": ""}, "run id"),
        ({"kind": "sweep"}, "ledger kind"),
        ({"noise_multiplier": 0.0}, "noise multiplier > 0"),
        ({"noise_multiplier": math.inf}, "noise multiplier > 0"),
        ({"sample_rate": 0.0}, "sample rate in"),
        ({"delta": 0.0}, "delta"),
        ({"steps": -1}, "steps"),
    ],
)
def test_a_malformed_entry_is_refused(changes, message) -> None:
    with pytest.raises(ValueError, match=message):
        entry(**({"run": "x"} | changes))


def test_a_private_selection_is_one_run_composed_as_repeat_and_select() -> None:
    # one cell of a private selection (E[K] = 4, geometric) beside an ordinary trial: RDP only, RepeatAndSelect once
    cell = entry(
        "selection-cell",
        sigma=1.8,
        selection_mean=4.0,
        selection_shape=1.0,
        selection_candidates=[[1.8, 1 / 56, 168]],  # as read back from JSON
    )
    total = compose_ledger([cell, entry("trial", sigma=2.0)])
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.RepeatAndSelectDpEvent(sgd(1.8, 1 / 56, 168), 4.0, 1.0))
    alone = float(accountant.get_epsilon(DELTA))
    accountant.compose(sgd(2.0, 1 / 56, 168))
    assert total.epsilon_rdp == pytest.approx(float(accountant.get_epsilon(DELTA)), rel=1e-9)
    assert compose_ledger([cell]).epsilon_rdp == pytest.approx(alone, rel=1e-9)
    assert math.isnan(total.epsilon_pld) and math.isnan(total.epsilon_replace_one) and total.epsilon_patient is None
    assert cell.selection_candidates == ((1.8, 1 / 56, 168),) and total.runs == 2
    poisson = dataclasses.replace(cell, selection_shape=None)  # Poisson's infinite shape is stored as None
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.RepeatAndSelectDpEvent(sgd(1.8, 1 / 56, 168), 4.0, math.inf))
    assert compose_ledger([poisson]).epsilon_rdp == pytest.approx(float(accountant.get_epsilon(DELTA)), rel=1e-9)


def test_a_selection_needs_its_mean_and_candidates() -> None:
    with pytest.raises(ValueError, match="private selection needs both"):
        entry("cell", selection_mean=4.0)
