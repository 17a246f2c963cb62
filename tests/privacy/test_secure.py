"""Secure mode: ChaCha20 noise and Poisson sampling. Each test fails if the corresponding guarantee breaks:
the noise's distribution and scale, Opacus' 4-Gaussian recipe, the sampler's Binomial batch sizes, the
independence from every torch/numpy seed, and a private trial that spends exactly the planned epsilon."""

import copy
import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from scipy import stats

from tests.factories import run_tiny_trial, tiny_trial_config
from tests.privacy.models import inputs, small_convnext
from trainables import names as M
from trainables.privacy.engine import SecureDPOptimizer, make_dp_optimizer, poisson_batches, private_step, wrap_model
from trainables.privacy.secure import CHUNK_VALUES, SecureRandom

P_MIN = 1e-4
"""Smallest p-value accepted from a goodness-of-fit test (a correct source fails one such test 1 in 10,000 runs)."""


def zero_loss(logits, targets):
    return (logits * 0).sum(dim=1)  # per-sample gradients are 0: the update is pure noise / B


def noise_of_one_step(source: torch.Generator | SecureRandom, sigma: float, clip: float, expected_batch: int):
    model = small_convnext(0)
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        noise_generator=source,
        accountant=RDPAccountant(),
        sample_rate=0.1,
    )
    private_step(wrap_model(model, "hooks"), optimizer, zero_loss, inputs(4), max_physical_batch_size=8)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), optimizer


def test_secure_step_noise_is_gaussian_with_std_sigma_clip_over_expected_batch():
    sigma, clip, expected_batch = 1.7, 0.5, 16
    noise, optimizer = noise_of_one_step(SecureRandom(), sigma, clip, expected_batch)
    assert isinstance(optimizer, SecureDPOptimizer) and optimizer.generator is None
    n, scale = noise.numel(), sigma * clip / expected_batch
    assert n > 100_000 and noise.dtype == torch.float32
    # 5 standard errors: the mean's is scale/sqrt(n), the sample std's is about scale/sqrt(2n)
    assert noise.mean().item() == pytest.approx(0.0, abs=5 * scale / math.sqrt(n))
    assert noise.std().item() == pytest.approx(scale, rel=5 / math.sqrt(2 * n))
    assert stats.kstest(noise.double().numpy() / scale, "norm").pvalue > P_MIN


def test_gaussian_noise_follows_opacus_secure_recipe():
    # Known numbers: with the Gaussians replaced by 0, 1, 2, ... the noise is (std * (z1+z2+z3+z4)) / 2 of
    # the 4 rows of draws after the discarded first one (Opacus 1.6 `_generate_noise(secure_mode=True)`).
    class Counting(SecureRandom):
        def __init__(self):
            super().__init__()
            self.requests, self.next = [], 0

        def standard_normal(self, n, device=None):
            self.requests.append(n)
            self.next += n
            return torch.arange(self.next - n, self.next, dtype=torch.float64)

    source = Counting()
    noise = source.gaussian_noise(std=2.0, reference=torch.ones(3, dtype=torch.float16))
    assert source.requests == [1, 12]  # one thrown away, then 4 per value
    assert noise.dtype == torch.float16 and noise.tolist() == [22.0, 26.0, 30.0]  # 2 * (1+4+7+10) / 2, ...
    assert source.gaussian_noise(std=0.0, reference=torch.ones(3)).tolist() == [0.0] * 3  # as Opacus: no draw
    assert source.requests == [1, 12]


def test_uniforms_have_53_random_bits_and_never_zero():
    source = SecureRandom()
    u = source.uniform(CHUNK_VALUES + 1000)  # crosses a chunk: no keystream reused across requests
    assert u.dtype == torch.float64 and (u > 0).all() and (u < 1).all()
    assert torch.equal(u * 2.0**53, torch.round(u * 2.0**53))  # multiples of 2^-53
    assert stats.kstest(u.numpy(), "uniform").pvalue > P_MIN
    assert torch.unique(u).numel() == u.numel()  # 53 bits: a repeat among 1M draws has probability ~6e-5
    assert torch.corrcoef(torch.stack((u[:-1], u[1:])))[0, 1].abs() < 5 / math.sqrt(u.numel())
    first, second = source.random_bytes(64), source.random_bytes(64)
    assert first != second  # a fresh nonce per request


def test_standard_normal_moments_and_tails():
    z = SecureRandom().standard_normal(400_001).numpy()
    assert z.shape == (400_001,)
    assert stats.kstest(z, "norm").pvalue > P_MIN
    assert abs(np.mean(z**4) - 3) < 5 * math.sqrt(96 / z.size)  # kurtosis of a Gaussian; var(z^4) = 96


def test_secure_poisson_batch_sizes_follow_binomial():
    n, q, steps = 1000, 0.03, 4000
    sizes = np.array([len(b) for b in poisson_batches(n, q, steps, SecureRandom())])
    assert len(sizes) == steps
    support = np.arange(n + 1)
    expected = stats.binom.pmf(support, n, q) * steps
    # chi-square over the sizes, pooling both tails into cells of at least 5 expected batches
    low, high = support[expected >= 5][[0, -1]]
    observed = np.r_[(sizes < low).sum(), np.bincount(sizes, minlength=n + 1)[low : high + 1], (sizes > high).sum()]
    pooled = np.r_[expected[:low].sum(), expected[low : high + 1], expected[high + 1 :].sum()]
    assert stats.chisquare(observed, pooled * steps / pooled.sum()).pvalue > P_MIN


def test_secure_poisson_includes_each_record_independently_at_rate_q():
    records, q, steps = 50, 0.2, 3000
    counts = np.zeros(records)
    for batch in poisson_batches(records, q, steps, SecureRandom()):
        counts[batch.numpy()] += 1
    assert np.abs(counts / steps - q).max() < 5 * math.sqrt(q * (1 - q) / steps)


def test_secure_draws_ignore_torch_and_numpy_seeds():
    def seeded(make):
        torch.manual_seed(0)
        np.random.seed(0)
        return make()

    def secure_noise():
        return noise_of_one_step(SecureRandom(), 1.0, 1.0, 8)[0]

    def secure_batches():
        return torch.cat(list(poisson_batches(200, 0.5, 3, SecureRandom())))

    def seeded_noise():
        return noise_of_one_step(torch.Generator().manual_seed(0), 1.0, 1.0, 8)[0]

    assert not torch.equal(seeded(secure_noise), seeded(secure_noise))
    assert not torch.equal(seeded(secure_batches), seeded(secure_batches))
    assert torch.equal(seeded(seeded_noise), seeded(seeded_noise))  # the default mode stays reproducible


def test_secure_source_cannot_be_saved_or_copied():
    with pytest.raises(TypeError, match="secret"):
        pickle.dumps(SecureRandom())
    with pytest.raises(TypeError, match="secret"):
        copy.deepcopy(SecureRandom())


def test_secure_trial_spends_exactly_the_planned_epsilon_and_resumes_with_a_fresh_key(tiny_site):
    default_cfg = tiny_trial_config(tiny_site, model_selection="last")  # same best epoch in both runs
    cfg = dataclasses.replace(default_cfg, privacy=dataclasses.replace(default_cfg.privacy, secure_mode=True))
    default, secure = run_tiny_trial(default_cfg), run_tiny_trial(cfg)
    privacy = cfg.privacy
    assert [e[M.EPSILON] for e in secure.epochs] == [e[M.EPSILON] for e in default.epochs]
    ledger = (M.EPSILON, M.STEPS, M.EPSILON_AT_BEST_EPOCH, M.EPSILON_CROSS_CHECK_RDP, M.EPSILON_CROSS_CHECK_PLD)
    assert {k: secure.result.metrics[k] for k in ledger} == {k: default.result.metrics[k] for k in ledger}
    assert secure.states[-1]["accountant"] == default.states[-1]["accountant"]
    planned = [(privacy.noise_multiplier, privacy.sample_rate, privacy.steps)]
    assert secure.states[-1]["accountant"]["history"] == planned
    # Nothing of the secure source is checkpointed; the seeded streams are, in the default mode.
    assert secure.states[-1]["sampler_rng"] is None and secure.states[-1]["noise_rng"] is None
    assert isinstance(default.states[-1]["noise_rng"], torch.Tensor)

    # Resumed from epoch 1 with a new key: the same ledger at the end, but other draws than the first run.
    resumed = run_tiny_trial(cfg, state=secure.states[0])
    assert [e[M.EPOCH] for e in resumed.epochs] == [2]
    assert resumed.states[-1]["accountant"] == secure.states[-1]["accountant"]
    assert resumed.result.metrics[M.EPSILON] == secure.result.metrics[M.EPSILON]
    weights = [run.states[-1]["model"] for run in (secure, resumed)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
