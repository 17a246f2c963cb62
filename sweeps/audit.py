"""`dpsweep audit SPEC`: an empirical lower bound on each audited trial's epsilon, beside the epsilon it claims.

For every private (model, dataset, init, target epsilon, privacy unit) cell of a grid sweep (or the targets the
``audit:`` section names), the cell's first grid point is planned exactly as the sweep plans it (same data, init,
sigma, q, steps, clip, engine mode, unit) and audited in one run with m canaries (`trainables.audit.run_audit`;
at the patient level each canary is a patient record and the claim the patient-level epsilon:
white-box Dirac gradient canaries through the engine's own clipping and noise, or black-box input canaries
through the real trial loop with the trial's engine). Results go to ``runs/<sweep>/audit.parquet``, to one MLflow
run per audit under the sweep's parent run (role ``audit``), to the console and to the report.

The n audits of one command (cells x kinds) are one family: each bound is computed at confidence
``1 - beta / n`` (Bonferroni: all n hold together with probability >= 1 - beta, beta = 1 - ``audit.confidence``),
and a claim is refuted when its Holm-adjusted p-value is below beta (family-wise error <= beta); the command then
exits non-zero. With one audit both are the plain test (`trainables.privacy.audit`, "Testing the claim").
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import asdict, replace
from typing import Any

import pandas as pd

from sweeps.ledger import PlannedRun, mark_runs, record_runs
from sweeps.plan import DatasetPlan, Log, SweepPaths, plan_sweep
from sweeps.spec import AuditSpec, SpecError, SweepSpec
from trainables import names as N
from trainables.config import PrivacyConfig, is_private
from trainables.data.ledger import read_ledger
from trainables.point import TrialPoint
from trainables.privacy.audit import HOLM_P_VALUE, AuditKind, bonferroni_confidence, holm_adjusted_p_values

AUDIT_COLUMNS = {
    "trial": "trial",
    "kind": "kind",
    "privacy_unit": "unit",
    "m": "m",
    "claimed_epsilon": "eps claimed",
    "epsilon_lower_bound": "eps lower bound",
    "confidence": "confidence",
    "epsilon_ceiling": "eps ceiling",
    "correct": "correct",
    "guesses": "guesses",
    "claim_p_value": "p claim",
    "holm_p_value": "p Holm",
    "violates_claim": "refuted",
    "wall_time_s": "seconds",
}


def audited_trials(spec: SweepSpec, trials: list[TrialPoint], audit: AuditSpec) -> list[TrialPoint]:
    """The first planned trial of every private cell (model, dataset, init, target, privacy unit) whose target the
    audit covers (all private ones by default)."""
    targets = set(audit.target_epsilon) or {e for e in spec.axes.target_epsilon if is_private(e)}
    chosen: dict[tuple[str, str, str, float, str], TrialPoint] = {}
    for trial in trials:
        c = trial.config
        cell = (c.model, c.dataset, c.init, c.privacy.target_epsilon, c.privacy.privacy_unit)
        if c.privacy.is_private and c.privacy.target_epsilon in targets:
            chosen.setdefault(cell, trial)
    return list(chosen.values())


def run_audits(
    spec: SweepSpec,
    paths: SweepPaths,
    *,
    kinds: tuple[AuditKind, ...] | None = None,
    m: int | None = None,
    log: Log = print,
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
    audits = len(chosen) * len(audit.kind)
    confidence = bonferroni_confidence(audit.confidence, audits)
    command = uuid.uuid4().hex[:12]  # this `dpsweep audit`: its runs in the datasets' privacy ledgers
    done = []
    for trial in chosen:
        for kind in audit.kind:
            log(f"audit {kind}: {trial.key} (m={audit.m}, claimed epsilon {trial.config.privacy.target_epsilon:g})")
            result = run_audit(
                trial.config,
                trial.init,
                m=audit.m,
                kind=kind,
                confidence=confidence,
                real_records=audit.real_records if kind == "white_box" else None,
                record=functools.partial(
                    _record_audit, spec, paths, trial, f"{kind}:{trial.key}", command, plan.datasets
                ),
            )
            _mark_audit(paths, trial, f"{spec.name}/audit-{command}/{kind}:{trial.key}")
            done.append((trial, result, _log_to_mlflow(spec, paths, trial, result)))
    holm = holm_adjusted_p_values([result.claim_p_value for _, result, _ in done])
    rows = []
    for (trial, result, run_id), holm_p in zip(done, holm, strict=True):
        refuted = bool(holm_p < 1 - audit.confidence)
        rows.append(
            {
                "trial": trial.key,
                **asdict(result),
                "audits": audits,
                "family_confidence": audit.confidence,
                HOLM_P_VALUE: float(holm_p),
                "violates_claim": refuted,
                "target_epsilon": trial.config.privacy.target_epsilon,
                "init": trial.config.init,
                "model": trial.config.model,
                "dataset": trial.config.dataset,
            }
        )
        _log_family_test(paths, run_id, result.kind, float(holm_p), refuted)
    table = pd.DataFrame(rows)
    sweep_dir = paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(sweep_dir / N.AUDIT_FILE, index=False)
    return table


def _record_audit(
    spec: SweepSpec,
    paths: SweepPaths,
    trial: TrialPoint,
    name: str,
    command: str,
    datasets: dict[str, DatasetPlan],
    privacy: PrivacyConfig,
) -> None:
    """Record an audit run in its training set's privacy ledger before it trains (run
    ``<sweep>/audit-<command id>/<kind>:<trial>``)."""
    dataset = trial.config.dataset
    run = PlannedRun(
        run=f"{spec.name}/audit-{command}/{name}",
        sweep=spec.name,
        trial=name,
        privacy=privacy,
        patient_images=datasets[dataset].patient_images,
    )
    record_runs(paths.data_root, dataset, [run], kind="audit")


def _mark_audit(paths: SweepPaths, trial: TrialPoint, run: str) -> None:
    """The audit run ended: a ``finished`` row in the ledger (its mechanism is recorded already)."""
    entries = [entry for entry in read_ledger(paths.data_root, trial.config.dataset) if entry.run == run]
    mark_runs(paths.data_root, trial.config.dataset, entries[-1:], "finished")


def _log_to_mlflow(spec: SweepSpec, paths: SweepPaths, trial: TrialPoint, result: Any) -> str:
    """One MLflow run per audit, a child of the sweep's parent run (never read back as a trial); returns its id.
    The family's test (`_log_family_test`) is added once every audit has run."""
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
        },
    )
    params = {
        "kind": result.kind,
        "privacy_unit": result.privacy_unit,
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
    return str(run.info.run_id)


def _log_family_test(paths: SweepPaths, run_id: str, kind: str, holm_p_value: float, refuted: bool) -> None:
    """The Holm-adjusted p-value (metric ``audit/<kind>/holm_p_value``) and the refutation tag of one audit's run."""
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(paths.tracking_uri)
    client.log_metric(run_id, N.audit_metric(kind, HOLM_P_VALUE), holm_p_value)
    client.set_tag(run_id, f"{N.TAG_PREFIX}audit_violates_claim", str(refuted))


def audit_summary(table: pd.DataFrame) -> str:
    """The audit table and what it means, for the console."""
    shown = table[list(AUDIT_COLUMNS)].rename(columns=AUDIT_COLUMNS)
    small = {name: "{:.3g}".format for name in ("p claim", "p Holm")} | {"confidence": "{:.4g}".format}
    with pd.option_context("display.width", 220, "display.float_format", "{:.3f}".format):
        lines = [shown.to_string(index=False, formatters=small), ""]
    family, audits = float(table["family_confidence"].iloc[0]), int(table["audits"].iloc[0])
    beta = 1 - family
    lines.append(
        f"Bonferroni over the {audits} audit(s): each bound at confidence {float(table['confidence'].iloc[0]):.4g} "
        f"(1 - {beta:g}/{audits}), so all hold together with probability >= {family:g}: each mechanism that ran "
        "spends at least its bound. A claim is refuted when its Holm-adjusted p-value ('p Holm', from the theorem's "
        f"p-value at the claim, 'p claim') is below {beta:g}: family-wise error <= {beta:g}. A bound at or below "
        "the claim is consistent with it; it does not show the claim is tight."
    )
    lines.append(
        "Power: 'eps ceiling' is the largest bound any outcome could give with these m canaries at this "
        "confidence (every guess right): a claim above it is out of the audit's reach (Holm's later steps reach "
        "a little further only once other claims are refuted). A larger m raises it only while the theorem's "
        "2 m delta term stays small (docs/design.md, Empirical audit)."
    )
    beyond = table[table["claimed_epsilon"] >= table["epsilon_ceiling"]]
    if len(beyond):
        lines.append(
            f"{len(beyond)} claim(s) at or above their ceiling, out of this audit's reach: "
            f"{', '.join(beyond['trial'] + ' (' + beyond['kind'] + ')')}."
        )
    if (table["kind"] == "white_box").any():
        lines.append(
            "White-box canaries are gradient rows clipped after the engine's per-sample norms, so the bk engine's "
            "per-layer rules never see them: only a black-box audit (--kind black_box, trained through the trial's "
            "engine) covers those rules."
        )
    if (table["privacy_unit"] == "patient").any():
        lines.append(
            "Patient-level audits (unit patient): each canary is a patient record (white-box: one canary gradient "
            "per patient, sampled at the patient rate; black-box: a canary patient of max_images_per_patient "
            "mislabeled images), so their claims and bounds are epsilons per patient."
        )
    if (table["kind"] == "black_box").any():
        engines = ", ".join(sorted(set(table.loc[table["kind"] == "black_box", "grad_sample_mode"])))
        lines.append(f"Black-box audits trained through the trial's own engine ({engines}).")
    violations = table[table["violates_claim"]]
    if len(violations):
        lines.append(
            f"CLAIM REFUTED for {len(violations)} audit(s): {', '.join(violations['trial'])}: the mechanism "
            "leaks more than its accountant claims; do not trust these trials' epsilon"
        )
    return "\n".join(lines)
