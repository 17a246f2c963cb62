"""Speed knobs that must not touch the mechanism: fixed-shape padded chunks (padding is inert, bit for bit, in every
grad-sample mode), bf16 autocast (each record still moves the clipped sum by at most C), and the trial-level
knobs (``speed.fixed_shapes``, ``speed.data_on_device``) leaving a CPU trial's numbers unchanged.

Bit-exact comparisons run with ``torch.use_deterministic_algorithms(True)`` on CPU. Padding's inertness is shown bit
for bit at a fixed shape (pad rows of large values vs zeros; pad rows' per-sample gradients exactly zero); padded vs
unpadded steps are bit-identical when no chunk is padded and equal to float rounding otherwise (a chunk of another
size runs other kernels)."""

import math

import pytest
import timm
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import trainables.privacy.bk as bk
import trainables.privacy.engine as engine
from trainables import names as M
from trainables.config import SpeedConfig
from trainables.privacy.bk import BookKeepingModule
from trainables.privacy.chunks import PhysicalChunk, padded_rows, physical_chunks
from trainables.privacy.engine import GRAD_SAMPLE_MODES, make_dp_optimizer, private_step, wrap_model

CHUNK = 4
CLIP = 0.05  # every record of these inputs is clipped at this bound (checked below)
BF16_TOLERANCE = 1e-5
"""Relative slack on ``||sum(D) - sum(D minus i)|| <= C`` in bf16 mode: the float32 rounding of the clipped sums (the
same slack as the float32 tests in test_bk.py); seen: ~1e-7."""


def LOSS(logits, targets):  # the per-sample multi-label BCE a trial trains with
    return nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)


def convnext(seed: int = 0) -> nn.Module:
    """test_convnext (LayerNorm2d, LayerNorm, depthwise convs, layer scales drawn in [0.5, 1.5])."""
    torch.manual_seed(seed)
    model = timm.create_model("test_convnext", num_classes=5, in_chans=1, drop_path_rate=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 32, 32, generator=g), (torch.rand(n, 5, generator=g) > 0.5).float()


@pytest.fixture(autouse=True)
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def noisy_update(
    mode: str,
    batch,
    *,
    pad_multiple: int | None,
    sigma: float = 0.5,
    autocast_dtype=None,
    memory_format=torch.contiguous_format,
) -> torch.Tensor:
    """The released update ``p.grad`` (noisy clipped sum / B) of one private step, noise from a fixed seed."""
    model = convnext().to(memory_format=memory_format)
    assert model.stem[0].weight.is_contiguous(memory_format=memory_format)
    wrapped = wrap_model(model, mode)
    accountant = RDPAccountant()
    optimizer = make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=CLIP,
        expected_batch_size=8,
        noise_generator=torch.Generator().manual_seed(7),
        accountant=accountant,
        sample_rate=0.1,
    )
    loss = private_step(
        wrapped, optimizer, LOSS, batch, CHUNK, pad_multiple=pad_multiple, autocast_dtype=autocast_dtype
    )
    assert loss.dim() == 0 and loss.device == batch[0].device  # stays on the device: no host sync
    assert sum(n for _, _, n in accountant.history) == 1  # one accounted step, whatever the padding
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_physical_chunks_pad_only_the_last_chunk_with_zeros():
    x, y = inputs(10)
    chunks = list(physical_chunks(x, y, CHUNK, pad_multiple=CHUNK))
    assert [(len(c.x), len(c.y), c.n_real) for c in chunks] == [(4, 4, 4), (4, 4, 4), (4, 4, 2)]
    assert torch.equal(torch.cat([c.x[: c.n_real] for c in chunks]), x)
    assert torch.equal(torch.cat([c.y[: c.n_real] for c in chunks]), y)
    assert not chunks[-1].x[2:].any() and not chunks[-1].y[2:].any()
    assert [c.n_real for c in physical_chunks(x, y, CHUNK, pad_multiple=None)] == [4, 4, 2]
    assert list(physical_chunks(x[:0], y[:0], CHUNK, pad_multiple=CHUNK)) == []  # an empty batch runs no chunk
    assert [len(c.x) for c in physical_chunks(x[:8], y[:8], CHUNK, pad_multiple=CHUNK)] == [
        4,
        4,
    ]  # exact multiple: no pad
    # a finer granule: the last chunk rounded up to a multiple of 3 rows, never beyond the chunk size
    assert [(len(c.x), c.n_real) for c in physical_chunks(x, y, 8, pad_multiple=3)] == [(8, 8), (3, 2)]
    assert [(len(c.x), c.n_real) for c in physical_chunks(x[:7], y[:7], 8, pad_multiple=3)] == [(8, 7)]
    assert [padded_rows(n, 32, 8) for n in (1, 8, 9, 31, 32)] == [8, 8, 16, 32, 32]
    assert padded_rows(5, 32, None) == 5


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
@pytest.mark.parametrize("n", [0, 1, 6, 8])  # empty, one padded chunk, a padded last chunk, an exact multiple
def test_padded_step_releases_the_unpadded_update(mode, n):
    """Bit for bit when no chunk needs padding (empty batch, exact multiple); otherwise equal up to float rounding:
    CPU kernels pick other algorithms for a chunk of 4 rows than for 1 or 2, so even the real rows' per-sample
    gradients round differently (seen: <= 9.3e-10 absolute on entries ~3e-3, i.e. ~1 float32 ulp). That padding
    itself contributes exactly nothing is shown bit for bit by the two tests below."""
    batch = inputs(n)
    unpadded = noisy_update(mode, batch, pad_multiple=None)
    for multiple in (CHUNK, 3):
        padded = noisy_update(mode, batch, pad_multiple=multiple)
        if n % CHUNK == 0:
            assert torch.equal(padded, unpadded)
        else:
            torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_padding_content_cannot_leak_into_the_update(mode, monkeypatch):
    """Pad rows full of large values and other labels give the same update bit for bit; the same rows counted as
    records change it (so this comparison would see a leak)."""
    batch = inputs(6)
    zero_padded = noisy_update(mode, batch, pad_multiple=CHUNK)
    garbage = torch.Generator().manual_seed(3)

    def chunks_with(real_rows_of_padding: bool):
        def chunks(x, y, size, pad_multiple):
            for chunk in physical_chunks(x, y, size, pad_multiple):
                k = chunk.n_real
                xb, yb = chunk.x.clone(), chunk.y.clone()
                xb[k:] = 50.0 * torch.randn(xb[k:].shape, generator=garbage)
                yb[k:] = 1.0
                yield PhysicalChunk(xb, yb, len(xb) if real_rows_of_padding else k)

        return chunks

    for module in (engine, bk):
        monkeypatch.setattr(module, "physical_chunks", chunks_with(real_rows_of_padding=False))
    assert torch.equal(noisy_update(mode, batch, pad_multiple=CHUNK), zero_padded)
    for module in (engine, bk):
        monkeypatch.setattr(module, "physical_chunks", chunks_with(real_rows_of_padding=True))
    assert not torch.allclose(noisy_update(mode, batch, pad_multiple=CHUNK), zero_padded, atol=1e-4)


def test_padded_rows_get_exactly_zero_per_sample_gradients_and_norms():
    # Before the rows are cut away: the backward from the real losses alone leaves nothing on padded rows, through
    # LayerNorm, depthwise convs and layer scales.
    x, y = inputs(3)
    padded = next(physical_chunks(x, y, 8, pad_multiple=8))
    result = BookKeepingModule(convnext()).per_sample(LOSS, padded.x, padded.y, padded.n_real)
    assert torch.equal(result.norms[3:], torch.zeros(5, dtype=torch.float64))
    assert all(torch.equal(v[3:], torch.zeros_like(v[3:])) for v in result.norms_sq.values())
    assert (result.norms[:3] > CLIP).all()  # every real record is clipped at CLIP in these tests
    assert len(result.clip_factors(CLIP)) == 3 and result.loss.shape == (3,)
    for mode in ("hooks", "functorch"):
        wrapped = wrap_model(convnext(), mode)
        LOSS(wrapped(padded.x), padded.y)[: padded.n_real].sum().backward()
        for name, p in wrapped._module.named_parameters():
            assert p.grad_sample.shape[0] == 8, name
            assert torch.equal(p.grad_sample[3:], torch.zeros_like(p.grad_sample[3:])), (mode, name)
            assert p.grad_sample[:3].abs().sum() > 0, (mode, name)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_bf16_each_record_moves_the_clipped_sum_by_at_most_clip_norm(mode):
    """bf16 autocast changes the gradients, not the clipping: removing any one record changes the (noise-free)
    clipped sum by at most C, and by exactly C when the record is clipped (norms and factors in float32)."""
    x, y = inputs(6)

    def clipped_sum(keep: list[int]) -> torch.Tensor:
        update = noisy_update(mode, (x[keep], y[keep]), pad_multiple=CHUNK, sigma=0.0, autocast_dtype=torch.bfloat16)
        return update.double() * 8  # p.grad = clipped sum / expected batch size 8

    everyone = clipped_sum(list(range(6)))
    fp32 = noisy_update(mode, (x, y), pad_multiple=CHUNK, sigma=0.0).double() * 8
    assert not torch.equal(everyone, fp32.to(everyone.dtype))  # bf16 did change the gradients
    for i in range(6):
        change = (everyone - clipped_sum([j for j in range(6) if j != i])).norm().item()
        assert change <= CLIP * (1 + BF16_TOLERANCE), (i, change)
        assert change == pytest.approx(CLIP, rel=BF16_TOLERANCE)  # every record is clipped (see above)


def test_bf16_per_sample_values_are_float32_before_clipping(monkeypatch):
    """Opacus takes norms of ``grad_sample`` in its own dtype: the engine hands it float32 rows."""
    seen = []
    original = engine.DPOptimizer.clip_and_accumulate

    def spy(self):
        seen.extend(g.dtype for g in self.grad_samples)
        return original(self)

    monkeypatch.setattr(engine.DPOptimizer, "clip_and_accumulate", spy)
    noisy_update("hooks", inputs(3), pad_multiple=CHUNK, autocast_dtype=torch.bfloat16)
    assert seen and set(seen) == {torch.float32}


# ----------------------------------------------------------------------------------------------------
# Trial level: the knobs leave a CPU trial's numbers unchanged


def _numbers(run) -> tuple[list, dict, dict]:
    """Everything a run released but its wall time (``system/total_train_s``, different in every run)."""
    metrics = {
        k: v
        for k, v in run.result.metrics.items()
        if not (isinstance(v, float) and math.isnan(v)) and k != M.SYSTEM_TOTAL_TRAIN_S
    }
    return run.epochs, metrics, run.result.model.state_dict()


def _assert_same_trial(a, b) -> None:
    epochs_a, metrics_a, weights_a = _numbers(a)
    epochs_b, metrics_b, weights_b = _numbers(b)
    assert metrics_a == metrics_b
    assert [e.keys() for e in epochs_a] == [e.keys() for e in epochs_b]
    for ea, eb in zip(epochs_a, epochs_b, strict=True):
        assert {k: v for k, v in ea.items() if v == v} == {k: v for k, v in eb.items() if v == v}
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    from tests.test_train import prepare_tiny_site

    return prepare_tiny_site(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("epsilon", [4.0, math.inf])
def test_data_on_device_and_fixed_shapes_leave_a_cpu_trial_bit_identical(tiny_site, epsilon):
    from tests.test_train import run_tiny_trial, tiny_trial_config

    def run(**speed):
        cfg = tiny_trial_config(
            tiny_site,
            epsilon,
            epochs=1,
            privacy_reproducible_noise=True,  # the same noise and batches in every run, to compare them
            speed=SpeedConfig(max_physical_batch_size=8, **speed),
        )
        return run_tiny_trial(cfg)

    reference = run(data_on_device="off", fixed_shapes="off")
    _assert_same_trial(run(data_on_device="on", fixed_shapes="off"), reference)
    if math.isfinite(epsilon):  # Poisson batches of ~16 in chunks of 8: most steps pad their last chunk
        padded = run(data_on_device="on", fixed_shapes="on")
        assert [e[M.STEPS] for e in padded.epochs] == [e[M.STEPS] for e in reference.epochs]
        assert padded.result.metrics[M.EPSILON] == reference.result.metrics[M.EPSILON]
        weights, reference_weights = padded.result.model.state_dict(), reference.result.model.state_dict()
        for name, value in weights.items():  # float rounding only (other chunk shapes, other kernels)
            torch.testing.assert_close(value, reference_weights[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_channels_last_model_releases_the_same_update(mode):
    """``speed.cuda_tuning`` runs the model channels-last on CUDA; the engines must give the same clipped, noisy
    update as for the contiguous model (checked on CPU, where the same code paths run; float rounding apart)."""
    x, y = inputs(6)
    contiguous = noisy_update(mode, (x, y), pad_multiple=CHUNK)
    x = x.contiguous(memory_format=torch.channels_last)
    channels_last = noisy_update(mode, (x, y), pad_multiple=CHUNK, memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-5, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync checks exist only there)")
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_cuda_private_steps_never_wait_for_the_device(mode, tiny_site):
    """Padded private steps on data held on the GPU, under ``torch.cuda.set_sync_debug_mode("error")``: any
    host-device synchronisation in the step (an ``.item()``, a pageable copy) raises. Written without a GPU in the
    session that built it: first run on a device still to come."""
    from tests.test_train import tiny_trial_config
    from trainables.data.loaders import DeviceImages, load_trial_data
    from trainables.privacy.engine import poisson_batches

    device = torch.device("cuda")
    torch.use_deterministic_algorithms(False)  # the fixture's CPU setting; not what is tested here
    data = load_trial_data(tiny_trial_config(tiny_site, 4.0, epochs=1))
    source = DeviceImages(data.train, device)
    model = convnext().to(device)
    wrapped = wrap_model(model, mode)
    optimizer = make_dp_optimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        noise_multiplier=1.0,
        max_grad_norm=CLIP,
        expected_batch_size=16,
        noise_generator=torch.Generator(device=device).manual_seed(7),
        accountant=RDPAccountant(),
        sample_rate=1 / 9,
    )
    batches = poisson_batches(len(data.train), 1 / 9, 6, torch.Generator().manual_seed(0))
    losses = []
    try:
        for step, indices in enumerate(batches):
            if step == 2:  # after warm-up (cudnn planning, lazy initialisation)
                torch.cuda.set_sync_debug_mode("error")
            losses.append(private_step(wrapped, optimizer, LOSS, source.batch(indices.numpy()), 8, pad_multiple=8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(loss.device.type == "cuda" for loss in losses)
    assert torch.isfinite(torch.stack(losses)).all()
