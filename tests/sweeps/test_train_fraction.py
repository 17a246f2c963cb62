"""``data.train_fraction``, the data-scale grid axis: parsed as a grid axis, each fraction planned on its nested
subset's own N (q, steps and sigma derived here again from the subset drawn by hand), named ``-frac<f>`` below 1
(a sweep without the axis keeps its keys and fingerprint) and extendable like the other axes."""

from __future__ import annotations

import hashlib
import hmac
import math

import pytest

from sweeps.describe import describe_plan
from sweeps.plan import SweepPaths, plan_sweep, spec_fingerprint, spec_settings, trial_key
from sweeps.spec import parse_spec
from sweeps.state import refusal, setting_changes
from tests.sweeps.tiny import tiny_spec
from trainables.data.splits import SUBSET_KEY_LABEL
from trainables.data.synthetic import sample_cohort
from trainables.privacy.accounting import epsilon_spent

FRACTIONS = [0.25, 0.5, 1.0]
SCALE = {"data": {"train_fraction": FRACTIONS}, "privacy": {"target_epsilon": [2, math.inf]}}


def subset_by_hand(fraction: float) -> tuple[int, int]:
    """(images, patients) of synthetic-a's training subset (600 images), drawn here from the rule itself: the patients
    whose HMAC-SHA256 under the twin's public key's derived key maps below f."""
    manifest = sample_cohort("synthetic-a", 600)[0]
    train = manifest[manifest["split"] == "train"]
    public = hashlib.sha256(b"dpsweep public subset key\0synthetic-a").digest()
    order_key = hmac.new(public, SUBSET_KEY_LABEL, hashlib.sha256).digest()
    kept = {
        p
        for p in set(train["patient_id"])
        if int(hmac.new(order_key, p.encode(), hashlib.sha256).hexdigest()[:16], 16) // 2**11 / 2**53 < fraction
    }
    return int(train["patient_id"].isin(kept).sum()), len(kept)


def test_the_axis_is_parsed_as_a_grid_axis_and_names_subset_trials_only():
    spec = parse_spec(tiny_spec(**SCALE))
    assert spec.axes.train_fraction == (0.25, 0.5, 1.0)
    assert len(spec.grid()) == 2 * 3
    keys = [trial_key(spec, p) for p in spec.grid()]
    assert keys[:3] == ["random-eps2-clip1-lr0.002-seed0-frac0.25", "random-eps2-clip1-lr0.002-seed0-frac0.5"] + [
        "random-eps2-clip1-lr0.002-seed0"
    ]
    assert parse_spec(tiny_spec(data={"train_fraction": 0.5})).axes.train_fraction == (0.5,)


def test_without_the_axis_or_with_fraction_1_a_sweep_keeps_its_settings_keys_and_fingerprint():
    plain, explicit = parse_spec(tiny_spec()), parse_spec(tiny_spec(data={"train_fraction": [1]}))
    assert spec_fingerprint(plain) == spec_fingerprint(explicit)
    assert "train_fraction" not in spec_settings(plain)["axes"]
    assert [trial_key(plain, p) for p in plain.grid()] == [trial_key(explicit, p) for p in explicit.grid()]
    assert spec_fingerprint(parse_spec(tiny_spec(**SCALE))) != spec_fingerprint(plain)


def test_each_fraction_is_planned_on_its_subsets_n(tmp_path):
    spec = parse_spec(tiny_spec(**SCALE))
    plan = plan_sweep(spec, SweepPaths(tmp_path / "runs", tmp_path / "data", "sqlite:///x.db"), dry_run=True)
    batch, epochs = spec.privacy.expected_batch_size, spec.privacy.epochs
    sigmas = {}
    for trial in plan.trials:
        fraction = trial.config.train_fraction
        n_images, n_patients = subset_by_hand(fraction)
        batches = math.ceil(n_images / batch)
        privacy = trial.config.privacy
        assert (trial.params["n_train"], trial.params["n_patients"]) == (n_images, n_patients)
        assert trial.params["train_fraction"] == fraction
        assert privacy.steps == epochs * batches
        if privacy.is_private:
            assert f"N={n_images} treated as public" in trial.params["privacy/guarantee"]
            assert privacy.sample_rate == 1 / batches
            assert 2 - 0.01 <= epsilon_spent(privacy.noise_multiplier, privacy.sample_rate, privacy.steps, 6e-6) <= 2
            sigmas[fraction] = privacy.noise_multiplier
    assert sigmas[0.25] > sigmas[0.5] > sigmas[1.0]  # fewer records: a larger q needs more noise for the same target
    subsets = [subset_by_hand(f) for f in FRACTIONS]
    assert subsets[0][0] < subsets[1][0] < subsets[2][0] == plan.datasets["synthetic-a"].n_train
    text = describe_plan(plan)
    assert f"synthetic-a[train_fraction=0.25]: N_train={subsets[0][0]}" in text


def test_a_trial_on_the_whole_split_in_a_scale_sweep_carries_the_fraction_as_a_param(tmp_path):
    spec = parse_spec(tiny_spec(**SCALE))
    plan = plan_sweep(spec, SweepPaths(tmp_path / "runs", tmp_path / "data", "sqlite:///x.db"), dry_run=True)
    whole = next(t for t in plan.trials if t.config.train_fraction == 1)
    assert "train_fraction" not in whole.config.to_flat() and whole.params["train_fraction"] == 1.0
    plain = plan_sweep(
        parse_spec(tiny_spec()), SweepPaths(tmp_path / "runs", tmp_path / "data", "sqlite:///x.db"), dry_run=True
    )
    assert all("train_fraction" not in t.params for t in plain.trials)


@pytest.mark.parametrize(
    ("old", "new", "refused"),
    [
        (None, FRACTIONS, False),  # a sweep without the axis gains subsets: new trials only
        ([0.5, 1.0], FRACTIONS, False),
        (FRACTIONS, [0.5, 1.0], True),  # removes trials that ran
        (FRACTIONS, None, True),
    ],
)
def test_fractions_extend_a_sweep_and_removing_one_is_refused(old, new, refused):
    def settings(fractions):
        return spec_settings(parse_spec(tiny_spec(data={"train_fraction": fractions})))

    (change,) = setting_changes(settings(old), settings(new))
    assert change.field == "data.train_fraction"
    assert (refusal(change, settings(old)) is not None) == refused
