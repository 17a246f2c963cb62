"""A trial point: everything one trial needs and records, built once when the trial is made (`sweeps.plan.make_trial`,
for a grid point or an Optuna proposal) and handed across Ray as JSON-able data.

    sweeps.plan.make_trial --> TrialPoint --to_ray--> Ray's param space {"point": {...}} (and params.json)
        --from_ray--> trainables.trial.dp_trial (config, init), sweeps.tracking (run name, tags, params),
                      sweeps.results (records for the tables); analysis reads ``point.key`` from params.json

The Ray dict holds ``key``, ``trial`` (the flat `TrialConfig`), ``init`` (the `ResolvedInit`), ``params``, ``tags`` and
``run_name``. Points written before ``run_name`` existed (sweeps started by an earlier dpsweep) are still read: their
run name and run-level tags are derived as that dpsweep derived them (`legacy_run_name`). This module imports no torch,
Ray or MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from trainables.config import TrialConfig, is_private
from trainables.errors import UserError
from trainables.names import BUDGET_PARAM, PRIVATE_TAG, ROLE_TAG, SWEEP_TAG, TRIAL_KEY_TAG, budget_value

if TYPE_CHECKING:
    from trainables.models import ResolvedInit

POINT: Final = "point"
"""The key of Ray's param space (and of each trial's ``params.json``) that holds the trial point."""
TRIAL_ROLE: Final = "trial"
"""`ROLE_TAG` of a trial's child run (the sweep's parent run is ``sweep``)."""


class PointError(UserError, ValueError):
    """A Ray trial point cannot be read (not written by dpsweep, or by an incompatible version)."""


@dataclass(frozen=True)
class TrialPoint:
    """One trial, as made for Ray.

    Attributes:
        key: unique in the sweep (`sweeps.schema.TrialName.key`): Ray's and the tables' trial id, the
            ``dpsweep.trial_key`` tag.
        run_name: the short MLflow run name (`sweeps.schema.TrialName.run_name`).
        config: the trial's whole configuration (privacy planned).
        init: where its initial weights come from.
        params: its MLflow params and trials.parquet columns (`TrialConfig.to_flat` plus the training-set size, the
            search mode, the guarantee in words, ...); not the ``budget`` param (`mlflow_params`).
        tags: every tag of its MLflow run but the run-level ones only the driver knows (the parent run, Ray's trial
            id): `run_tags` (sweep, role, key, ``dpsweep.private``), the privacy setup and the provenance.
    """

    key: str
    run_name: str
    config: TrialConfig
    init: ResolvedInit
    params: dict[str, Any]
    tags: dict[str, str]

    @property
    def budget(self) -> str:
        """The ``budget`` param (`names.budget_value`): ``eps=<target>`` or ``non-private``; a proxy trial's
        (`TrialConfig.proxy`, public data) ``proxy eps=<target>``, never binned as a private result."""
        budget = budget_value(self.config.privacy.target_epsilon)
        return f"proxy {budget}" if self.config.proxy else budget

    def mlflow_params(self) -> dict[str, Any]:
        """What the child run logs as params: `params` and the ``budget`` (which is no trial parameter: the tables
        read from MLflow drop it)."""
        return {**self.params, BUDGET_PARAM: self.budget}

    def to_ray(self) -> dict[str, Any]:
        """The JSON-able dict Ray's param space holds under `POINT` (Ray writes it to ``params.json``)."""
        return {
            "key": self.key,
            "trial": self.config.to_flat(),
            "init": asdict(self.init),
            "params": self.params,
            "tags": self.tags,
            "run_name": self.run_name,
        }

    @classmethod
    def from_ray(cls, point: Mapping[str, Any]) -> TrialPoint:
        """The point `to_ray` wrote, or one an earlier dpsweep wrote (no ``run_name``: its run name and run-level tags
        are derived as that dpsweep derived them, so a resumed sweep names and finds its runs as before).

        Raises:
            PointError: the dict is no dpsweep trial point.
        """
        from trainables.models import ResolvedInit  # here: reading a point's key needs no torch

        missing = [name for name in ("key", "trial", "init", "params", "tags") if name not in point]
        if missing:
            raise PointError(
                f"Ray trial point without {', '.join(missing)} (has {sorted(point)}): not written by dpsweep's "
                "planner; run the sweep again with --fresh to plan its trials anew"
            )
        key = str(point["key"])
        try:
            config = TrialConfig.from_flat(dict(point["trial"]))
            init = ResolvedInit(**point["init"])
        except (KeyError, TypeError) as error:
            raise PointError(
                f"Ray trial point {key!r}: its trial config or init cannot be read by this dpsweep ({error}); run the "
                "sweep again with --fresh"
            ) from None
        tags = dict(point["tags"])
        run_name = point.get("run_name")
        if run_name is None:  # written before points carried their run name
            run_name = legacy_run_name(key)
            tags = {**run_tags(key, config), **tags}
        return cls(key, str(run_name), config, init, dict(point["params"]), tags)


def run_tags(key: str, config: TrialConfig) -> dict[str, str]:
    """The tags that find a trial's run again and say whether it is private: the sweep, the role, the key and
    ``dpsweep.private`` (`names.PRIVATE_TAG`: ``true`` for a finite target epsilon, ``reproducible_noise`` or not)."""
    return {
        SWEEP_TAG: config.sweep,
        ROLE_TAG: TRIAL_ROLE,
        TRIAL_KEY_TAG: key,
        PRIVATE_TAG: str(is_private(config.privacy.target_epsilon)).lower(),
    }


_LEGACY_RUN_NAME_PARTS = (
    (re.compile(r"-epsinf(?=-|$)"), " ε∞"),
    (re.compile(r"-eps"), " ε"),
    (re.compile(r"-clip"), " c"),
    (re.compile(r"-lr"), " lr"),
    (re.compile(r"-seed"), " s"),
    (re.compile(r"-t(?=\d+$)"), " t"),
    (re.compile(r"-(?=(image|patient)$)"), " "),
)


def legacy_run_name(key: str) -> str:
    """The run name an earlier dpsweep gave a point that did not carry one: read back from its key
    (``random-eps8-clip1-lr0.002-seed0`` -> ``random ε8 c1 lr0.002 s0``). Points made now carry the name, written
    from the same parts as the key (`sweeps.schema.TrialName`)."""
    name = key
    for pattern, replacement in _LEGACY_RUN_NAME_PARTS:
        name = pattern.sub(replacement, name)
    return name
