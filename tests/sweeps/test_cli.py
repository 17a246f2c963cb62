"""`dpsweep` user errors: one clear message, exit status 2, nothing launched."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps.cli import main
from sweeps.plan import SweepPaths, plan_sweep
from sweeps.spec import SpecError, parse_spec
from tests.sweeps.refusals import paper_dry_run_status
from trainables import names as N

SMALL = {
    "name": "small",
    "data": {"train": "synthetic-a", "image_size": 32, "synthetic_images": 60},
    "model": "test_convnext",
    "inits": ["random"],
    "privacy": {"target_epsilon": [1, 8], "expected_batch_size": 8, "epochs": 2},
}


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_bad_yaml_exits_2_naming_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    assert main(["sweep", str(bad)]) == 2
    assert "malformed YAML at line" in capsys.readouterr().err


def test_epsilon_zero_exits_2_before_anything_runs(tmp_path, capsys):
    spec = {**SMALL, "privacy": {**SMALL["privacy"], "target_epsilon": [0]}}
    assert main(["sweep", str(write(tmp_path, spec)), "--runs", str(tmp_path / "runs")]) == 2
    assert "privacy.target_epsilon[0] = 0.0 must be > 0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_delta_at_least_one_over_n_is_refused_once_n_is_known(tmp_path):
    spec = parse_spec({**SMALL, "privacy": {**SMALL["privacy"], "delta": 0.05}}, source="small.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    with pytest.raises(SpecError, match=r"delta.*0\.05.*1/N"):
        plan_sweep(spec, paths)


def test_missing_weight_file_is_refused_before_ray(tmp_path):
    spec = parse_spec(
        {
            **SMALL,
            "model": "convnext_tiny",
            "inits": ["imagenet"],
            "init_weights": {"imagenet": str(tmp_path / "missing.safetensors")},
        },
        source="small.yaml",
    )
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    with pytest.raises(SpecError, match=r"inits: init_weights\.imagenet: file .*missing\.safetensors does not exist"):
        plan_sweep(spec, paths)


def test_unprepared_real_dataset_names_the_prepare_command(tmp_path):
    spec = parse_spec({**SMALL, "data": {"train": "chexpert", "image_size": 224}}, source="small.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    with pytest.raises(SpecError, match=r"run `dpsweep prepare chexpert --root /path/to/chexpert --size 224"):
        plan_sweep(spec, paths)


def test_dry_run_prints_each_trial_with_its_calibrated_sigma(tmp_path):
    path = write(tmp_path, SMALL)
    result = run_cli(
        "sweep",
        str(path),
        "--dry-run",
        "--runs",
        str(tmp_path / "runs"),
        "--data",
        str(tmp_path / "data"),
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "random-eps1-clip1-lr0.001-seed0: sigma=" in result.stdout
    assert "random-eps8-clip1-lr0.001-seed0: sigma=" in result.stdout
    assert not (tmp_path / "runs" / "ray").exists()


def test_prepare_command_writes_a_cache_a_sweep_can_name(tmp_path, capsys):
    from tests.data import fixtures
    from trainables.data.cache import open_cache

    root = fixtures.build_uka(tmp_path / "src")
    out = tmp_path / "data"
    pattern = "UKA_preprocessed/{subset}/{image_id}.jpg"  # the fixture's layout (the group's folders)
    assert (
        main(
            [
                "prepare",
                "uka-cxr",
                "--root",
                str(root),
                "--size",
                "32",
                "--out",
                str(out),
                "--workers",
                "1",
                "--image-pattern",
                pattern,
            ]
        )
        == 0
    )
    assert "prepared:" in capsys.readouterr().out
    cache = open_cache(out / "uka-cxr" / "32")
    assert cache.images.shape[1:] == (32, 32) and len(cache.manifest) == len(cache.images)
    spec = parse_spec(
        {**SMALL, "data": {"train": "synthetic-a", "external": ["uka-cxr"], "image_size": 32, "synthetic_images": 60}},
        source="small.yaml",
    )
    plan = plan_sweep(spec, SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(out)))
    assert plan.trials[0].config.external_datasets == ("uka-cxr",)


def test_prepare_missing_root_exits_2(tmp_path, capsys):
    assert main(["prepare", "chexpert", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "data")]) == 2
    assert "nope" in capsys.readouterr().err


def test_paper_dry_run_works_offline_without_data_or_weights(tmp_path):
    """The reference grid validates here: estimated N per unprepared dataset, sigma per trial, GPU-hours, and
    what to fix (datasets to prepare, weights to provide) - and exits 3 (planned, but blocked by those notes), or 2
    after the plan on a machine without the GPU and CPUs its trials reserve, without writing Ray state."""
    root = Path(__file__).resolve().parents[2]
    result = run_cli(
        "sweep",
        str(root / "sweeps" / "paper.yaml"),
        "--dry-run",
        "--runs",
        str(tmp_path / "runs"),
        "--data",
        str(tmp_path / "data"),
        cwd=root,
    )
    assert result.returncode == paper_dry_run_status(), result.stderr
    if result.returncode == 2:
        assert "paper.yaml: resources." in result.stderr
    out = result.stdout
    flat = " ".join(out.split())
    assert "sweep 'paper': 240 trials (grid)" in out
    assert "vindr-cxr: N_train~13500 (estimate: not prepared), q=0.0047619, steps=4200" in out
    trial_lines = [line for line in out.splitlines() if re.match(r"  convnext_\S+-seed\d+: sigma=", line)]
    assert len(trial_lines) == 240
    # sigma 1.4922 plus the cost of pos_weight: train's label-count release (noise multiplier 20), composed in
    assert "  convnext_small-vindr-cxr-imagenet-eps1-clip4-lr5e-06-seed0: sigma=1.5156" in out
    assert "  convnext_tiny-uka-cxr-domain-epsinf-clip3.5-lr1e-05-seed0: sigma=0.0000" in out
    assert "GPU-hours estimate (one NVIDIA H200 per trial):" in out
    assert "run `dpsweep prepare chexpert --root /path/to/chexpert --size 224" in flat  # notes wrap at 100 characters
    assert (
        "weights for init 'dinov3' (convnext_tiny.dinov3_lvd1689m) are not available offline" in flat
    )  # notes wrap at 100 characters
    assert "pretrain stage (convnext_small on mimic-cxr" in out
    assert sorted(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_secure_mode_reaches_every_trial_and_its_tags(tmp_path):
    spec = parse_spec({**SMALL, "privacy": {**SMALL["privacy"], "secure_mode": True}}, source="small.yaml")
    plan = plan_sweep(spec, SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data")))
    assert all(t.config.privacy.secure_mode for t in plan.trials)
    assert {t.tags["dpsweep.secure_mode"] for t in plan.trials} == {"true"}
    assert {t.params["secure_mode"] for t in plan.trials} == {True}


def test_a_dry_run_writes_nothing_and_plans_what_the_real_run_plans(tmp_path, monkeypatch, capsys):
    """No data, no calibration cache, no runs/ (relative folders resolve in the working folder, left empty): the
    synthetic twin is drawn in memory, with the N the real run prepares, so sigma is the same."""
    work = tmp_path / "work"
    work.mkdir()
    sweep_file = write(tmp_path, {**SMALL, "data": {**SMALL["data"], "external": ["synthetic-b"]}})
    monkeypatch.chdir(work)
    assert main(["sweep", str(sweep_file), "--dry-run"]) == 0
    assert "random-eps1-clip1-lr0.001-seed0: sigma=" in capsys.readouterr().out
    assert sorted(work.iterdir()) == []
    spec = parse_spec(yaml.safe_load(sweep_file.read_text()), source=str(sweep_file))
    paths = SweepPaths.for_spec(spec)
    dry = plan_sweep(spec, paths, dry_run=True)
    assert sorted(work.iterdir()) == []
    real = plan_sweep(spec, paths)
    assert (work / "data" / "synthetic-a").is_dir() and (work / "runs").is_dir()
    assert dry.datasets == real.datasets and dry.privacy_plans == real.privacy_plans
    assert [t.config for t in dry.trials] == [t.config for t in real.trials]


def test_a_dry_run_reads_the_calibration_cache_without_writing_it(tmp_path):
    spec = parse_spec(SMALL, source="small.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    plan_sweep(spec, paths)
    cache = tmp_path / "runs" / N.CALIBRATION_CACHE_FILE
    before = cache.read_bytes()
    wider = parse_spec({**SMALL, "privacy": {**SMALL["privacy"], "target_epsilon": [1, 2, 8]}}, source="small.yaml")
    plan = plan_sweep(wider, paths, dry_run=True)  # eps 2 is calibrated anew, in a temporary copy
    assert cache.read_bytes() == before
    assert plan.privacy_plans[("synthetic-a", 2.0, "image")].noise_multiplier > 0


def test_the_command_line_lists_the_preparable_datasets_without_importing_them():
    from sweeps.cli import PREPARABLE
    from trainables.data.adapters import PREPARABLE as ADAPTERS

    assert PREPARABLE == ADAPTERS
