"""The DP-SGD engine: Opacus per-sample gradients (verified), clipping, noise, Poisson sampling, accounting.

Mechanism (one step): every training record is included independently with probability q (Poisson
sampling); each included record's gradient g_i is clipped to L2 norm <= C over all trainable parameters;
the update is ``(sum_i clip(g_i) + N(0, (sigma*C)^2 I)) / B`` with B = q*N the expected batch size, fed to
AdamW. Accounting assumes add/remove adjacency of single records (images, the privacy unit).

Why not `PrivacyEngine.make_private`: we need the sampler's RNG state in checkpoints, exact step counts
(Opacus derives steps as ``int(1/q)``, which can be off by one in floating point), virtual batches without
changing accounting, and a grad-sample module whose conv sampler is correct on ConvNeXt (see
`VerifiedGradSampleModule`). The pieces are Opacus's own: `GradSampleModule`, `DPOptimizer`,
`RDPAccountant`/`PRVAccountant`.

Per-sample clipping comes in three verified modes (`GRAD_SAMPLE_MODES`): ``bk`` (book-keeping,
`trainables.privacy.bk`: per-sample norms and the clipped sum from one backward pass, no per-sample gradient of
the whole model), ``hooks`` and ``functorch`` (Opacus per-sample gradients, clipped by Opacus' DPOptimizer). All
three clip with Opacus' factor and feed the same DPOptimizer noise and accountant hook.

Fixed shapes and precision are speed knobs (`trainables.config.SpeedConfig`): padded chunks
(`trainables.privacy.chunks`) contribute nothing, and under bf16 autocast the per-sample gradients are upcast to float32
before Opacus or book-keeping takes norms, clip factors and sums, so the mechanism is the same.

Randomness (chosen by `trainables.privacy.randomness`): by default noise and Poisson sampling come from
``torch.Generator`` streams seeded from ``os.urandom`` (secret, checkpointed). In secure mode both come from a
`trainables.privacy.secure.SecureRandom` (ChaCha20 under a fresh ``os.urandom`` key, Opacus' 4-Gaussian noise
recipe): same distributions, not reproducible.
"""

from __future__ import annotations

import copy
import math
import typing
import warnings
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants.accountant import IAccountant
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.func import functional_call, grad, vmap

from trainables.config import GradSampleMode
from trainables.privacy.bk import (
    BookKeepingModule,
    PatientRows,
    PerSampleLoss,
    clip_factors,
    clipped_sum_step,
    full_float32,
    upcast,
)
from trainables.privacy.chunks import physical_chunks
from trainables.privacy.secure import SecureRandom

GRAD_SAMPLE_MODES: tuple[str, ...] = typing.get_args(GradSampleMode)
"""Allowed per-sample-gradient modes. ``bk``: book-keeping (`trainables.privacy.bk`), the fastest. Stock Opacus
``hooks`` and ``ghost`` are wrong on timm ConvNeXt (channels-last inputs to the downsample convs); our ``hooks``
uses the corrected conv sampler below. ``ew`` fails on ConvNeXt. ``functorch`` is correct as shipped (every
module through ``torch.func``)."""

WrappedModel: TypeAlias = GradSampleModule | BookKeepingModule
"""What `wrap_model` returns: ``._module`` is the model itself in both."""


def _contiguous_conv_grad_sample(
    layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    # Opacus's unfold2d reads strides as if the input were NCHW-contiguous; timm's LayerNorm2d hands the
    # ConvNeXt downsample convs channels-last tensors, which silently yields wrong per-sample gradients.
    samples: dict[nn.Parameter, torch.Tensor] = compute_conv_grad_sample(
        layer, [a.contiguous() for a in activations], backprops
    )
    return samples


class VerifiedGradSampleModule(GradSampleModule):  # type: ignore[misc]  # Opacus ships no type hints
    """Opacus's GradSampleModule with a conv grad sampler that is correct for non-contiguous inputs.

    The sampler table is a class attribute copied from Opacus, so stock Opacus is left untouched.
    """

    GRAD_SAMPLERS = {
        **GradSampleModule.GRAD_SAMPLERS,
        nn.Conv1d: _contiguous_conv_grad_sample,
        nn.Conv2d: _contiguous_conv_grad_sample,
        nn.Conv3d: _contiguous_conv_grad_sample,
    }


class PerSampleGradientError(RuntimeError):
    """The engine's per-sample gradients disagree with the torch.func reference: training would use wrong updates
    (a rule that mixed samples, which the reference would also catch, would void the guarantee)."""


def wrap_model(model: nn.Module, grad_sample_mode: str) -> WrappedModel:
    """Wrap a model for per-sample clipping: a `BookKeepingModule` (``bk``), or a GradSampleModule whose
    backward passes also compute per-sample gradients (``p.grad_sample``).

    The GradSampleModule expects the backward of the *sum* of per-sample losses (``loss_reduction="sum"``), so
    ``grad_sample`` is each sample's own loss gradient without a 1/n scale undone later (which would round
    differently for different chunk sizes); the DPOptimizer still divides the noisy sum by the expected batch size.

    Raises:
        ValueError: unknown mode, or a model that cannot be trained privately (e.g. BatchNorm; for ``bk`` an
            `~trainables.privacy.bk.UnsupportedModuleError` naming a module it has no rule for).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} is not allowed; choose one of {GRAD_SAMPLE_MODES} "
            "(stock Opacus 'hooks'/'ghost' give wrong per-sample gradients on ConvNeXt, 'ew' fails on it)"
        )
    if grad_sample_mode == "bk":
        return BookKeepingModule(model)
    return VerifiedGradSampleModule(
        model, batch_first=True, loss_reduction="sum", strict=True, force_functorch=grad_sample_mode == "functorch"
    )


def without_hooks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every forward/backward hook removed (torch.func refuses Opacus' hooks)."""
    clean = copy.deepcopy(model)
    for module in clean.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(module, hooks).clear()
    return clean


def reference_per_sample_gradients(
    model: nn.Module, loss_fn: PerSampleLoss, x: torch.Tensor, y: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of each sample's own loss, by ``torch.func.vmap(grad(...))``: the ground truth.

    ``model`` must carry no autograd hooks (see `without_hooks`).
    """
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, (p, buffers), (xi[None],)), yi[None]).sum()

    with warnings.catch_warnings():
        # torch.func's notice that timm's adaptive pooling runs through its slow batching fallback: this reference
        # runs on a handful of samples, so speed does not matter here (exactly this message, nothing else).
        warnings.filterwarnings(
            "ignore",
            message="There is a performance drop because we have not yet implemented the batching rule",
            category=UserWarning,
        )
        gradients: dict[str, torch.Tensor] = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    return gradients


@dataclass(frozen=True)
class GradientCheck:
    """Result of comparing engine per-sample gradients with the reference on a few samples.

    Attributes:
        max_relative_error: max over samples and parameters of ||g_engine - g_ref|| / ||g_ref||.
        worst_parameter: where that maximum occurred.
        n_samples: samples checked.
        n_parameters: trainable parameter tensors checked (all of them).
    """

    max_relative_error: float
    worst_parameter: str
    n_samples: int
    n_parameters: int


def check_per_sample_gradients(
    wrapped: WrappedModel,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    tolerance: float = 1e-3,
) -> GradientCheck:
    """Verify the wrapped model's per-sample gradients against ``torch.func``; raise on any mismatch.

    Runs one forward/backward through the engine on ``x`` (a few samples, in the model's own dtype),
    compares every trainable parameter's ``grad_sample`` with the reference, then clears all
    gradients. Nothing is updated and no privacy budget is spent. For ``bk``, which never forms per-sample
    gradients, `check_book_keeping` compares what it does form: per-parameter per-sample norms and clipped sums.

    Raises:
        PerSampleGradientError: a parameter lacks per-sample gradients, or the relative error of any
            sample's gradient exceeds ``tolerance``.
    """
    if isinstance(wrapped, BookKeepingModule):
        return check_book_keeping(wrapped, loss_fn, x, y, tolerance)
    module = wrapped._module  # in train mode, as in training (Opacus captures activations only then);
    # the forward must be deterministic (no dropout, drop_path 0), which DP-SGD requires anyway. TF32 is
    # off during the check so that GPU rounding (~1e-3) cannot hide or fake a mismatch.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = reference_per_sample_gradients(without_hooks(module), loss_fn, x, y)
        wrapped.zero_grad(set_to_none=True)
        torch.autograd.backward(loss_fn(wrapped(x), y).sum())  # loss_reduction="sum" (wrap_model)
        worst, worst_name = 0.0, ""
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if getattr(p, "grad_sample", None) is None:
                raise PerSampleGradientError(f"parameter {name} gets no per-sample gradient from the engine")
            engine = p.grad_sample.reshape(len(x), -1)
            ref = reference[name].reshape(len(x), -1)
            error = ((engine - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).max().item()
            if error > worst:
                worst, worst_name = error, name
    finally:
        for p in module.parameters():
            p.grad_sample = None
            p.grad = None
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    check = GradientCheck(worst, worst_name, len(x), len(reference))
    if worst > tolerance:
        raise PerSampleGradientError(
            f"per-sample gradients are wrong: relative error {worst:.3g} > {tolerance:g} at {worst_name}; "
            "the trial would train on wrong (clipped) gradients, so it refuses to train"
        )
    return check


def _relative_error(engine: torch.Tensor, reference: torch.Tensor) -> float:
    """``||engine - reference|| / ||reference||`` in float64 (1e-12 floor), over all entries."""
    engine, reference = engine.to(torch.float64), reference.to(torch.float64)
    return float(((engine - reference).norm() / reference.norm().clamp_min(1e-12)).item())


def check_book_keeping(
    wrapped: BookKeepingModule,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    tolerance: float = 1e-3,
    groups: np.ndarray | None = None,
) -> GradientCheck:
    """Verify book-keeping against ``torch.func``: every parameter's per-record norms and clipped sums.

    Compared on ``x`` (a few records): (1) per record and parameter, the gradient norm (relative error vs the
    reference norm); (2) per parameter, the clipped sum ``sum_r c_r g_r`` at two clip norms: the median of the
    reference per-record total norms (about half the records clipped, half not; the engine's own factors vs
    the reference's) and infinity (the plain sum, which pins every per-record gradient's direction in sum).
    With ``groups`` (patient-level: each row's patient, patient-contiguous, as `BookKeepingModule.per_sample` takes
    them) the records are patients and the reference gradient of a patient is the sum of its images' ``torch.func``
    gradients, so a grouped rule that summed image norms (leaving out the cross-image terms) is caught.
    References and errors are reduced in float64 (a float32 norm over 28M entries is itself off by ~1e-3).
    The model runs in its current mode (train mode in a trial); nothing is updated and no budget is spent.

    Raises:
        PerSampleGradientError: a parameter is missing, or any relative error exceeds ``tolerance``.
    """
    module = wrapped._module
    unit = "sample" if groups is None else "patient"
    with full_float32():  # so that GPU rounding (~1e-3) can neither hide nor fake a mismatch
        reference = reference_per_sample_gradients(without_hooks(module), loss_fn, x, y)
        result = wrapped.per_sample(loss_fn, x, y, groups=groups)
        if groups is not None:  # per patient: the sums of its images' gradients
            patients = PatientRows.of(groups, x.device)
            reference = {name: patients.sum_rows(g.to(torch.float64)) for name, g in reference.items()}
        n = result.n_records
        missing = sorted(set(reference) - set(result.norms_sq))
        if missing:
            raise PerSampleGradientError(f"parameters {missing} get no per-{unit} norm from the bk engine")
        ref_norms = {name: g.reshape(n, -1).to(torch.float64).norm(dim=1) for name, g in reference.items()}
        ref_total = torch.stack(list(ref_norms.values())).pow(2).sum(0).sqrt()
        errors: dict[str, float] = {}
        for name, ref in ref_norms.items():
            engine = result.norms_sq[name].to(torch.float64).clamp_min(0).sqrt()
            errors[f"{name} (per-{unit} norm)"] = ((engine - ref).abs() / ref.clamp_min(1e-12)).max().item()
        for label, clip in (("clipped sum", ref_total.median().item()), ("sum", math.inf)):
            engine_sums = result.clipped_sums(clip_factors(result.norms, clip))
            ref_factors = clip_factors(ref_total, clip)
            for name, g in reference.items():
                ref_sum = torch.einsum("i,i...->...", ref_factors, g.to(torch.float64))
                errors[f"{name} ({label})"] = _relative_error(engine_sums[name], ref_sum)
    worst_name = max(errors, key=errors.__getitem__)
    check = GradientCheck(errors[worst_name], worst_name, n, len(reference))
    if not check.max_relative_error <= tolerance:  # NaN fails too
        raise PerSampleGradientError(
            f"book-keeping per-{unit} norms or clipped sums are wrong: relative error "
            f"{check.max_relative_error:.3g} > {tolerance:g} at {worst_name}; clipping would not bound each {unit}'s "
            "contribution, so this trial refuses to train"
        )
    return check


class SecureDPOptimizer(DPOptimizer):  # type: ignore[misc]  # Opacus ships no type hints
    """Opacus' DPOptimizer whose noise comes from a `SecureRandom` instead of a torch generator.

    ``add_noise`` is Opacus 1.6's, line for line, with ``_generate_noise(std, p.summed_grad, generator,
    secure_mode=True)`` replaced by ``noise_source.gaussian_noise(std, p.summed_grad)`` (the same recipe: one
    draw thrown away, sum of 4 N(0, std^2) draws / 2). Clipping, std = noise_multiplier * max_grad_norm, the
    division by the expected batch size (``scale_grad``), virtual steps and the accountant hook are Opacus'.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureRandom, **kwargs: Any) -> None:
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source

    def add_noise(self) -> None:
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.noise_source.gaussian_noise(
                std=self.noise_multiplier * self.max_grad_norm, reference=p.summed_grad
            )
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


class GeneratorDPOptimizer(DPOptimizer):  # type: ignore[misc]  # Opacus ships no type hints
    """Opacus' DPOptimizer with a torch generator's noise (the default and reproducible modes), drawn without
    allocating.

    Opacus 1.6's ``add_noise`` allocates, per parameter, a zero tensor it only returns when std is 0, the noise
    ``torch.normal(0, std, size, generator, dtype)`` and ``summed_grad + noise``: above glibc's mmap threshold each is
    fresh pages, faulted in and zeroed at every step (more than half of the noise's time at convnext_atto's 3.4M
    parameters on this CPU). Here each parameter's noise is drawn by the same call on the same generator in the same
    order (``normal_(0, std, generator)``, which is what ``torch.normal`` runs on a new tensor) into a buffer kept
    across steps, and added into the clipped sum in place, which becomes ``p.grad``: bit for bit Opacus'
    ``summed_grad + noise``, with the generator left in the same state (`tests.privacy.test_engine`). The buffer
    is zeroed before ``add_noise`` returns, so no noise outlives the step's own sum. Secure mode and std 0 run
    Opacus' code.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(optimizer, **kwargs)
        self._noise_buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        if self.secure_mode or std == 0:
            super().add_noise()
            return
        for p in self.params:
            summed = p.summed_grad
            _check_processed_flag(summed)
            noise = self._noise_buffer(summed)
            noise.normal_(0, std, generator=self.generator)
            p.grad = summed.add_(noise).view_as(p)
            _mark_as_processed(summed)
        for buffer in self._noise_buffers.values():
            buffer.zero_()

    def _noise_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A contiguous view shaped like ``like`` (its dtype and device) into the buffer kept across steps."""
        key = (like.dtype, like.device)
        buffer = self._noise_buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            size = max(like.numel(), *(p.numel() for p in self.params))
            buffer = self._noise_buffers[key] = torch.empty(size, dtype=like.dtype, device=like.device)
        return buffer[: like.numel()].view(like.shape)


def make_dp_optimizer(
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    noise_generator: torch.Generator | SecureRandom,
    accountant: IAccountant,
    sample_rate: float,
) -> DPOptimizer:
    """Wrap an optimizer so each step clips per-sample gradients, adds noise once per logical batch, and
    records the step (sigma, q) in the accountant.

    Args:
        noise_generator: a ``torch.Generator`` on the gradients' device (Opacus' default noise, drawn by
            `GeneratorDPOptimizer`; secretly seeded, see `trainables.privacy.randomness`), or a `SecureRandom`
            (secure mode: `SecureDPOptimizer`).
    """
    common = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )
    if isinstance(noise_generator, SecureRandom):
        dp_optimizer: DPOptimizer = SecureDPOptimizer(optimizer, noise_source=noise_generator, **common)
    else:
        dp_optimizer = GeneratorDPOptimizer(optimizer, generator=noise_generator, **common)
    dp_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp_optimizer


def poisson_batches(
    n: int, sample_rate: float, steps: int, generator: torch.Generator | SecureRandom
) -> Iterator[torch.Tensor]:
    """Indices of ``steps`` Poisson-sampled logical batches: each record in independently with prob. q.

    With a ``torch.Generator``: the same draws as Opacus's ``UniformWithReplacementSampler``
    (``torch.rand(n) < q``), but with an exact step count. With a `SecureRandom`: its
    `~SecureRandom.inclusion_mask`. Empty batches are yielded too: they still cost a noisy step and
    privacy budget.
    """
    for _ in range(steps):
        if isinstance(generator, SecureRandom):
            mask = generator.inclusion_mask(n, sample_rate)
        else:
            mask = torch.rand(n, generator=generator) < sample_rate
        yield mask.nonzero(as_tuple=False).reshape(-1)


def private_step(
    wrapped: WrappedModel,
    optimizer: DPOptimizer,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_physical_batch_size: int,
    extra_grad_samples: Mapping[str, torch.Tensor] | None = None,
    *,
    pad_multiple: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One DP-SGD step on one logical batch, split into physical chunks that fit in memory.

    Clipped per-sample gradients of all chunks are summed; noise is added and the accountant advanced
    exactly once, at the last chunk. Afterwards ``p.grad`` holds the noisy update that was applied.
    Returns the mean per-sample loss of the batch as a 0-dim tensor on the batch's device (NaN when empty):
    nothing is read back to the host, so a step never waits for the device.

    Args:
        pad_multiple: fixed shapes (``speed.fixed_shapes``): the last chunk is zero-padded to a multiple of this many
            rows, at most ``max_physical_batch_size`` (`trainables.privacy.chunks.physical_chunks`; None: no
            padding). Only the real rows' losses are back-propagated and only their per-sample gradient rows reach
            Opacus' clipping, so padding changes no norm, factor, sum or loss, and the accounting (one step at
            (sigma, q)) is unchanged.
        autocast_dtype: ``torch.bfloat16`` for ``speed.precision: bf16``: the forward (and so the backward) under
            autocast; per-sample gradients are upcast to float32 before clipping and summing (TF32 off there).
        extra_grad_samples: explicit per-sample gradient rows added to the batch (white-box audit canaries):
            parameter name (as in ``wrapped._module.named_parameters()``) -> [m, *parameter shape], every entry
            with the same m; a row is zero on parameters it does not name. Each row is clipped to
            ``max_grad_norm`` by the same norm and factor code as the real samples and added to the clipped sum
            before the (single) noise draw. They count in no loss and change no accounting: the caller accounts
            for what they stand for.
    """
    if isinstance(wrapped, BookKeepingModule):
        return book_keeping_step(
            wrapped,
            optimizer,
            loss_fn,
            batch,
            max_physical_batch_size,
            extra_grad_samples,
            pad_multiple,
            autocast_dtype,
        )
    x, y = batch
    n = len(x)
    if n == 0:
        # An empty Poisson batch still releases a noisy update; give Opacus empty per-sample gradients.
        optimizer.zero_grad(set_to_none=True)
        for p in wrapped.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        append_grad_samples(wrapped, extra_grad_samples)
        with full_float32():
            optimizer.step()
        return torch.full((), math.nan, device=x.device)
    total_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    chunks = list(physical_chunks(x, y, max_physical_batch_size, pad_multiple))
    autocast = nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, dtype=autocast_dtype)
    for i, chunk in enumerate(chunks):
        # Clears per-sample gradients; Opacus keeps the clipped sum across skipped (non-final) chunks.
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(wrapped(chunk.x), chunk.y)[: chunk.n_real]  # padded rows: exactly zero gradients
        torch.autograd.backward(loss.sum())  # loss_reduction="sum" (wrap_model)
        total_loss = total_loss + loss.detach().sum()
        real_grad_samples(wrapped, chunk.n_real)
        last = i == len(chunks) - 1
        if last:
            append_grad_samples(wrapped, extra_grad_samples)
        optimizer.signal_skip_step(do_skip=not last)
        with full_float32():  # Opacus' norms, clip factors and clipped sum (an einsum) without TF32
            optimizer.step()
    return total_loss / n


def real_grad_samples(wrapped: GradSampleModule, n_real: int) -> None:
    """Keep only the real rows of each ``p.grad_sample`` (padded rows never reach Opacus' clipping), in float32
    if autocast left them in bfloat16 (Opacus would otherwise take bf16 norms of them)."""
    for p in wrapped.parameters():
        if p.requires_grad:
            p.grad_sample = upcast(p.grad_sample[:n_real])


def append_grad_samples(wrapped: GradSampleModule, rows: Mapping[str, torch.Tensor] | None) -> None:
    """Opacus modes: explicit rows (see `private_step`) become extra per-sample gradients of every trainable
    parameter (zero rows where a parameter is not named), clipped by Opacus' clip_and_accumulate."""
    if not rows:
        return
    parameters = {name: p for name, p in wrapped._module.named_parameters() if p.requires_grad}
    unknown = sorted(set(rows) - set(parameters))
    if unknown:
        raise ValueError(f"extra_grad_samples names {unknown}, which are not trainable parameters of the model")
    counts = {len(v) for v in rows.values()}
    if len(counts) != 1:
        raise ValueError(f"extra_grad_samples must give every parameter the same number of rows, got {sorted(counts)}")
    (m,) = counts
    for name, p in parameters.items():
        extra = rows.get(name, torch.zeros((m, *p.shape), dtype=p.dtype, device=p.device))
        if tuple(extra.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"extra_grad_samples[{name!r}] has rows of shape {tuple(extra.shape[1:])}, the "
                f"parameter has {tuple(p.shape)}"
            )
        p.grad_sample = torch.cat([p.grad_sample, extra.to(p.device, p.dtype)])


def book_keeping_step(
    wrapped: BookKeepingModule,
    optimizer: DPOptimizer,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_physical_batch_size: int,
    extra_grad_samples: Mapping[str, torch.Tensor] | None = None,
    pad_multiple: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    groups: np.ndarray | None = None,
) -> torch.Tensor:
    """`private_step` for ``bk`` (and `trainables.privacy.patients.private_patient_step`, with ``groups``): the
    engine's clipped sum (all chunks, clipped with ``optimizer.max_grad_norm``; per patient when ``groups`` is given,
    `clipped_sum_step`) handed to Opacus' DPOptimizer as ``p.summed_grad``; then ``add_noise`` (std sigma*C:
    Opacus' draws, `GeneratorDPOptimizer`; `SecureDPOptimizer`'s in secure mode), ``scale_grad`` (division by the
    expected batch size), accountant hook and the wrapped optimizer's step: the same noise and accounting as the other
    modes, once per logical batch."""
    parameters = wrapped.trainable_parameters()
    if {id(p) for p in optimizer.params} != {id(p) for p in parameters.values()}:
        raise ValueError("the DP optimizer's parameters are not the wrapped model's trainable parameters")
    optimizer.zero_grad(set_to_none=True)  # first: the previous step's buffers are not held through this one
    sums, mean_loss = clipped_sum_step(
        wrapped,
        loss_fn,
        batch,
        optimizer.max_grad_norm,
        max_physical_batch_size,
        extra_grad_samples,
        pad_multiple=pad_multiple,
        autocast_dtype=autocast_dtype,
        groups=groups,
    )
    for name, p in parameters.items():
        # Opacus' per-parameter attributes (set on nn.Parameter at run time)
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # type: ignore[attr-defined]
        p.summed_grad = sums[name]  # type: ignore[attr-defined]
    # DPOptimizer.pre_step without clip_and_accumulate (which would add the zero rows' empty sum to each
    # summed_grad: two passes over the parameters for nothing) and without virtual-step skipping (the chunks are
    # already summed): noise, division by the expected batch size, the accountant hook, the step.
    optimizer.add_noise()
    optimizer.scale_grad()
    if optimizer.step_hook:
        optimizer.step_hook(optimizer)
    optimizer.original_optimizer.step()
    return mean_loss
