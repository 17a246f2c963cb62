"""Book-keeping (bk) clipping against torch.func on every parameter, and the DP step built on it: clipping bound,
noise, empty and virtual batches, explicit (canary) rows, equality with functorch mode, the self-check catching a
broken layer rule, and loud errors on unsupported modules.

Tolerances: float64 relative errors < 1e-10 (seen: ~1e-14); float32 < 1e-4 (seen: ~1e-6, float32 rounding over
sums of a few thousand terms)."""

import math

import pytest
import timm
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import trainables.privacy.bk as bk
from tests.privacy.bk_models import LOSS, MixedLayers, convnext, inputs
from trainables.privacy.bk import BookKeepingModule, UnsupportedModuleError, clipped_sum_step
from trainables.privacy.engine import (
    GRAD_SAMPLE_MODES,
    PerSampleGradientError,
    check_per_sample_gradients,
    make_dp_optimizer,
    private_step,
    reference_per_sample_gradients,
    wrap_model,
)
from trainables.privacy.secure import SecureRandom

F64_TOLERANCE, F32_TOLERANCE = 1e-10, 1e-4


# ----------------------------------------------------------------------------------------------------
# Per-sample norms and clipped sums equal torch.func on every parameter


@pytest.mark.parametrize(
    ("name", "dtype", "tolerance"),
    [
        ("test_convnext", torch.float64, F64_TOLERANCE),
        ("test_convnext", torch.float32, F32_TOLERANCE),
        ("convnext_atto", torch.float64, F64_TOLERANCE),  # conv_mlp: 1x1 convs, LayerNorm2d in the blocks
        ("convnext_tiny", torch.float64, F64_TOLERANCE),  # Linear on channels-last 4-D activations, LayerNorm
    ],
)
def test_norms_and_clipped_sums_equal_torch_func_on_every_parameter(name, dtype, tolerance):
    model = convnext(name, dtype)
    check = check_per_sample_gradients(wrap_model(model, "bk"), LOSS, *inputs(3, dtype=dtype))
    assert check.max_relative_error < tolerance, check
    assert check.n_parameters == sum(1 for p in model.parameters() if p.requires_grad)


def test_the_scratch_buffer_is_kept_across_steps_and_changes_no_value():
    """The layer scales' and ghost layers' temporaries go to one buffer kept by the wrapper (`bk.Scratch`): the
    same memory at the second step with the same values, and those of fresh tensors up to the order of a sum (the
    buffer is contiguous where a fresh product may be channels-last): float64, within 1e-12."""
    model = convnext("convnext_atto", torch.float64)  # ghost layers in its last stages, a layer scale per block
    wrapped = BookKeepingModule(model)
    x, y = inputs(4, dtype=torch.float64)
    first = wrapped.per_sample(LOSS, x, y)
    first_sums = first.clipped_sums(first.clip_factors(1.0))
    buffer = wrapped._scratch._buffer
    assert buffer is not None and any(layer.ghost for layer in first._layers)
    second = wrapped.per_sample(LOSS, x, y)
    second_sums = second.clipped_sums(second.clip_factors(1.0))
    assert wrapped._scratch._buffer is not None and wrapped._scratch._buffer.data_ptr() == buffer.data_ptr()
    wrapped._scratch = None  # the rules and clipped sums then make fresh tensors
    fresh = wrapped.per_sample(LOSS, x, y)
    for layer in fresh._layers:
        assert layer.scratch is None
    fresh_sums = fresh.clipped_sums(fresh.clip_factors(1.0))
    assert torch.equal(first.norms, second.norms)
    assert ((first.norms - fresh.norms).abs() / fresh.norms).max() < 1e-12
    for name, value in fresh_sums.items():
        assert torch.equal(first_sums[name], second_sums[name]), name
        assert (first_sums[name] - value).norm() <= 1e-12 * value.norm(), name


@pytest.mark.slow
def test_convnext_small_the_paper_model_is_exact_on_every_parameter():
    model = convnext("convnext_small", torch.float64)
    check = check_per_sample_gradients(wrap_model(model, "bk"), LOSS, *inputs(2, dtype=torch.float64))
    assert check.max_relative_error < F64_TOLERANCE, check
    assert check.n_parameters == sum(1 for p in model.parameters() if p.requires_grad)


def test_every_parameter_kind_is_covered_and_checked():
    # gamma, depthwise conv, LayerNorm2d, LayerNorm, Linear (4-D channels-last input), stem/downsample convs, head
    model = convnext("convnext_tiny", torch.float64)
    result = BookKeepingModule(model).per_sample(LOSS, *inputs(2, dtype=torch.float64))
    names = set(result.norms_sq)
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}
    for expected in (
        "stem.0.weight",
        "stem.1.weight",
        "stages.0.blocks.0.gamma",
        "stages.0.blocks.0.conv_dw.weight",
        "stages.0.blocks.0.norm.weight",
        "stages.0.blocks.0.mlp.fc1.weight",
        "stages.1.downsample.0.bias",
        "stages.1.downsample.1.weight",
        "head.norm.weight",
        "head.fc.bias",
    ):
        assert expected in names


@pytest.mark.parametrize(
    "choice",
    ["cost model", "all ghost", "all instantiated", "all ghost, blocks of 5", "grouped folded", "grouped looped"],
)
def test_ghost_and_instantiated_branches_give_the_same_results(monkeypatch, choice):
    if choice.startswith("all"):
        monkeypatch.setattr(bk, "prefers_ghost_norm", lambda *shape: choice.startswith("all ghost"))
    if choice.startswith("grouped"):  # the three grouped convs (6 x 6 outputs) with the batch folded, or one by one
        monkeypatch.setattr(bk, "GROUPED_CONV_FOLD_PIXELS", (0, 10**9) if choice.endswith("folded") else (1, 0))
    if choice.endswith("blocks of 5"):  # 36 and 144 positions in uneven blocks, the off-diagonal ones counted twice
        monkeypatch.setattr(bk, "GHOST_BLOCK_POSITIONS", 5)
    torch.manual_seed(0)
    model = MixedLayers().double()
    check = check_per_sample_gradients(wrap_model(model, "bk"), LOSS, *inputs(5, 12, torch.float64, channels=2))
    assert check.max_relative_error < F64_TOLERANCE, check
    assert check.n_parameters == 15


@pytest.mark.parametrize(("positions", "d_in", "d_out"), [(1, 7, 3), (13, 4, 9), (300, 9, 4)])
def test_ghost_norm_and_clipped_sum_equal_explicit_per_sample_gradients(positions, d_in, d_out):
    # 300 positions: 3 blocks of 100 (GHOST_BLOCK_POSITIONS 128); d_in < d_out scales a, d_in > d_out scales g
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, positions, d_in, generator=g, dtype=torch.float64)
    out = torch.randn(5, positions, d_out, generator=g, dtype=torch.float64)
    factors = torch.rand(5, generator=g, dtype=torch.float64)
    per_sample = torch.einsum("bto,bti->boi", out, a)
    expected_norms_sq = per_sample.square().sum((1, 2))
    expected_sum = torch.einsum("b,boi->oi", factors, per_sample)
    norms_sq = bk.ghost_norm_sq(a, out)
    assert ((norms_sq - expected_norms_sq).abs() / expected_norms_sq).max() < 1e-12
    assert (bk.ghost_clipped_sum(a, out, factors) - expected_sum).norm() / expected_sum.norm() < 1e-12


def test_cost_model_instantiates_early_stages_and_ghosts_late_ones():
    # convnext_tiny at 128 px: stage 0 MLP (T = 32*32, 96 -> 384) instantiated; stage 3 (T = 4*4, 768 -> 3072) ghost
    assert not bk.prefers_ghost_norm(32 * 32, 96, 384)
    assert bk.prefers_ghost_norm(4 * 4, 768, 3072)
    assert bk.prefers_ghost_norm(1, 768, 5)  # the head on pooled features: ||a||^2 ||g||^2


# ----------------------------------------------------------------------------------------------------
# The self-check catches a broken rule; unsupported modules are errors


def test_self_check_catches_a_broken_layer_scale_rule(monkeypatch):
    original = bk.ConvNeXtLayerScaleRule.per_sample

    def broken(self, module, a, g, call):  # forgets the 1/2 .. 3/2 scale of one channel
        grads = original(self, module, a, g, call)
        for name, per_sample in grads.instantiated.items():
            per_sample[:, 0] *= 1.01
            grads.norms_sq[name] = per_sample.pow(2).sum(1)
        return grads

    monkeypatch.setattr(bk.ConvNeXtLayerScaleRule, "per_sample", broken)
    with pytest.raises(PerSampleGradientError, match=r"gamma"):
        check_per_sample_gradients(wrap_model(convnext(), "bk"), LOSS, *inputs())


def test_self_check_catches_a_wrong_ghost_norm(monkeypatch):
    original = bk.ghost_norm_sq
    monkeypatch.setattr(bk, "ghost_norm_sq", lambda a, g: original(a, g) * 0.98)
    with pytest.raises(PerSampleGradientError, match=r"per-sample norm"):
        check_per_sample_gradients(wrap_model(convnext(), "bk"), LOSS, *inputs())


def test_self_check_catches_a_wrong_clipped_sum(monkeypatch):
    # right norms, wrong sum: the bias sums of linear layers off by 1%
    original = bk.LayerGrads.clipped_sums

    def broken(self, factors, shapes):
        sums = original(self, factors, shapes)
        return {name: value * 1.01 if name.endswith("fc1.bias") else value for name, value in sums.items()}

    monkeypatch.setattr(bk.LayerGrads, "clipped_sums", broken)
    with pytest.raises(PerSampleGradientError, match=r"fc1\.bias \((clipped )?sum\)"):
        check_per_sample_gradients(wrap_model(convnext(), "bk"), LOSS, *inputs())


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None]


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (nn.GroupNorm(1, 3), r"module 1 \(torch\.nn\.modules\.normalization\.GroupNorm\)"),
        (_Scale(), r"module 1 \(.*_Scale\) has trainable parameters \['scale'\]"),
        (nn.Conv2d(3, 3, 3, padding="same"), r"1 \(Conv2d\): padding_mode='zeros', padding='same'"),
    ],
)
def test_unsupported_modules_are_errors_naming_the_module(layer, message):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), layer, nn.Flatten(), nn.LazyLinear(5))
    model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(UnsupportedModuleError, match=message):
        wrap_model(model, "bk")
    for p in layer.parameters():  # a frozen module is not clipped, and needs no rule
        p.requires_grad_(False)
    wrap_model(model, "bk")


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


def test_drop_path_and_shared_or_reused_modules_are_refused():
    with pytest.raises(UnsupportedModuleError, match="drop_path"):
        wrap_model(timm.create_model("test_convnext", num_classes=5, in_chans=1, drop_path_rate=0.1), "bk")
    with pytest.raises(UnsupportedModuleError, match="ran twice"):
        BookKeepingModule(_Twice()).per_sample(lambda out, y: out.sum(1), torch.rand(2, 4), torch.zeros(2))
    fc = nn.Linear(4, 4)
    with pytest.raises(UnsupportedModuleError, match="shared"):  # one module at two places in the tree
        wrap_model(nn.Sequential(fc, nn.ReLU(), fc), "bk")
    shared = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    shared[1].weight = shared[0].weight
    with pytest.raises(UnsupportedModuleError, match="shared"):
        wrap_model(shared, "bk")


def test_bk_is_an_allowed_mode_and_hooks_stay_off_outside_the_engine():
    assert "bk" in GRAD_SAMPLE_MODES
    model = convnext()
    wrapped = wrap_model(model, "bk")
    x, y = inputs()
    LOSS(model(x), y).mean().backward()  # an ordinary pass: ordinary gradients, nothing recorded
    assert all(p.grad is not None for p in model.parameters())
    assert all(site.activation is None and site.grads is None for site in wrapped._sites)
    model.zero_grad(set_to_none=True)
    check_per_sample_gradients(wrapped, LOSS, x, y)
    assert all(p.grad is None and getattr(p, "grad_sample", None) is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------------
# The DP step: sensitivity, noise, accounting, virtual and empty batches, canaries, equality with functorch


def _dp_setup(
    mode: str,
    sigma: float,
    clip: float,
    expected_batch: int,
    seed: int = 0,
    noise: torch.Generator | SecureRandom | None = None,
):
    model = convnext(seed=seed)
    wrapped = wrap_model(model, mode)
    accountant = RDPAccountant()
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        noise_generator=noise or torch.Generator().manual_seed(seed + 7),
        accountant=accountant,
        sample_rate=0.1,
    )
    return model, wrapped, optimizer, accountant


def _update(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_removing_one_record_changes_the_clipped_sum_by_at_most_clip_norm():
    clip, n = 0.05, 6
    x, y = inputs(n)
    reference = reference_per_sample_gradients(convnext(), LOSS, x, y)
    norms = torch.stack([g.reshape(n, -1).double().norm(dim=1) ** 2 for g in reference.values()]).sum(0).sqrt()
    assert (norms > clip).all()  # every record is clipped at this bound, so each moves the sum by exactly C
    wrapped = wrap_model(convnext(), "bk")

    def clipped_sum(keep: torch.Tensor) -> torch.Tensor:
        sums, _ = clipped_sum_step(wrapped, LOSS, (x[keep], y[keep]), clip, max_physical_batch_size=4)
        return torch.cat([s.reshape(-1) for s in sums.values()]).double()

    everyone = clipped_sum(torch.arange(n))
    for i in range(n):
        without_i = clipped_sum(torch.tensor([j for j in range(n) if j != i]))
        assert (everyone - without_i).norm().item() == pytest.approx(clip, rel=1e-5)
        assert (everyone - without_i).norm().item() <= clip * (1 + 1e-5)


def test_unclipped_records_pass_unchanged():
    x, y = inputs(3)
    reference = reference_per_sample_gradients(convnext(), LOSS, x, y)
    sums, _ = clipped_sum_step(wrap_model(convnext(), "bk"), LOSS, (x, y), max_grad_norm=1e6, max_physical_batch_size=8)
    for name, g in reference.items():
        torch.testing.assert_close(sums[name], g.sum(0), rtol=1e-4, atol=1e-7)


def test_noise_has_std_sigma_times_clip_over_expected_batch_and_each_step_is_accounted():
    sigma, clip, expected_batch = 1.7, 0.5, 16
    model, wrapped, optimizer, accountant = _dp_setup("bk", sigma, clip, expected_batch)
    zero_loss = lambda logits, targets: (logits * 0).sum(dim=1)  # noqa: E731 - per-sample gradients are 0
    for step in range(2):  # twice: Opacus' processed-flags must not trip on the second step
        private_step(wrapped, optimizer, zero_loss, inputs(4), max_physical_batch_size=3)
        noise = _update(model)
        assert noise.std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.01)
        assert abs(noise.mean().item()) < 5 * sigma * clip / expected_batch / math.sqrt(noise.numel())
        assert sum(n for _, _, n in accountant.history) == step + 1


def test_secure_noise_works_in_bk_mode():
    sigma, clip, expected_batch = 1.0, 1.0, 8
    model, wrapped, optimizer, accountant = _dp_setup("bk", sigma, clip, expected_batch, noise=SecureRandom())
    private_step(wrapped, optimizer, LOSS, inputs(3), max_physical_batch_size=8)
    assert type(optimizer).__name__ == "SecureDPOptimizer"
    assert _update(model).std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.02)
    assert sum(n for _, _, n in accountant.history) == 1


def test_empty_batch_still_takes_a_noisy_accounted_step():
    sigma, clip, expected_batch = 1.0, 1.0, 8
    model, wrapped, optimizer, accountant = _dp_setup("bk", sigma, clip, expected_batch)
    x, y = inputs(1)
    assert math.isnan(private_step(wrapped, optimizer, LOSS, (x[:0], y[:0]), max_physical_batch_size=8))
    assert _update(model).std().item() == pytest.approx(sigma * clip / expected_batch, rel=0.02)
    assert sum(n for _, _, n in accountant.history) == 1


@pytest.mark.parametrize("physical", [1, 3, 64])
def test_bk_step_equals_functorch_step_with_the_same_noise(physical):
    # Same model, batch and noise seed: bk and functorch release the same noisy update (float rounding apart),
    # whatever the physical batch size.
    x, y = inputs(7)
    updates, losses = {}, {}
    for mode, chunk in (("functorch", 64), ("bk", physical)):
        model, wrapped, optimizer, accountant = _dp_setup(mode, sigma=0.3, clip=0.05, expected_batch=7)
        losses[mode] = float(private_step(wrapped, optimizer, LOSS, (x, y), max_physical_batch_size=chunk))
        updates[mode] = _update(model)
        assert sum(n for _, _, n in accountant.history) == 1
    torch.testing.assert_close(updates["bk"], updates["functorch"], rtol=0, atol=1e-6)
    assert losses["bk"] == pytest.approx(losses["functorch"], rel=1e-6)


@pytest.mark.parametrize("mode", ["bk", "functorch"])
def test_extra_grad_sample_rows_are_clipped_like_samples_and_added_once(mode):
    clip, expected_batch = 0.5, 4
    model, wrapped, optimizer, _ = _dp_setup(mode, 0.0, clip, expected_batch)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    dirac = torch.zeros(2, *params["head.fc.weight"].shape)
    dirac[0, 1, 2] = 1e3  # a huge canary on one coordinate: clipped to exactly C
    dirac[1, 3, 0] = 0.1  # a small one on another, jointly with a second parameter (norm 0.1 * sqrt(2) < C)
    gamma = torch.zeros(2, *params["stages.0.blocks.0.gamma"].shape)
    gamma[1, 0] = 0.1
    zero_loss = lambda logits, targets: (logits * 0).sum(dim=1)  # noqa: E731 - the real samples contribute 0
    x, y = inputs(3)
    for batch in ((x, y), (x[:0], y[:0])):  # also on an empty Poisson batch
        private_step(
            wrapped,
            optimizer,
            zero_loss,
            batch,
            max_physical_batch_size=2,
            extra_grad_samples={"head.fc.weight": dirac, "stages.0.blocks.0.gamma": gamma},
        )
        grads = {n: p.grad * expected_batch for n, p in zip(names, model.parameters(), strict=True)}
        expected_fc = torch.zeros_like(params["head.fc.weight"])
        expected_fc[1, 2] = clip * 1e3 / (1e3 + 1e-6)
        expected_fc[3, 0] = 0.1
        torch.testing.assert_close(grads["head.fc.weight"], expected_fc, rtol=1e-6, atol=1e-7)
        assert grads["stages.0.blocks.0.gamma"][0].item() == pytest.approx(0.1, rel=1e-6)
        assert (
            sum(
                g.abs().sum().item() for n, g in grads.items() if n not in ("head.fc.weight", "stages.0.blocks.0.gamma")
            )
            < 1e-6
        )
    with pytest.raises(ValueError, match="not trainable|unknown"):
        private_step(wrapped, optimizer, zero_loss, (x, y), 2, extra_grad_samples={"nope": dirac})


def test_private_trial_in_bk_mode_equals_functorch_mode(tmp_path):
    from tests.factories import prepare_tiny_site, run_tiny_trial, tiny_trial_config
    from trainables import names as M

    site = prepare_tiny_site(tmp_path)
    # reproducible_noise: both modes must draw the same noise and batches to be compared
    runs = {
        mode: run_tiny_trial(
            tiny_trial_config(
                site,
                4.0,
                epochs=1,
                reproducible_noise=True,
                grad_sample_mode=mode,
                max_physical_batch_size=8,
            )
        )
        for mode in ("bk", "functorch")
    }
    bk_epochs, ft_epochs = runs["bk"].epochs, runs["functorch"].epochs
    assert [e[M.STEPS] for e in bk_epochs] == [e[M.STEPS] for e in ft_epochs]
    assert [e[M.EPSILON] for e in bk_epochs] == [e[M.EPSILON] for e in ft_epochs]
    assert bk_epochs[-1][M.VAL_AUROC_MACRO] == pytest.approx(ft_epochs[-1][M.VAL_AUROC_MACRO], abs=1e-4)
    bk_weights, ft_weights = runs["bk"].result.model.state_dict(), runs["functorch"].result.model.state_dict()
    for name, value in bk_weights.items():
        torch.testing.assert_close(value, ft_weights[name], rtol=1e-4, atol=1e-5)
