import math
from dataclasses import fields

import pytest

from trainables.config import NESTED, PrivacyConfig, SpeedConfig, TrialConfig


def make() -> TrialConfig:
    return TrialConfig(
        sweep="s",
        dataset="synthetic-a",
        data_root="/d",
        image_size=64,
        model="test_convnext",
        init="random",
        init_weights=None,
        lr=1e-3,
        seed=0,
        privacy=PrivacyConfig(target_epsilon=math.inf, max_grad_norm=0.5),
        speed=SpeedConfig(threads=2),
        external_datasets=("synthetic-b",),
    )


def test_flat_round_trip_uses_the_fields_own_names():
    cfg = make()
    flat = cfg.to_flat()
    assert flat["target_epsilon"] == math.inf and flat["threads"] == 2 and flat["max_grad_norm"] == 0.5
    assert flat["external_datasets"] == ["synthetic-b"]
    assert TrialConfig.from_flat(flat) == cfg


def test_every_field_name_is_unique_across_the_nested_configs():
    """`to_flat` drops the section prefix, so a name may belong to one config only."""
    names = [f.name for f in fields(TrialConfig) if f.name not in NESTED]
    names += [f.name for kind in (PrivacyConfig, SpeedConfig) for f in fields(kind)]
    assert len(names) == len(set(names))


def test_unknown_keys_are_refused():
    with pytest.raises(KeyError, match="epsilon_target"):
        TrialConfig.from_flat({**make().to_flat(), "epsilon_target": 1})


@pytest.mark.parametrize(
    ("field", "value"),
    [("precision", "bf16"), ("fixed_shapes", "on"), ("data_on_device", "off"), ("cuda_tuning", False)],
)
def test_sweep_files_set_the_speed_knobs_under_speed(field, value):
    from sweeps.spec import parse_spec
    from tests.sweeps.test_spec import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), field: value}
    assert getattr(parse_spec(raw).speed, field) == value


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("precision", "fp16", r"speed\.precision = 'fp16'; choose one of \('fp32', 'bf16'\)"),
        ("fixed_shapes", True, r"speed\.fixed_shapes = True; choose one of \('auto', 'on', 'off'\)"),
        ("data_on_device", "yes", r"speed\.data_on_device = 'yes'; choose one of \('auto', 'on', 'off'\)"),
    ],
)
def test_bad_speed_knobs_are_refused_naming_field_value_and_choices(field, value, expected):
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.test_spec import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), field: value}
    with pytest.raises(SpecError, match=expected):
        parse_spec(raw)


@pytest.mark.parametrize("knob", [{"precision": "bf16"}, {"fixed_shapes": "on"}])
def test_patient_level_sweeps_refuse_bf16_and_forced_padding(knob):
    # Patient-level chunks hold whole patients and run in float32: a knob they cannot honour is an error, not ignored.
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.test_units_spec import units_dict

    raw = units_dict()
    raw["speed"] = {**raw["speed"], **knob}
    with pytest.raises(SpecError, match=r"privacy\.privacy_unit: patient with speed\.precision"):
        parse_spec(raw)


@pytest.mark.parametrize("multiple", [0, 65])
def test_pad_multiple_must_fit_the_physical_batch(multiple):
    from sweeps.spec import SpecError, parse_spec
    from tests.sweeps.test_spec import smoke_dict

    raw = smoke_dict()
    raw["speed"] = {**raw.get("speed", {}), "max_physical_batch_size": 64, "pad_multiple": multiple}
    with pytest.raises(SpecError, match=rf"speed\.pad_multiple = {multiple} must be between 1 and"):
        parse_spec(raw)
