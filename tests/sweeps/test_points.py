"""Trial points, made once when a trial is made and handed across Ray: they round-trip through Ray's JSON, points an
earlier dpsweep wrote are still read, and every trial's MLflow run gets exactly the name, tags and params it got
before the points were typed (``points_before_typed.json``: what `make_trial` and the MLflow callback of that dpsweep
gave the tiny sweep's private, non-private and ``reproducible_noise`` trials and two Optuna trials)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from sweeps.plan import spec_fingerprint
from sweeps.search import study_cells
from tests.sweeps.points import (
    datasets,
    optuna_factory,
    planned_points,
    proposal,
    tiny_optuna_spec,
    tiny_points,
)
from tests.sweeps.tiny import tiny_spec
from trainables import names as N
from trainables.point import POINT, PointError, TrialPoint, legacy_run_name

BEFORE = json.loads((Path(__file__).parent / "points_before_typed.json").read_text())
"""Case -> the Ray point, run name, MLflow tags (parent run as ``<parent>``) and params of the dpsweep before typed
points."""


def optuna_points(spec=None) -> list[TrialPoint]:
    """Trial 7 of every study of an Optuna sweep (default: the tiny one, epsilon 2 and inf), made by its factory."""
    spec = spec or tiny_optuna_spec(name="golden")
    factory = optuna_factory(spec)
    return [
        factory(cell, proposal(7, math.isfinite(cell.cell.target_epsilon)))
        for cell in study_cells(spec, datasets(spec))
    ]


def made_now() -> dict[str, TrialPoint]:
    """The points of the cases of `BEFORE`, made by this dpsweep from the same inputs."""
    cases = {}
    for case, overrides in (("grid", {}), ("reproducible", {"privacy": {"reproducible_noise": True}})):
        for point in tiny_points(name="golden", **overrides):
            cases[f"{case}-{'private' if point.config.privacy.is_private else 'inf'}"] = point
    for point in optuna_points():
        cases[f"optuna-{'private' if point.config.privacy.is_private else 'inf'}"] = point
    return cases


@pytest.fixture(scope="module")
def callback(tmp_path_factory):
    """The real MLflow callback on a fresh sqlite store; `logged` creates a trial's run through it."""
    from mlflow.tracking import MlflowClient

    from sweeps.tracking import get_or_create_experiment, get_or_create_parent_run

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, "points", root / "mlartifacts")
    parent = get_or_create_parent_run(client, experiment, "golden", {})
    return SimpleNamespace(client=client, experiment=experiment, parent=parent, uri=uri)


def logged(callback, ray_point: dict, trial_id: str) -> dict:
    """The run name, tags (the parent run as ``<parent>``, MLflow's own tags left out) and params of the child run
    the callback creates for a Ray trial holding ``ray_point`` (a new callback each time: no run is reused)."""
    from sweeps.tracking import MlflowSweepCallback

    writer = MlflowSweepCallback(callback.uri, callback.experiment, callback.parent)
    run_id = writer.run_for(SimpleNamespace(config={POINT: ray_point}, trial_id=trial_id))
    run = callback.client.get_run(run_id)
    callback.client.delete_run(run_id)  # the next case may have the same key
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    return {
        "run_name": run.info.run_name,
        "tags": {**tags, N.PARENT_TAG: "<parent>"},
        "params": dict(run.data.params),
    }


def test_every_case_of_before_is_made_now():
    assert sorted(made_now()) == sorted(BEFORE)


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_a_trial_made_now_is_recorded_as_before(callback, case):
    point = made_now()[case]
    assert logged(callback, point.to_ray(), f"id_{case}") == {
        k: BEFORE[case][k] for k in ("run_name", "tags", "params")
    }


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_a_point_an_earlier_dpsweep_wrote_is_recorded_as_before(callback, case):
    old = BEFORE[case]["point"]
    assert "run_name" not in old and N.ROLE_TAG not in old["tags"]
    point = TrialPoint.from_ray(old)
    assert (point.key, point.config.to_flat(), point.params) == (old["key"], old["trial"], old["params"])
    assert logged(callback, old, f"id_{case}") == {k: BEFORE[case][k] for k in ("run_name", "tags", "params")}


@pytest.mark.parametrize("case", sorted(BEFORE))
def test_private_tag_and_budget_as_before(case):
    """``dpsweep.private`` says a finite target (``reproducible_noise`` included, whose guarantee param says none);
    ``budget`` is ``eps=<target>`` or ``non-private``; both set once, with the point."""
    point = made_now()[case]
    private = case.endswith("-private")
    assert point.tags[N.PRIVATE_TAG] == str(private).lower() == BEFORE[case]["tags"][N.PRIVATE_TAG]
    assert point.budget == ("eps=2" if private else "non-private") == BEFORE[case]["params"][N.BUDGET_PARAM]
    assert N.BUDGET_PARAM not in point.params  # no trial parameter: the tables never see it
    no_guarantee = case == "reproducible-private" or not private
    assert point.tags["dpsweep.dp_guarantee"] == str(not no_guarantee).lower()


def both_units_spec():
    from sweeps.spec import parse_spec

    raw = tiny_spec(
        model=["convnext_small", "convnext_tiny"],
        data={"train": ["chexpert", "mimic-cxr"]},
        inits=["imagenet", "random"],
        privacy={
            "target_epsilon": [0.5, 1, math.inf],
            "privacy_unit": ["image", "patient"],
            "max_images_per_patient": 3,
        },
        speed={"grad_sample_mode": "hooks"},
        training={"lr": [0.0005, 1e-5], "seed": [0, 1]},
    )
    return parse_spec(raw, source="both.yaml")


def every_kind_of_point() -> list[TrialPoint]:
    """Grid points with and without the model/dataset prefix and the unit suffix, and Optuna points with and
    without the prefix."""
    from sweeps.spec import parse_spec

    one_unit = parse_spec(
        tiny_spec(
            model=["convnext_small", "convnext_tiny"],
            data={"train": ["chexpert", "mimic-cxr"]},
            inits=["imagenet"],
            privacy={"target_epsilon": [1], "max_grad_norm": [0.5]},
            training={"lr": [0.001], "seed": [1]},
        ),
        source="one-unit.yaml",
    )
    optuna = tiny_optuna_spec(data={"train": ["synthetic-a", "synthetic-b"]}, privacy={"target_epsilon": [3, math.inf]})
    factory = optuna_factory(optuna)
    numbered = [
        factory(cell, proposal(12, math.isfinite(cell.cell.target_epsilon)))
        for cell in study_cells(optuna, datasets(optuna))
    ]
    return [
        *tiny_points(),
        *planned_points(both_units_spec()),
        *planned_points(one_unit),
        *optuna_points(),
        *numbered,
    ]


RUN_NAMES = {
    "random-eps2-clip1-lr0.002-seed0": "random ε2 c1 lr0.002 s0",
    "random-epsinf-clip1-lr0.002-seed0": "random ε∞ c1 lr0.002 s0",
    "convnext_small-chexpert-imagenet-eps1-clip0.5-lr0.001-seed1": (
        "convnext_small-chexpert-imagenet ε1 c0.5 lr0.001 s1"
    ),
    "convnext_tiny-mimic-cxr-random-eps0.5-clip1-lr1e-05-seed0-patient": (
        "convnext_tiny-mimic-cxr-random ε0.5 c1 lr1e-05 s0 patient"
    ),
    "convnext_small-mimic-cxr-imagenet-epsinf-clip1-lr0.0005-seed1-image": (
        "convnext_small-mimic-cxr-imagenet ε∞ c1 lr0.0005 s1 image"
    ),
    "random-eps2-t007": "random ε2 t007",
    "random-epsinf-t007": "random ε∞ t007",
    "synthetic-b-random-eps3-t012": "synthetic-b-random ε3 t012",
    "synthetic-a-random-epsinf-t012": "synthetic-a-random ε∞ t012",
}
"""Keys and the run names the dpsweep before typed points gave them (read back from the key then)."""


def test_run_names_are_those_of_before():
    names = {point.key: point.run_name for point in every_kind_of_point()}
    assert {key: names.get(key) for key in RUN_NAMES} == RUN_NAMES
    # every name equals the one read back from its key, as an earlier dpsweep named runs; distinct keys, distinct names
    assert {key: legacy_run_name(key) for key in names} == names
    assert len(set(names.values())) == len(names)


def test_a_point_survives_rays_json():
    for point in every_kind_of_point():
        ray_point = point.to_ray()
        assert sorted(ray_point) == ["init", "key", "params", "run_name", "tags", "trial"]
        assert TrialPoint.from_ray(json.loads(json.dumps(ray_point))) == point


def test_a_foreign_or_unreadable_point_is_refused_by_name():
    with pytest.raises(PointError, match=r"without trial, init, params, tags \(has \['key'\]\).*--fresh"):
        TrialPoint.from_ray({"key": "k"})
    ray_point = tiny_points()[0].to_ray()
    ray_point["trial"]["clip_norm"] = 1.0  # a field no TrialConfig has
    with pytest.raises(PointError, match=r"'random-eps2-clip1-lr0.002-seed0': its trial config or init cannot be"):
        TrialPoint.from_ray(ray_point)


def test_cells_carry_their_key_and_a_grid_point_its_cell():
    spec = both_units_spec()
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2 * 3
    assert (
        cells[0].key == "convnext_small-chexpert-imagenet-eps0.5"
        and cells[-1].key == "convnext_tiny-mimic-cxr-random-epsinf"
    )
    assert {p.cell for p in spec.grid()} == set(cells)
    point = spec.grid()[-1]
    assert (point.model, point.dataset, point.init, point.target_epsilon) == (
        "convnext_tiny",
        "mimic-cxr",
        "random",
        math.inf,
    )
    assert [c.key for c in tiny_optuna_spec().cells()] == ["random-eps2", "random-epsinf"]


def write_state(spec, paths, state_format: int) -> None:
    sweep_dir = paths.sweep_dir(spec)
    sweep_dir.mkdir(parents=True)
    state = {"format": state_format, "fingerprint": spec_fingerprint(spec), "status": "complete"}
    (sweep_dir / N.SWEEP_STATE_FILE).write_text(json.dumps(state))
    import pandas as pd

    pd.DataFrame({"trial": ["t"]}).to_parquet(sweep_dir / N.TRIALS_FILE)


def test_a_grid_sweep_started_before_typed_points_resumes_an_optuna_one_is_refused(tmp_path):
    from sweeps.launch import run_sweep
    from sweeps.plan import SweepPaths
    from sweeps.spec import SpecError, parse_spec

    grid = parse_spec(tiny_spec(name="old-grid"), source="grid.yaml")
    paths = SweepPaths.for_spec(grid, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    write_state(grid, paths, 2)
    assert run_sweep(grid, paths, log=lambda line: None)["trial"].tolist() == ["t"]  # accepted: complete already
    optuna = tiny_optuna_spec(name="old-optuna")
    write_state(optuna, paths, 2)
    with pytest.raises(
        SpecError, match=r"state format 2, now 4: the Optuna searcher Ray saved .* run again with --fresh"
    ):
        run_sweep(optuna, paths, log=lambda line: None)
    older = parse_spec(tiny_spec(name="older"), source="older.yaml")
    write_state(older, paths, 1)
    with pytest.raises(SpecError, match=r"state format 1, now 4: sweep-file fields were renamed"):
        run_sweep(older, paths, log=lambda line: None)
