"""Trial points made as a sweep makes them (`sweeps.plan.make_trial`), without data or Ray: for tests of what reads
them (the trainable, the MLflow callback, the progress lines, the tables)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from sweeps.plan import DatasetPlan, SweepPaths, cell_privacy, make_trial, trial_name
from sweeps.search import OptunaTrialFactory, Proposal
from sweeps.spec import SweepSpec, parse_spec
from tests.sweeps.tiny import tiny_spec
from trainables.models import ResolvedInit
from trainables.point import TrialPoint, run_tags
from trainables.privacy.planning import plan_privacy

N_TRAIN = 600
SIGMA = 1.5
PROVENANCE = {"dpsweep.git_commit": "abc123"}
PATHS = SweepPaths(Path("/runs"), Path("/data"), "sqlite:///x.db")


def datasets(spec: SweepSpec, n_train: int = N_TRAIN) -> dict[str, DatasetPlan]:
    """``n_train`` training images (and half as many patients) for every training set of the sweep (the schedule
    fields are placeholders: trials are planned from the cell's privacy config)."""
    return {name: DatasetPlan(name, n_train, 0.1, 20, n_patients=n_train // 2) for name in spec.data.train}


def inits(spec: SweepSpec) -> dict[tuple[str, str], ResolvedInit]:
    """Every (model, init) resolved without weights."""
    return {(m, i): ResolvedInit(i, "random", m, None) for m in spec.models for i in spec.inits}


def planned_points(spec: SweepSpec) -> list[TrialPoint]:
    """The grid's points, each planned on `N_TRAIN` training images of its dataset with noise multiplier `SIGMA`
    (no calibration: any sigma makes a valid point) and provenance `PROVENANCE`."""
    points = []
    for point in spec.grid():
        eps = point.target_epsilon
        dataset = datasets(spec)[point.dataset]
        privacy = plan_privacy(
            cell_privacy(spec, eps, point.privacy_unit),
            dataset.n_records(point.privacy_unit),
            noise_multiplier=None if math.isinf(eps) else SIGMA,
        )
        points.append(
            make_trial(
                spec,
                PATHS,
                dataset,
                inits(spec)[(point.model, point.init)],
                point,
                trial_name(spec, point),
                privacy=privacy,
                provenance_tags=PROVENANCE,
            )
        )
    return points


def tiny_points(**overrides: Any) -> list[TrialPoint]:
    """The planned points of `tiny_spec(**overrides)` (default: epsilon 2 and the non-private baseline)."""
    return planned_points(parse_spec(tiny_spec(**overrides), source="tiny.yaml"))


def tiny_point(target_epsilon: float, *, sweep: str = "tiny", key: str | None = None) -> TrialPoint:
    """One tiny point at ``target_epsilon`` in sweep ``sweep``; ``key`` renames it (run name ``run <key>``)."""
    (point,) = tiny_points(name=sweep, privacy={"target_epsilon": [target_epsilon]})
    if key is None:
        return point
    tags = {**point.tags, **run_tags(key, point.config)}
    return dataclasses.replace(point, key=key, run_name=f"run {key}", tags=tags)


def tiny_optuna_spec(**overrides: Any) -> SweepSpec:
    """`tiny_spec(**overrides)` searched by Optuna (its grid settings left to the ranges)."""
    raw = tiny_spec(search="optuna", **overrides)
    for section, name in (("privacy", "max_grad_norm"), ("privacy", "expected_batch_size"), ("privacy", "epochs")):
        raw[section].pop(name, None)
    raw["training"].pop("lr", None)
    return parse_spec(raw, source="tiny-optuna.yaml")


def optuna_factory(spec: SweepSpec, n_train: int = N_TRAIN) -> OptunaTrialFactory:
    """The sweep's trial factory over `datasets` and `inits`, with provenance `PROVENANCE`."""
    return OptunaTrialFactory(spec, PATHS, datasets(spec, n_train), inits(spec), PROVENANCE)


def proposal(number: int, private: bool) -> Proposal:
    """A fixed accepted proposal (batch 32, 2 epochs, lr 0.003; sigma 2 and clip 0.8 when private)."""
    return Proposal(
        number=number,
        expected_batch_size=32,
        epochs=2,
        lr=0.003,
        noise_multiplier=2.0 if private else None,
        max_grad_norm=0.8 if private else None,
        planned_epsilon=1.5 if private else math.inf,
    )
