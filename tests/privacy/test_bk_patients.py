"""Book-keeping (bk) with patients as the records (issue 24): each patient's *summed* gradient normed per layer
(instantiated per-image gradients summed per patient; group ghost norms with the cross-image terms), one clip factor
per patient, each image's contribution scaled by it. Against sums of ``torch.func`` per-image gradients on every
parameter; sensitivity per patient; the grouped self-check catching a rule that sums image norms; one-image patients
equal to image-level bk bit for bit; equality with functorch (a step and a whole trial); fixed shapes and bf16.

Tolerances: float64 <= 1e-12 relative (seen ~1e-14), float32 <= 1e-5 (seen ~1e-6)."""

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

import trainables.privacy.bk as bk
import trainables.privacy.patients as patients_module
from tests.privacy.bk_models import LOSS, MixedLayers, convnext, inputs
from trainables import names as M
from trainables.privacy.bk import BookKeepingModule, PatientRows, clip_factors, clipped_sum_step
from trainables.privacy.chunks import PhysicalChunk, patient_physical_chunks
from trainables.privacy.engine import (
    GRAD_SAMPLE_MODES,
    PerSampleGradientError,
    check_per_sample_gradients,
    make_dp_optimizer,
    private_step,
    reference_per_sample_gradients,
    wrap_model,
)
from trainables.privacy.patients import check_patient_gradients, private_patient_step

F64_TOLERANCE, F32_TOLERANCE = 1e-12, 1e-5
ONE_TO_THREE = np.array([0, 0, 0, 1, 2, 2])  # patients of 3, 1 and 2 images, patient-contiguous
UP_TO_TEN = np.array([0] * 10 + [1, 1, 2])  # a patient of 10 images beside patients of 2 and 1
CLIP = 0.01  # every patient's (and image's) gradient of these inputs is far above it


def reference_per_patient(model, x, y, groups) -> dict[str, torch.Tensor]:
    """Per patient, the sum of its images' torch.func gradients (float64), patients in order of appearance."""
    per_image = reference_per_sample_gradients(model, LOSS, x, y)
    rows = [np.flatnonzero(groups == label) for label in dict.fromkeys(groups.tolist())]
    return {name: torch.stack([g[r].to(torch.float64).sum(0) for r in rows]) for name, g in per_image.items()}


def relative(engine: torch.Tensor, reference: torch.Tensor) -> float:
    return float((engine.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize(
    ("name", "dtype", "tolerance", "groups"),
    [
        ("test_convnext", torch.float64, F64_TOLERANCE, ONE_TO_THREE),
        ("test_convnext", torch.float32, F32_TOLERANCE, ONE_TO_THREE),
        ("convnext_atto", torch.float64, F64_TOLERANCE, ONE_TO_THREE),  # conv_mlp: 1x1 convs, LayerNorm2d in blocks
        ("convnext_atto", torch.float32, F32_TOLERANCE, ONE_TO_THREE),
        ("test_convnext", torch.float64, F64_TOLERANCE, UP_TO_TEN),
        ("test_convnext", torch.float32, F32_TOLERANCE, UP_TO_TEN),
    ],
)
def test_per_patient_norms_and_clipped_sums_equal_torch_func_sums(name, dtype, tolerance, groups):
    x, y = inputs(len(groups), dtype=dtype)
    reference = reference_per_patient(convnext(name, dtype), x, y, groups)
    result = BookKeepingModule(convnext(name, dtype)).per_sample(LOSS, x, y, groups=groups)
    n = len(np.unique(groups))
    assert result.n_records == n and result.norms.shape == (n,)
    assert set(result.norms_sq) == set(reference)
    assert any(layer.ghost for layer in result._layers) and any(layer.instantiated for layer in result._layers)
    norms = {param: g.reshape(n, -1).norm(dim=1) for param, g in reference.items()}
    for param, expected in norms.items():
        engine = result.norms_sq[param].double().sqrt()
        assert ((engine - expected).abs() / expected).max().item() <= tolerance, param
    total = torch.stack(list(norms.values())).pow(2).sum(0).sqrt()
    assert ((result.norms - total).abs() / total).max().item() <= tolerance
    clip = total.median().item()  # one patient clipped, one not (and the median itself at ~1)
    factors = clip_factors(total, clip)
    sums = result.clipped_sums(result.clip_factors(clip))
    for param, g in reference.items():
        assert relative(sums[param], torch.einsum("p,p...->...", factors, g)) <= tolerance, param


@pytest.mark.parametrize("choice", ["cost model", "all ghost", "all instantiated", "all ghost, blocks of 5"])
def test_ghost_and_instantiated_branches_give_the_same_patient_numbers(monkeypatch, choice):
    # Every other layer shape (grouped, strided, dilated convs; Linear on 4-D and 2-D inputs), forced to either branch
    if choice != "cost model":
        monkeypatch.setattr(bk, "prefers_ghost_norm", lambda *shape: choice.startswith("all ghost"))
    if choice.endswith("blocks of 5"):  # the images' own ghost norms in uneven position blocks
        monkeypatch.setattr(bk, "GHOST_BLOCK_POSITIONS", 5)
    torch.manual_seed(0)
    wrapped = wrap_model(MixedLayers().double(), "bk")
    x, y = inputs(6, 12, torch.float64, channels=2)
    check = check_patient_gradients(wrapped, LOSS, x, y, ONE_TO_THREE)
    assert check.max_relative_error < F64_TOLERANCE and check.n_samples == 3, check


def test_the_cost_model_counts_a_patients_images_as_positions():
    x, y = inputs(11)
    wrapped = BookKeepingModule(convnext())
    ghost = {
        k: {p for layer in wrapped.per_sample(LOSS, x, y, groups=groups)._layers for p in layer.ghost}
        for k, groups in ((1, np.arange(11)), (10, np.array([0] * 10 + [1])))
    }
    # stage 1 of test_convnext at 32 px (T = 8 x 8 positions) is ghosted for images, instantiated for k = 10
    assert "stages.1.blocks.0.mlp.fc1.weight" in ghost[1] - ghost[10]
    assert ghost[10] < ghost[1] and "stages.3.blocks.0.mlp.fc1.weight" in ghost[10]


def test_patient_rows_pair_every_two_images_of_a_patient_once():
    rows = PatientRows.of(np.array([7, 7, 7, 2, 5, 5]), torch.device("cpu"))
    assert rows.of_row.tolist() == [0, 0, 0, 1, 2, 2] and (rows.n_patients, rows.largest) == (3, 3)
    pairs = [
        (pairs.lo + i, pairs.lo + i + pairs.offset, patient)
        for pairs in rows.offsets
        for i, patient in zip(pairs.first.tolist(), pairs.patient.tolist(), strict=True)
    ]
    assert sorted(pairs) == [(0, 1, 0), (0, 2, 0), (1, 2, 0), (4, 5, 2)]
    assert all(pairs.lo + pairs.first.max() < pairs.hi for pairs in rows.offsets)
    assert rows.sum_rows(torch.arange(8.0)).tolist() == [3.0, 3.0, 9.0]  # rows after the real six are ignored


# ----------------------------------------------------------------------------------------------------
# One-image patients are image-level records; the self-check catches grouped rules that sum image norms


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def _optimizer(model, sigma: float = 0.0, expected_batch: int = 1, clip: float = CLIP):
    return make_dp_optimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=expected_batch,
        noise_generator=torch.Generator().manual_seed(7),
        accountant=RDPAccountant(),
        sample_rate=0.1,
    )


def _update(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_one_image_patients_are_the_image_level_records_bit_for_bit(deterministic):
    x, y = inputs(7)
    wrapped = BookKeepingModule(convnext())
    images = wrapped.per_sample(LOSS, x, y)
    singletons = wrapped.per_sample(LOSS, x, y, groups=np.arange(7))
    assert torch.equal(singletons.norms, images.norms)
    assert all(torch.equal(singletons.norms_sq[p], images.norms_sq[p]) for p in images.norms_sq)
    clip = images.norms.median().item()
    image_sums = images.clipped_sums(images.clip_factors(clip))
    assert all(torch.equal(v, image_sums[p]) for p, v in singletons.clipped_sums(singletons.clip_factors(clip)).items())
    updates = {}
    for unit in ("image", "patient"):  # a whole noisy step, in chunks of 3 (the last one padded)
        model = convnext()
        wrapped, optimizer = wrap_model(model, "bk"), _optimizer(model, sigma=0.5, expected_batch=7)
        if unit == "image":
            private_step(wrapped, optimizer, LOSS, (x, y), 3, pad_multiple=3)
        else:
            private_patient_step(wrapped, optimizer, LOSS, (x, y), np.arange(7), 3, pad_multiple=3)
        updates[unit] = _update(model)
    assert torch.equal(updates["patient"], updates["image"])


def test_self_check_catches_group_ghost_norms_taken_as_sums_of_image_norms(monkeypatch):
    x, y = inputs(len(ONE_TO_THREE))
    wrapped = wrap_model(convnext(), "bk")
    monkeypatch.setattr(
        bk, "patient_ghost_norm_sq", lambda image_norms_sq, a, g, patients: patients.sum_rows(image_norms_sq)
    )
    check_per_sample_gradients(wrapped, LOSS, x, y)  # the image rows never group: only the grouped check can see it
    with pytest.raises(PerSampleGradientError, match=r"per-patient norms .* \(per-patient norm\)"):
        check_patient_gradients(wrapped, LOSS, x, y, ONE_TO_THREE)


@pytest.mark.parametrize("layer", ["stages.0.blocks.0.conv_dw.weight", "stages.1.blocks.0.mlp.fc1.weight"])
def test_self_check_catches_one_layer_grouped_by_summing_image_norms(monkeypatch, layer):
    # One layer's grouped rule broken: a depthwise conv (always instantiated), an MLP weight (instantiated at k = 3)
    original = bk.LayerGrads.by_patient

    def broken(self, patients):
        grouped = original(self, patients)
        if layer in grouped.norms_sq:
            grouped.norms_sq[layer] = patients.sum_rows(self.norms_sq[layer])  # the cross-image terms left out
        return grouped

    monkeypatch.setattr(bk.LayerGrads, "by_patient", broken)
    x, y = inputs(len(ONE_TO_THREE))
    with pytest.raises(PerSampleGradientError, match=rf"at {layer} \(per-patient norm\)"):
        check_patient_gradients(wrap_model(convnext(), "bk"), LOSS, x, y, ONE_TO_THREE)


# ----------------------------------------------------------------------------------------------------
# Sensitivity: one patient moves the noise-free clipped sum by min(||G_p||, C)


@pytest.mark.parametrize("physical", [6, 3])  # one chunk; chunks of whole patients
def test_removing_a_patient_moves_the_noise_free_sum_by_its_clipped_norm(physical):
    x, y = inputs(len(ONE_TO_THREE))
    reference = reference_per_patient(convnext(), x, y, ONE_TO_THREE)
    norms = torch.stack([g.reshape(3, -1).norm(dim=1) for g in reference.values()]).pow(2).sum(0).sqrt()
    clip = norms.median().item() * 1.01  # the largest patient clipped to C, the other two below it
    assert (norms > clip).sum() == 1 and (norms < clip).sum() == 2
    wrapped = wrap_model(convnext(), "bk")

    def clipped_sum(keep: np.ndarray) -> torch.Tensor:
        groups = np.unique(ONE_TO_THREE[keep], return_inverse=True)[1]
        sums, _ = clipped_sum_step(wrapped, LOSS, (x[keep], y[keep]), clip, physical, groups=groups)
        return torch.cat([s.reshape(-1) for s in sums.values()]).double()

    everyone = clipped_sum(np.ones(len(ONE_TO_THREE), bool))
    for patient in range(3):
        change = (everyone - clipped_sum(ONE_TO_THREE != patient)).norm().item()
        assert change <= clip * (1 + F32_TOLERANCE)
        assert change == pytest.approx(min(norms[patient].item(), clip), rel=F32_TOLERANCE)


@pytest.mark.parametrize("physical", [1, 3, 6])
def test_bk_patient_step_equals_functorch_patient_step_with_the_same_noise(physical):
    groups = np.array([0, 1, 1, 2, 2, 2, 3]) if physical >= 3 else np.arange(7)  # chunks hold whole patients
    x, y = inputs(7)
    updates, losses = {}, {}
    for mode in ("functorch", "bk"):
        model = convnext()
        optimizer = _optimizer(model, sigma=0.3, expected_batch=4, clip=0.05)
        loss = private_patient_step(wrap_model(model, mode), optimizer, LOSS, (x, y), groups, physical)
        updates[mode], losses[mode] = _update(model), float(loss)
    torch.testing.assert_close(updates["bk"], updates["functorch"], rtol=0, atol=1e-6)
    assert losses["bk"] == pytest.approx(losses["functorch"], rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# Fixed shapes and bf16, every mode

CHUNK = 4


def _noisy_patient_update(mode, batch, groups, *, pad_multiple, sigma=0.5, autocast_dtype=None) -> torch.Tensor:
    model = convnext()
    optimizer = _optimizer(model, sigma=sigma, expected_batch=8)
    loss = private_patient_step(
        wrap_model(model, mode),
        optimizer,
        LOSS,
        batch,
        groups,
        CHUNK,
        pad_multiple=pad_multiple,
        autocast_dtype=autocast_dtype,
    )
    assert loss.dim() == 0 and loss.device == batch[0].device
    return _update(model)


def test_patient_chunks_are_padded_each_with_the_patients_of_their_real_rows():
    groups = np.array([0, 0, 0, 1, 2, 2, 3])
    x, y = inputs(7)
    chunks = list(patient_physical_chunks(x, y, groups, CHUNK, pad_multiple=CHUNK))
    assert [(len(c.x), c.n_real, g.tolist()) for c, g in chunks] == [(4, 4, [0, 0, 0, 1]), (4, 3, [2, 2, 3])]
    assert torch.equal(torch.cat([c.x[: c.n_real] for c, _ in chunks]), x)
    assert not chunks[1][0].x[3:].any() and not chunks[1][0].y[3:].any()
    # every chunk is cut between patients, so any of them may be short and padded (granule 3, at most the chunk size)
    two_chunks = patient_physical_chunks(x[:6], y[:6], np.array([0, 0, 1, 1, 1, 2]), CHUNK, 3)
    assert [(len(c.x), c.n_real) for c, _ in two_chunks] == [(3, 2), (4, 4)]
    with pytest.raises(ValueError, match="patient entries"):
        next(patient_physical_chunks(x, y, groups[:5], CHUNK))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_padded_patient_step_releases_the_unpadded_update(mode, deterministic):
    groups = np.array([0, 0, 0, 1, 2, 2, 3])  # chunks of 4 and 3 images: the second padded
    batch = inputs(7)
    unpadded = _noisy_patient_update(mode, batch, groups, pad_multiple=None)
    padded = _noisy_patient_update(mode, batch, groups, pad_multiple=CHUNK)
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-8)  # other chunk shapes, other kernels
    whole = np.array([0, 0, 0, 1, 2, 2, 3, 3])  # two full chunks: nothing to pad, bit for bit
    assert torch.equal(
        _noisy_patient_update(mode, inputs(8), whole, pad_multiple=CHUNK),
        _noisy_patient_update(mode, inputs(8), whole, pad_multiple=None),
    )


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_padding_content_cannot_leak_into_a_patient_update(mode, monkeypatch, deterministic):
    """Pad rows of large values give the same update bit for bit; the same row counted as a one-image patient moves
    it by its clipped contribution, C / B (so the comparison would see a leak)."""
    groups, batch = np.array([0, 0, 0, 1, 2, 2, 3]), inputs(7)
    zero_padded = _noisy_patient_update(mode, batch, groups, pad_multiple=CHUNK)
    garbage = torch.Generator().manual_seed(3)
    original = patient_physical_chunks

    def chunks_with(pad_rows_are_patients: bool):
        def chunks(x, y, groups, size, pad_multiple):
            for chunk, chunk_groups in original(x, y, groups, size, pad_multiple):
                k = chunk.n_real
                xb, yb = chunk.x.clone(), chunk.y.clone()
                xb[k:] = 50.0 * torch.randn(xb[k:].shape, generator=garbage)
                yb[k:] = 1.0
                if pad_rows_are_patients:
                    extra = np.arange(len(xb) - k) + chunk_groups.max() + 1
                    yield PhysicalChunk(xb, yb, len(xb)), np.r_[chunk_groups, extra]
                else:
                    yield PhysicalChunk(xb, yb, k), chunk_groups

        return chunks

    for module in (bk, patients_module):
        monkeypatch.setattr(module, "patient_physical_chunks", chunks_with(pad_rows_are_patients=False))
    assert torch.equal(_noisy_patient_update(mode, batch, groups, pad_multiple=CHUNK), zero_padded)
    for module in (bk, patients_module):
        monkeypatch.setattr(module, "patient_physical_chunks", chunks_with(pad_rows_are_patients=True))
    leaked = _noisy_patient_update(mode, batch, groups, pad_multiple=CHUNK)
    assert (leaked - zero_padded).norm().item() == pytest.approx(CLIP / 8, rel=1e-3)  # one pad row, clipped to C


def test_padded_rows_belong_to_no_patient():
    x, y = inputs(5)
    chunk, groups = next(patient_physical_chunks(x, y, np.array([0, 0, 0, 1, 1]), 8, pad_multiple=8))
    result = BookKeepingModule(convnext()).per_sample(LOSS, chunk.x, chunk.y, chunk.n_real, groups=groups)
    unpadded = BookKeepingModule(convnext()).per_sample(LOSS, x, y, groups=groups)
    assert len(chunk.x) == 8 and result.n_records == 2 and result.norms.shape == (2,)
    torch.testing.assert_close(result.norms, unpadded.norms, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="5 real rows"):
        BookKeepingModule(convnext()).per_sample(LOSS, chunk.x, chunk.y, chunk.n_real, groups=groups[:3])


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_bf16_each_patient_moves_the_clipped_sum_by_at_most_clip_norm(mode):
    groups, (x, y) = ONE_TO_THREE, inputs(len(ONE_TO_THREE))

    def clipped_sum(keep: np.ndarray) -> torch.Tensor:
        kept = np.unique(groups[keep], return_inverse=True)[1]
        update = _noisy_patient_update(
            mode, (x[keep], y[keep]), kept, pad_multiple=CHUNK, sigma=0.0, autocast_dtype=torch.bfloat16
        )
        return update.double() * 8  # p.grad = clipped sum / expected batch size 8

    everyone = clipped_sum(np.ones(len(groups), bool))
    fp32 = _noisy_patient_update(mode, (x, y), groups, pad_multiple=CHUNK, sigma=0.0).double() * 8
    assert not torch.equal(everyone, fp32)  # bf16 did change the gradients
    for patient in range(3):
        change = (everyone - clipped_sum(groups != patient)).norm().item()
        assert change <= CLIP * (1 + F32_TOLERANCE), (patient, change)
        assert change == pytest.approx(CLIP, rel=F32_TOLERANCE)  # every patient is clipped at CLIP


# ----------------------------------------------------------------------------------------------------
# A whole patient-level trial: bk equals functorch


def _patient_trial(site, mode: str, **speed):
    from tests.factories import tiny_trial_config

    return tiny_trial_config(
        site,
        4.0,
        epochs=1,
        reproducible_noise=True,  # both modes draw the same batches and noise, to be compared
        grad_sample_mode=mode,
        max_physical_batch_size=8,
        privacy_unit="patient",
        max_images_per_patient=3,
        expected_batch_size=8,
        **speed,
    )


def test_patient_level_trial_in_bk_equals_functorch(tiny_site):
    from tests.factories import run_tiny_trial

    runs = {mode: run_tiny_trial(_patient_trial(tiny_site, mode)) for mode in ("bk", "functorch")}
    bk_epochs, ft_epochs = runs["bk"].epochs, runs["functorch"].epochs
    assert [e[M.STEPS] for e in bk_epochs] == [e[M.STEPS] for e in ft_epochs]
    assert [e[M.EPSILON] for e in bk_epochs] == [e[M.EPSILON] for e in ft_epochs]
    assert bk_epochs[-1][M.VAL_AUROC_MACRO] == pytest.approx(ft_epochs[-1][M.VAL_AUROC_MACRO], abs=1e-4)
    bk_weights, ft_weights = runs["bk"].result.model.state_dict(), runs["functorch"].result.model.state_dict()
    for name, value in bk_weights.items():
        torch.testing.assert_close(value, ft_weights[name], rtol=1e-4, atol=1e-5)
    padded = run_tiny_trial(_patient_trial(tiny_site, "bk", fixed_shapes="on", pad_multiple=8))
    assert padded.result.metrics[M.EPSILON] == runs["bk"].result.metrics[M.EPSILON]
    for name, value in padded.result.model.state_dict().items():  # float rounding only (other chunk shapes)
        torch.testing.assert_close(value, bk_weights[name], rtol=1e-5, atol=1e-6)
