"""The DP engine: per-sample gradients against torch.func, clipping, noise scale, Poisson sampling,
virtual batches, accounting of every step. Each test fails if the corresponding guarantee breaks."""

import math

import pytest
import timm
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from tests.privacy.models import LOSS, inputs, small_convnext
from trainables.privacy.engine import (
    GeneratorDPOptimizer,
    PerSampleGradientError,
    check_per_sample_gradients,
    make_dp_optimizer,
    poisson_batches,
    private_step,
    reference_per_sample_gradients,
    wrap_model,
)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_engine_per_sample_gradients_match_torch_func(mode):
    wrapped = wrap_model(small_convnext(), mode)
    check = check_per_sample_gradients(wrapped, LOSS, *inputs())
    assert check.max_relative_error < 1e-4
    assert check.n_parameters == sum(1 for p in wrapped._module.parameters() if p.requires_grad)


def test_stock_opacus_hooks_are_caught_on_convnext():
    # Stock Opacus unfolds channels-last conv inputs wrongly (ConvNeXt downsample convs); our check must see it.
    stock = GradSampleModule(small_convnext(), batch_first=True, loss_reduction="sum")  # our convention
    with pytest.raises(PerSampleGradientError, match="downsample"):
        check_per_sample_gradients(stock, LOSS, *inputs())
    # ... and only there: with the same reduction, stock Opacus agrees with torch.func on every other parameter
    x, y = inputs()
    reference = reference_per_sample_gradients(small_convnext(), LOSS, x, y)
    stock.zero_grad(set_to_none=True)
    LOSS(stock(x), y).sum().backward()
    for name, p in stock._module.named_parameters():
        if "downsample" not in name:
            torch.testing.assert_close(p.grad_sample, reference[name], rtol=1e-4, atol=1e-6)


def test_unknown_or_broken_modes_are_refused():
    for mode in ("ghost", "ew", "stock"):
        with pytest.raises(ValueError, match="grad_sample_mode"):
            wrap_model(small_convnext(), mode)


def test_check_leaves_no_gradients_behind():
    wrapped = wrap_model(small_convnext(), "hooks")
    check_per_sample_gradients(wrapped, LOSS, *inputs())
    for p in wrapped._module.parameters():
        assert p.grad is None and getattr(p, "grad_sample", None) is None


def _dp_setup(noise_multiplier: float, clip: float, expected_batch: int, seed: int = 0, sample_rate: float = 0.1):
    model = small_convnext(seed)
    wrapped = wrap_model(model, "hooks")
    accountant = RDPAccountant()
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        noise_generator=torch.Generator().manual_seed(seed + 7),
        accountant=accountant,
        sample_rate=sample_rate,
    )
    return model, wrapped, optimizer, accountant


def _update(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_each_sample_contributes_at_most_clip_norm():
    clip, n = 0.01, 6
    x, y = inputs(n)
    reference = reference_per_sample_gradients(small_convnext(0), LOSS, x, y)
    norms = torch.stack([g.reshape(n, -1).norm(dim=1) ** 2 for g in reference.values()]).sum(0).sqrt()
    assert (norms > clip).all()  # every sample needs clipping at this bound
    for i in range(n):
        model, wrapped, optimizer, _ = _dp_setup(0.0, clip, expected_batch=1)
        private_step(wrapped, optimizer, LOSS, (x[i : i + 1], y[i : i + 1]), max_physical_batch_size=8)
        assert _update(model).norm().item() == pytest.approx(clip, rel=1e-4)  # clipped to exactly C
    model, wrapped, optimizer, _ = _dp_setup(0.0, clip, expected_batch=1)
    private_step(wrapped, optimizer, LOSS, (x, y), max_physical_batch_size=8)
    assert _update(model).norm().item() <= n * clip * (1 + 1e-5)


def test_noise_has_std_sigma_times_clip_over_expected_batch():
    sigma, clip, expected_batch = 1.7, 0.5, 16
    model, wrapped, optimizer, _ = _dp_setup(sigma, clip, expected_batch)
    # Zero loss: per-sample gradients are 0, so the update is pure noise / B.
    zero_loss = lambda logits, targets: (logits * 0).sum(dim=1)  # noqa: E731
    private_step(wrapped, optimizer, zero_loss, inputs(4), max_physical_batch_size=8)
    noise = _update(model)
    assert noise.numel() > 100_000
    assert noise.mean().item() == pytest.approx(0.0, abs=5 * sigma * clip / expected_batch / math.sqrt(noise.numel()))
    assert noise.std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.01)


def test_default_noise_is_opacus_own_from_the_seeded_generator():
    # Secure mode must not leak into the default path: Opacus' draws from our generator, reproducible noise.
    _, _, optimizer, _ = _dp_setup(1.0, 1.0, 8)
    assert type(optimizer) is GeneratorDPOptimizer and not optimizer.secure_mode
    assert optimizer.generator.initial_seed() == 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generator_noise_is_bit_for_bit_opacus_add_noise(dtype):
    # GeneratorDPOptimizer draws into a reused buffer and adds in place: p.grad, and the generator's state after,
    # must equal Opacus 1.6's own add_noise exactly, over shapes that take every branch of torch's normal_ fill
    # (under 16 values, a multiple of 16, a ragged tail), two steps running (the buffer reused), and no noise left
    # behind in the buffer.
    shapes = [(3,), (5, 7), (16,), (4, 8, 3, 3), (1000,), (2,)]
    sigma, clip = 1.3, 0.7

    def noised(optimizer_type):
        params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in shapes]
        generator = torch.Generator().manual_seed(11)
        optimizer = optimizer_type(
            torch.optim.SGD(params, lr=0.1),
            noise_multiplier=sigma,
            max_grad_norm=clip,
            expected_batch_size=4,
            generator=generator,
        )
        grads = []
        for step in range(2):
            sums = [torch.arange(p.numel(), dtype=dtype).reshape(p.shape) / (step + 3) for p in params]
            for p, summed in zip(params, sums, strict=True):
                p.summed_grad = summed
            optimizer.add_noise()
            grads.append([p.grad.clone() for p in params])
            optimizer.zero_grad(set_to_none=True)
        return grads, generator.get_state(), optimizer

    ours, our_state, optimizer = noised(GeneratorDPOptimizer)
    opacus, opacus_state, _ = noised(DPOptimizer)
    for ours_step, opacus_step in zip(ours, opacus, strict=True):
        for mine, theirs in zip(ours_step, opacus_step, strict=True):
            assert mine.dtype == dtype and torch.equal(mine, theirs)
    assert torch.equal(our_state, opacus_state)
    assert optimizer._noise_buffers and all(not b.any() for b in optimizer._noise_buffers.values())
    noise = torch.cat([(g - torch.arange(g.numel(), dtype=dtype).reshape(g.shape) / 4).reshape(-1) for g in ours[1]])
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.1)  # the draws are noise of std sigma * C


def test_poisson_batch_sizes_follow_binomial():
    n, q, steps = 1000, 0.03, 4000
    batches = poisson_batches(n, q, steps, torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    assert len(sizes) == steps
    mean_se = math.sqrt(n * q * (1 - q) / steps)
    assert sizes.mean().item() == pytest.approx(n * q, abs=4 * mean_se)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.1)


def test_poisson_batches_include_each_record_independently():
    batches = list(poisson_batches(50, 0.2, 3000, torch.Generator().manual_seed(1)))
    counts = torch.zeros(50)
    for b in batches:
        counts[b] += 1
    assert (counts / 3000 - 0.2).abs().max().item() < 0.035  # every record included at rate ~q


def test_physical_batch_size_does_not_change_the_update():
    x, y = inputs(10)
    updates = []
    for physical in (3, 64):
        model, wrapped, optimizer, accountant = _dp_setup(1.0, 0.05, expected_batch=10)
        private_step(wrapped, optimizer, LOSS, (x, y), max_physical_batch_size=physical)
        updates.append(_update(model))
        assert len(accountant.history) == 1 and accountant.history[0][2] == 1  # one step, counted once
    assert torch.allclose(updates[0], updates[1], atol=1e-6)


def test_empty_batch_still_adds_noise_and_counts_a_step():
    sigma, clip, expected_batch = 1.0, 1.0, 8
    model, wrapped, optimizer, accountant = _dp_setup(sigma, clip, expected_batch)
    x, y = inputs(1)
    private_step(wrapped, optimizer, LOSS, (x[:0], y[:0]), max_physical_batch_size=8)
    assert _update(model).std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.02)
    assert sum(steps for _, _, steps in accountant.history) == 1


def test_accountant_counts_every_logical_batch():
    model, wrapped, optimizer, accountant = _dp_setup(1.0, 1.0, expected_batch=4, sample_rate=0.4)
    x, y = inputs(10)
    for indices in poisson_batches(10, 0.4, 5, torch.Generator().manual_seed(3)):
        private_step(wrapped, optimizer, LOSS, (x[indices], y[indices]), max_physical_batch_size=2)
    assert sum(steps for _, _, steps in accountant.history) == 5
    assert all(q == 0.4 and s == 1.0 for s, q, _ in accountant.history)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["convnext_atto", "convnext_tiny", "convnext_small"])
def test_study_architectures_get_exact_per_sample_gradients_for_every_parameter(model_name):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=5, in_chans=1, drop_path_rate=0.0)
    x, y = inputs(2, size=32)
    for mode in ("hooks", "functorch"):
        wrapped = wrap_model(model, mode)
        check = check_per_sample_gradients(wrapped, LOSS, x, y)
        wrapped._close()  # remove the hooks before wrapping the same model again
        assert check.max_relative_error < 1e-4, (mode, check)
        assert check.n_parameters == sum(1 for p in model.parameters() if p.requires_grad)
    stock = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with pytest.raises(PerSampleGradientError):
        check_per_sample_gradients(stock, LOSS, x, y)
    stock._close()
    # every trainable parameter is also updated by the DP optimizer
    optimizer = make_dp_optimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=2,
        noise_generator=torch.Generator().manual_seed(0),
        accountant=RDPAccountant(),
        sample_rate=0.1,
    )
    assert {id(p) for p in optimizer.params} == {id(p) for p in model.parameters() if p.requires_grad}
