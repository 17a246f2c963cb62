"""dpsweep's MLflow artifact-repository plugin (`analysis.mlflow_source.mlflow_artifacts_repository`) for child
processes: the entry point as ``pyproject.toml`` declares it, found by MLflow through ``importlib.metadata``.

An environment installed from this checkout (``make setup``, CI) has it in dpsweep's own metadata. One installed
before the entry point was added (or from another checkout whose code is put first with ``PYTHONPATH``) lacks it:
then `plugin_env` writes the same declaration as a ``*.dist-info`` folder (what pip writes for it) on the child's
``PYTHONPATH``, so that the test runs the code under test with the declaration under test.
"""

from __future__ import annotations

import importlib.metadata
import os
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GROUP = "mlflow.artifact_repository"
SCHEME = "mlflow-artifacts"


def declared_entry_point() -> str:
    """The ``mlflow-artifacts`` entry point of ``pyproject.toml`` (``module:function``)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"][GROUP][SCHEME]


def installed() -> bool:
    """Whether this environment's package metadata already declares the same entry point."""
    return any(e.value == declared_entry_point() for e in importlib.metadata.entry_points(group=GROUP, name=SCHEME))


def plugin_env(folder: Path) -> dict[str, str]:
    """The environment for a child Python: this checkout first on ``PYTHONPATH`` (as the tests run), and the entry
    point declared under ``folder`` when the installed metadata lacks it."""
    paths = [str(ROOT)]
    if not installed():
        info = folder / "dpsweep_mlflow_plugin-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dpsweep-mlflow-plugin\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[{GROUP}]\n{SCHEME} = {declared_entry_point()}\n")
        paths.append(str(folder))
    inherited = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, *([inherited] if inherited else [])])}


SWEEP = "smoke"  # the experiment the docs' block names


def write_store(runs: Path) -> dict[str, Any]:
    """A sweep's experiment, parent run and two trial runs, each with its own ``evaluation/metrics.parquet``, written
    as a sweep writes them; returns run id -> the table logged."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from analysis import mlflow_source
    from sweeps.tracking import get_or_create_experiment, get_or_create_parent_run
    from trainables import names as M

    runs.mkdir(parents=True)
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, SWEEP, runs / "mlartifacts")
    parent = get_or_create_parent_run(client, experiment, SWEEP, {})
    logged = {}
    for index, init in enumerate(("random", "domain")):
        run_id = client.create_run(
            experiment, run_name=init, tags={M.ROLE_TAG: "trial", M.PARENT_TAG: parent, M.SWEEP_TAG: SWEEP}
        ).info.run_id
        table = pd.DataFrame({"metric": [M.TEST_AUROC_MACRO], "value": [0.6 + index / 8], "integer": [False]})
        file = runs.parent / "metrics.parquet"
        table.to_parquet(file, index=False)
        mlflow_source.run_artifact_repository(client, uri, run_id).log_artifact(str(file), M.EVALUATION_ARTIFACT_DIR)
        file.unlink()
        client.set_terminated(run_id)
        logged[run_id] = table
    return logged
