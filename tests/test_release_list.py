"""docs/design.md's "What a private trial releases" is the whole list: every metric, param and tag a private trial
logs, every sweep-level param and every trials/epochs table column matches a row of that table, and no row it
matches says "not released". A new key fails here until the table says why it may be released.

Also what a private trial must not release: no per-epoch time in its MLflow metrics' timestamps."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from analysis.tables import TrialRecord, build_tables
from tests.factories import prepare_tiny_site, run_tiny_trial, tiny_trial_config
from trainables import names as M

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
SECTION = "## What a private trial releases"
RELEASED = ("accounted", "public", "unaccounted")
"""How a row's last column starts when the value is released: the reason it is covered, or why it is knowingly not."""
NOT_RELEASED = ("not released", "**never released**")


@dataclass(frozen=True)
class ReleaseRow:
    """One row of the table: the names and patterns in its first column (code spans; ``*`` matches anything)."""

    names: tuple[str, ...]
    covered: str

    @property
    def released(self) -> bool:
        return self.covered.startswith(RELEASED)


def release_table(text: str) -> list[ReleaseRow]:
    """The rows of the section's markdown table (header and separator skipped)."""
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")][2:]
    rows = []
    for line in lines:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 3, f"a row of {SECTION!r} needs 3 cells: {line}"
        rows.append(ReleaseRow(tuple(re.findall(r"`([^`]+)`", cells[0])), cells[2]))
    return rows


ROWS = release_table(DESIGN.read_text())


def row_for(key: str, rows: list[ReleaseRow] = ROWS) -> ReleaseRow | None:
    """The row naming ``key`` exactly, else the first whose pattern matches it; None when no row does."""
    exact = [row for row in rows if key in row.names]
    if exact:
        return exact[0]
    return next((row for row in rows if any("*" in n and fnmatch.fnmatchcase(key, n) for n in row.names)), None)


def unlisted(keys: set[str]) -> list[str]:
    """Keys no row covers, or whose row says they are not released."""
    return sorted(key for key in keys if (row := row_for(key)) is None or not row.released)


def test_every_row_says_how_it_is_covered():
    assert len(ROWS) >= 20
    for row in ROWS:
        assert row.covered.startswith(RELEASED + NOT_RELEASED), row


def test_an_undocumented_or_unreleasable_key_is_caught():
    keys = {M.EPSILON, M.test_auroc("pneumonia"), M.external_auroc("site"), "privacy/new_thing", M.TRAIN_LOSS}
    assert unlisted(keys | set(M.SYSTEM_METRICS)) == sorted({"privacy/new_thing", M.TRAIN_LOSS, *M.SYSTEM_METRICS})
    assert row_for("dpsweep.torch_version") is not None and row_for("dpsweep.new_tag") is None


# ----------------------------------------------------------------------------------------------------
# What a private trial, and its sweep, log


@dataclass(frozen=True)
class Logged:
    metrics: set[str]
    params: set[str]
    tags: set[str]
    sweep_params: set[str]
    columns: set[str]


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Logged:
    """A tiny image-level private trial with ``pos_weight: train`` (the label-count release), bootstrap CIs and an
    external test set; the params and tags the planner gives an image-level and a patient-level trial; the
    sweep's params; and the tables built from that trial."""
    from sweeps.describe import sweep_params
    from sweeps.tuning_cost import tuning_summary
    from trainables.data.synthetic import prepare_synthetic

    site = prepare_tiny_site(tmp_path_factory.mktemp("data"))
    prepare_synthetic("synthetic-b", site, size=32, n_images=120)
    cfg = tiny_trial_config(
        site,
        3.0,
        epochs=1,
        pos_weight="train",
        label_count_noise_multiplier=20.0,
        n_boot=10,
        external_datasets=("synthetic-b",),
    )
    run = run_tiny_trial(cfg)
    final = {**run.result.metrics, M.NODE_ID: "node"}  # as `trainables.trial` reports it to Ray
    epochs = [{**e, **s} for e, s in zip(run.epochs, run.system, strict=True)]

    spec, plan, trials = _planned(tmp_path_factory.mktemp("runs"))
    params = {key for trial in trials for key in trial.params} | {M.BUDGET_PARAM}
    tags = {key for trial in trials for key in trial.tags}
    tags |= {M.PARENT_TAG, M.SWEEP_TAG, M.ROLE_TAG, M.TRIAL_KEY_TAG, M.RAY_TRIAL_ID_TAG, M.PRIVATE_TAG}  # tracking
    record = TrialRecord(trials[0].key, M.TERMINATED, trials[0].params, trials[0].tags, final, epochs)
    table, epoch_table = build_tables([record])
    return Logged(
        metrics={key for report in (*epochs, final) for key in report},
        params=params,
        tags=tags,
        sweep_params=set(sweep_params(plan)) | set(tuning_summary(spec, table)) | {M.LEDGER_EPSILON},
        columns=set(table.columns) | set(epoch_table.columns),
    )


def _planned(runs: Path) -> tuple[Any, Any, list[Any]]:
    """An image-level ``pos_weight: train`` trial and a patient-level trial from the units sweep file, and a plan
    holding them (sigma given, nothing calibrated)."""
    from sweeps.plan import DatasetPlan, SweepPaths, SweepPlan, cell_privacy, make_trial, provenance_tags, trial_name
    from sweeps.spec import parse_spec
    from trainables.models import ResolvedInit
    from trainables.privacy.planning import plan_privacy

    raw = yaml.safe_load((ROOT / "sweeps" / "units-smoke.yaml").read_text())
    image_raw = yaml.safe_load((ROOT / "sweeps" / "units-smoke.yaml").read_text())
    image_raw["privacy"]["privacy_unit"] = ["image"]
    del image_raw["privacy"]["max_images_per_patient"]
    image_raw["training"]["pos_weight"] = "train"
    paths = SweepPaths(runs, runs / "data", "sqlite:///x.db")
    dataset = DatasetPlan("synthetic-a", 1000, 0.032, 96, n_patients=600)
    init = ResolvedInit("random", "random", "test_convnext", None)
    trials = []
    for spec_raw, unit, n in ((image_raw, "image", 1000), (raw, "patient", 600)):
        spec = parse_spec(spec_raw)
        point = next(p for p in spec.grid() if p.privacy_unit == unit)
        privacy = plan_privacy(cell_privacy(spec, point.target_epsilon, unit), n, noise_multiplier=1.1)
        trials.append(
            make_trial(
                spec,
                paths,
                dataset,
                init,
                point,
                trial_name(spec, point),
                privacy=privacy,
                provenance_tags=provenance_tags(),
            )
        )
    spec = parse_spec(raw)
    return spec, SweepPlan(spec, paths, trials, {dataset.name: dataset}), trials


def test_the_tiny_trial_logs_what_the_list_must_cover(logged):
    """The fixture reaches the keys the list is about (else the tests below would prove little)."""
    assert {M.EPSILON_REPLACE_ONE, M.EPSILON_PATIENT, M.PATIENT_IMAGES, M.SYSTEM_TOTAL_TRAIN_S} <= logged.metrics
    assert M.auroc_macro_ci("test", "low") in logged.metrics and M.external_auroc("synthetic-b") in logged.metrics
    assert not logged.metrics & {M.TRAIN_LOSS, *M.SYSTEM_METRICS}  # a private trial reports neither
    assert {"n_train", "n_patients", "label_count_noise_multiplier", M.GUARANTEE} <= logged.params
    assert {"n_trials", "inits", M.TUNING_EPSILON} <= logged.sweep_params
    assert {"git_commit", M.RELEASED_STEPS, M.NODE_ID} <= logged.columns


@pytest.mark.parametrize("kind", ["metrics", "params", "tags", "sweep_params", "columns"])
def test_everything_a_private_trial_and_its_sweep_log_is_in_the_release_list(logged, kind):
    missing = unlisted(getattr(logged, kind))
    assert not missing, (
        f"{kind} {missing} are logged but not listed (or listed as not released) in docs/design.md, "
        f"{SECTION!r}: add a row saying why each is accounted, public or knowingly unaccounted"
    )


# ----------------------------------------------------------------------------------------------------
# No per-epoch time in MLflow


def test_a_private_trials_mlflow_metrics_carry_the_run_start_not_its_report_times(tmp_path):
    """Ray stamps each report with the time it was made; for a private trial those stamps would time its epochs,
    so its metrics carry the child run's start time. A non-private trial keeps Ray's stamps."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from sweeps.tracking import MlflowSweepCallback, get_or_create_experiment, get_or_create_parent_run
    from tests.sweeps.points import planned_points
    from trainables.point import POINT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, "s", tmp_path / "artifacts")
    callback = MlflowSweepCallback(uri, experiment, get_or_create_parent_run(client, experiment, "s", {}))
    start = 1_700_000_000
    points = {point.config.privacy.is_private: point for point in planned_points(parse_tiny())}
    keys = {}
    for name, epsilon in (("private", 0.5), ("baseline", math.inf)):
        point = points[math.isfinite(epsilon)]
        keys[name] = point.key
        trial = SimpleNamespace(trial_id=name, config={POINT: point.to_ray()})
        for epoch in (1, 2):
            result = {M.EPOCH: epoch, M.EPSILON: epsilon * epoch, M.VAL_AUROC_MACRO: 0.6, "timestamp": start + epoch}
            callback.on_trial_result(0, [], trial, result)
        final = {M.EPSILON: epsilon * 2, M.BEST_EPOCH: 2, M.SYSTEM_TOTAL_TRAIN_S: 7.0, "timestamp": start + 9}
        callback.on_trial_result(0, [], trial, {**final, M.DONE: True})
    for key in ("private", "baseline"):
        (run,) = client.search_runs([experiment], f"tags.`{M.TRIAL_KEY_TAG}` = '{keys[key]}'")
        stamps = {m.timestamp for name in run.data.metrics for m in client.get_metric_history(run.info.run_id, name)}
        if key == "private":
            assert stamps == {run.info.start_time}
        else:
            assert stamps == {1000 * (start + t) for t in (1, 2, 9)}


def parse_tiny():
    """The tiny sweep (`tests.sweeps.tiny`): one private target and the baseline."""
    from sweeps.spec import parse_spec
    from tests.sweeps.tiny import tiny_spec

    return parse_spec(tiny_spec())
