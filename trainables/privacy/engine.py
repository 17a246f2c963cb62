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

Randomness (chosen by `trainables.privacy.randomness`): by default noise and Poisson sampling come from
``torch.Generator`` streams seeded from ``os.urandom`` (secret, checkpointed). In secure mode both come from a
`trainables.privacy.secure.SecureRandom` (ChaCha20 under a fresh ``os.urandom`` key, Opacus' 4-Gaussian noise
recipe): same distributions, not reproducible.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.accountants.accountant import IAccountant
from opacus.grad_sample.conv import compute_conv_grad_sample
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn
from torch.func import functional_call, grad, vmap

from trainables.config import GradSampleMode
from trainables.privacy.secure import SecureRandom

GRAD_SAMPLE_MODES: tuple[str, ...] = typing.get_args(GradSampleMode)
"""Allowed per-sample-gradient modes. Stock Opacus ``hooks`` and ``ghost`` are wrong on timm ConvNeXt
(channels-last inputs to the downsample convs); our ``hooks`` uses the corrected conv sampler below.
``ew`` fails on ConvNeXt. ``functorch`` is correct as shipped (every module through ``torch.func``)."""

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [n, k], targets [n, k]) -> per-sample loss [n]."""


def _contiguous_conv_grad_sample(layer: nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor):
    # Opacus's unfold2d reads strides as if the input were NCHW-contiguous; timm's LayerNorm2d hands the
    # ConvNeXt downsample convs channels-last tensors, which silently yields wrong per-sample gradients.
    return compute_conv_grad_sample(layer, [a.contiguous() for a in activations], backprops)


class VerifiedGradSampleModule(GradSampleModule):
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


def wrap_model(model: nn.Module, grad_sample_mode: str) -> GradSampleModule:
    """Wrap a model so that backward passes also compute per-sample gradients (``p.grad_sample``).

    Raises:
        ValueError: unknown mode, or a model that cannot be trained privately (e.g. BatchNorm).
    """
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={grad_sample_mode!r} is not allowed; choose one of {GRAD_SAMPLE_MODES} "
            "(stock Opacus 'hooks'/'ghost' give wrong per-sample gradients on ConvNeXt, 'ew' fails on it)"
        )
    return VerifiedGradSampleModule(
        model, batch_first=True, loss_reduction="mean", strict=True, force_functorch=grad_sample_mode == "functorch"
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

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


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
    wrapped: GradSampleModule,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    tolerance: float = 1e-3,
) -> GradientCheck:
    """Verify the wrapped model's per-sample gradients against ``torch.func``; raise on any mismatch.

    Runs one forward/backward through the engine on ``x`` (a few samples, in the model's own dtype),
    compares every trainable parameter's ``grad_sample`` with the reference, then clears all
    gradients. Nothing is updated and no privacy budget is spent.

    Raises:
        PerSampleGradientError: a parameter lacks per-sample gradients, or the relative error of any
            sample's gradient exceeds ``tolerance``.
    """
    module = wrapped._module  # in train mode, as in training (Opacus captures activations only then);
    # the forward must be deterministic (no dropout, drop_path 0), which DP-SGD requires anyway. TF32 is
    # off during the check so that GPU rounding (~1e-3) cannot hide or fake a mismatch.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        reference = reference_per_sample_gradients(without_hooks(module), loss_fn, x, y)
        wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped(x), y).mean().backward()
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


class SecureDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose noise comes from a `SecureRandom` instead of a torch generator.

    ``add_noise`` is Opacus 1.6's, line for line, with ``_generate_noise(std, p.summed_grad, generator,
    secure_mode=True)`` replaced by ``noise_source.gaussian_noise(std, p.summed_grad)`` (the same recipe: one
    draw thrown away, sum of 4 N(0, std^2) draws / 2). Clipping, std = noise_multiplier * max_grad_norm, the
    division by the expected batch size (``scale_grad``), virtual steps and the accountant hook are Opacus'.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureRandom, **kwargs):
        super().__init__(optimizer, generator=None, secure_mode=True, **kwargs)
        self.noise_source = noise_source

    def add_noise(self):
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = self.noise_source.gaussian_noise(std=self.noise_multiplier * self.max_grad_norm,
                                                     reference=p.summed_grad)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)


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
        noise_generator: a ``torch.Generator`` on the gradients' device (Opacus' default noise; secretly
            seeded, see `trainables.privacy.randomness`), or a `SecureRandom` (secure mode: `SecureDPOptimizer`).
    """
    common = dict(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  expected_batch_size=expected_batch_size, loss_reduction="mean")
    if isinstance(noise_generator, SecureRandom):
        dp_optimizer: DPOptimizer = SecureDPOptimizer(optimizer, noise_source=noise_generator, **common)
    else:
        dp_optimizer = DPOptimizer(optimizer, generator=noise_generator, **common)
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
    wrapped: GradSampleModule,
    optimizer: DPOptimizer,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_physical_batch_size: int,
    extra_grad_samples: dict[str, torch.Tensor] | None = None,
) -> float:
    """One DP-SGD step on one logical batch, split into physical chunks that fit in memory.

    Clipped per-sample gradients of all chunks are summed; noise is added and the accountant advanced
    exactly once, at the last chunk. Afterwards ``p.grad`` holds the noisy update that was applied.
    Returns the mean per-sample loss of the batch (NaN when empty).

    Args:
        extra_grad_samples: per-sample gradient rows of records that are not model inputs (the empirical
            audit's white-box canaries, `trainables.privacy.audit`): parameter name (as in the unwrapped
            model's ``named_parameters()``) -> ``[k, *shape]``, the same k for every name; trainable
            parameters not named get zero rows. They are appended to the last chunk's ``grad_sample``
            after its backward, so the optimizer clips each of the k rows (L2 over all parameters) and
            noises their sum with the same code as real samples. They count as k more records of the batch.
    """
    x, y = batch
    n = len(x)
    if n == 0:
        # An empty Poisson batch still releases a noisy update; give Opacus empty per-sample gradients.
        optimizer.zero_grad(set_to_none=True)
        for p in wrapped.parameters():
            if p.requires_grad:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        if extra_grad_samples is not None:
            _append_grad_samples(wrapped, extra_grad_samples)
        optimizer.step()
        return float("nan")
    total_loss = 0.0
    starts = range(0, n, max_physical_batch_size)
    for i, start in enumerate(starts):
        # Clears per-sample gradients; Opacus keeps the clipped sum across skipped (non-final) chunks.
        optimizer.zero_grad(set_to_none=True)
        xb, yb = x[start : start + max_physical_batch_size], y[start : start + max_physical_batch_size]
        loss = loss_fn(wrapped(xb), yb)
        loss.mean().backward()
        total_loss += loss.detach().sum().item()
        if extra_grad_samples is not None and i == len(starts) - 1:
            _append_grad_samples(wrapped, extra_grad_samples)
        optimizer.signal_skip_step(do_skip=i < len(starts) - 1)
        optimizer.step()
    return total_loss / n


def _append_grad_samples(wrapped: nn.Module, extra: dict[str, torch.Tensor]) -> None:
    """Append ``extra``'s rows (see `private_step`) to every trainable parameter's ``grad_sample``."""
    module = getattr(wrapped, "_module", wrapped)
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    unknown = sorted(set(extra) - set(params))
    if unknown:
        raise ValueError(f"extra_grad_samples names {unknown}, which are not trainable parameters of the model")
    counts = {len(rows) for rows in extra.values()}
    if len(counts) > 1:
        raise ValueError(f"extra_grad_samples must give every parameter the same number of rows, got {sorted(counts)}")
    k = counts.pop() if counts else 0
    for name, p in params.items():
        rows = extra.get(name)
        if rows is None:
            rows = torch.zeros((k, *p.shape), dtype=p.grad_sample.dtype, device=p.grad_sample.device)
        elif tuple(rows.shape[1:]) != tuple(p.shape):
            raise ValueError(f"extra_grad_samples[{name!r}] has rows of shape {tuple(rows.shape[1:])}, "
                             f"the parameter has {tuple(p.shape)}")
        p.grad_sample = torch.cat([p.grad_sample, rows.to(p.grad_sample)], dim=0)
