"""The notebooks run headless against a small sweep (study_views: the report's views from the parquet tables;
mlflow_runs: the runs and artifacts through MLflow's own client); stored without outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.analysis.fixtures import make_sweep  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "analysis" / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "dpsweep-test-venv"


def test_there_is_a_notebook():
    assert [p.name for p in NOTEBOOKS] == ["mlflow_runs.ipynb", "study_views.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "os.environ.get(" in parameters[0].source
    if path.name == "study_views.ipynb":
        assert "DPSWEEP_SWEEP_DIR" in parameters[0].source


def execute(path: Path, tmp_path: Path, monkeypatch) -> list:
    """Run the notebook in a kernel of this very interpreter (the venv's python, its kernel spec found through
    JUPYTER_PATH) from the notebook's folder, as Jupyter does; returns every code cell's outputs."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "dpsweep test venv",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL, timeout=120, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def test_study_views_notebook_executes_on_a_fixture_sweep(tmp_path, monkeypatch):
    path = NOTEBOOK_DIR / "study_views.ipynb"
    monkeypatch.setenv("DPSWEEP_SWEEP_DIR", str(make_sweep(tmp_path / "runs")))
    outputs = execute(path, tmp_path, monkeypatch)
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 5  # the report's five figures
    text = "\n".join(str(o.get("data", {}).get("text/html", "")) + str(o.get("text", "")) for o in outputs)
    assert "fixture: 9 trials" in text
    assert "<td>0.61</td>" in text  # random init, bin (0, 1]: test AUROC of the validation-selected epoch
    assert "<td>0.211</td>" in text  # paired bootstrap p-value 4/19
    assert "test AUROC gap by bin, attribute: age" in text and "<td>0.14</td>" in text  # per-epoch fairness view
    assert "ext-b" in text
    # The intersectional cell: analysis.subgroups.group_metrics on the stored predictions and the fixture manifests.
    assert "intersectional groups: sex x age_bin" in text and "group(s) without a defined macro AUROC left out" in text


def test_mlflow_runs_notebook_reads_every_artifact_with_mlflows_client(tmp_path, monkeypatch):
    """The store a sweep writes, read by the notebook with MLflow's own client and no server (the kernel has
    dpsweep's entry point, as a kernel of the project's venv does)."""
    from tests.analysis.mlflow_plugin import SWEEP, plugin_env, write_store

    logged = write_store(tmp_path / "project" / "runs")
    monkeypatch.setenv("PYTHONPATH", plugin_env(tmp_path / "plugin")["PYTHONPATH"])
    monkeypatch.setenv("DPSWEEP_TRACKING_URI", f"sqlite:///{tmp_path / 'project' / 'runs' / 'mlflow.db'}")
    monkeypatch.setenv("DPSWEEP_EXPERIMENT", SWEEP)
    outputs = execute(NOTEBOOK_DIR / "mlflow_runs.ipynb", tmp_path, monkeypatch)
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in outputs)
    assert f"experiment {SWEEP!r}: artifacts at mlflow-artifacts:/{SWEEP}" in text
    assert "2 trial run(s)" in text and "'evaluation/metrics.parquet'" in text
    assert f"metrics: {len(logged)} rows from {len(logged)} trial(s)" in text  # every trial's downloaded table
    for table in logged.values():
        assert f"{table['value'].item():g}" in text


def test_study_views_notebook_leaves_out_the_proxy_phase_and_plots_the_data_scale(tmp_path, monkeypatch):
    """As the report does: a proxy sweep's phase-1 trial (public data, no epsilon) appears in no view, and a
    data-scale sweep gets the AUROC-against-N figure while the study's views keep the largest fraction."""
    import pandas as pd

    sweep_dir = make_sweep(tmp_path / "runs")
    trials = pd.read_parquet(sweep_dir / "trials.parquet")
    trials["phase"] = trials["trial"].map({"random-eps3": "proxy"}).fillna("private")
    fraction = trials["trial"].map({"random-eps1": 0.5, "random-eps1-lr": 0.25})
    trials["train_fraction"] = fraction
    trials["n_train"] = (400 * fraction.fillna(1.0)).astype(int)
    trials.to_parquet(sweep_dir / "trials.parquet", index=False)
    monkeypatch.setenv("DPSWEEP_SWEEP_DIR", str(sweep_dir))
    outputs = execute(NOTEBOOK_DIR / "study_views.ipynb", tmp_path, monkeypatch)
    text = "\n".join(str(o.get("data", {}).get("text/html", "")) + str(o.get("text", "")) for o in outputs)
    assert "left out: 1 proxy-phase trials" in text
    assert "the views below keep the 6 trials on training fraction 1" in text  # 9 - 1 proxy - 2 on subsets
    assert "random-eps3" not in text  # the proxy trial's key is in no table
    assert "<td>100</td>" in text and "<td>200</td>" in text  # the data-scale table's N_train of the subsets
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 6  # the report's five figures and the data-scale one
