"""A sweep plan in words and numbers: the parent run's params, the plan printed when a sweep starts, and what
``dpsweep sweep --dry-run`` prints (every trial with its sigma, GPU-hours, what is still missing)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from sweeps.plan import SweepPlan
from sweeps.schema import SelectionSpec
from sweeps.validate import NO_PATIENT_IDS
from trainables.config import is_private
from trainables.privacy.planning import schedule


def sweep_params(plan: SweepPlan) -> dict[str, Any]:
    """Sweep-wide settings recorded on the parent run."""
    spec, p = plan.spec, plan.spec.privacy
    datasets = list(plan.datasets.values())
    return {
        "model": ",".join(spec.models),
        "dataset": ",".join(spec.data.train),
        "external": ",".join(spec.data.external),
        "inits": ",".join(spec.inits),
        "target_epsilon": ",".join(f"{e:g}" for e in spec.axes.target_epsilon),
        "delta": p.delta,
        "accountant": p.accountant,
        "epochs": p.epochs,
        "expected_batch_size": p.expected_batch_size,
        "n_train": ",".join(str(d.n_train) for d in datasets),
        "sample_rate": ",".join(f"{d.sample_rate:g}" for d in datasets),
        "steps": ",".join(str(d.steps) for d in datasets),
        "n_trials": plan.n_trials,
        "privacy_unit": ",".join(spec.axes.privacy_unit),
        "search": spec.search,
        "secure_mode": p.secure_mode,
        **(selection_params(spec.selection) if spec.selection is not None else {}),
        **(
            {
                "proxy_dataset": spec.proxy.dataset,
                "proxy_batch_size": spec.proxy.batch_size,
                "proxy_top_k": spec.proxy.top_k,
            }
            if spec.proxy is not None
            else {}
        ),
    }


def selection_params(selection: SelectionSpec) -> dict[str, Any]:
    """A private selection's parent-run params: the trial count's distribution and its ranges (never a drawn K)."""
    return {
        "selection_distribution": selection.distribution,
        "selection_mean_trials": selection.mean_trials,
        **({"selection_shape": selection.shape} if selection.shape is not None else {}),
        **{f"selection_{name}": list(getattr(selection, name)) for name in (*selection.RANGES, *selection.CHOICES)},
    }


def describe_plan(plan: SweepPlan) -> str:
    spec, p = plan.spec, plan.spec.privacy
    trials = (
        f"{plan.n_trials} cells, one released trial each at most"
        if spec.search == "private_selection"
        else f"{plan.n_trials} trials"
    )
    lines = [
        f"sweep {spec.name!r}: {trials} ({spec.search}) of {', '.join(spec.models)} "
        f"(delta={p.delta:g}, accountant={p.accountant})"
    ]
    for dataset in plan.dataset_plans():
        approx = "~" if dataset.estimated else "="
        patients = (
            f"{approx}{dataset.n_patients}"
            if dataset.n_patients is not None
            else (" unknown" if dataset.estimated and dataset.name not in NO_PATIENT_IDS else ": none (no patient ids)")
        )
        line = f"  {dataset.key}: N_train{approx}{dataset.n_train}" + (
            " (estimate: not prepared)" if dataset.estimated else ""
        )
        image_only = spec.axes.privacy_unit == ("image",)
        if spec.search == "grid" and image_only:
            line += f", q={dataset.sample_rate:.5g}, steps={dataset.steps}"
        lines.append(f"{line}; N_patients{patients}")
        if spec.search != "grid":
            continue
        for unit in spec.axes.privacy_unit:
            indent = "    "
            if not image_only:
                q, steps = schedule(p, dataset.n_records(unit))
                lines.append(f"    privacy unit {unit}: q={q:.5g}, steps={steps}")
                indent = "      "
            for eps in spec.axes.target_epsilon:
                sigma = plan.privacy_plans[(dataset.key, eps, unit)].noise_multiplier
                lines.append(
                    f"{indent}target epsilon {eps:g}: noise multiplier {sigma:.4f}"
                    if is_private(eps)
                    else f"{indent}target epsilon inf: non-private baseline (no clipping, no noise)"
                )
    if spec.optuna is not None:
        o = spec.optuna
        ranges = ", ".join(f"{name} {list(getattr(o, name))}" for name in o.RANGES)
        lines.append(
            f"  optuna: {len(spec.cells())} studies (model x dataset x init x epsilon) x "
            f"{o.trials_per_target} trials, objectives {list(o.objectives)}, at most {o.max_concurrent} "
            f"at once; searched: {ranges}"
        )
    if plan.proxy is not None:
        from sweeps.proxy import describe_proxy

        lines.extend(describe_proxy(plan))
    if spec.selection is not None:
        from sweeps.selection import describe_selections

        lines.extend(describe_selections(plan))
    return "\n".join(lines)


def dry_run_report(plan: SweepPlan) -> str:
    """What `dpsweep sweep --dry-run` prints: the plan, each trial with its sigma, GPU-hours, open issues."""
    from sweeps.estimate import describe_gpu_hours, describe_trials_per_gpu, measurements, trial_gpu_seconds

    spec = plan.spec
    measured = measurements()
    lines = [describe_plan(plan)]
    total, unknown, bases = 0.0, [], set()
    if spec.optuna is None:
        for trial in plan.trials:
            privacy = trial.config.privacy
            lines.append(
                f"  {trial.key}: sigma={privacy.noise_multiplier:.4f}, q={privacy.sample_rate:.5g}, "
                f"steps={privacy.steps}"
            )
            dataset = plan.dataset_plan(trial.config.dataset, trial.config.train_fraction)
            images_per_batch = (
                privacy.expected_batch_size
                if privacy.privacy_unit == "image"
                else round(privacy.expected_batch_size * dataset.n_train / dataset.n_records("patient"))
            )  # patients bring images
            estimate = trial_gpu_seconds(
                measured,
                trial.config.model,
                spec.data.image_size,
                spec.speed.grad_sample_mode,
                dataset.n_train,
                images_per_batch,
                privacy.steps,
                privacy.epochs,
                privacy.is_private,
            )
            if estimate is None:
                unknown.append(trial.config.model)
            else:
                total += estimate[0]
                bases.add(f"{trial.config.model}: {estimate[1]}")
    else:
        # Optuna: its trials per study; private selection: the expected number of candidates (K itself is secret)
        search = spec.optuna or spec.selection
        assert search is not None
        epochs = max(search.epochs)
        per_cell = spec.optuna.trials_per_target if spec.optuna is not None else search.mean_trials
        for cell in spec.cells():
            n_train = plan.datasets[cell.dataset].n_train
            estimate = trial_gpu_seconds(
                measured,
                cell.model,
                spec.data.image_size,
                spec.speed.grad_sample_mode,
                n_train,
                1,
                epochs * n_train,
                epochs,
                is_private(cell.target_epsilon),
            )
            if estimate is None:
                unknown.append(cell.model)
            else:
                total += estimate[0] * per_cell
                bases.add(f"{cell.model}: {estimate[1]}, at the largest epochs {epochs}")
    if spec.pretrain is not None and "domain" in spec.inits and plan.pretrain_n:
        for model in spec.models:  # the pretrain stage: non-private, once per model (cached afterwards)
            estimate = trial_gpu_seconds(
                measured,
                model,
                spec.data.image_size,
                "nonprivate",
                plan.pretrain_n,
                1,
                0,
                spec.pretrain.epochs,
                private=False,
            )
            if estimate is not None and not Path(plan.inits[(model, "domain")].weights or "").is_file():
                total += estimate[0]
                lines.append(
                    wrap(
                        f"  pretrain stage ({model} on {spec.pretrain.dataset}, {spec.pretrain.epochs} epochs, "
                        f"non-private): ~{estimate[0] / 3600:,.0f} GPU-hours, run once before the trials",
                        "    ",
                    )
                )
    lines.append(wrap(describe_gpu_hours(total, unknown, bases, measured), "  "))
    if spec.resources.gpu > 0 or spec.speed.device == "cuda":
        precision = spec.speed.precision
        cases: set[tuple[str, int, str, int, str]] = {
            (model, spec.data.image_size, spec.speed.grad_sample_mode, spec.speed.max_physical_batch_size, precision)
            for model in spec.models
        }
        lines.extend(wrap(line, "    ") for line in describe_trials_per_gpu(measured, cases))
    if plan.notes:
        lines.append("before running it for real:")
        lines.extend(wrap(f"  - {note}", "    ") for note in plan.notes)
    return "\n".join(lines)


def wrap(text: str, indent: str) -> str:
    """One console line wrapped at 100 characters, continuation lines indented; words (paths, commands) unbroken."""
    return textwrap.fill(text, 100, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)
