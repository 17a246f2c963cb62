import math

import pytest

from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig


def make() -> TrialConfig:
    return TrialConfig(sweep="s", dataset="synthetic-a", data_root="/d", image_size=64, model="test_convnext",
                       init="random", init_weights=None, lr=1e-3, seed=0,
                       privacy=PrivacyConfig(target_epsilon=math.inf), speed=SpeedConfig(threads=2),
                       external_datasets=("synthetic-b",))


def test_flat_round_trip_keeps_privacy_and_speed_apart():
    cfg = make()
    flat = cfg.to_flat()
    assert flat["privacy.target_epsilon"] == math.inf and flat["speed.threads"] == 2
    assert TrialConfig.from_flat(flat) == cfg


def test_unknown_keys_are_refused():
    with pytest.raises(KeyError, match="privacy.epsilon_target"):
        TrialConfig.from_flat({**make().to_flat(), "privacy.epsilon_target": 1})
