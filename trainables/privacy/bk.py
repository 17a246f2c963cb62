"""Book-keeping (bk) per-sample clipping: DP-SGD's clipped sum from one backward pass, no per-sample gradient
of the whole model ever built.

Mechanism (the same as every other mode, see `trainables.privacy.engine`): each sample's gradient g_i over all
trainable parameters is clipped with Opacus' factor ``c_i = min(1, C / (||g_i|| + 1e-6))`` and the released
update is ``(sum_i c_i g_i + N(0, (sigma C)^2 I)) / B``. Only how ``||g_i||`` and ``sum_i c_i g_i`` are computed
differs (Bu et al. 2023, "Differentially private optimization on large model at small cost"):

1. One forward pass; hooks keep each layer's input activations ``a`` (a view of what autograd saves anyway).
2. One backward pass of ``sum_i loss_i`` that computes input gradients only (``torch.autograd.grad`` with
   respect to the model input, so no parameter gradient is formed); a hook on each layer's output receives the
   output gradient ``g``. For a layer ``y = a W^T`` over T positions (pixels, tokens) the per-sample weight
   gradient is ``G_i = g_i^T a_i`` ([d_out, d_in]); its squared norm is computed either by
   - **instantiating** G_i (cost B T d_in d_out, the same work as the layer's ordinary weight gradient; G kept
     for step 4, ``a`` and ``g`` dropped), or by the
   - **ghost norm** ``||G_i||^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` (cost B T^2 (d_in + d_out); ``a`` and ``g``
     kept for step 4),
   chosen per layer by `prefers_ghost_norm` (the cost model below). Depthwise/grouped convolutions, norms,
   layer scales and biases have few values per sample and are always instantiated.
3. Per-sample total norms (summed in float64 over all parameters) and the clip factors c_i.
4. Each layer's clipped sum: ``sum_i c_i G_i`` from the stored G, or ``(c * g)^T a`` over all samples and
   positions for ghost layers (one matmul, the layer's ordinary weight-gradient cost). No second backward.

Cost model (`prefers_ghost_norm`): instantiate iff ``d_in d_out <= T (d_in + d_out)``, i.e. iff the per-sample
gradients are no larger than the activations and output gradients a ghost layer would have to keep. Then
instantiating is also the cheaper in time (the ghost norm would add B T^2 (d_in+d_out) >= B T d_in d_out work);
otherwise the ghost norm adds less than one weight-gradient's work and stores nothing of size d_in d_out. The
rule therefore bounds both the extra time (one weight gradient per layer at most) and the extra memory (the
layer's own activations) and never changes results beyond float rounding: both branches compute the same
norm. Grouped (depthwise) convolutions get exact per-sample weight gradients from grouped convolution forwards
with the output gradients as kernels, one per sample or one for the batch (`_grouped_conv_per_sample`).

Precision: the per-sample work of steps 2-4 always runs in float32 (or the model's float64) with TF32 off
(`full_float32`), whatever the model's forward and backward ran in: under ``speed.precision: bf16`` the stored ``a``
and ``g`` are upcast before norms are taken, so the norms, clip factors and clipped sums are float32 computations
on the same values, and each sample's clipped contribution has norm <= C up to float32 rounding, as in fp32 mode.

Padding (``speed.fixed_shapes``, `trainables.privacy.chunks`): only a chunk's first ``n_real`` rows are records; the
backward starts from their losses only (a padded row's output gradients are exactly zero), and clip factors and
clipped sums are taken over those rows only.

Patients (``privacy.privacy_unit: patient``, `trainables.privacy.patients`): the record is a patient p with images
I_p, its gradient the sum ``G_p = sum_{i in I_p} G_i`` and its factor ``c_p = min(1, C / (||G_p|| + 1e-6))``. Given
each real row's patient (`PatientRows`; a chunk holds whole patients), every layer's contribution is regrouped
right after its rule (`LayerGrads.by_patient`): instantiated per-image gradients are summed per patient before the
norm; a ghost layer's norm is the **group ghost norm** ``||G_p||^2 = sum_{(i,t),(j,s) in I_p x T} (a_{i,t} .
a_{j,s})(g_{i,t} . g_{j,s})``, the images' own ghost norms plus the cross-image terms (`patient_ghost_norm_sq`), not
a sum of image norms. Totals and factors are per patient; the clipped sum of a ghost layer scales each image's rows
by its patient's factor, ``sum_p c_p G_p = sum_i c_{p(i)} G_i``. The cost model sees a patient of k images as k T
positions: with k the chunk's largest patient it decides on ``k T`` (with the cross terms, computed per row distance
1..k-1 over spans of up to B rows, a ghost norm costs up to k times the image-level one, as a ghost norm over k T
positions would; instantiated gradients shrink to one per patient). Padding rows belong to no patient
and contribute nothing. A chunk of one-image patients computes exactly what the image-level path does.

Coverage: every trainable parameter must belong to a module with a rule in `RULES` (matched by exact type,
as a subclass may change the forward), or be a timm ConvNeXt block's layer scale ``gamma``
(`ConvNeXtLayerScaleRule`). Anything else is an `UnsupportedModuleError` naming the module: no parameter is
ever frozen or skipped silently. Every trial also checks this engine's per-sample norms and clipped sums
against ``torch.func`` before training (`trainables.privacy.engine.check_per_sample_gradients`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers.norm import LayerNorm as TimmLayerNorm
from timm.layers.norm import LayerNorm2d as TimmLayerNorm2d
from timm.models.convnext import ConvNeXtBlock
from torch import nn
from torch.utils.hooks import RemovableHandle

from trainables.privacy.chunks import PhysicalChunk, patient_physical_chunks, physical_chunks

CLIP_EPSILON = 1e-6
"""Opacus' clip factor ``min(1, C / (norm + 1e-6))``: the same constant, so bk equals the other modes."""

PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(logits [n, k], targets [n, k]) -> per-sample loss [n]."""


class UnsupportedModuleError(ValueError):
    """A module with trainable parameters that the book-keeping engine has no rule for."""


@contextmanager
def full_float32() -> Iterator[None]:
    """TF32 off for matmuls and cuDNN convolutions inside the block (CUDA; a no-op for CPU kernels), restored after.

    Per-sample norms and clipped sums run inside it: with TF32 a ghost norm and its layer's clipped sum would be two
    computations rounded to 10-bit mantissas, and their disagreement (~1e-3) would loosen the bound ``||c_i g_i||
    <= C``. The flags are process-wide and read when a kernel is launched; hooks run on the autograd thread between
    launches, so only the kernels inside the block see them off.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a 16-bit float (bf16 autocast), else ``t`` itself (float32 and float64 kept)."""
    return t.to(torch.float32) if t.dtype in (torch.bfloat16, torch.float16) else t


def prefers_ghost_norm(positions: int, d_in: int, d_out: int) -> bool:
    """The cost model: ghost norm iff instantiated per-sample gradients would outgrow the layer's a and g.

    Args:
        positions: T, positions per record over which the layer shares its weight (pixels of a conv's output,
            tokens; 1 for a plain [B, d] linear layer); for patients, k T with k the chunk's largest patient.
        d_in: inputs per position (a conv's ``in_channels * kernel area``).
        d_out: outputs per position.
    """
    return d_in * d_out > positions * (d_in + d_out)


class Scratch:
    """One buffer, kept across steps, for the short-lived elementwise temporaries of the per-sample work (a layer
    scale's ``a * g``, a ghost layer's factor-scaled rows): each is reduced or multiplied away before the next is
    taken, so one buffer of the largest serves them all. Large fresh tensors are mapped and zeroed page by page at
    every step (glibc serves allocations above its mmap threshold, at most 32 MiB, with fresh pages); a ConvNeXt's
    first stage at 224 px has 38 MiB temporaries at batch 32, and the persistent buffer pays those faults once."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device, uninitialized; valid until the next
        `take`."""
        n = math.prod(shape)
        buffer = self._buffer
        if buffer is None or buffer.numel() < n or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffer = torch.empty(n, dtype=like.dtype, device=like.device)
        return buffer[:n].view(shape)


def _product(a: torch.Tensor, b: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """``a * b`` (broadcast), into ``scratch`` when given."""
    if scratch is None:
        return a * b
    shape = torch.broadcast_shapes(a.shape, b.shape)  # type: ignore[no-untyped-call]  # unannotated in torch
    return torch.mul(a, b, out=scratch.take(shape, like=a))


# --------------------------------------------------------------------------------------------------------
# Patients: which rows of a chunk are one record.


@dataclass(frozen=True)
class PairsAtOffset:
    """The pairs of images (i, i + offset) of one patient at one row distance ``offset``: in a patient-contiguous chunk
    every pair of images of one patient is (i, i + offset) for one offset below its size.

    Attributes:
        offset: the distance j - i of these pairs' rows.
        lo, hi: their first rows i lie in ``[lo, hi)`` (`patient_ghost_norm_sq` takes the rows of that span and the
            span ``offset`` later as views: no gather).
        first: each pair's i - lo (long, on the chunk's device).
        patient: each pair's patient (long, on the chunk's device).
    """

    offset: int
    lo: int
    hi: int
    first: torch.Tensor
    patient: torch.Tensor


@dataclass(frozen=True)
class PatientRows:
    """The real rows of a patient-level chunk grouped into its records, the patients (`PatientRows.of`).

    Attributes:
        of_row: [n_real] each real row's patient, 0..n_patients-1 (long, on the chunk's device).
        n_patients: P, the records of the chunk.
        largest: k, the most images of one patient in the chunk (the cost model's factor on positions).
        offsets: every pair of images of one patient, grouped by their rows' distance 1..k-1 (`PairsAtOffset`):
            the cross-image terms of the group ghost norm.
    """

    of_row: torch.Tensor
    n_patients: int
    largest: int
    offsets: tuple[PairsAtOffset, ...]

    @classmethod
    def of(cls, groups: np.ndarray, device: torch.device) -> PatientRows:
        """From each real row's patient label, patient-contiguous: a run of equal labels is one patient (as
        `trainables.privacy.chunks.patient_chunks` and the Opacus modes' grouping read them). Computed on the host,
        where the labels are, and copied to ``device`` without waiting for it."""
        labels = np.asarray(groups)
        of_row = np.cumsum(np.r_[True, labels[1:] != labels[:-1]]) - 1 if labels.size else np.zeros(0, np.int64)
        sizes = np.bincount(of_row)
        largest = int(sizes.max()) if sizes.size else 0

        def on_device(rows: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(rows.astype(np.int64)).to(device, non_blocking=True)

        offsets = []
        for offset in range(1, largest):  # the largest patient has a pair at every offset below its size
            rows = np.flatnonzero(of_row[:-offset] == of_row[offset:])
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            offsets.append(PairsAtOffset(offset, lo, hi, on_device(rows - lo), on_device(of_row[rows])))
        return cls(on_device(of_row), len(sizes), largest, tuple(offsets))

    def sum_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-patient sums [P, ...] of per-row values [>= n_real, ...] (rows after the real ones are ignored)."""
        summed = torch.zeros((self.n_patients, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        return summed.index_add_(0, self.of_row, rows[: len(self.of_row)])


# --------------------------------------------------------------------------------------------------------
# What one layer contributes: per-record squared norms now, the clipped sum once the clip factors are known.


@dataclass
class LayerGrads:
    """One module's per-sample contribution, between the backward pass and the clipped sum.

    Attributes:
        norms_sq: parameter name (in the model) -> per-record squared norms [B] (or [P] patients) of that
            parameter's gradient.
        instantiated: parameter name -> per-record gradients [B or P, *shape] (small layers, norms, biases).
        ghost: parameter name -> (a [B, T, d_in], g [B, T, d_out]) of the images, whose clipped sum is ``(c g)^T a``.
        ghost_records: for patients, each real image row's patient [n_real]: a ghost layer's rows are scaled by their
            patient's factor. None: the rows are the records.
        scratch: the buffer of the clipped sums' temporaries (`Scratch`; None: fresh tensors).
    """

    norms_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    instantiated: dict[str, torch.Tensor] = field(default_factory=dict)
    ghost: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ghost_records: torch.Tensor | None = None
    scratch: Scratch | None = None

    def add_instantiated(self, name: str, per_sample: torch.Tensor) -> None:
        self.instantiated[name] = per_sample
        self.norms_sq[name] = torch.linalg.vector_norm(per_sample.reshape(len(per_sample), -1), dim=1).square()

    def add_ghost(self, name: str, a: torch.Tensor, g: torch.Tensor) -> None:
        self.ghost[name] = (a, g)
        self.norms_sq[name] = ghost_norm_sq(a, g)

    def clipped_sums(self, factors: torch.Tensor, shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
        """``sum_r factors_r g_r`` over the first ``len(factors)`` records (the real rows of a padded chunk, or its
        patients) per parameter, shaped like the parameter; TF32 off (`full_float32`)."""
        n = len(factors)
        row_factors = factors if self.ghost_records is None else factors[self.ghost_records]
        m = len(row_factors)
        sums = {}
        with full_float32():
            for name, per_sample in self.instantiated.items():
                flat = per_sample[:n].reshape(n, -1)
                sums[name] = (factors.to(flat.dtype) @ flat).reshape(shapes[name])
            for name, (a, g) in self.ghost.items():
                sums[name] = ghost_clipped_sum(a[:m], g[:m], row_factors, self.scratch).reshape(shapes[name])
        return sums

    def by_patient(self, patients: PatientRows) -> LayerGrads:
        """This layer with patients as the records: instantiated per-image gradients summed per patient (then
        normed), ghost layers normed by `patient_ghost_norm_sq` and kept per image (`ghost_records`)."""
        grouped = LayerGrads(ghost_records=patients.of_row, scratch=self.scratch)
        for name, image_norms_sq in self.norms_sq.items():  # the rule's order, in which the float64 total adds up
            if name in self.ghost:
                a, g = self.ghost[name]
                grouped.ghost[name] = (a, g)
                grouped.norms_sq[name] = patient_ghost_norm_sq(image_norms_sq, a, g, patients)
            else:
                grouped.add_instantiated(name, patients.sum_rows(self.instantiated[name]))
        return grouped


GHOST_BLOCK_POSITIONS = 128
"""The ghost norm's position blocks hold at most this many positions (`ghost_norm_sq`)."""


def ghost_norm_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||g_i^T a_i||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s)`` without forming g_i^T a_i.

    The double sum is symmetric in (t, s): with the positions cut into k blocks of at most `GHOST_BLOCK_POSITIONS`,
    only the blocks on and above the diagonal are computed, the off-diagonal ones counted twice ((k + 1) / 2k of the
    full products' work; a ConvNeXt's 14 x 14 stage: 3/4).

    Args:
        a: [B, T, d_in] layer inputs; g: [B, T, d_out] output gradients.
    """
    positions = a.shape[1]
    n_blocks = max(1, -(-positions // GHOST_BLOCK_POSITIONS))
    edges = [positions * k // n_blocks for k in range(n_blocks + 1)]
    blocks = [(a[:, lo:hi], g[:, lo:hi]) for lo, hi in zip(edges, edges[1:], strict=False)]
    total = torch.zeros(len(a), dtype=a.dtype, device=a.device)
    with full_float32():
        for k, (a_k, g_k) in enumerate(blocks):
            for m, (a_m, g_m) in enumerate(blocks[k:], start=k):
                term = torch.bmm(a_k, a_m.transpose(1, 2)).mul_(torch.bmm(g_k, g_m.transpose(1, 2))).sum((1, 2))
                total += term if m == k else 2 * term
    return total


def ghost_clipped_sum(
    a: torch.Tensor, g: torch.Tensor, factors: torch.Tensor, scratch: Scratch | None = None
) -> torch.Tensor:
    """``sum_i c_i g_i^T a_i`` [d_out, d_in] as one matmul over all rows and positions, the layer's ordinary
    weight-gradient cost: the factors scale the narrower of ``a`` and ``g`` (the fewer values to multiply), and the
    product reads [B T, d] views of both where their layouts allow (a channels-last Linear's, without a copy).

    Args:
        a: [B, T, d_in] layer inputs; g: [B, T, d_out] output gradients; factors: [B] each row's factor.
        scratch: where the scaled rows go (`Scratch`; None: a fresh tensor).
    """
    scale = factors.to(g.dtype)[:, None, None]
    if a.shape[2] <= g.shape[2]:
        a = _product(a, scale, scratch)
    else:
        g = _product(g, scale, scratch)
    return g.reshape(-1, g.shape[2]).T @ a.reshape(-1, a.shape[2])


def patient_ghost_norm_sq(
    image_norms_sq: torch.Tensor, a: torch.Tensor, g: torch.Tensor, patients: PatientRows
) -> torch.Tensor:
    """Per-patient ``||sum_{i in I_p} g_i^T a_i||_F^2`` [P] without forming any gradient: the images' own ghost norms
    ``image_norms_sq`` [>= n_real] (the terms i = j) plus the cross-image terms ``2 sum_{i < j in I_p} sum_{t,s}
    (a_{i,t} . a_{j,s})(g_{i,t} . g_{j,s})`` (`PatientRows.offsets`). Not the sum of the image norms, which would
    leave out the cross terms and misjudge (mostly underrate) a patient's norm.

    The pairs at one row distance are taken from two slices of ``a`` and ``g`` spanning their rows (views): the
    span's other rows are computed and dropped, which cost less than gathering the pairs' rows (the gathers were 84%
    of this function's time at convnext_atto's stage 3, 64 px, batch 32, patients of 1-3 images, on this CPU).

    Args:
        a: [B, T, d_in] layer inputs; g: [B, T, d_out] output gradients (B >= n_real rows).
    """
    total = patients.sum_rows(image_norms_sq)
    with full_float32():
        for pairs in patients.offsets:  # rows [lo, hi) against the rows offset later, as views of a and g
            lo, hi, offset = pairs.lo, pairs.hi, pairs.offset
            a_i, a_j = a[lo:hi], a[lo + offset : hi + offset]
            g_i, g_j = g[lo:hi], g[lo + offset : hi + offset]
            cross = (torch.bmm(a_i, a_j.transpose(1, 2)) * torch.bmm(g_i, g_j.transpose(1, 2))).sum((1, 2))
            total.index_add_(0, pairs.patient, 2 * cross[pairs.first])
    return total


def _linear_weight(lg: LayerGrads, name: str, a: torch.Tensor, g: torch.Tensor, group_size: int) -> None:
    """Per-sample weight gradient ``g_i^T a_i`` of a position-shared linear map; a [B, T, d_in], g [B, T, d_out];
    ``group_size`` images (at most) are summed into one record (`RuleCall.group_size`)."""
    positions, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    if prefers_ghost_norm(positions * group_size, d_in, d_out):
        lg.add_ghost(name, a, g)
    else:
        lg.add_instantiated(name, torch.bmm(g.transpose(1, 2), a))


# --------------------------------------------------------------------------------------------------------
# Rules: one per supported module type. A rule maps (module, its input a, its output gradient g) to LayerGrads.


@dataclass(frozen=True)
class RuleCall:
    """What one rule call needs besides the module, its input and its output gradient.

    Attributes:
        names: direct parameter attribute (``weight``) -> full name in the model, trainable ones only.
        group_size: the most rows that will be summed into one record (the chunk's largest patient; 1 for images): the
            cost model counts a ghost norm's positions times this (`LayerGrads.by_patient` groups).
        scratch: the buffer for elementwise temporaries (`Scratch`; None: fresh tensors).
    """

    names: Mapping[str, str]
    group_size: int = 1
    scratch: Scratch | None = None


class LayerRule:
    """How to turn one module's input and output gradient into per-sample norms and clipped sums."""

    def check(self, path: str, module: nn.Module) -> None:  # optional override
        """Raise `UnsupportedModuleError` if this instance of the type is configured in an unsupported way."""

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, call: RuleCall) -> LayerGrads:
        """Per-sample gradients (or ghost factors) of ``module``'s trainable direct parameters.

        Args:
            a: the module's input; g: the gradient of ``sum_i loss_i`` with respect to its output.
            call: the parameters' names, the records' size and the scratch buffer (`RuleCall`).
        """
        raise NotImplementedError


class LinearRule(LayerRule):
    """``nn.Linear`` on [B, d], [B, T, d] or channels-last [B, H, W, d] inputs (timm ConvNeXt's Mlp)."""

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, call: RuleCall) -> LayerGrads:
        lg = LayerGrads()
        batch = len(a)
        a3, g3 = a.reshape(batch, -1, a.shape[-1]), g.reshape(batch, -1, g.shape[-1])
        names = call.names
        if "weight" in names:
            _linear_weight(lg, names["weight"], a3, g3, call.group_size)
        if "bias" in names:
            lg.add_instantiated(names["bias"], g3.sum(1))
        return lg


class Conv2dRule(LayerRule):
    """``nn.Conv2d`` with any stride, padding, dilation and groups, NCHW or channels-last inputs.

    groups == 1: the input is unfolded into [B, T, C_in k_h k_w] patches and the layer treated as linear
    (ghost or instantiate by the cost model); a patchify conv (kernel == stride, no padding: ConvNeXt's stem and
    downsample layers) is unfolded by a reshape. groups > 1 (the depthwise 7x7 convs): per-sample weight
    gradients always instantiated (C_out C_in/groups k_h k_w values per sample), `_grouped_conv_per_sample`.
    """

    def check(self, path: str, module: nn.Module) -> None:
        assert isinstance(module, nn.Conv2d)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise UnsupportedModuleError(
                f"{path} ({type(module).__name__}): padding_mode={module.padding_mode!r}, padding={module.padding!r} "
                "is not supported by grad_sample_mode 'bk' (zero padding given as numbers only)"
            )

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, call: RuleCall) -> LayerGrads:
        assert isinstance(module, nn.Conv2d)
        lg, names = LayerGrads(), call.names
        if "weight" in names:
            if module.groups == 1:
                patches = _unfold(module, a)  # [B, T, d_in]
                g3 = g.flatten(2).transpose(1, 2)  # [B, T, C_out]
                _linear_weight(lg, names["weight"], patches, g3, call.group_size)
            else:
                lg.add_instantiated(names["weight"], _grouped_conv_per_sample(module, a, g))
        if "bias" in names:
            lg.add_instantiated(names["bias"], g.sum((2, 3)))
        return lg


def _unfold(conv: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Input patches [B, T, C_in k_h k_w] (T = output pixels, feature order (C_in, k_h, k_w) as in the weight)."""
    kh, kw = conv.kernel_size
    batch, channels, height, width = a.shape
    padding = (int(conv.padding[0]), int(conv.padding[1]))  # numeric (Conv2dRule.check)
    if (kh, kw) == (1, 1) and tuple(conv.stride) == (1, 1) and padding == (0, 0):
        return a.flatten(2).transpose(1, 2)  # a 1x1 conv is a linear layer over the pixels: a view, no copy
    if tuple(conv.stride) == (kh, kw) and padding == (0, 0) and tuple(conv.dilation) == (1, 1):
        ho, wo = height // kh, width // kw
        patches = a[:, :, : ho * kh, : wo * kw].reshape(batch, channels, ho, kh, wo, kw)
        return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, ho * wo, channels * kh * kw)
    # F.unfold reads any strides correctly (unlike Opacus 1.6's unfold2d on channels-last inputs).
    return F.unfold(a, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride).transpose(1, 2)


GROUPED_CONV_FOLD_PIXELS = (16, 64)
"""`_grouped_conv_per_sample` folds the batch into one convolution when its output has this many pixels (bounds
included); otherwise it loops over the samples."""


def _grouped_conv_per_sample(conv: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients [B, C_out, C_in/groups, k_h, k_w] of a grouped convolution, as grouped
    convolution *forwards* with the output gradients as kernels.

    ``G[b, o, i, u, v] = sum_{h,w} g[b, o, h, w] a_pad[b, c(o, i), h s + u d, w s + v d]`` is a correlation of the
    padded input with ``g``: stride d (the layer's dilation), dilation s (its stride), cropped to the kernel size.
    The input channels within a group (C_in/groups) become the convolution's batch and the output channels its
    kernels. Two ways, the same sums:
    - one sample at a time, in the layer's own groups, ``a`` and ``g`` read in place (a ConvNeXt's channels-last
      activations as they are);
    - the batch folded into the groups (B groups times as many, one call), which copies ``a`` and ``g`` once.
    On this CPU (2 threads, batch 32, the depthwise 7x7 convs of convnext_atto at 64 px and convnext_tiny at 224 px,
    glibc's mmap threshold pinned as in `benchmarks/bench_dp_step.py`, the two interleaved) the fold was faster at
    4 x 4 to 8 x 8 output pixels (1.2-1.6x: there the B calls' own overhead dominates), the loop at 2 x 2 (1.5x) and
    at 14 x 14 to 56 x 56 (1.3-1.5x), about even at 16 x 16: the fold is taken within `GROUPED_CONV_FOLD_PIXELS`.
    Both were 7-50x faster than the convolution's own weight-gradient kernel.
    """
    batch, c_in = a.shape[:2]
    groups = conv.groups
    c_in_group = c_in // groups
    kh, kw = conv.kernel_size

    def correlate(inputs: torch.Tensor, kernels: torch.Tensor, groups: int) -> torch.Tensor:
        padding = (int(conv.padding[0]), int(conv.padding[1]))  # numeric (Conv2dRule.check)
        return F.conv2d(inputs, kernels, stride=conv.dilation, padding=padding, dilation=conv.stride, groups=groups)

    fewest, most = GROUPED_CONV_FOLD_PIXELS
    if fewest <= g.shape[2] * g.shape[3] <= most:
        inputs = a.reshape(batch * groups, c_in_group, *a.shape[2:]).transpose(0, 1)  # [C_in/G, B G, H, W]
        kernels = g.reshape(batch * conv.out_channels, 1, *g.shape[2:])  # ordered (sample, group, output)
        correlation = correlate(inputs, kernels, batch * groups)  # [C_in/G, B C_out, >=kh, >=kw]
        folded = correlation[..., :kh, :kw].reshape(c_in_group, batch, conv.out_channels, kh, kw)
        per_sample: torch.Tensor = folded.permute(1, 2, 0, 3, 4)
        return per_sample
    out = a.new_empty(batch, conv.out_channels, c_in_group, kh, kw)
    for b in range(batch):
        inputs = a[b].reshape(groups, c_in_group, *a.shape[2:]).transpose(0, 1)  # [C_in/G, G, H, W]
        kernels = g[b].unsqueeze(1)  # [C_out, 1, H_out, W_out], ordered (group, output) as the weight
        correlation = correlate(inputs, kernels, groups)  # [C_in/G, C_out, >=kh, >=kw]
        out[b] = correlation[..., :kh, :kw].transpose(0, 1)
    return out


class LayerNormRule(LayerRule):
    """``nn.LayerNorm`` and timm's ``LayerNorm`` (normalized over the last dims) and ``LayerNorm2d`` (over the
    channels of NCHW tensors). Per-sample gradients: weight ``sum_t g_t * xhat_t``, bias ``sum_t g_t``, with xhat
    recomputed from the stored input as the forward computes it (biased variance, ``eps`` inside the root)."""

    def __init__(self, channels_dim: int | None = None) -> None:
        self.channels_dim = channels_dim  # 1 for LayerNorm2d; None: the trailing normalized_shape dims

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, call: RuleCall) -> LayerGrads:
        assert isinstance(module, nn.LayerNorm)
        lg, names = LayerGrads(), call.names
        batch = len(a)
        if self.channels_dim is not None:  # LayerNorm2d: move channels last, as its forward does
            a, g = a.movedim(self.channels_dim, -1), g.movedim(self.channels_dim, -1)
        shape = (batch, -1, *module.normalized_shape)
        if "weight" in names:
            xhat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)  # the forward's own kernel
            lg.add_instantiated(names["weight"], xhat.mul_(g).reshape(shape).sum(1))  # in place: one buffer less
        if "bias" in names:
            lg.add_instantiated(names["bias"], g.reshape(shape).sum(1))
        return lg


class ConvNeXtLayerScaleRule(LayerRule):
    """timm ``ConvNeXtBlock.gamma``: ``out = shortcut + mlp_out * gamma`` (channels on dim 1 after the permute).

    The hooks take ``a`` = the block's ``mlp`` output and ``g`` = the gradient of the block's output, which is the
    gradient of ``mlp_out * gamma`` because drop_path must be the identity (checked). Per-sample gradient:
    ``sum_{h,w} a * g`` per channel. The block's own children (conv_dw, norm, mlp) have their own rules.
    """

    def check(self, path: str, module: nn.Module) -> None:
        assert isinstance(module, ConvNeXtBlock)
        if not isinstance(module.drop_path, nn.Identity):
            raise UnsupportedModuleError(
                f"{path} (ConvNeXtBlock): drop_path is {type(module.drop_path).__name__}; DP needs "
                "drop_path_rate=0 (a deterministic forward per sample)"
            )

    def per_sample(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, call: RuleCall) -> LayerGrads:
        assert isinstance(module, ConvNeXtBlock)
        lg = LayerGrads()
        if "gamma" in call.names:
            mlp_out = a if module.use_conv_mlp else a.permute(0, 3, 1, 2)
            lg.add_instantiated(call.names["gamma"], _product(mlp_out, g, call.scratch).sum((2, 3)))
        return lg


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.LayerNorm: LayerNormRule(),
    TimmLayerNorm: LayerNormRule(),
    TimmLayerNorm2d: LayerNormRule(channels_dim=1),
    ConvNeXtBlock: ConvNeXtLayerScaleRule(),
}
"""Supported module types (exact type: a subclass may change the forward) -> their rule."""

_ACTIVATION_FROM_CHILD: dict[type[nn.Module], str] = {ConvNeXtBlock: "mlp"}
"""Rules whose ``a`` is a child's output rather than the module's own input."""


# --------------------------------------------------------------------------------------------------------
# The wrapper: hooks, the backward, norms, clip factors, clipped sums.


@dataclass
class _Site:
    """One hooked module during one forward/backward."""

    path: str
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]  # trainable direct parameters: attribute -> full name
    activation: torch.Tensor | None = None
    grads: LayerGrads | None = None
    calls: int = 0


@dataclass
class PerSampleResult:
    """What one physical batch contributes: per-record norms, and clipped sums on request. The records are the
    samples (rows), or for a patient-level chunk its patients.

    Attributes:
        norms_sq: full parameter name -> per-record squared gradient norms, [B] per row (padded rows, from
            ``n_real`` on, exactly 0) or [P] per patient (float32, or float64 for a float64 model).
        norms: per-record total gradient norms over all trainable parameters, [B] or [P] (float64).
        loss: per-sample losses of the real rows [n_real], detached.
        n_real: the leading rows that are images (the rest is padding).
        n_records: the leading entries of ``norms`` that are records: ``n_real``, or P.
    """

    norms_sq: dict[str, torch.Tensor]
    norms: torch.Tensor
    loss: torch.Tensor
    n_real: int
    n_records: int
    _layers: list[LayerGrads]
    _shapes: dict[str, torch.Size]

    def clip_factors(self, max_grad_norm: float) -> torch.Tensor:
        """Opacus' per-record factors ``min(1, C / (norm + 1e-6))`` [n_records] (float64)."""
        return clip_factors(self.norms[: self.n_records], max_grad_norm)

    def clipped_sums(self, factors: torch.Tensor) -> dict[str, torch.Tensor]:
        """``sum_r factors_r g_r`` over the first ``len(factors)`` records, for every trainable parameter (full name
        -> tensor shaped like it)."""
        sums: dict[str, torch.Tensor] = {}
        for layer in self._layers:
            sums.update(layer.clipped_sums(factors, self._shapes))
        return sums


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clip factors ``min(1, C / (norm + 1e-6))``."""
    return (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0)


class BookKeepingModule(nn.Module):
    """A model wrapped for book-keeping clipping; ``forward`` is the model's own.

    The hooks record only inside `per_sample`, so evaluation, ``torch.func`` and non-private passes through the
    same model are untouched. Construction raises `UnsupportedModuleError` if any trainable parameter is not
    covered by a rule, is shared between modules, or sits in a module configured unsupportedly.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = module
        self._sites: list[_Site] = []
        self._recording = False
        self._patients: PatientRows | None = None  # while recording a patient-level chunk
        self._scratch: Scratch | None = Scratch()  # the per-sample temporaries' buffer, kept across steps
        self._handles: list[RemovableHandle] = []
        owners: dict[int, str] = {}
        for path, child in module.named_modules(remove_duplicate=False):
            direct = {attr: p for attr, p in child.named_parameters(recurse=False)}
            trainable = {attr: f"{path}.{attr}" if path else attr for attr, p in direct.items() if p.requires_grad}
            for attr, p in direct.items():
                if id(p) in owners and p.requires_grad:
                    raise UnsupportedModuleError(
                        f"parameter {path}.{attr} is shared with {owners[id(p)]}; grad_sample_mode 'bk' needs each "
                        "trainable parameter used by one module"
                    )
                owners[id(p)] = f"{path}.{attr}"
            if not trainable:
                continue
            rule = RULES.get(type(child))
            if rule is None:
                raise UnsupportedModuleError(
                    f"module {path or '<root>'} ({type(child).__module__}.{type(child).__qualname__}) has trainable "
                    f"parameters {sorted(trainable)} but grad_sample_mode 'bk' has no rule for its type; supported: "
                    f"{sorted(t.__name__ for t in RULES)}. Freeze them or use grad_sample_mode 'functorch'"
                )
            rule.check(path, child)
            self._sites.append(_Site(path, child, rule, trainable))
        for site in self._sites:
            self._attach(site)

    def _attach(self, site: _Site) -> None:
        child_name = _ACTIVATION_FROM_CHILD.get(type(site.module))
        if child_name is None:
            self._handles.append(site.module.register_forward_hook(self._leaf_hook(site)))
        else:
            child = getattr(site.module, child_name)
            self._handles.append(child.register_forward_hook(self._child_hook(site)))
            self._handles.append(site.module.register_forward_hook(self._output_hook(site)))

    def _leaf_hook(self, site: _Site) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._recording:
                site.activation = inputs[0].detach()
                self._on_output(site, output)

        return hook

    def _child_hook(self, site: _Site) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._recording:
                site.activation = output.detach()

        return hook

    def _output_hook(self, site: _Site) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._recording:
                self._on_output(site, output)

        return hook

    def _on_output(self, site: _Site, output: torch.Tensor) -> None:
        site.calls += 1
        if site.calls > 1:
            raise UnsupportedModuleError(
                f"module {site.path} ({type(site.module).__name__}) ran twice in one forward; grad_sample_mode 'bk' "
                "needs each parameterized module called once per forward"
            )
        if not output.requires_grad:
            return  # no gradient will reach it; caught after the backward

        def on_grad(grad: torch.Tensor) -> None:
            activation, patients = site.activation, self._patients
            assert activation is not None
            # bf16 autocast: the per-sample work runs in float32 on the (exactly) upcast values
            call = RuleCall(site.names, 1 if patients is None else max(patients.largest, 1), self._scratch)
            grads = site.rule.per_sample(site.module, upcast(activation), upcast(grad.detach()), call)
            grads.scratch = self._scratch
            # grouped here, so that per-image gradients live no longer than this hook
            site.grads = grads if patients is None else grads.by_patient(patients)
            site.activation = None  # kept only through a ghost layer's LayerGrads, if at all

        output.register_hook(on_grad)  # type: ignore[no-untyped-call]

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self._module(*args, **kwargs)
        return out

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Full name -> parameter, for every parameter the engine clips (all trainable ones)."""
        return {name: p for name, p in self._module.named_parameters() if p.requires_grad}

    @contextmanager
    def _recording_on(self, patients: PatientRows | None) -> Iterator[None]:
        for site in self._sites:
            site.activation, site.grads, site.calls = None, None, 0
        self._recording, self._patients = True, patients
        try:
            yield
        finally:
            self._recording, self._patients = False, None

    def per_sample(
        self,
        loss_fn: PerSampleLoss,
        x: torch.Tensor,
        y: torch.Tensor,
        n_real: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        groups: np.ndarray | None = None,
    ) -> PerSampleResult:
        """One forward and one input-gradient backward on a physical batch: per-record norms, clipped sums.

        Per-sample gradients are those of each sample's own loss ``loss_fn(model(x), y)[i]`` (no division by
        the batch size); a patient's is the sum of its images'. Parameter ``.grad`` fields are left untouched.

        Args:
            n_real: only rows ``[0, n_real)`` are images (default: all); the backward starts from their losses
                only, so every later row (padding) gets exactly zero output gradients, norms and contributions.
            autocast_dtype: run the forward under ``torch.autocast`` to this dtype (``bfloat16``); the per-sample
                norms and sums are still float32 (module docstring).
            groups: patient-level: each real row's patient label [n_real], patient-contiguous (`PatientRows.of`);
                the records are then the patients. None: each row is a record.

        Raises:
            UnsupportedModuleError: a module ran twice, or a layer's output got no gradient (it does not depend
                on the input ``x``, which the input-gradient backward needs).
            ValueError: ``n_real`` out of range, or ``groups`` not one label per real row.
        """
        n_real = len(x) if n_real is None else n_real
        if not 0 <= n_real <= len(x):
            raise ValueError(f"n_real={n_real} must be between 0 and the chunk's {len(x)} rows")
        if groups is not None and len(groups) != n_real:
            raise ValueError(f"groups has {len(groups)} patient labels for {n_real} real rows")
        patients = None if groups is None else PatientRows.of(groups, x.device)
        x = x.detach().requires_grad_(True)  # the backward targets x, so no parameter gradient is formed
        autocast = (
            nullcontext() if autocast_dtype is None else torch.autocast(device_type=x.device.type, dtype=autocast_dtype)
        )
        try:
            with self._recording_on(patients):
                with autocast:
                    loss = loss_fn(self._module(x), y)
                (input_grad,) = torch.autograd.grad(loss[:n_real].sum(), [x])
            del input_grad
            layers: list[LayerGrads] = []
            for site in self._sites:
                if site.grads is None:
                    raise UnsupportedModuleError(
                        f"module {site.path} ({type(site.module).__name__}) got no output gradient: grad_sample_mode "
                        "'bk' needs every parameterized layer to be run on (a function of) the input"
                    )
                layers.append(site.grads)
        finally:
            for site in self._sites:
                site.activation, site.grads = None, None
        shapes = {name: p.shape for name, p in self.trainable_parameters().items()}
        norms_sq = {name: value for layer in layers for name, value in layer.norms_sq.items()}
        missing = set(shapes) - set(norms_sq)
        if missing:  # cannot happen with the coverage check above; never release an unclipped parameter
            raise UnsupportedModuleError(f"no per-sample gradient for {sorted(missing)}")
        total = torch.stack([v.to(torch.float64) for v in norms_sq.values()]).sum(0).sqrt()
        n_records = n_real if patients is None else patients.n_patients
        return PerSampleResult(norms_sq, total, loss[:n_real].detach(), n_real, n_records, layers, shapes)

    def remove_hooks(self) -> None:
        """Detach the hooks from the model (before wrapping it again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------------
# Explicit per-sample gradient rows (audit canaries), clipped exactly like real samples.


def clipped_explicit_rows(
    rows: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor], max_grad_norm: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Clip ``m`` explicit per-sample gradients and sum them, with the same norm and factor code as real samples.

    Args:
        rows: parameter name -> [m, *parameter shape]; a row's gradient is zero on parameters not named. All
            entries must have the same m.
        parameters: the trainable parameters (name -> tensor), for names, shapes, dtype and device.

    Returns:
        (name -> clipped sum for each named parameter, per-row total norms [m] (float64)).

    Raises:
        ValueError: unknown parameter names, wrong shapes or inconsistent row counts.
    """
    unknown = sorted(set(rows) - set(parameters))
    if unknown:
        raise ValueError(f"extra_grad_samples names parameters that are not trainable: {unknown}")
    counts = {len(v) for v in rows.values()}
    if len(counts) > 1:
        raise ValueError(f"extra_grad_samples entries have different row counts {sorted(counts)}")
    for name, value in rows.items():
        if tuple(value.shape[1:]) != tuple(parameters[name].shape):
            raise ValueError(
                f"extra_grad_samples[{name!r}] has shape {tuple(value.shape)}; expected "
                f"[m, {', '.join(map(str, parameters[name].shape))}]"
            )
    if not rows or counts == {0}:
        return {}, torch.zeros(0, dtype=torch.float64)
    layer = LayerGrads()
    for name, value in rows.items():
        layer.add_instantiated(name, value.to(parameters[name].device, parameters[name].dtype))
    norms = torch.stack([v.to(torch.float64) for v in layer.norms_sq.values()]).sum(0).sqrt()
    factors = clip_factors(norms, max_grad_norm)
    return layer.clipped_sums(factors, {name: parameters[name].shape for name in rows}), norms


def clipped_sum_step(
    wrapped: BookKeepingModule,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    max_grad_norm: float,
    max_physical_batch_size: int,
    extra_grad_samples: Mapping[str, torch.Tensor] | None = None,
    *,
    pad_multiple: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    groups: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The clipped sum ``sum_r c_r g_r`` of one logical batch over its records, accumulated over physical chunks.

    Args:
        pad_multiple: fixed shapes: the last chunk zero-padded to a multiple of this many rows (`physical_chunks`;
            for patients every chunk, `patient_physical_chunks`); padded rows contribute nothing. None: no padding.
        autocast_dtype: see `BookKeepingModule.per_sample`.
        groups: patient-level: each image's patient, patient-contiguous (`trainables.privacy.patients.PatientIndex.
            gather`); chunks then hold whole patients and each patient's summed gradient is clipped as one record.
            None: each image is a record.

    Returns:
        (full parameter name -> clipped sum (zeros for an empty batch), mean per-image loss of the real rows as a
        0-dim tensor on the batch's device (NaN if empty); nothing is read back to the host).
    """
    x, y = batch
    parameters = wrapped.trainable_parameters()
    sums: dict[str, torch.Tensor] = {}
    total_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    chunks: Iterator[tuple[PhysicalChunk, np.ndarray | None]] = (
        ((chunk, None) for chunk in physical_chunks(x, y, max_physical_batch_size, pad_multiple))
        if groups is None
        else patient_physical_chunks(x, y, groups, max_physical_batch_size, pad_multiple)
    )
    for chunk, chunk_groups in chunks:
        result = wrapped.per_sample(loss_fn, chunk.x, chunk.y, chunk.n_real, autocast_dtype, chunk_groups)
        for name, value in result.clipped_sums(result.clip_factors(max_grad_norm)).items():
            sums[name] = sums[name] + value if name in sums else value
        total_loss = total_loss + result.loss.sum()
    for name, p in parameters.items():  # an empty batch: nothing clipped, every sum zero
        if name not in sums:
            sums[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    if extra_grad_samples:
        extra, _ = clipped_explicit_rows(extra_grad_samples, parameters, max_grad_norm)
        for name, value in extra.items():
            sums[name] = sums[name] + value
    return sums, (total_loss / len(x) if len(x) else torch.full_like(total_loss, math.nan))
