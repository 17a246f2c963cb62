"""The one-run privacy audit (Steinke, Nasr & Jagielski 2023): its statistics against known numbers, the
engine's canary rows, and the white-box audit catching a mechanism that breaks its claim.

Flakiness. The coins, the sampling and the noise are secret (``os.urandom``), so each audit test is a random
experiment; its failure probability is bounded by design and stated where it is used (all < 1e-6).
"""

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from scipy import special, stats
from torch import nn

from tests.factories import tiny_trial_config
from trainables import audit as audit_runners
from trainables.audit import input_canaries, run_audit, white_box_audit, with_canaries
from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
from trainables.data.cache import SplitData, open_cache
from trainables.data.loaders import CacheSplitDataset
from trainables.models import resolve_init
from trainables.privacy import audit as privacy_audit_module
from trainables.privacy import bk as bk_module
from trainables.privacy import engine as engine_module
from trainables.privacy import patients as patients_module
from trainables.privacy import randomness as randomness_module
from trainables.privacy import setup as private_setup
from trainables.privacy.accounting import (
    calibrate_noise_multiplier,
    create_accountant,
    epsilon_spent,
    sample_rate_and_steps,
)
from trainables.privacy.audit import (
    DEFAULT_GUESS_SPLITS,
    AuditError,
    AuditResult,
    GuessOutcome,
    audit_bound,
    audit_metric,
    bonferroni_confidence,
    claim_p_value,
    epsilon_ceiling,
    epsilon_lower_bound,
    guess,
    holm_adjusted_p_values,
    likelihood_ratio_scores,
    p_value,
    place_dirac_canaries,
)
from trainables.privacy.engine import make_dp_optimizer, private_step, wrap_model
from trainables.privacy.patients import group_patients, private_patient_step
from trainables.privacy.planning import plan_privacy

GRAD_SAMPLE_MODES = ["bk", "hooks", "functorch"]


# ----------------------------------------------------------------------------------------------------------
# Statistics


def test_p_value_without_delta_is_the_binomial_tail_of_randomized_response():
    for epsilon, r, v in [(0.0, 10, 5), (1.0, 100, 70), (2.5, 37, 37), (0.3, 1000, 540)]:
        expected = stats.binom.sf(v - 1, r, math.exp(epsilon) / (1 + math.exp(epsilon)))
        assert p_value(epsilon, m=2 * r, guesses=r, correct=v, delta=0.0) == pytest.approx(expected, rel=1e-12)


def test_p_value_delta_term_is_the_papers():
    # 2 m delta max_i P[v-i <= Bin(r, p) <= v-1] / i, written out by hand for r = 4, v = 3
    epsilon, m, delta, r, v = 1.0, 10, 1e-3, 4, 3
    p = special.expit(epsilon)
    pmf = [math.comb(r, k) * p**k * (1 - p) ** (r - k) for k in range(r + 1)]
    alpha = max(pmf[2] / 1, (pmf[2] + pmf[1]) / 2, (pmf[2] + pmf[1] + pmf[0]) / 3)
    expected = pmf[3] + pmf[4] + 2 * m * delta * alpha
    assert p_value(epsilon, m=m, guesses=r, correct=v, delta=delta) == pytest.approx(expected, rel=1e-12)


def test_all_correct_bound_is_the_closed_form_and_grows_with_the_guesses():
    # With v = r and delta = 0: p(eps) = p_eps^r < beta  <=>  eps > logit(beta^(1/r)).
    bounds = []
    for r in (10, 60, 100, 1000):
        exact = special.logit(0.05 ** (1 / r))
        bound = epsilon_lower_bound(m=r, guesses=r, correct=r, delta=0.0, beta=0.05)
        assert exact - 0.002 <= bound <= exact  # rounded down to the 0.001 grid, never up
        bounds.append(bound)
    assert bounds == sorted(bounds) and bounds[0] == pytest.approx(1.051, abs=0.002)
    assert bounds[1] == pytest.approx(2.972, abs=0.002) and bounds[-1] == pytest.approx(5.809, abs=0.002)


def test_chance_guessing_and_no_guesses_give_zero():
    assert epsilon_lower_bound(m=1000, guesses=1000, correct=500, delta=1e-5, beta=0.05) == 0.0
    assert epsilon_lower_bound(m=1000, guesses=0, correct=0, delta=1e-5, beta=0.05) == 0.0


def test_delta_weakens_the_bound():
    kwargs = dict(guesses=200, correct=190, beta=0.05)
    pure = epsilon_lower_bound(m=1000, delta=0.0, **kwargs)
    assert epsilon_lower_bound(m=1000, delta=1e-5, **kwargs) <= pure
    assert epsilon_lower_bound(m=1000, delta=1e-3, **kwargs) < pure


def test_randomized_response_exact_false_alarm_rate_is_at_most_beta():
    # An eps-DP randomized response on every coin: correct ~ Bin(r, p_eps) exactly. The bound exceeds eps iff
    # eps is rejected, i.e. correct >= v_min; its probability must be <= beta (here computed, not sampled).
    for epsilon, r in [(0.5, 200), (1.0, 1000), (2.0, 5000)]:
        v_min = next(v for v in range(r + 1) if p_value(epsilon, m=r, guesses=r, correct=v, delta=0.0) < 0.05)
        assert stats.binom.sf(v_min - 1, r, special.expit(epsilon)) <= 0.05


def test_randomized_response_audits_cover_and_approach_the_true_epsilon():
    # Seeded simulated audits through the full guessing code: >= 95% of bounds <= eps, close to it for large m.
    # (RR is the extremal eps-DP mechanism, so about 5% of runs may exceed eps; fixed seeds: 98.5% do not.)
    epsilon, m = 1.0, 2000
    bounds = []
    for seed in range(400):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < special.expit(epsilon)
        scores = np.where(included == truthful, 1.0, -1.0)  # the randomized-response answer "in" / "out"
        bounds.append(audit_bound(scores, included, delta=0.0, splits=((0.5, 0.5),), rng=rng).epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds <= epsilon).mean() >= 0.95
    assert 0.85 <= np.median(bounds) <= epsilon


def test_guess_counts_top_in_and_bottom_out():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    outcome = guess(scores, included, n_in=2, n_out=2, rng=np.random.default_rng(0))
    assert (outcome.guesses, outcome.correct) == (4, 2)  # top {5: in, 4: out} + bottom {1: out, 0: in}
    with pytest.raises(ValueError, match="n_in"):
        guess(scores, included, n_in=4, n_out=3, rng=np.random.default_rng(0))


def test_ties_are_broken_at_random_not_by_position():
    # All scores equal: a position-ordered tie-break would guess the first k; a random one is at chance.
    included = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    outcome = guess(np.zeros(1000), included, n_in=500, n_out=0, rng=np.random.default_rng(1))
    assert abs(outcome.correct - 250) < 60  # hypergeometric sd ~ 11: 5 sd


def test_audit_bound_pays_the_union_bound_over_rules():
    rng = np.random.default_rng(0)
    included = rng.random(2000) < 0.5
    scores = included + rng.normal(0, 0.3, 2000)
    one = audit_bound(scores, included, delta=1e-5, splits=((0.1, 0.0),), rng=np.random.default_rng(1))
    many = audit_bound(scores, included, delta=1e-5, rng=np.random.default_rng(1))
    assert many.rules_tried == len(DEFAULT_GUESS_SPLITS) and one.rules_tried == 1
    beta_each = 0.05 / len(DEFAULT_GUESS_SPLITS)
    assert many.epsilon_lower_bound == epsilon_lower_bound(
        m=2000, guesses=many.outcome.guesses, correct=many.outcome.correct, delta=1e-5, beta=beta_each
    )
    same_rule = epsilon_lower_bound(
        m=2000, guesses=one.outcome.guesses, correct=one.outcome.correct, delta=1e-5, beta=beta_each
    )
    assert same_rule < one.epsilon_lower_bound  # the same guesses are worth less when 8 rules were tried


def test_holm_step_down_on_a_known_example():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06.
    adjusted = holm_adjusted_p_values([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    assert list(adjusted < 0.05) == [True, False, False, True]  # Bonferroni (p < 0.0125) would refute only 0.005
    np.testing.assert_allclose(holm_adjusted_p_values([0.3, 0.6]), [0.6, 0.6])  # capped, then monotone
    assert holm_adjusted_p_values([0.7, 0.9, 0.2]).max() == 1.0
    with pytest.raises(ValueError, match="p-values in"):
        holm_adjusted_p_values([0.1, 1.5])


def test_one_audit_is_its_own_family():
    assert holm_adjusted_p_values([0.0123]).tolist() == [0.0123]
    assert bonferroni_confidence(0.95, 1) == 0.95
    assert bonferroni_confidence(0.95, 5) == pytest.approx(0.99, abs=1e-15)


def test_claim_p_value_pays_for_the_rules_and_agrees_with_the_bound():
    outcomes = (GuessOutcome(10, 0, 9), GuessOutcome(100, 0, 80))
    each = [p_value(1.0, m=1000, guesses=o.guesses, correct=o.correct, delta=1e-5) for o in outcomes]
    assert claim_p_value(1.0, outcomes, m=1000, delta=1e-5) == pytest.approx(2 * min(each), rel=1e-12)
    assert claim_p_value(1.0, outcomes[:1], m=1000, delta=1e-5) == each[0]
    # Simulated randomized-response audits: a bound above the claim is a refutation of it (p < beta), and a
    # refutation leaves the bound at most one grid step (0.001) below the claim.
    for seed in range(40):
        rng = np.random.default_rng(seed)
        included = rng.random(1000) < 0.5
        scores = np.where(included == (rng.random(1000) < special.expit(2.0)), 1.0, -1.0) + rng.random(1000) * 1e-3
        bound = audit_bound(scores, included, delta=1e-5, rng=rng)
        for claim in (0.5, 1.0, 1.5, 1.8, 2.0):
            refuted = bound.claim_p_value(claim) < 0.05
            assert refuted or bound.epsilon_lower_bound <= claim
            assert not refuted or bound.epsilon_lower_bound > claim - 0.001


def test_epsilon_ceiling_is_the_all_correct_bound_and_the_delta_term_caps_it():
    # The (0.25, 0.25) rule, all 500 guesses right, at 0.05 / 8: the largest bound of m = 1000 canaries.
    ceiling = epsilon_ceiling(1000, delta=6e-6, confidence=0.95)
    assert ceiling == epsilon_lower_bound(m=1000, guesses=500, correct=500, delta=6e-6, beta=0.05 / 8)
    assert ceiling == pytest.approx(4.53, abs=0.005)
    larger = [epsilon_ceiling(m, delta=6e-6, confidence=0.95) for m in (4000, 10000, 50000)]
    assert larger[0] == pytest.approx(5.73, abs=0.005) and larger[1] == pytest.approx(5.94, abs=0.005)
    assert larger[2] < larger[1]  # 2 m delta grows with m: more canaries stop helping
    assert epsilon_ceiling(1000, delta=6e-6, confidence=1 - 0.05 / 6) < ceiling  # a family of 6 pays for it
    # An oracle (scores = the coins) reaches the ceiling and nothing passes it.
    included = np.random.default_rng(0).random(1000) < 0.5
    oracle = audit_bound(included.astype(float), included, delta=6e-6, rng=np.random.default_rng(1))
    assert oracle.epsilon_lower_bound == ceiling


def test_likelihood_ratio_score_is_the_poisson_gaussian_log_likelihood_ratio():
    rng = np.random.default_rng(0)
    x, sigma, q = rng.normal(0.3, 1, (7, 5)), 0.8, 0.1
    gauss = stats.norm(scale=sigma)
    expected = np.log(((1 - q) * gauss.pdf(x) + q * gauss.pdf(x - 1)) / gauss.pdf(x)).sum(axis=0)
    np.testing.assert_allclose(likelihood_ratio_scores(x, sigma, q), expected, rtol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Canaries and the engine's extra per-sample rows


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)  # 4,545 trainable values at 32 px
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(900, 5))


def LOSS(logits, targets):  # the trial's per-sample multi-label BCE
    return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def test_dirac_canaries_are_distinct_public_and_one_hot():
    model = tiny_model()
    canaries = place_dirac_canaries(model, 300, gradient_norm=1000.0, seed=3)
    again = place_dirac_canaries(model, 300, gradient_norm=1000.0, seed=3)
    assert canaries.parameter == again.parameter and (canaries.flat_index == again.flat_index).all()
    params = dict(model.named_parameters())
    pairs = set(zip(canaries.parameter, canaries.flat_index.tolist(), strict=True))
    assert len(pairs) == 300 and all(0 <= i < params[name].numel() for name, i in pairs)
    rows = canaries.grad_samples(model, np.array([5, 7, 7]))
    for k, canary in enumerate([5, 7, 7]):
        row = torch.cat([rows[n][k].reshape(-1) if n in rows else torch.zeros(p.numel()) for n, p in params.items()])
        assert row.norm() == 1000.0 and (row != 0).sum() == 1
        assert rows[canaries.parameter[canary]][k].reshape(-1)[canaries.flat_index[canary]] == 1000.0
    with pytest.raises(ValueError, match="distinct coordinates"):
        place_dirac_canaries(model, 5000, 1.0)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("batch_size", [3, 0])
def test_extra_grad_samples_are_clipped_and_summed_like_records(mode, batch_size):
    # sigma = 0: the update with canary rows minus the update without is exactly sum_k clip(row_k) / B.
    clip, expected_batch = 0.5, 4
    x = torch.rand(batch_size, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = (torch.rand(batch_size, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    updates = []
    for with_extra in (False, True):
        model = tiny_model()
        wrapped = wrap_model(model, mode)
        optimizer = make_dp_optimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=expected_batch,
            noise_generator=torch.Generator().manual_seed(2),
            accountant=create_accountant("rdp"),
            sample_rate=0.1,
        )
        canaries = place_dirac_canaries(model, 3, gradient_norm=100.0, seed=0)
        extra = canaries.grad_samples(model, np.array([0, 1, 2, 2])) if with_extra else None
        private_step(wrapped, optimizer, LOSS, (x, y), max_physical_batch_size=2, extra_grad_samples=extra)
        updates.append(canaries.read(model))
    factor = clip / (100.0 + 1e-6)  # Opacus' clip factor C / (norm + 1e-6)
    np.testing.assert_allclose(
        updates[1] - updates[0], np.array([1, 1, 2]) * 100.0 * factor / expected_batch, rtol=1e-5, atol=1e-7
    )


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("groups", [[0, 0, 1, 2, 2, 2], []])
def test_extra_grad_samples_are_records_of_their_own_beside_a_batchs_patients(mode, groups):
    # sigma = 0: canary rows in a patient-level step are clipped and summed as whole records, never grouped with a
    # patient's images (in chunks of whole patients, the last one carrying the rows).
    clip, expected_batch = 0.5, 4
    n = len(groups)
    x = torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    y = (torch.rand(n, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    updates = []
    for with_extra in (False, True):
        model = tiny_model()
        optimizer = make_dp_optimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=expected_batch,
            noise_generator=torch.Generator().manual_seed(2),
            accountant=create_accountant("rdp"),
            sample_rate=0.1,
        )
        canaries = place_dirac_canaries(model, 3, gradient_norm=100.0, seed=0)
        extra = canaries.grad_samples(model, np.array([0, 1, 2, 2])) if with_extra else None
        private_patient_step(
            wrap_model(model, mode), optimizer, LOSS, (x, y), np.array(groups), 3, extra_grad_samples=extra
        )
        updates.append(canaries.read(model))
    factor = clip / (100.0 + 1e-6)  # Opacus' clip factor C / (norm + 1e-6)
    np.testing.assert_allclose(
        updates[1] - updates[0], np.array([1, 1, 2]) * 100.0 * factor / expected_batch, rtol=1e-5, atol=1e-7
    )


def test_extra_grad_samples_are_validated():
    model = tiny_model()
    wrapped = wrap_model(model, "hooks")
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        noise_generator=torch.Generator().manual_seed(0),
        accountant=create_accountant("rdp"),
        sample_rate=0.1,
    )
    batch = (torch.rand(2, 1, 32, 32), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="not trainable parameters"):
        private_step(wrapped, optimizer, LOSS, batch, 8, extra_grad_samples={"nope": torch.zeros(1, 3)})
    with pytest.raises(ValueError, match="same number of rows"):
        private_step(
            wrapped,
            optimizer,
            LOSS,
            batch,
            8,
            extra_grad_samples={"3.bias": torch.zeros(1, 5), "0.bias": torch.zeros(2, 4)},
        )


# ----------------------------------------------------------------------------------------------------------
# White-box audits: a correct mechanism stays below its claim; broken ones are caught

# Claim: eps = 2 at delta = 1e-5 for q = 0.01, 300 steps (sigma ~ 0.885, rdp), m = 4500 Dirac canaries on a
# 4,545-value model, 50 real records. Each audit takes ~2-5 s on one (shared) core.
CLAIM_EPSILON, DELTA, Q, STEPS, M = 2.0, 1e-5, 0.01, 300, 4500


def random_train_split(n: int = 50, size: int = 32) -> CacheSplitDataset:
    rng = np.random.default_rng(0)
    split = SplitData(
        images=rng.integers(0, 256, (n, size, size), dtype=np.uint8),
        rows=np.arange(n),
        labels=(rng.random((n, 5)) < 0.5).astype(np.float32),
        sex=np.full(n, "F"),
        age=np.full(n, 50.0),
        patient_id=np.array([str(i) for i in range(n)]),
    )
    return CacheSplitDataset(split)


@functools.cache
def claimed_config(mode: str) -> TrialConfig:
    sigma = calibrate_noise_multiplier(CLAIM_EPSILON, DELTA, Q, STEPS)
    return TrialConfig(
        sweep="audit",
        dataset="random",
        data_root="/unused",
        image_size=32,
        model="tiny",
        init="random",
        init_weights=None,
        lr=1e-3,
        seed=0,
        privacy=PrivacyConfig(
            target_epsilon=CLAIM_EPSILON,
            delta=DELTA,
            max_grad_norm=1.0,
            expected_batch_size=1,
            noise_multiplier=sigma,
            sample_rate=Q,
            steps=STEPS,
        ),
        speed=SpeedConfig(grad_sample_mode=mode, device="cpu"),
    )


def audit(mode: str) -> AuditResult:
    return white_box_audit(tiny_model(), random_train_split(), claimed_config(mode), m=M)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_white_box_audit_of_a_correct_mechanism_stays_below_its_claim(mode):
    result = audit(mode)
    assert result.claimed_epsilon == pytest.approx(CLAIM_EPSILON, abs=0.01) and result.claimed_epsilon <= 2.0
    assert result.m == M and 0 < result.guesses <= M and result.correct <= result.guesses
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon and not result.violates_claim


@pytest.fixture
def sigma_over_4(monkeypatch):
    """An engine bug: the optimizer adds a quarter of the noise while the config (and the claim) keep sigma."""

    def quarter_noise(optimizer, *, noise_multiplier, **kwargs):
        return make_dp_optimizer(optimizer, noise_multiplier=noise_multiplier / 4, **kwargs)

    monkeypatch.setattr(private_setup, "make_dp_optimizer", quarter_noise)  # the one DP optimizer of make_private


def _sum_without_clipping(self):
    # Opacus 1.6's DPOptimizer.clip_and_accumulate with the per-sample clip factor left out.
    for p in self.params:
        _check_processed_flag(p.grad_sample)
        grad = self._get_flat_grad_sample(p).to(p.dtype).sum(dim=0)
        p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad
        _mark_as_processed(p.grad_sample)


@pytest.fixture
def clipping_disabled(monkeypatch):
    """An engine bug: per-sample gradients are summed unclipped while noise is still sigma * C (Opacus' clipping for
    hooks/functorch, the book-keeping engine's clip factors for bk)."""
    monkeypatch.setattr(DPOptimizer, "clip_and_accumulate", _sum_without_clipping)
    monkeypatch.setattr(bk_module, "clip_factors", lambda norms, max_grad_norm: torch.ones_like(norms))


# FALSE ALARMS AND MISSES. Simulated with the exact score model of these runs (numpy, without the real records'
# small contributions): x_t = [canary in and sampled] + N(0, s^2) per step, likelihood-ratio score at the claimed
# sigma, the default rules, 95% confidence:
# - correct mechanism (s = sigma = 0.885): 100 audits, bound mean 0.35, sd 0.09, max 0.67; the claim 2.0 is
#   18 sd above the mean (the theorem alone guarantees P[bound > claim] <= 0.05).
# - sigma/4 (s = 0.221): 150 audits, bound mean 3.07, sd 0.15, min 2.67; a miss (bound <= 2.0) needs 7 sd.
# - no clipping: an included canary sampled once scores ~1000/sigma^2 above any excluded one, so the top 20%
#   (900 guesses) are all "in" unless fewer than 900 of the 4500 canaries are included and sampled (each
#   with probability 0.5 * (1 - 0.99^300) = 0.475): P < 1e-100 (test_no_clipping_miss_probability); 50 simulated
#   audits all gave 4.525. The planned-trial design below (eps 4, m = 200): 400 audits, mean 0.23, sd 0.23,
#   max 1.22: the claim is 16 sd away.


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_white_box_audit_catches_a_quarter_of_the_noise(mode, sigma_over_4):
    result = audit(mode)
    assert result.claimed_epsilon == pytest.approx(CLAIM_EPSILON, abs=0.01)
    assert result.violates_claim, result


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_white_box_audit_catches_disabled_clipping(mode, clipping_disabled):
    result = audit(mode)
    assert result.violates_claim and result.epsilon_lower_bound > 4.0, result


# Patient level: the same claim and canaries, the real records 20 patients of 1-4 images (50 images), each clipped as
# one record by the trial's patient step; each canary is one more patient record (one Dirac row) at the patient rate.
# The canaries' score model is the image-level one above (real records only blur it), so are the false-alarm and
# miss probabilities.


def random_patient_split() -> CacheSplitDataset:
    split = random_train_split().split
    ids = np.repeat(np.arange(20), [1, 2, 3, 4] * 5)  # 50 images
    return CacheSplitDataset(dataclasses.replace(split, patient_id=ids.astype(str)))


@functools.cache
def claimed_patient_config(mode: str) -> TrialConfig:
    cfg = claimed_config(mode)
    privacy = dataclasses.replace(cfg.privacy, privacy_unit="patient", max_images_per_patient=4)
    return dataclasses.replace(cfg, privacy=privacy)


def patient_audit(mode: str, monkeypatch: pytest.MonkeyPatch) -> AuditResult:
    """The white-box audit at the patient level; every step must be the trial's patient step with patient groups."""
    groups_seen = []
    step = audit_runners.private_patient_step

    def patient_step(wrapped, optimizer, loss_fn, batch, groups, *args, **kwargs):
        groups_seen.append(np.asarray(groups))
        return step(wrapped, optimizer, loss_fn, batch, groups, *args, **kwargs)

    monkeypatch.setattr(audit_runners, "private_patient_step", patient_step)
    result = white_box_audit(tiny_model(), random_patient_split(), claimed_patient_config(mode), m=M)
    assert len(groups_seen) == STEPS
    assert any(len(g) > len(set(g.tolist())) for g in groups_seen)  # some step clipped a patient of several images
    return result


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_patient_level_white_box_audit_of_a_correct_mechanism_stays_below_its_claim(mode, monkeypatch):
    result = patient_audit(mode, monkeypatch)
    assert result.privacy_unit == "patient" and result.sample_rate == Q and result.steps == STEPS
    assert result.claimed_epsilon == pytest.approx(CLAIM_EPSILON, abs=0.01) and result.claimed_epsilon <= 2.0
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon and not result.violates_claim


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_patient_level_white_box_audit_catches_a_quarter_of_the_noise(mode, sigma_over_4, monkeypatch):
    result = patient_audit(mode, monkeypatch)
    assert result.privacy_unit == "patient" and result.violates_claim, result


def test_no_clipping_miss_probability():
    p_sampled = 0.5 * (1 - (1 - Q) ** STEPS)
    assert stats.binom.cdf(0.2 * M - 1, M, p_sampled) < 1e-100
    beta = 0.05 / len(DEFAULT_GUESS_SPLITS)
    assert epsilon_lower_bound(m=M, guesses=900, correct=900, delta=DELTA, beta=beta) > 4.0


# ----------------------------------------------------------------------------------------------------------
# The audit of a planned trial (what `dpsweep audit` runs): timm model, the trial's data, metrics


def test_white_box_audit_of_a_planned_trial(tiny_site):
    # test_convnext on the tiny site, eps = 4 over 2 epochs (24 steps at q = 1/12): weak, but the whole path runs.
    cfg = tiny_trial_config(tiny_site, 4.0)
    result = run_audit(cfg, resolve_init("random", cfg.model), m=200, kind="white_box", real_records=16)
    assert result.kind == "white_box" and result.score == "likelihood_ratio" and result.steps == cfg.privacy.steps
    assert result.claimed_epsilon == epsilon_spent(
        cfg.privacy.noise_multiplier, cfg.privacy.sample_rate, cfg.privacy.steps, cfg.privacy.delta
    )
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon  # see FALSE ALARMS above
    metrics = result.to_metrics()
    assert metrics[audit_metric("white_box", "epsilon_lower_bound")] == result.epsilon_lower_bound
    assert {audit_metric("white_box", n) for n in ("m", "guesses", "correct", "confidence", "claimed_epsilon")} <= (
        metrics.keys()
    )


def test_black_box_training_set_and_plan_follow_the_coins(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0)
    train = CacheSplitDataset(open_cache(tiny_site / "synthetic-a" / "32").split("train"))
    images, labels = input_canaries(30, 32, 5, seed=0)
    included = np.random.default_rng(0).random(30) < 0.5
    enlarged = with_canaries(train, images[included], labels[included])
    assert len(enlarged) == len(train) + included.sum()
    x, y = enlarged.batch(np.arange(len(train), len(enlarged)))
    np.testing.assert_array_equal((x[:, 0].numpy() * 255).round(), images[included])
    np.testing.assert_array_equal(y.numpy(), labels[included])
    planned = audit_runners.recalibrated(cfg, len(enlarged))
    assert (planned.privacy.sample_rate, planned.privacy.steps) == sample_rate_and_steps(len(enlarged), 16, 2)
    assert (
        epsilon_spent(
            planned.privacy.noise_multiplier, planned.privacy.sample_rate, planned.privacy.steps, planned.privacy.delta
        )
        <= 4.0
    )


def test_black_box_audit_runs_the_trial_loop_through_the_trials_engine(tiny_site, monkeypatch):
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1)
    assert cfg.speed.grad_sample_mode == "bk"  # the default engine, whose per-layer rules white-box canaries skip
    book_keeping_steps = []
    step = engine_module.book_keeping_step
    monkeypatch.setattr(
        engine_module, "book_keeping_step", lambda *args: book_keeping_steps.append(len(args[3][0])) or step(*args)
    )
    result = run_audit(cfg, resolve_init("random", cfg.model), m=64, kind="black_box")
    assert result.kind == "black_box" and result.score == "negative_loss" and result.m == 64
    assert result.grad_sample_mode == "bk" and len(book_keeping_steps) == result.steps  # every step, bk's own code
    assert result.claimed_epsilon <= 4.0 and 0 <= result.epsilon_lower_bound <= result.claimed_epsilon
    assert set(result.to_metrics()) == {
        audit_metric("black_box", n)
        for n in (
            "epsilon_lower_bound",
            "claimed_epsilon",
            "m",
            "guesses",
            "correct",
            "confidence",
            "wall_time_s",
            "claim_p_value",
            "epsilon_ceiling",
        )
    }
    assert result.epsilon_ceiling == epsilon_ceiling(64, delta=cfg.privacy.delta, confidence=0.95)
    assert 0 < result.claim_p_value <= 1


def test_white_box_audit_of_a_planned_patient_level_trial_claims_the_patient_epsilon(tiny_site):
    # The smoke-cell path at the patient level: q and steps per patient, bound below the patient-level claim (m = 200
    # cannot bound above ~2.96 at 95%, see the ceiling, so a correct mechanism cannot be refuted at claim 4).
    cfg = tiny_trial_config(tiny_site, 4.0, privacy_unit="patient", max_images_per_patient=3)
    n_patients = group_patients(open_cache(tiny_site / "synthetic-a" / "32").split("train").patient_id, 3).n_patients
    assert (cfg.privacy.sample_rate, cfg.privacy.steps) == sample_rate_and_steps(n_patients, 16, 2)
    result = run_audit(cfg, resolve_init("random", cfg.model), m=200, kind="white_box", real_records=16)
    assert result.privacy_unit == "patient" and (result.sample_rate, result.steps) == (
        cfg.privacy.sample_rate,
        cfg.privacy.steps,
    )
    assert result.claimed_epsilon == epsilon_spent(
        cfg.privacy.noise_multiplier, cfg.privacy.sample_rate, cfg.privacy.steps, cfg.privacy.delta
    )
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon <= 4.0


def test_black_box_audit_of_a_patient_level_trial_trains_canary_patients(tiny_site, monkeypatch):
    """Each canary is a patient of max_images_per_patient mislabeled noise images; the split grows by the included
    canary patients, (q, steps, sigma) are planned on N_patients', and the trial loop's patient steps train them."""
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1, privacy_unit="patient", max_images_per_patient=3)
    base = open_cache(tiny_site / "synthetic-a" / "32").split("train")
    n_patients = group_patients(base.patient_id, 3).n_patients
    trained = []
    train_trial = audit_runners.train_trial

    def recording_train_trial(trial_cfg, init, report, data):
        trained.append((trial_cfg, data.train.split))
        return train_trial(trial_cfg, init, report, data=data)

    grouped_steps = []
    step = patients_module.book_keeping_step

    def recording_step(*args, **kwargs):
        grouped_steps.append(kwargs.get("groups"))
        return step(*args, **kwargs)

    monkeypatch.setattr(audit_runners, "train_trial", lambda c, i, r, data: recording_train_trial(c, i, r, data))
    monkeypatch.setattr(patients_module, "book_keeping_step", recording_step)
    result = run_audit(cfg, resolve_init("random", cfg.model), m=32, kind="black_box")
    ((trial_cfg, split),) = trained
    added = split.patient_id[len(base) :].astype(str)
    canaries, sizes = np.unique(added, return_counts=True)
    assert (
        len(added) == 3 * len(canaries) and (sizes == 3).all() and all(c.startswith("audit-canary-") for c in canaries)
    )
    p = trial_cfg.privacy
    assert p.privacy_unit == "patient" and p.max_images_per_patient == 3
    assert (p.sample_rate, p.steps) == sample_rate_and_steps(n_patients + len(canaries), 16, 1)
    assert all(g is not None for g in grouped_steps) and len(grouped_steps) <= p.steps  # empty batches: no bk call
    assert result.privacy_unit == "patient" and result.m == 32 and result.claimed_epsilon <= 4.0
    assert (result.sample_rate, result.steps) == (p.sample_rate, p.steps)
    assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon


class RecordingGenerator(torch.Generator):
    """A torch generator that records every ``manual_seed`` (the class's own method cannot be patched)."""

    seeds: list[int] = []

    def manual_seed(self, seed):
        RecordingGenerator.seeds.append(int(seed))
        return super().manual_seed(seed)


@pytest.mark.parametrize("kind", ["white_box", "black_box"])
def test_audits_seed_with_full_entropy_and_release_no_seed(tiny_site, monkeypatch, kind):
    """Every secret stream (coins aside: numpy, 256 bits) gets a 128-bit seed through `generator_from_seed`; no
    ``manual_seed`` (32 bits kept on the CPU) sees anything but the public ``cfg.seed``. Reproducible noise is asked
    for and must be ignored (it would seed the sampler and the noise with 1 and 2)."""
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1, seed=7, reproducible_noise=True)
    secret, seeded = [], []
    draw = randomness_module.secret_seed

    def recording_secret_seed():
        secret.append(draw())
        return secret[-1]

    manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda seed: seeded.append(int(seed)) or manual_seed(seed))
    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    monkeypatch.setattr(RecordingGenerator, "seeds", seeded)
    monkeypatch.setattr(randomness_module, "secret_seed", recording_secret_seed)
    monkeypatch.setattr(privacy_audit_module, "secret_seed", recording_secret_seed)
    result = run_audit(
        cfg, resolve_init("random", cfg.model), m=32, kind=kind, real_records=16 if kind == "white_box" else None
    )
    # white-box: the init, the sampler and the noise; black-box: the trial loop's sampler and noise
    assert len(secret) == (3 if kind == "white_box" else 2) and all(s >= 2**64 for s in secret)
    assert set(seeded) <= {cfg.seed}  # the trial's public seed (black-box: its init and self-check records)
    released = [*dataclasses.asdict(result).values(), *result.to_metrics().values()]
    assert not any("seed" in name for name in dataclasses.asdict(result))
    assert not any(
        value == s or value == s % 2**32 or value == s % 2**64
        for s in secret
        for value in released
        if isinstance(value, int | float)
    )


def test_black_box_audit_of_a_pos_weight_train_trial_plans_and_claims_its_label_count_release(tiny_site):
    """The audit re-plans sigma for the enlarged split with the trial's label-count release (as the sweep does), so
    the trial loop's budget check accepts it and the claim is the composition of both mechanisms."""
    cfg = tiny_trial_config(tiny_site, 4.0, epochs=1, pos_weight="train", label_count_noise_multiplier=20.0)
    enlarged = len(open_cache(tiny_site / "synthetic-a" / "32").split("train")) + 7
    planned = audit_runners.recalibrated(cfg, enlarged)
    without_release = plan_privacy(dataclasses.replace(cfg.privacy, label_count_noise_multiplier=None), enlarged)
    assert planned.privacy.label_count_noise_multiplier == 20.0
    assert planned.privacy.noise_multiplier > without_release.noise_multiplier  # the release costs budget
    result = run_audit(cfg, resolve_init("random", cfg.model), m=32, kind="black_box")
    steps_only = epsilon_spent(result.noise_multiplier, result.sample_rate, result.steps, result.delta)
    with_release = epsilon_spent(
        result.noise_multiplier, result.sample_rate, result.steps, result.delta, label_count_noise_multiplier=20.0
    )
    assert steps_only < result.claimed_epsilon == with_release <= 4.0


def test_audits_refuse_non_private_or_uncalibrated_trials(tiny_site):
    with pytest.raises(ValueError, match="private trial"):
        run_audit(
            tiny_trial_config(tiny_site, math.inf), resolve_init("random", "test_convnext"), m=10, kind="white_box"
        )
    with pytest.raises(ValueError, match="audit kind"):
        run_audit(tiny_trial_config(tiny_site, 4.0), resolve_init("random", "test_convnext"), m=10, kind="grey")


def test_more_canaries_than_coordinates_is_a_user_error(tiny_site):
    cfg = tiny_trial_config(tiny_site, 4.0)
    with pytest.raises(AuditError, match=r"m = 10000000: white-box canaries need distinct coordinates of the model; "):
        run_audit(cfg, resolve_init("random", cfg.model), m=10**7, kind="white_box", real_records=16)
