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
