"""MLflow's own client reads a sweep's artifacts from the sqlite store alone, the way the docs say, wherever runs/ is.

A small store is written as a sweep writes it (`sweeps.tracking.get_or_create_experiment`: artifact locations
``mlflow-artifacts:/<sweep>``, files under ``runs/mlartifacts/`` through dpsweep's own writer) in a scratch project
folder. Then, in a fresh Python with dpsweep's entry point (`tests.analysis.mlflow_plugin`) and the project folder
as working directory, the code block of docs/outputs.md and the README's one line run *as written*, and so does the
block again after ``runs/`` moved (from its new parent folder); dpsweep's own reader reads the moved store too.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from analysis import mlflow_source
from tests.analysis.mlflow_plugin import ROOT, SWEEP, declared_entry_point, plugin_env, write_store
from trainables import names as M

DOCS = ROOT / "docs" / "outputs.md"
README = ROOT / "README.md"


def docs_block() -> str:
    """The python block of docs/outputs.md that downloads an artifact with MLflow's client."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S)
    found = [b for b in blocks if "mlflow.artifacts.download_artifacts(" in b]
    assert len(found) == 1, blocks
    return found[0]


def readme_line() -> str:
    """The README's inline call of ``mlflow.artifacts.download_artifacts``."""
    found = re.findall(r"`(mlflow\.artifacts\.download_artifacts\([^`]*\))`", README.read_text())
    assert len(found) == 1, found
    return found[0]


def run_python(code: str, cwd: Path, plugin: Path) -> str:
    """``code`` in a fresh interpreter (this venv's) in ``cwd``; returns its stdout, fails on any error."""
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=plugin_env(plugin), capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# Runs after the docs' block: what it listed and downloaded, checked against the store.
REPORT = textwrap.dedent(
    """
    import pandas as pd
    print("RUN", run_id)
    print("PATH", path)
    print("VALUE", pd.read_parquet(path)["value"].item())
    """
)


def printed(output: str, label: str) -> str:
    found = re.search(rf"^{label} (.+)$", output, re.M)
    assert found is not None, output
    return found.group(1)


def check_block(output: str, logged: dict[str, pd.DataFrame], runs: Path) -> None:
    run_id = printed(output, "RUN")
    assert f"'{M.EVALUATION_ARTIFACT_DIR}/{M.METRICS_FILE}'" in output  # list_artifacts
    assert float(printed(output, "VALUE")) == logged[run_id]["value"].item()
    path = Path(printed(output, "PATH"))
    assert path.name == M.METRICS_FILE and not path.is_relative_to(runs)  # a downloaded copy, not the store's file


def test_pyproject_registers_the_resolver_for_mlflows_scheme():
    assert declared_entry_point() == "analysis.mlflow_source:mlflow_artifacts_repository"


def test_mlflows_client_reads_the_artifacts_as_the_docs_say_and_after_runs_moved(tmp_path):
    project = tmp_path / "project"
    logged = write_store(project / "runs")
    block = docs_block()
    assert 'MlflowClient("sqlite:///runs/mlflow.db")' in block and f'get_experiment_by_name("{SWEEP}")' in block
    check_block(run_python(block + REPORT, project, tmp_path / "plugin"), logged, project / "runs")

    run_id = next(iter(logged))
    line = readme_line()
    assert 'tracking_uri="sqlite:///runs/mlflow.db"' in line and "run_id=..." in line
    code = f"import mlflow\nimport pandas as pd\npath = {line.replace('run_id=...', f'run_id={run_id!r}')}\n"
    output = run_python(code + "print(pd.read_parquet(path)['value'].item())", project, tmp_path / "plugin")
    assert float(output.split()[-1]) == logged[run_id]["value"].item()

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(project / "runs", moved / "runs")
    assert not (project / "runs").exists()
    check_block(run_python(block + REPORT, moved, tmp_path / "plugin"), logged, moved / "runs")
    # dpsweep's own reader, given the moved store
    uri = f"sqlite:///{moved / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    repository = mlflow_source.run_artifact_repository(client, uri, run_id)
    assert [a.path for a in repository.list_artifacts(M.EVALUATION_ARTIFACT_DIR)] == [
        f"{M.EVALUATION_ARTIFACT_DIR}/{M.METRICS_FILE}"
    ]


def test_the_resolver_is_the_folder_beside_a_sqlite_store_and_mlflows_proxy_for_a_server(tmp_path, monkeypatch):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    uri = "mlflow-artifacts:/smoke/abc/artifacts"
    local = mlflow_source.mlflow_artifacts_repository(uri, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert isinstance(local, LocalArtifactRepository)
    assert Path(local.artifact_dir) == tmp_path / "mlartifacts" / "smoke" / "abc" / "artifacts"
    served = mlflow_source.mlflow_artifacts_repository(uri, tracking_uri="http://127.0.0.1:5123")
    assert type(served) is MlflowArtifactsRepository
    assert served.artifact_uri == "http://127.0.0.1:5123/api/2.0/mlflow-artifacts/artifacts/smoke/abc/artifacts"
    # no tracking URI given: MLflow's current one decides
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    implicit = mlflow_source.mlflow_artifacts_repository(uri)
    assert Path(implicit.artifact_dir) == tmp_path / "other" / "mlartifacts" / "smoke" / "abc" / "artifacts"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://user@host/db")
    with pytest.raises(Exception, match="tracking URI must be a valid http or https URI"):
        mlflow_source.mlflow_artifacts_repository(uri)  # as MLflow's own: no folder to resolve to
