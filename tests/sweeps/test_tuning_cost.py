"""The sweep's tuning cost counts what it should: every trial that started at its planned steps (whatever stopped it),
each trial's label-count release, ``reproducible_noise`` trials as no guarantee, Optuna's fixed trial count.

Tables are built from hand-made trial records through `analysis.tables.build_tables` (the schema the sweep writes);
expected values are dp-accounting's, composed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from analysis.tables import TableError, TrialRecord, build_tables
from sweeps.tuning_cost import (
    adaptive_tuning_bounds,
    patient_level_sweep_epsilon,
    started_trials,
    tuning_cost,
    tuning_summary,
)
from trainables import names as N
from trainables.privacy.accounting import epsilon_spent

SIGMA, Q, STEPS, DELTA = 1.1, 0.02, 300, 1e-5
DATASET = "synthetic-a"  # tests.sweeps.tiny's training set, for the specs below


def record(
    key: str,
    status: str,
    released_epochs: int,
    *,
    final: bool = False,
    sigma: float = SIGMA,
    q: float = Q,
    steps: int = STEPS,
    delta: float = DELTA,
    **params,
) -> TrialRecord:
    """A trial of 3 planned epochs (``steps`` planned steps) that reported ``released_epochs`` of them."""
    per_epoch = steps // 3
    epochs = [{N.EPOCH: e, N.STEPS: e * per_epoch, N.EPSILON: 0.5 * e} for e in range(1, released_epochs + 1)]
    return TrialRecord(
        key=key,
        status=status,
        params={
            "noise_multiplier": sigma,
            "sample_rate": q if sigma else 0.0,
            "steps": steps,
            "delta": delta,
            "target_epsilon": 2.0 if sigma else math.inf,
            "dataset": DATASET,
            "pos_weight": "uniform",
            "label_count_noise_multiplier": None,
            "reproducible_noise": False,
            **params,
        },
        epochs=epochs,
        final={N.STEPS: steps, N.BEST_EPOCH: 3, N.EPSILON: 1.9} if final else {},
    )


def table(*records: TrialRecord, runs: dict[str, str] | None = None) -> pd.DataFrame:
    """The trial table of ``records``; every trial has an MLflow child run unless ``runs`` says otherwise."""
    return build_tables(list(records), {r.key: f"run-{r.key}" for r in records} if runs is None else runs)[0]


def rdp_epsilon(*events: dp_event.DpEvent, delta: float = DELTA) -> float:
    accountant = RdpAccountant()
    accountant.compose(dp_event.ComposedDpEvent(list(events)))
    return accountant.get_epsilon(delta)


def dpsgd(total_steps: int, sigma: float = SIGMA, q: float = Q) -> dp_event.DpEvent:
    return dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), total_steps)


# --- which trials, at which steps --------------------------------------------------------------------------------


def test_an_early_stopped_trial_counts_at_its_planned_steps_not_where_asha_stopped_it():
    trials = table(record("a", N.TERMINATED, 3, final=True), record("asha", N.STOPPED, 1))
    assert list(trials[N.RELEASED_STEPS]) == [STEPS, STEPS // 3]  # what it published stays in the table
    cost = tuning_cost(trials)
    assert cost.epsilon == pytest.approx(rdp_epsilon(dpsgd(2 * STEPS)), rel=1e-9)
    # Composing the steps it happened to run (the stopping point depends on the data) is not the bound.
    assert cost.epsilon > rdp_epsilon(dpsgd(STEPS + STEPS // 3)) * 1.05


def test_failed_and_interrupted_trials_count_at_their_planned_steps():
    trials = table(
        record("a", N.TERMINATED, 3, final=True),
        record("failed-late", N.ERROR, 2),  # failed in its third epoch
        record("failed-early", N.ERROR, 0),  # failed before its first report: it may have trained on the data
        record("interrupted", N.INCOMPLETE, 1),  # the driver stopped after its first epoch
        record("killed", N.INCOMPLETE, 0),  # started (it has an MLflow run), killed before its first report
    )
    assert list(started_trials(trials)) == [True] * 5
    assert tuning_cost(trials).epsilon == pytest.approx(rdp_epsilon(dpsgd(5 * STEPS)), rel=1e-9)


def test_a_trial_that_never_started_is_left_out():
    """Never started: INCOMPLETE, nothing released and no MLflow child run (the callback creates one at start)."""
    records = [record("a", N.TERMINATED, 3, final=True), record("pending", N.INCOMPLETE, 0)]
    trials = table(*records, runs={"a": "run-a"})
    assert list(started_trials(trials)) == [True, False]
    assert tuning_cost(trials).epsilon == pytest.approx(rdp_epsilon(dpsgd(STEPS)), rel=1e-9)
    assert tuning_cost(trials).n_trials == 1
    nothing = table(record("p", N.INCOMPLETE, 0), record("q", N.INCOMPLETE, 0), runs={})
    assert tuning_cost(nothing) is None
    # Without a status column nothing tells a pending trial apart: every row counts.
    assert list(started_trials(trials.drop(columns="status"))) == [True, True]


def test_a_non_private_trial_is_left_out_and_labelled():
    trials = table(record("a", N.TERMINATED, 3, final=True), record("inf", N.INCOMPLETE, 1, sigma=0.0))
    cost = tuning_cost(trials)
    assert cost.epsilon == pytest.approx(rdp_epsilon(dpsgd(STEPS)), rel=1e-9)
    assert cost.n_non_private_excluded == 1 and "private trials only" in cost.sentence.lower()


def test_a_table_that_contradicts_itself_or_lacks_what_the_bound_needs_is_refused():
    trials = table(record("a", N.TERMINATED, 3, final=True))
    with pytest.raises(TableError, match=r"released 300 steps, more than its planned 200"):
        tuning_cost(trials.assign(steps=200))
    with pytest.raises(TableError, match=r"no 'privacy/released_steps' column .* `dpsweep table"):
        tuning_cost(trials.drop(columns=N.RELEASED_STEPS))
    with pytest.raises(TableError, match=r"no 'steps' column"):
        tuning_cost(trials.drop(columns="steps"))
    with pytest.raises(TableError, match=r"pos_weight 'train' but no label_count_noise_multiplier"):
        tuning_cost(trials.assign(pos_weight="train"))


# --- label-count releases (pos_weight: train) ---------------------------------------------------------------------

SIGMA_C = 20.0
# The smoke scale (q = 1/56, 168 steps, delta 6e-6), sigma calibrated (Opacus rdp) so release and steps end at 2.
SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, SIGMA_WITH_RELEASE = 1 / 56, 168, 6e-6, 1.005859375


def test_a_pos_weight_train_sweep_costs_at_least_its_largest_trial():
    """A one-trial pos_weight: train grid: its tuning epsilon once fell below its own trial's (the release missing)."""
    only = record(
        "a",
        N.TERMINATED,
        3,
        final=True,
        sigma=SIGMA_WITH_RELEASE,
        q=SMOKE_Q,
        steps=SMOKE_STEPS,
        delta=SMOKE_DELTA,
        pos_weight="train",
        label_count_noise_multiplier=SIGMA_C,
    )
    cost = tuning_cost(table(only))
    own = epsilon_spent(
        SIGMA_WITH_RELEASE, SMOKE_Q, SMOKE_STEPS, SMOKE_DELTA, "rdp", label_count_noise_multiplier=SIGMA_C
    )
    release, steps = dp_event.GaussianDpEvent(SIGMA_C), dpsgd(SMOKE_STEPS, SIGMA_WITH_RELEASE, SMOKE_Q)
    assert cost.epsilon == pytest.approx(rdp_epsilon(release, steps, delta=SMOKE_DELTA), rel=1e-9)
    assert own <= 2.0 and cost.epsilon >= own
    assert rdp_epsilon(steps, delta=SMOKE_DELTA) < own  # what the sweep used to report


def test_every_trial_s_own_release_is_composed():
    trials = table(
        record("a", N.TERMINATED, 3, final=True, pos_weight="train", label_count_noise_multiplier=SIGMA_C),
        record("b", N.STOPPED, 1, pos_weight="train", label_count_noise_multiplier=SIGMA_C),
        record("inf", N.TERMINATED, 3, final=True, sigma=0.0, pos_weight="train"),  # exact counts, left out
    )
    release = dp_event.GaussianDpEvent(SIGMA_C)
    assert tuning_cost(trials).epsilon == pytest.approx(rdp_epsilon(release, release, dpsgd(2 * STEPS)), rel=1e-9)


# --- reproducible_noise trials ------------------------------------------------------------------------------------


def reproducible_table() -> pd.DataFrame:
    return table(
        record("a", N.TERMINATED, 3, final=True, reproducible_noise=True),
        record("b", N.TERMINATED, 3, final=True, reproducible_noise=True),
        record("inf", N.TERMINATED, 3, final=True, sigma=0.0),
    )


def test_an_all_reproducible_sweep_prints_an_infinite_tuning_epsilon_and_why(tmp_path):
    from sweeps.summary import summary_text

    trials = reproducible_table()
    cost = tuning_cost(trials)
    assert cost.epsilon == math.inf and cost.n_reproducible == 2 and cost.n_non_private_excluded == 1
    text = " ".join(summary_text(trials, tmp_path, "sqlite:///mlflow.db").split())  # unwrapped
    assert "not DP (epsilon = inf)" in text
    assert "2 of the 2 trials use reproducible_noise (their noise replays from the seed logged with them)" in text


def tiny_grid(**privacy):
    from sweeps.spec import parse_spec
    from tests.sweeps.tiny import tiny_spec

    return parse_spec(tiny_spec(privacy=privacy))


def test_the_parent_run_gets_no_infinite_metric_as_mlflow_holds_none():
    """`sweeps.tracking.finish_parent` refuses an infinite summary; the infinite tuning epsilon is left out of it,
    as a non-private trial's epsilon is (the console states it)."""
    assert tuning_summary(tiny_grid(reproducible_noise=True), reproducible_table()) == {}
    finite = table(record("a", N.TERMINATED, 3, final=True))
    assert tuning_summary(tiny_grid(), finite) == {N.TUNING_EPSILON: pytest.approx(rdp_epsilon(dpsgd(STEPS)))}


# --- patient level ------------------------------------------------------------------------------------------------


def test_the_patient_level_sweep_epsilon_composes_planned_steps_and_label_counts_as_the_ledger_does():
    from trainables.privacy.ledger import LedgerEntry, compose_ledger

    patient_q, patient_steps, k = 1 / 33, 99, 3
    trials = table(
        record("i", N.TERMINATED, 3, final=True, privacy_unit="image", label_count_noise_multiplier=SIGMA_C),
        record(
            "p",
            N.STOPPED,
            1,
            q=patient_q,
            steps=patient_steps,
            privacy_unit="patient",
            label_count_noise_multiplier=SIGMA_C,
        ),
        record("pending", N.INCOMPLETE, 0, privacy_unit="patient"),
        runs={"i": "run-i", "p": "run-p"},
    ).assign(**{N.PATIENT_IMAGES: [k, math.nan, math.nan]})

    def entry(run: str, unit: str, q: float, steps: int) -> LedgerEntry:
        return LedgerEntry(
            run=run,
            kind="trial",
            sweep="s",
            trial=run,
            status="planned",
            private=True,
            privacy_unit=unit,
            noise_multiplier=SIGMA,
            sample_rate=q,
            steps=steps,
            label_count_noise_multiplier=SIGMA_C,
            patient_images=k if unit == "image" else None,
            delta=DELTA,
            accountant="rdp",
            time="",
            user="",
            host="",
        )

    # The lead's ledger (an independent implementation) at the planned steps of the two trials that started.
    expected = compose_ledger([entry("i", "image", Q, STEPS), entry("p", "patient", patient_q, patient_steps)])
    assert patient_level_sweep_epsilon(trials) == {DATASET: pytest.approx(expected.epsilon_patient, rel=1e-9)}
    replayed = trials.assign(reproducible_noise=[False, True, False])
    assert patient_level_sweep_epsilon(replayed) == {DATASET: math.inf}


# --- Optuna: basic composition of the fixed trial count -----------------------------------------------------------


def tiny_optuna(**privacy):
    from sweeps.spec import parse_spec
    from tests.sweeps.tiny import tiny_spec

    return parse_spec(
        tiny_spec(
            search="optuna",
            privacy={"target_epsilon": [2, 4, math.inf], "max_grad_norm": None, "expected_batch_size": None}
            | {"epochs": None, **privacy},
            training=None,
            optuna={
                "trials_per_target": 3,
                "noise_multiplier": [0.5, 3.0],
                "expected_batch_size": [32, 34],
                "epochs": [1, 1],
                "lr": [5.0e-4, 3.0e-3],
                "max_grad_norm": [0.5, 2.0],
            },
        )
    )


def test_optuna_basic_composition_counts_every_trial_the_search_may_train():
    """3 trials per target fixed in advance: 3 x 2 + 3 x 4, however many ran (here one of six, and a baseline)."""
    spec = tiny_optuna()
    trials = table(record("a", N.TERMINATED, 3, final=True), record("inf", N.TERMINATED, 3, final=True, sigma=0.0))
    trials["n_train"] = 400
    worst, basic = adaptive_tuning_bounds(spec, trials)[DATASET]
    delta = spec.privacy.delta
    assert (basic.epsilon, basic.delta, basic.k) == (18.0, pytest.approx(6 * delta), 6)
    assert worst.k == 6
    assert tuning_summary(spec, trials) == {N.TUNING_EPSILON: worst.epsilon, N.TUNING_EPSILON_BASIC: 18.0}


def test_an_optuna_sweep_with_reproducible_noise_has_no_bound(tmp_path):
    from sweeps.summary import summary_text

    spec, trials = tiny_optuna(reproducible_noise=True), reproducible_table()
    trials["n_train"] = 400
    assert adaptive_tuning_bounds(spec, trials) == {} and tuning_summary(spec, trials) == {}
    text = " ".join(summary_text(trials, Path(tmp_path), "sqlite:///mlflow.db", spec).split())
    assert "not DP (epsilon = inf)" in text and "adaptive selection" not in text


def test_a_patient_level_optuna_sweep_bounds_the_search_over_its_patients():
    """The admissible set of a patient-level cell is planned over N_patients (B in patients), as its proposals were."""
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound

    spec = tiny_optuna(privacy_unit="patient", max_images_per_patient=3, target_epsilon=[2, math.inf])
    trials = table(record("a", N.TERMINATED, 3, final=True), record("inf", N.TERMINATED, 3, final=True, sigma=0.0))
    trials["n_train"], trials["n_patients"] = 400, 150
    worst, _ = adaptive_tuning_bounds(spec, trials)[DATASET]
    o = spec.optuna
    assert o is not None

    def bound(n_records: int) -> float:
        cell = AdmissibleSet(n_records, 2.0, spec.privacy.delta, (0.5, 3.0), (32, 34), (1, 1))
        return adaptive_tuning_bound([(cell, o.trials_per_target)]).epsilon

    assert worst.epsilon == pytest.approx(bound(150)) and worst.epsilon != pytest.approx(bound(400))
