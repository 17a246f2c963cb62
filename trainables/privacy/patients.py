"""Patient-level DP-SGD (``privacy.privacy_unit: patient``): the patient, not the image, is the record.

Mechanism (one step), on top of `trainables.privacy.engine`:

* **Poisson sampling of patients**: every training patient joins the batch independently with probability q, with
  q = 1 / ceil(N_patients / B) and steps = epochs * ceil(N_patients / B) (`sample_rate_and_steps` on N_patients;
  B = ``expected_batch_size`` is the expected number of *patients* per batch). The number of patients in a batch
  is Binomial(N_patients, q).
* **A sampled patient brings its images**, at most ``max_images_per_patient`` (public). The fixed rule for
  patients with more: keep the first ``max_images_per_patient`` of its images in the training split's order (the
  prepared manifest's row order). The rule depends only on the patient's own images, so adding or removing another
  patient never changes which images a patient contributes.
* **One gradient per patient**: the *sum* of its images' per-sample gradients (the gradient of the patient's summed
  loss), clipped to L2 norm <= C over all trainable parameters as one record. Sum rather than mean: a patient with
  one image is then exactly the image-level record (VinDr, or a cap of 1, gives image-level DP-SGD bit for bit),
  and every image keeps the weight it has in image-level training; the mean would down-weight images of patients
  with many studies. Either is one record clipped to C, so the sensitivity is the same.
* **Noise** N(0, (sigma C)^2 I) on the sum of clipped patient gradients, update divided by B, as image-level.

Adjacency: add/remove one patient with all its images; the accountant sees the usual Poisson-subsampled Gaussian
over (sigma, q, steps) with N_patients records. N_patients and the cap are public; delta must be < 1/N_patients.

Virtual batches: every engine clips each physical chunk's records when the chunk is processed, so a patient split
over two chunks would be clipped twice (sensitivity 2C). `patient_chunks` therefore cuts a logical batch only
between patients (at most ``max_physical_batch_size`` images per chunk; the cap must not exceed it). Under fixed
shapes each such chunk is zero-padded (`trainables.privacy.chunks.patient_physical_chunks`); padding rows belong to
no patient and contribute nothing, as for images. Under bf16 the per-image values are upcast to float32 before
grouping, norms and clipping, as for images.

Every mode, one record per patient:

* ``hooks``, ``functorch``: after each chunk's backward the per-image ``p.grad_sample`` rows are summed per patient
  (`sum_grad_samples_by_patient`) before Opacus clips them.
* ``bk`` (book-keeping, `trainables.privacy.bk`), which never forms whole per-sample gradients: each layer's
  per-image pieces are grouped right after the backward reaches it: instantiated gradients summed per patient, ghost
  norms taken over the patient's rows (group ghost norms: the Gram matrices of activations and output gradients
  over all positions of all its images, cross-image terms included; the sum of its images' norms would be wrong);
  the clip factor is the patient's, and each image's rows enter the clipped sum scaled by it.

The self-check (`check_patient_gradients`) compares each patient's gradient (``hooks``/``functorch``: the grouped
rows; ``bk``: per-patient norms and clipped sums) with sums of ``torch.func`` per-image gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from trainables.privacy.bk import BookKeepingModule, PerSampleLoss, full_float32
from trainables.privacy.chunks import patient_chunks, patient_physical_chunks
from trainables.privacy.engine import (
    GradientCheck,
    PerSampleGradientError,
    WrappedModel,
    append_grad_samples,
    book_keeping_step,
    check_book_keeping,
    private_step,
    real_grad_samples,
    reference_per_sample_gradients,
    without_hooks,
)

__all__ = [
    "PatientIndex",
    "check_patient_gradients",
    "group_patients",
    "patient_chunks",
    "private_patient_step",
    "sum_grad_samples_by_patient",
]


@dataclass(frozen=True)
class PatientIndex:
    """The training split's images grouped by patient, the public cap applied.

    Attributes:
        images: per patient (in order of first appearance in the split), the indices of the images it contributes
            (into the split, ascending, at most the cap).
        max_images_per_patient: the cap.
        n_images_left_out: images of patients above the cap that are never used.
    """

    images: tuple[np.ndarray, ...]
    max_images_per_patient: int
    n_images_left_out: int

    @property
    def n_patients(self) -> int:
        return len(self.images)

    def gather(self, patients: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The image indices of ``patients`` (patient-contiguous) and, per image, its patient's position (0-based,
        in the order of ``patients``)."""
        chosen = [self.images[int(p)] for p in np.asarray(patients)]
        if not chosen:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        groups = np.repeat(np.arange(len(chosen)), [len(c) for c in chosen])
        return np.concatenate(chosen).astype(np.int64), groups.astype(np.int64)


def group_patients(patient_ids: Sequence[str] | np.ndarray, max_images_per_patient: int) -> PatientIndex:
    """Group a split's images by patient id, keeping each patient's first ``max_images_per_patient`` images.

    Raises:
        ValueError: the cap is not a whole number >= 1, or there are no images.
    """
    if isinstance(max_images_per_patient, bool) or not (
        isinstance(max_images_per_patient, int) and max_images_per_patient >= 1
    ):
        raise ValueError(f"max_images_per_patient={max_images_per_patient!r} must be a whole number >= 1")
    ids = np.asarray(patient_ids)
    if ids.size == 0:
        raise ValueError("group_patients needs at least one image")
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # patients in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    by_patient = np.argsort(rank[inverse], kind="stable")  # image indices grouped, ascending within a patient
    bounds = np.cumsum(np.bincount(rank[inverse], minlength=len(order)))[:-1]
    groups = np.split(by_patient, bounds)
    kept = tuple(g[:max_images_per_patient] for g in groups)
    return PatientIndex(
        kept, max_images_per_patient, int(sum(len(g) - len(k) for g, k in zip(groups, kept, strict=True)))
    )


def sum_grad_samples_by_patient(module: torch.nn.Module, groups: torch.Tensor) -> None:
    """Replace every trainable parameter's per-image ``grad_sample`` rows by per-patient sums.

    ``groups[i]`` is image i's patient, numbered 0..P-1 in order of first appearance within the chunk (as
    `patient_chunks` leaves them after renumbering); afterwards ``grad_sample`` has P rows, so the optimizer clips
    each patient's summed gradient as one record.
    """
    _, local = torch.unique_consecutive(groups, return_inverse=True)
    n_patients = int(local.max().item()) + 1 if len(local) else 0
    for p in module.parameters():
        if not p.requires_grad:
            continue
        rows = getattr(p, "grad_sample", None)
        if rows is None or not isinstance(rows, torch.Tensor):
            raise PerSampleGradientError("a trainable parameter has no per-sample gradient to group by patient")
        if rows.shape[0] != len(groups):
            raise ValueError(f"grad_sample has {rows.shape[0]} rows for {len(groups)} images")
        summed = torch.zeros((n_patients, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        setattr(p, "grad_sample", summed.index_add_(0, local.to(rows.device), rows))  # noqa: B010 (Opacus' attribute)


def private_patient_step(
    wrapped: WrappedModel,
    optimizer: DPOptimizer,
    loss_fn: PerSampleLoss,
    batch: tuple[torch.Tensor, torch.Tensor],
    groups: np.ndarray,
    max_physical_batch_size: int,
    *,
    pad_multiple: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    extra_grad_samples: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One patient-level DP-SGD step on a patient-contiguous logical batch (see the module docstring).

    Chunks hold whole patients; each chunk's records are its patients (``bk``: grouped inside the engine; the other
    modes: the chunk's ``grad_sample`` rows summed per patient), the optimizer clips and accumulates them; noise is
    added and the accountant advanced once, at the last chunk. An empty batch is a noisy step too
    (`trainables.privacy.engine.private_step`). Returns the mean per-image loss as a 0-dim tensor on the batch's
    device (NaN when empty), without reading it back to the host.

    Args:
        groups: each image's patient (`PatientIndex.gather`), patient-contiguous.
        pad_multiple: fixed shapes: each chunk zero-padded to a multiple of this many rows (at most
            ``max_physical_batch_size``); None: no padding. Padding rows contribute nothing.
        autocast_dtype: ``torch.bfloat16`` for ``speed.precision: bf16`` (as `trainables.privacy.engine.private_step`).
        extra_grad_samples: explicit gradient rows, each one more *record* beside the batch's patients (the
            white-box audit's canary patients): clipped to C as a whole row and added to the clipped sum before the
            noise, as in `trainables.privacy.engine.private_step`; never grouped with an image.
    """
    x, y = batch
    if len(x) == 0:
        return private_step(wrapped, optimizer, loss_fn, batch, max_physical_batch_size, extra_grad_samples)
    if isinstance(wrapped, BookKeepingModule):
        return book_keeping_step(
            wrapped,
            optimizer,
            loss_fn,
            batch,
            max_physical_batch_size,
            extra_grad_samples,
            pad_multiple=pad_multiple,
            autocast_dtype=autocast_dtype,
            groups=groups,
        )
    chunks = list(patient_physical_chunks(x, y, groups, max_physical_batch_size, pad_multiple))
    autocast = nullcontext() if autocast_dtype is None else torch.autocast(x.device.type, dtype=autocast_dtype)
    total_loss = torch.zeros((), dtype=torch.float32, device=x.device)
    for i, (chunk, chunk_groups) in enumerate(chunks):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(wrapped(chunk.x), chunk.y)[: chunk.n_real]  # padded rows: exactly zero gradients
        torch.autograd.backward(loss.sum())  # loss_reduction="sum" (engine.wrap_model)
        total_loss = total_loss + loss.detach().sum()
        real_grad_samples(wrapped, chunk.n_real)  # padded rows dropped, bf16 rows upcast
        sum_grad_samples_by_patient(wrapped, torch.as_tensor(chunk_groups))
        last = i == len(chunks) - 1
        if last:
            append_grad_samples(wrapped, extra_grad_samples)  # after the grouping: each row is its own record
        optimizer.signal_skip_step(do_skip=not last)
        with full_float32():  # Opacus' clipping and sum without TF32 (speed.cuda_tuning)
            optimizer.step()
    return total_loss / len(x)


def check_patient_gradients(
    wrapped: WrappedModel,
    loss_fn: PerSampleLoss,
    x: torch.Tensor,
    y: torch.Tensor,
    groups: np.ndarray,
    tolerance: float = 1e-3,
) -> GradientCheck:
    """Verify the grouped path: the engine's per-patient gradients equal sums of ``torch.func`` per-image gradients.

    One forward/backward of ``x`` (patient-contiguous, ``groups`` as in `PatientIndex.gather`) through the engine,
    the same `sum_grad_samples_by_patient` as training, compared per patient and parameter with the reference;
    all gradients are cleared afterwards (nothing is updated, no budget spent). For ``bk``, which forms no per-patient
    gradient, `trainables.privacy.engine.check_book_keeping` compares per-patient norms and clipped sums.

    Raises:
        PerSampleGradientError: a relative error above ``tolerance``.
    """
    if isinstance(wrapped, BookKeepingModule):
        return check_book_keeping(wrapped, loss_fn, x, y, tolerance, groups=groups)
    module = wrapped._module
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    group_tensor = torch.as_tensor(groups)
    _, local = torch.unique_consecutive(group_tensor, return_inverse=True)
    n_patients = int(local.max().item()) + 1
    try:
        reference = reference_per_sample_gradients(without_hooks(module), loss_fn, x, y)
        wrapped.zero_grad(set_to_none=True)
        loss_fn(wrapped(x), y).sum().backward()  # type: ignore[no-untyped-call]  # loss_reduction="sum"
        sum_grad_samples_by_patient(wrapped, group_tensor)
        worst, worst_name = 0.0, ""
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            ref_rows = reference[name].reshape(len(x), -1)
            ref = torch.zeros((n_patients, ref_rows.shape[1]), dtype=ref_rows.dtype, device=ref_rows.device)
            ref.index_add_(0, local.to(ref_rows.device), ref_rows)
            engine = getattr(p, "grad_sample").reshape(n_patients, -1)  # noqa: B009 (Opacus' attribute)
            error = ((engine - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).max().item()
            if error > worst:
                worst, worst_name = error, name
    finally:
        for p in module.parameters():
            setattr(p, "grad_sample", None)  # noqa: B010
            p.grad = None
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    check = GradientCheck(worst, worst_name, n_patients, len(reference))
    if worst > tolerance:
        raise PerSampleGradientError(
            f"per-patient gradients are wrong: relative error {worst:.3g} > {tolerance:g} at {worst_name}; "
            "the trial would clip wrong patient gradients, so it refuses to train"
        )
    return check
