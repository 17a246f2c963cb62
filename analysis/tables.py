"""The trial and epoch tables: one schema, one row per trial (or per trial epoch), with provenance.

``trials.parquet`` columns: ``trial`` (the grid point's key), ``status`` (TERMINATED / ERROR / RUNNING),
``error``, ``mlflow_run_id``, the trial's parameters (``init``, ``target_epsilon``, ``noise_multiplier``,
``sample_rate``, ``steps``, ``delta``, ``accountant``, ``max_grad_norm``, ``lr``, ``seed``, ``model``,
``privacy_unit``, ...), provenance (``git_commit``, ``*_version``) and every final metric under its
metric-name constant (``test/auroc_macro``, ``privacy/epsilon``, ...; non-private epsilon is ``inf``).

``epochs.parquet``: ``trial``, ``init``, ``target_epsilon``, ``max_grad_norm``, ``lr``, ``seed`` and the
per-epoch metrics (``epoch``, ``privacy/epsilon``, ``val/auroc_macro``, ...).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
PROVENANCE_PACKAGES = ("torch", "opacus", "timm", "ray", "mlflow", "numpy", "scikit-learn")
EPOCH_ID_COLUMNS = ("trial", "init", "target_epsilon", "max_grad_norm", "lr", "seed")


def provenance() -> dict[str, str]:
    """Git commit of the code (``unknown`` outside a checkout; ``-dirty`` suffix with local changes) and
    versions of the libraries that determine results."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {"git_commit": commit}
    for package in PROVENANCE_PACKAGES:
        try:
            info[f"{package.replace('-', '_')}_version"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"{package.replace('-', '_')}_version"] = "missing"
    return info


def build_tables(records: list[dict[str, Any]], mlflow_runs: dict[str, str] | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trial and epoch tables from plain trial records.

    Args:
        records: one dict per trial with ``key``, ``status``, ``error``, ``params``, ``tags``, ``final``
            (final metrics, empty if unfinished) and ``epochs`` (list of per-epoch metric dicts).
        mlflow_runs: trial key -> MLflow run id.
    """
    mlflow_runs = mlflow_runs or {}
    trial_rows, epoch_rows = [], []
    for record in records:
        tags = {k.removeprefix("dpsweep."): v for k, v in record.get("tags", {}).items()}
        row = {"trial": record["key"], "status": record["status"], "error": record.get("error"),
               "mlflow_run_id": mlflow_runs.get(record["key"]), **record["params"],
               **{k: tags[k] for k in ("git_commit", *_version_keys()) if k in tags}}
        row.update({k: v for k, v in record.get("final", {}).items() if _is_metric(k)})
        trial_rows.append(row)
        ids = {c: row.get(c) for c in EPOCH_ID_COLUMNS}
        for epoch in record.get("epochs", []):
            epoch_rows.append({**ids, **{k: v for k, v in epoch.items() if _is_metric(k)}})
    trials = pd.DataFrame(trial_rows)
    epochs = pd.DataFrame(epoch_rows, columns=None if epoch_rows else list(EPOCH_ID_COLUMNS))
    if len(epochs) and "epoch" in epochs:
        epochs = epochs.sort_values(["trial", "epoch"]).drop_duplicates(["trial", "epoch"], keep="last")
        epochs["epoch"] = epochs["epoch"].astype("int64")
    return trials.reset_index(drop=True), epochs.reset_index(drop=True)


def _version_keys() -> tuple[str, ...]:
    return tuple(f"{p.replace('-', '_')}_version" for p in PROVENANCE_PACKAGES)


def _is_metric(key: str) -> bool:
    return "/" in key or key == "epoch"
