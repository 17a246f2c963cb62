"""`dpsweep audit SPEC`: an empirical lower bound on each audited trial's epsilon, beside the epsilon it claims.

For every private (model, dataset, init, target epsilon) cell of a grid sweep (or the targets the ``audit:``
section names), the cell's first grid point is planned exactly as the sweep plans it (same data, init, sigma, q,
steps, clip, engine mode) and audited in one run with m canaries (`trainables.audit.run_audit`:
white-box Dirac gradient canaries through the engine's own clipping and noise, or black-box input canaries
through the real trial loop). Results go to ``runs/<sweep>/audit.parquet``, to one MLflow run per audit under the
sweep's parent run (role ``audit``), to the console and to the report. A lower bound above the claimed epsilon
refutes the claim at the stated confidence: the command then exits non-zero.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import pandas as pd

from sweeps.plan import Log, SweepPaths, plan_sweep
from sweeps.spec import AuditSpec, SpecError, SweepSpec
from trainables import names as N
from trainables.config import is_private
from trainables.point import TrialPoint

AUDIT_COLUMNS = {
    "trial": "trial",
    "kind": "kind",
    "m": "m",
    "claimed_epsilon": "eps claimed",
    "epsilon_lower_bound": "eps lower bound",
    "confidence": "confidence",
    "correct": "correct",
    "guesses": "guesses",
    "wall_time_s": "seconds",
}


def audited_trials(spec: SweepSpec, trials: list[TrialPoint], audit: AuditSpec) -> list[TrialPoint]:
    """The first planned trial of every private cell whose target the audit covers (all private ones by default)."""
    targets = set(audit.target_epsilon) or {e for e in spec.axes.target_epsilon if is_private(e)}
    chosen: dict[tuple[str, str, str, float], TrialPoint] = {}
    for trial in trials:
        c = trial.config
        cell = (c.model, c.dataset, c.init, c.privacy.target_epsilon)
        if c.privacy.is_private and c.privacy.target_epsilon in targets:
            chosen.setdefault(cell, trial)
    return list(chosen.values())


def run_audits(
    spec: SweepSpec, paths: SweepPaths, *, kinds: tuple[str, ...] | None = None, m: int | None = None, log: Log = print
) -> pd.DataFrame:
    """Audit the sweep's private cells; write ``runs/<sweep>/audit.parquet`` and MLflow runs; return the table."""
    from trainables.audit import run_audit

    if spec.search != "grid":
        raise SpecError(
            f"{spec.source}: `dpsweep audit` audits planned grid points; this sweep has search: {spec.search}"
        )
    audit = spec.audit or AuditSpec()
    audit = replace(audit, kind=tuple(kinds) if kinds else audit.kind, m=m or audit.m)
    plan = plan_sweep(spec, paths, log=log)
    chosen = audited_trials(spec, plan.trials, audit)
    if not chosen:
        raise SpecError(f"{spec.source}: no private grid point to audit (privacy.target_epsilon has only .inf)")
    rows = []
    for trial in chosen:
        for kind in audit.kind:
            log(f"audit {kind}: {trial.key} (m={audit.m}, claimed epsilon {trial.config.privacy.target_epsilon:g})")
            result = run_audit(
                trial.config,
                trial.init,
                m=audit.m,
                kind=kind,  # type: ignore[arg-type]
                confidence=audit.confidence,
                real_records=audit.real_records if kind == "white_box" else None,
            )
            rows.append(
                {
                    "trial": trial.key,
                    **asdict(result),
                    "violates_claim": result.violates_claim,
                    "target_epsilon": trial.config.privacy.target_epsilon,
                    "init": trial.config.init,
                    "model": trial.config.model,
                    "dataset": trial.config.dataset,
                }
            )
            _log_to_mlflow(spec, paths, trial, result)
    table = pd.DataFrame(rows)
    sweep_dir = paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(sweep_dir / N.AUDIT_FILE, index=False)
    return table


def _log_to_mlflow(spec: SweepSpec, paths: SweepPaths, trial: TrialPoint, result: Any) -> None:
    """One MLflow run per audit, a child of the sweep's parent run (never read back as a trial)."""
    import mlflow.tracking
    from mlflow.entities import Metric, Param

    from sweeps.tracking import get_or_create_experiment, get_or_create_parent_run

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    experiment_id = get_or_create_experiment(
        client, spec.tracking.experiment or spec.name, paths.runs_root / "mlartifacts"
    )
    parent = get_or_create_parent_run(client, experiment_id, spec.name, {"dpsweep.spec": spec.source})
    run = client.create_run(
        experiment_id,
        run_name=f"audit {result.kind} {trial.key}",
        tags={
            N.PARENT_TAG: parent,
            N.SWEEP_TAG: spec.name,
            N.ROLE_TAG: "audit",
            N.AUDITED_TRIAL_TAG: trial.key,
            f"{N.TAG_PREFIX}audit_kind": result.kind,
            f"{N.TAG_PREFIX}audit_violates_claim": str(result.violates_claim),
        },
    )
    params = {
        "kind": result.kind,
        "m": result.m,
        "score": result.score,
        "grad_sample_mode": result.grad_sample_mode,
        "noise_multiplier": result.noise_multiplier,
        "sample_rate": result.sample_rate,
        "steps": result.steps,
        "delta": result.delta,
    }
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in result.to_metrics().items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")


def audit_summary(table: pd.DataFrame) -> str:
    """The audit table and what it means, for the console."""
    shown = table[list(AUDIT_COLUMNS)].rename(columns=AUDIT_COLUMNS)
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        lines = [shown.to_string(index=False), ""]
    confidence = float(table["confidence"].iloc[0])
    lines.append(
        f"Each lower bound holds with probability >= {confidence:g}: the mechanism that ran spends at least "
        "that epsilon. A bound at or below the claimed epsilon is consistent with the claim (it does not "
        "show the claim is tight: one run with m canaries cannot measure large epsilons)."
    )
    violations = table[table["violates_claim"]]
    if len(violations):
        lines.append(
            f"CLAIM REFUTED for {len(violations)} audit(s): {', '.join(violations['trial'])}: the mechanism "
            "leaks more than its accountant claims; do not trust these trials' epsilon"
        )
    return "\n".join(lines)
