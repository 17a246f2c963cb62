"""Guards in the trial loop that protect the privacy ledger."""

import math

import pytest
from opacus.accountants import RDPAccountant

from trainables.config import PrivacyConfig, TrialConfig
from trainables.train import BudgetError, _check_ledger


def config(sigma=1.2, q=0.1) -> TrialConfig:
    return TrialConfig(sweep="s", dataset="d", data_root="/d", image_size=32, model="test_convnext", init="random",
                       init_weights=None, lr=1e-3, seed=0,
                       privacy=PrivacyConfig(target_epsilon=2.0, noise_multiplier=sigma, sample_rate=q, steps=30))


def accountant(*steps):
    acc = RDPAccountant()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc


def test_consistent_ledger_passes():
    _check_ledger(accountant((1.2, 0.1, 10)), config(), 10)


@pytest.mark.parametrize("ledger", [(), ((1.2, 0.1, 9),), ((1.0, 0.1, 10),), ((1.2, 0.05, 10),)])
def test_lost_short_or_foreign_ledger_is_refused(ledger):
    with pytest.raises(BudgetError, match="inconsistent ledger"):
        _check_ledger(accountant(*ledger), config(), 10)


def test_epsilon_of_a_lost_ledger_would_be_under_reported():
    # why the guard exists: an accountant missing steps reports less epsilon than was spent
    full, short = accountant((1.2, 0.1, 30)), accountant((1.2, 0.1, 20))
    assert short.get_epsilon(1e-5) < full.get_epsilon(1e-5)
    assert not math.isclose(short.get_epsilon(1e-5), full.get_epsilon(1e-5))
