"""Paired bootstrap: determinism, vectorized AUROC against sklearn, CI coverage, paired p-values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from trainables.evaluate import bootstrap
from trainables.evaluate.bootstrap import (
    bootstrap_auroc,
    bootstrap_indices,
    macro_replicates,
    paired_bootstrap_auroc,
    paired_p_value,
    percentile_ci,
)


def _sklearn_replicates(y: np.ndarray, score: np.ndarray, indices: np.ndarray) -> np.ndarray:
    out = np.full((len(indices), y.shape[1]), np.nan)
    for b, rows in enumerate(indices):
        for j in range(y.shape[1]):
            if 0 < y[rows, j].sum() < len(rows):
                out[b, j] = roc_auc_score(y[rows, j], score[rows, j])
    return out


def _tied_data(n: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 3), dtype=np.int64)
    y[:, 0] = rng.random(n) < 0.5
    y[:, 1] = rng.random(n) < 0.3
    y[[3, 17], 2] = 1  # a rare label: many resamples draw no positive
    score = np.round(rng.normal(size=(n, 3)) + y, 0)  # integer scores: heavy ties within and across classes
    return y, score


def test_indices_are_deterministic_per_seed_and_prefix_stable():
    first = bootstrap_indices(50, 20, seed=7)
    assert first.shape == (20, 50) and first.dtype == np.int32
    assert first.min() >= 0 and first.max() < 50
    np.testing.assert_array_equal(first, bootstrap_indices(50, 20, seed=7))
    np.testing.assert_array_equal(first[:5], bootstrap_indices(50, 5, seed=7))
    assert not np.array_equal(first, bootstrap_indices(50, 20, seed=8))


@pytest.mark.parametrize(("n", "n_boot", "seed"), [(0, 10, 0), (10, 0, 0), (10, 10, -1), (10.0, 10, 0), (10, True, 0)])
def test_indices_reject_bad_arguments(n, n_boot, seed):
    with pytest.raises(ValueError, match="must be an integer"):
        bootstrap_indices(n, n_boot, seed)


def test_vectorized_auroc_equals_sklearn_per_replicate_with_ties():
    y, score = _tied_data()
    indices = bootstrap_indices(len(y), 120, seed=1)
    result = bootstrap_auroc(y, score, indices)
    expected = _sklearn_replicates(y, score, indices)
    np.testing.assert_array_equal(np.isnan(result), np.isnan(expected))
    assert np.isnan(result[:, 2]).any() and not np.isnan(result[:, 2]).all()
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-14)


def test_vectorized_auroc_without_ties_and_with_resamples_of_another_size():
    rng = np.random.default_rng(3)
    y = (rng.random((40, 2)) < 0.4).astype(int)
    score = rng.random((40, 2))
    indices = rng.integers(0, 40, size=(25, 15))
    np.testing.assert_allclose(
        bootstrap_auroc(y, score, indices), _sklearn_replicates(y, score, indices), rtol=0, atol=1e-14
    )


def test_vectorized_auroc_does_not_depend_on_chunking(monkeypatch):
    y, score = _tied_data(seed=4)
    indices = bootstrap_indices(len(y), 50, seed=2)
    whole = bootstrap_auroc(y, score, indices)
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 70)  # 2 replicates per chunk
    np.testing.assert_array_equal(bootstrap_auroc(y, score, indices), whole)


def test_label_with_one_class_on_the_full_split_is_nan_in_every_replicate():
    y = np.array([[0, 1], [1, 1], [0, 1], [1, 1]])
    score = np.array([[0.1, 0.2], [0.4, 0.3], [0.3, 0.1], [0.8, 0.9]])
    result = bootstrap_auroc(y, score, bootstrap_indices(4, 10, seed=0))
    assert np.isnan(result[:, 1]).all()


def test_indices_outside_the_split_raise():
    y, score = _tied_data()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 30\)"):
        bootstrap_auroc(y, score, np.array([[0, 30]]))


def test_macro_replicates_average_labels_measurable_on_the_full_split():
    per_label = np.array([[0.8, 0.6, np.nan], [0.7, np.nan, np.nan], [0.9, 0.7, np.nan]])
    macro = macro_replicates(per_label, measurable=[True, True, False])
    np.testing.assert_allclose(macro, [0.7, np.nan, 0.8])
    assert np.isnan(macro_replicates(per_label, measurable=[False, False, False])).all()


def test_percentile_ci_known_quantiles_and_nan_handling():
    assert percentile_ci(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_ci(np.r_[np.arange(101.0), np.nan, np.nan]) == pytest.approx((2.5, 97.5))
    assert percentile_ci(np.arange(101.0), level=0.9) == pytest.approx((5.0, 95.0))
    assert all(np.isnan(percentile_ci([np.nan, np.nan])))
    with pytest.raises(ValueError, match="level"):
        percentile_ci([0.5], level=95)


def test_paired_p_value_known_answers():
    reps_2 = np.array([0.70, 0.72, 0.74, 0.76])
    assert paired_p_value(reps_2 + 0.01, reps_2) == 0.0
    assert paired_p_value(reps_2, reps_2) == 1.0  # ties count against model 1
    assert paired_p_value([0.1, 0.2, 0.3, 0.4], [0.25] * 4) == 0.5
    assert paired_p_value([0.2, 0.3, np.nan], [0.2, 0.1, np.nan]) == 0.5  # tie + win; NaN left out
    assert np.isnan(paired_p_value([np.nan], [np.nan]))


def test_paired_p_value_rejects_unpaired_inputs():
    with pytest.raises(ValueError, match="same n_boot"):
        paired_p_value([0.5, 0.6], [0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="replicate 1 is NaN in one input only"):
        paired_p_value([0.5, np.nan], [0.5, 0.6])


def test_paired_bootstrap_separates_a_good_model_from_noise():
    rng = np.random.default_rng(5)
    y = (rng.random((400, 2)) < 0.3).astype(int)
    good = y + rng.normal(size=y.shape)
    noise = rng.normal(size=y.shape)
    labels = ("a", "b")
    result_good = paired_bootstrap_auroc(y, good, labels=labels, n_boot=200, seed=11)
    result_noise = paired_bootstrap_auroc(y, noise, labels=labels, n_boot=200, seed=11)
    np.testing.assert_array_equal(result_good.per_label, bootstrap_auroc(y, good, bootstrap_indices(400, 200, 11)))
    assert paired_p_value(result_good.macro, result_noise.macro) == 0.0
    assert paired_p_value(result_noise.macro, result_good.macro) == 1.0
    frame_good, frame_noise = result_good.to_frame(), result_noise.to_frame()
    assert paired_p_value(frame_good["auroc_macro"], frame_noise["auroc_macro"]) == 0.0


def test_percentile_ci_covers_a_known_auroc_at_about_the_nominal_rate():
    """200 binormal data sets (positives ~ N(d, 1), negatives ~ N(0, 1)): true AUROC = Phi(d / sqrt 2)."""
    d = 1.0
    true_auroc = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt(2)) = 0.7602
    rng = np.random.default_rng(2024)
    n_pos, n_neg, n_sims = 100, 100, 200
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)].astype(int)[:, None]
    covered = 0
    for sim in range(n_sims):
        score = (y[:, 0] * d + rng.normal(size=n_pos + n_neg))[:, None]
        result = paired_bootstrap_auroc(y, score, labels=("x",), n_boot=200, seed=sim)
        low, high = result.macro_ci()
        covered += low <= true_auroc <= high
    coverage = covered / n_sims
    assert 0.88 <= coverage <= 0.99, f"coverage {coverage:.3f} of nominal 0.95"


def test_frame_is_compact_float32_with_the_pairing_key():
    y, score = _tied_data()
    result = paired_bootstrap_auroc(y, score, labels=("a", "b", "c"), n_boot=64, seed=3)
    frame = result.to_frame()
    assert list(frame.columns) == ["auroc_macro", "a", "b", "c"]
    assert (frame.dtypes == np.float32).all() and len(frame) == 64 and frame.index.name == "replicate"
    assert frame.attrs == {"n_images": 30, "n_boot": 64, "boot_seed": 3}
    np.testing.assert_allclose(frame["a"], result.per_label[:, 0], rtol=1e-6)
    # the rare label makes some replicates' macro undefined; the CI leaves them out
    assert result.n_undefined == int(np.isnan(result.per_label[:, 2]).sum()) > 0
    low, high = result.macro_ci()
    assert low <= np.nanmedian(result.macro) <= high
    assert result.per_label_ci().shape == (3, 2)
