"""The privacy cost of a sweep's search: epsilon of releasing the best trial after running them all.

Grid sweeps compose every private trial at the steps behind what it released (`tuning_cost`, per training set
`tuning_costs`); Optuna sweeps, whose trials were chosen from earlier results, get bounds that hold under adaptive
selection (`adaptive_tuning_bounds`); sweeps with patient-level trials also get the patient-level composition of
both units (`patient_level_sweep_epsilon`). `tuning_summary` gives the parent run's metrics; the console states
them through `sweeps.summary`.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from analysis.tables import TableError
from sweeps.plan import label_count_noise_multiplier
from sweeps.spec import SweepSpec
from trainables import names as N


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
    (`trainables.privacy.units.composed_patient_epsilon`): patient-level trials at k = 1, image-level ones at k =
    their training split's largest images per patient (``privacy/patient_images``). Empty when no trial is
    patient-level, or k is unknown (no image-level trial finished). Label-count releases are not included."""
    from trainables.privacy.units import PatientMechanism, composed_patient_epsilon

    if "privacy_unit" not in trials or not (trials["privacy_unit"] == "patient").any():
        return {}
    results = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        released = _released_steps(group)
        ran = group[(released > 0) & (group["noise_multiplier"] > 0)]
        k_known = group[N.PATIENT_IMAGES].dropna() if N.PATIENT_IMAGES in group else pd.Series(dtype=float)
        if ran.empty or ((ran["privacy_unit"] == "image").any() and k_known.empty):
            continue
        k_image = int(k_known.max()) if len(k_known) else 1
        mechanisms = [
            PatientMechanism(
                float(r.noise_multiplier),
                float(r.sample_rate),
                int(steps),
                1 if r.privacy_unit == "patient" else k_image,
            )
            for r, steps in zip(ran.itertuples(), released[ran.index], strict=True)
        ]
        results[str(dataset)] = composed_patient_epsilon(mechanisms, float(ran["delta"].iloc[0]))
    return results


def tuning_cost(trials: pd.DataFrame) -> Any:
    """Epsilon of releasing the best trial after the whole grid (RDP composition of every private trial run
    on the same data: the grid's trial count is fixed, so Papernot-Steinke random-count bounds do not apply).

    Every trial that released anything is composed at the steps behind its releases (`names.RELEASED_STEPS`):
    finished ones at their final steps, early-stopped, failed and unfinished ones at their last reported epoch's
    (an unfinished trial's released epochs are published in MLflow and the tables too). None when no private
    trial released anything. For ``search: optuna`` see `sweeps.search` and docs/sweep-spec.md: Optuna picks each
    trial's parameters from earlier results, which this fixed-schedule composition does not cover; the summary then
    also states the bounds that do."""
    from trainables.privacy.tuning import TrialMechanism, tuning_epsilon

    released = _released_steps(trials)
    ran = trials[released > 0]
    private = ran[ran["noise_multiplier"] > 0]
    if private.empty:
        return None
    q = float(private["sample_rate"].iloc[0])  # non-private rows carry q = 0; their sigma 0 is what matters
    mechanisms = [
        TrialMechanism(float(r.noise_multiplier), float(r.sample_rate) or q, int(steps))
        for r, steps in zip(ran.itertuples(), released[released > 0], strict=True)
    ]
    return tuning_epsilon(
        mechanisms, float(private["delta"].iloc[0]), "fixed", private_trials_only=len(private) < len(ran)
    )


def _released_steps(trials: pd.DataFrame) -> pd.Series:
    """Per trial, the steps behind what it released (`analysis.tables.build_tables` writes the column)."""
    if N.RELEASED_STEPS not in trials:
        raise TableError(
            f"the trial table has no {N.RELEASED_STEPS!r} column (written by an earlier dpsweep); "
            "rebuild it with `dpsweep table <sweep file>`"
        )
    return trials[N.RELEASED_STEPS].fillna(0).astype(int)


def adaptive_tuning_bounds(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, list[Any]]:
    """Per training set of a ``search: optuna`` sweep, bounds on the privacy of all its private trials together
    that hold although Optuna picked each trial's mechanism from earlier results (`trainables.privacy.tuning`):

    - the worst-case RDP composition: each cell's ``optuna.trials_per_target`` trials, each at most the
      order-wise supremum of the RDP curves of every proposal the cell could train (the search ranges cut by the
      accountant's feasibility check), composed (Mironov 2017, Prop. 1: adaptive composition with curves fixed
      in advance);
    - basic composition of the targets of the private trials that released anything (Dwork and Roth 2014,
      Thm. 3.16).

    The realized-curve composition of `tuning_cost` is not such a bound; the summary says so."""
    from trainables.privacy.tuning import AdmissibleSet, adaptive_tuning_bound, basic_composition_bound

    o = spec.optuna
    if o is None or "dataset" not in trials or trials.empty:
        return {}
    p, released = spec.privacy, _released_steps(trials)
    bounds: dict[str, list[Any]] = {}
    for dataset, group in trials.groupby("dataset", sort=False):
        n_train = int(group["n_train"].iloc[0])
        targets = [
            float(c.target_epsilon) for c in spec.cells() if c.dataset == dataset and math.isfinite(c.target_epsilon)
        ]
        cells = [
            (
                AdmissibleSet(
                    n_train,
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
        ran = group[(released[group.index] > 0) & (group["noise_multiplier"] > 0)]
        found = [adaptive_tuning_bound(cells)]
        if len(ran):
            found.append(basic_composition_bound([float(t) for t in ran["target_epsilon"]], p.delta))
        bounds[str(dataset)] = found
    return bounds


def _range(bounds: tuple[Any, ...], kind: type = float) -> tuple[Any, Any]:
    """An ``optuna.*`` range as (low, high); a fixed ``[value]`` is (value, value)."""
    return kind(bounds[0]), kind(bounds[-1])


def tuning_summary(spec: SweepSpec, trials: pd.DataFrame) -> dict[str, float]:
    """The parent run's tuning-cost metrics (``/<dataset>`` suffixed with several datasets): grid sweeps'
    ``privacy/tuning_epsilon`` (RDP composition of the trials run); Optuna sweeps' bounds that hold under adaptive
    selection, ``privacy/tuning_epsilon`` (worst-case RDP composition) and ``privacy/tuning_epsilon_basic``."""

    def key(name: str, dataset: str) -> str:
        return name if len(spec.data.train) == 1 else f"{name}/{dataset}"

    if spec.optuna is not None:
        return {
            key(name, dataset): bound.epsilon
            for dataset, bounds in adaptive_tuning_bounds(spec, trials).items()
            for name, bound in zip((N.TUNING_EPSILON, N.TUNING_EPSILON_BASIC), bounds, strict=False)
        }
    return {key(N.TUNING_EPSILON, dataset): cost.epsilon for dataset, cost in tuning_costs(trials).items()}
