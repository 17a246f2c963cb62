"""The privacy cost of a sweep's search: epsilon of releasing the best trial after running them all.

Grid sweeps compose every private trial that started (`tuning_cost`, per training set `tuning_costs`); Optuna
sweeps, whose trials were chosen from earlier results, get bounds that hold under adaptive selection
(`adaptive_tuning_bounds`); sweeps with patient-level trials also get the patient-level composition of both units
(`patient_level_sweep_epsilon`). `tuning_summary` gives the parent run's metrics; the console states them through
`sweeps.summary`.

What is composed, read from the trial table (`analysis.tables`):

- **Every trial that started**, at its **planned** steps (the ``steps`` column), whatever its status: where a trial
  stopped (ASHA's decision, an error, a kill) may depend on the data, so the bound fixed in advance is the one that
  composes the steps it could have taken. ``privacy/released_steps`` still says what each trial published. A trial
  that **never started** is one that is ``INCOMPLETE`` with nothing released (``privacy/released_steps`` 0) and no
  MLflow child run (``mlflow_run_id`` empty: the tracking callback creates it when Ray starts the trial; the
  MLflow source lists no such trial at all); it touched no data and is left out. A table without ``status``
  counts every trial as started.
- **Label-count releases** (``label_count_noise_multiplier``, the ``pos_weight: train`` trials'): each trial's own,
  composed before its steps.
- **Reproducible-noise trials** (``reproducible_noise``) are private candidates without a guarantee: they make the
  tuning epsilon infinite (`trainables.privacy.tuning`), whereas non-private baselines are reference points, left
  out with the label "private trials only".

The sweep-wide composition of everything that touched a dataset (other sweeps, audits) is its ledger's
(`trainables.privacy.ledger`), not this module's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.tables import TableError
from sweeps.plan import label_count_noise_multiplier
from sweeps.spec import SweepSpec
from trainables import names as N

if TYPE_CHECKING:
    from trainables.privacy.tuning import TrialMechanism


def tuning_costs(trials: pd.DataFrame) -> dict[str, Any]:
    """Per private training set: epsilon of releasing the best trial after the whole sweep (`tuning_cost`)."""
    if "dataset" not in trials or trials.empty:
        return {}
    costs = {}
    mixed = "privacy_unit" in trials and trials["privacy_unit"].nunique() > 1
    for dataset, group in trials.groupby("dataset", sort=False):
        # Units are never composed with each other here (each cost is at its own unit, over its own trials);
        # `patient_level_sweep_epsilon` composes everything at the patient level.
        parts = group.groupby("privacy_unit", sort=False) if mixed else [(None, group)]
        for unit, part in parts:
            cost = tuning_cost(part)
            if cost is not None:
                costs[str(dataset) if unit is None else f"{dataset} ({unit}-level trials only)"] = cost
    return costs


def patient_level_sweep_epsilon(trials: pd.DataFrame) -> dict[str, float]:
    """Per training set of a sweep with patient-level trials, epsilon for one patient of releasing every private trial
    that started, at its planned steps (`trainables.privacy.units.composed_patient_epsilon`): patient-level trials at
    k = 1, image-level ones at k = their training split's largest images per patient (``privacy/patient_images``); each
    label-count release as a Gaussian of noise multiplier sigma_c / k (a patient's k images move the counts by at most
    k sensitivities; as the ledger, `trainables.privacy.ledger`). ``inf`` when a private trial uses
    ``reproducible_noise``. Empty when no trial is patient-level, or k is unknown (no image-level trial finished)."""
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    if "privacy_unit" not in trials or not (trials["privacy_unit"] == "patient").any():
        return {}
    results = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        started = group[started_trials(group)]
        private = started[started["noise_multiplier"] > 0]
        k_known = group[N.PATIENT_IMAGES].dropna() if N.PATIENT_IMAGES in group else pd.Series(dtype=float)
        if private.empty or ((private["privacy_unit"] == "image").any() and k_known.empty):
            continue
        k_image = int(k_known.max()) if len(k_known) else 1
        delta = float(private["delta"].iloc[0])
        trials_k = [
            (trial_mechanism(row), 1 if row["privacy_unit"] == "patient" else k_image)
            for row in private.to_dict("records")
        ]
        if not all(trial.has_guarantee for trial, _ in trials_k):
            results[str(dataset)] = math.inf
            continue
        results[str(dataset)] = composed_patient_epsilon(
            [
                PatientMechanism(t.noise_multiplier, t.sample_rate, t.steps, k, t.label_count_noise_multiplier)
                for t, k in trials_k
            ],
            delta,
        )
    return results


def tuning_cost(trials: pd.DataFrame) -> Any:
    """Epsilon of releasing the best trial after the whole grid (RDP composition of every private trial run
    on the same data: the grid's trial count is fixed, so Papernot-Steinke random-count bounds do not apply).

    Every trial that started (`started_trials`) is composed at its planned steps, its label-count release
    included (`trial_mechanism`); see the module docstring. Non-private trials are left out ("private trials
    only"); a ``reproducible_noise`` trial makes the epsilon ``inf``. None when no private trial started. For
    ``search: optuna`` see `sweeps.search` and docs/sweep-spec.md: Optuna picks each trial's parameters from earlier
    results, which this fixed-schedule composition does not cover; the summary then also states the bounds that do.

    Raises:
        TableError: the table lacks a column the bound needs, or a row is inconsistent (`trial_mechanism`).
    """
    from trainables.privacy.tuning import tuning_epsilon

    started = trials[started_trials(trials)]
    private = started[started["noise_multiplier"] > 0]
    if private.empty:
        return None
    mechanisms = [trial_mechanism(row) for row in started.to_dict("records")]
    return tuning_epsilon(
        mechanisms, float(private["delta"].iloc[0]), "fixed", private_trials_only=len(private) < len(started)
    )


def started_trials(trials: pd.DataFrame) -> pd.Series:
    """Per trial, whether it started and so may have touched the training data: every trial but the ``INCOMPLETE``
    ones that released nothing (``privacy/released_steps`` 0) and have no MLflow child run (the module docstring).

    Raises:
        TableError: the table has no ``privacy/released_steps`` column (written by an earlier dpsweep).
    """
    if N.RELEASED_STEPS not in trials:
        raise TableError(
            f"the trial table has no {N.RELEASED_STEPS!r} column (written by an earlier dpsweep); "
            "rebuild it with `dpsweep table <sweep file>`"
        )
    if "status" not in trials:
        return pd.Series(True, index=trials.index)
    released = trials[N.RELEASED_STEPS].fillna(0).astype(int) > 0
    has_run = (
        trials["mlflow_run_id"].map(lambda run: isinstance(run, str) and run != "")
        if "mlflow_run_id" in trials
        else pd.Series(False, index=trials.index)
    )
    return (trials["status"] != N.INCOMPLETE) | released | has_run


def trial_mechanism(row: dict[str, Any]) -> TrialMechanism:
    """One started trial of the table as it is accounted for: its planned steps (``steps``; not
    ``privacy/released_steps``), its label-count release (``label_count_noise_multiplier``, None/NaN for none) and
    ``reproducible_noise``. A non-private row (sigma 0) becomes a sigma-0 mechanism whose q and steps do not matter.

    Raises:
        TableError: a private row without planned steps, with fewer planned steps than it released, or a private
            ``pos_weight: train`` row without a label-count noise multiplier (its counts would be exact).
    """
    from trainables.privacy.tuning import TrialMechanism

    trial = row.get("trial", "?")
    sigma = float(row["noise_multiplier"])
    if sigma == 0:
        return TrialMechanism(0.0, 1.0, 1)  # no guarantee whatever it ran: only sigma 0 matters
    if "steps" not in row:
        raise TableError("the trial table has no 'steps' column (the planned DP-SGD steps); rebuild it")
    planned = _number(row["steps"])
    if planned is None or planned < 1:
        raise TableError(f"trial {trial!r} has no planned steps (steps={row['steps']!r}); rebuild the table")
    released = _number(row.get(N.RELEASED_STEPS)) or 0
    if released > planned:
        raise TableError(
            f"trial {trial!r} released {released:.0f} steps, more than its planned {planned:.0f}: the table is "
            "inconsistent; rebuild it with `dpsweep table <sweep file>`"
        )
    sigma_c = _number(row.get("label_count_noise_multiplier"))
    if sigma_c is None and row.get("pos_weight") == "train":
        raise TableError(
            f"private trial {trial!r} has pos_weight 'train' but no label_count_noise_multiplier: its label counts "
            "were not noised (an earlier dpsweep), so no tuning epsilon covers it"
        )
    return TrialMechanism(
        sigma,
        float(row["sample_rate"]),
        int(planned),
        label_count_noise_multiplier=sigma_c,
        reproducible_noise=bool(_number(row.get("reproducible_noise")) or False),
    )


def _number(value: Any) -> float | None:
    """A table cell as a number; None for a missing one (parquet stores a missing number as NaN, an object as None)."""
    return None if value is None or value != value else float(value)


def adaptive_tuning_bounds(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, list[Any]]:
    """Per training set of a ``search: optuna`` sweep, bounds on the privacy of all its private trials together
    that hold although Optuna picked each trial's mechanism from earlier results (`trainables.privacy.tuning`):

    - the worst-case RDP composition: each cell's ``optuna.trials_per_target`` trials, each at most the
      order-wise supremum of the RDP curves of every proposal the cell could train (the search ranges cut by the
      accountant's feasibility check), composed (Mironov 2017, Prop. 1: adaptive composition with curves fixed
      in advance);
    - basic composition of each cell's ``optuna.trials_per_target`` trials at its target (Dwork and Roth 2014,
      Thm. 3.16): the count fixed in advance, not the trials that ran.

    Proposals are planned over the cell's records (`sweeps.search.StudyCell`), so the admissible set is too: N is the
    training images (``n_train``), or for a patient-level sweep the training patients (``n_patients``) with epsilon
    per patient.

    None for a sweep whose trials use ``privacy.reproducible_noise``: no bound holds (their noise replays from the
    logged seed), and `tuning_cost` says so. The realized-curve composition of `tuning_cost` is not such a bound; the
    summary says so."""
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound, basic_composition_bound

    o = spec.optuna
    if o is None or spec.privacy.reproducible_noise or "dataset" not in trials or trials.empty:
        return {}
    p = spec.privacy
    (unit,) = spec.axes.privacy_unit  # an Optuna sweep has one (`sweeps.validate`)
    bounds: dict[str, list[Any]] = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        n_records = int(group["n_train" if unit == "image" else "n_patients"].iloc[0])
        targets = [
            float(c.target_epsilon) for c in spec.cells() if c.dataset == dataset and math.isfinite(c.target_epsilon)
        ]
        cells = [
            (
                AdmissibleSet(
                    n_records,
                    target,
                    p.delta,
                    noise_multiplier=_range(o.noise_multiplier),
                    expected_batch_size=_range(o.expected_batch_size, int),
                    epochs=_range(o.epochs, int),
                    accountant=p.accountant,
                    label_count_noise_multiplier=label_count_noise_multiplier(spec, True),
                ),
                o.trials_per_target,
            )
            for target in targets
        ]
        if not cells:
            continue
        basic = basic_composition_bound([target for target in targets for _ in range(o.trials_per_target)], p.delta)
        bounds[str(dataset)] = [adaptive_tuning_bound(cells), basic]
    return bounds


def _range(bounds: tuple[Any, ...], kind: type = float) -> tuple[Any, Any]:
    """An ``optuna.*`` range as (low, high); a fixed ``[value]`` is (value, value)."""
    return kind(bounds[0]), kind(bounds[-1])


def tuning_summary(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, float]:
    """The parent run's tuning-cost metrics (``/<dataset>`` suffixed with several datasets): grid sweeps'
    ``privacy/tuning_epsilon`` (RDP composition of the trials that started); Optuna sweeps' bounds that hold under
    adaptive selection, ``privacy/tuning_epsilon`` (worst-case RDP composition) and ``privacy/tuning_epsilon_basic``.

    An infinite tuning epsilon (``reproducible_noise`` trials) has no metric, as a non-private trial has no epsilon
    metric: MLflow cannot hold an infinity (`sweeps.tracking.finish_parent` refuses one); the console says it."""

    def key(name: str, dataset: str) -> str:
        return name if len(spec.data.train) == 1 else f"{name}/{dataset}"

    if spec.optuna is not None:
        found = {
            key(name, dataset): bound.epsilon
            for dataset, bounds in adaptive_tuning_bounds(spec, trials).items()
            for name, bound in zip((N.TUNING_EPSILON, N.TUNING_EPSILON_BASIC), bounds, strict=False)
        }
    else:
        found = {key(N.TUNING_EPSILON, dataset): cost.epsilon for dataset, cost in tuning_costs(trials).items()}
    return {name: epsilon for name, epsilon in found.items() if math.isfinite(epsilon)}
