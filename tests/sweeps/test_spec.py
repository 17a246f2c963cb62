"""Sweep-file validation: every bad input fails before Ray starts, naming the field, the value and the fix."""

import math
from pathlib import Path

import pytest
import yaml

from sweeps.spec import SpecError, load_spec, parse_spec

SMOKE = Path(__file__).resolve().parents[2] / "sweeps" / "smoke.yaml"


def smoke_dict() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def test_smoke_spec_is_valid_and_expands_to_the_grid():
    spec = load_spec(SMOKE)
    grid = spec.grid()
    assert len(grid) == len(spec.inits) * len(spec.privacy.epsilons) * len(spec.privacy.clip_norms) * len(
        spec.training.learning_rates) * len(spec.training.seeds)
    assert {p["init"] for p in grid} == {"random", "domain"}
    assert {p["target_epsilon"] for p in grid} == {1.0, 3.0, 8.0, math.inf}


def edit(path: str, value) -> dict:
    raw = smoke_dict()
    *parents, leaf = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("privacy.epsilons", [1, 0], r"privacy\.epsilons\[1\] = 0\.0 must be > 0 \(use \.inf"),
        ("privacy.epsilons", [-2], r"privacy\.epsilons\[0\] = -2\.0 must be > 0"),
        ("privacy.clip_norms", [0], r"privacy\.clip_norms\[0\] = 0\.0 must be a finite number > 0"),
        ("privacy.delta", 1.5, r"privacy\.delta = 1\.5 must be in \(0, 1\)"),
        ("privacy.accountant", "gdp", r"privacy\.accountant = 'gdp'; choose one of \('rdp', 'prv'\)"),
        ("privacy.epochs", 0, r"privacy\.epochs = 0 must be >= 1"),
        ("privacy.expected_batch_size", "lots", r"`privacy\.expected_batch_size` = 'lots' is not a valid int"),
        ("inits", ["random", "imagenett"], r"inits\[1\]: unknown init 'imagenett'"),
        ("data.train", "chexpertt", r"data\.train: unknown dataset 'chexpertt'"),
        ("speed.grad_sample_mode", "ghost", r"speed\.grad_sample_mode = 'ghost'; choose one of"),
        ("training.learning_rates", [0.001, -1], r"training\.learning_rates\[1\] = -1\.0 must be > 0"),
        ("evaluation.age_edges", [0, 70, 40], r"evaluation\.age_edges = \[0\.0, 70\.0, 40\.0\] must be strictly"),
    ],
)
def test_bad_fields_are_named_with_value_and_fix(path, value, expected):
    with pytest.raises(SpecError, match=expected):
        parse_spec(edit(path, value), source="smoke.yaml")


def test_unknown_fields_suggest_the_right_name():
    raw = smoke_dict()
    raw["privacy"]["epsilon"] = raw["privacy"].pop("epsilons")
    with pytest.raises(SpecError, match=r"unknown field `privacy\.epsilon`; did you mean `privacy\.epsilons`"):
        parse_spec(raw)


def test_missing_required_field():
    raw = smoke_dict()
    del raw["model"]
    with pytest.raises(SpecError, match="required field `model` is missing"):
        parse_spec(raw)


def test_domain_init_needs_a_public_pretrain_dataset():
    raw = smoke_dict()
    del raw["pretrain"]
    with pytest.raises(SpecError, match="init 'domain' needs a `pretrain:` section"):
        parse_spec(raw)
    with pytest.raises(SpecError, match="is the private training set"):
        parse_spec(edit("pretrain.dataset", "synthetic-a"))


def test_init_weights_must_name_a_used_init():
    with pytest.raises(SpecError, match=r"init_weights\.dinov3 names an init that the sweep does not use"):
        parse_spec({**smoke_dict(), "init_weights": {"dinov3": "/x.safetensors"}})


def test_timm_tag_inits_must_match_the_model():
    with pytest.raises(SpecError, match="is a weight tag for 'convnext_small' but the sweep's model is"):
        parse_spec(edit("inits", ["convnext_small.dinov3_lvd1689m"]))


def test_malformed_yaml_names_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nprivacy:\n  epsilons: [1, 3\n  delta: 1e-6\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: malformed YAML at line \d+, column \d+"):
        load_spec(bad)


def test_missing_sweep_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist; pass a path such as sweeps/smoke.yaml"):
        load_spec(tmp_path / "nope.yaml")


def test_non_mapping_yaml(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping of sections"):
        load_spec(bad)
