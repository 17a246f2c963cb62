"""An epoch's system metrics: how fast a trial trained (`trainables.names.SYSTEM_METRICS`).

Pure arithmetic on the epoch's wall time and public counts. Every figure here is derived from the wall time, which
tracks a private epoch's secret Poisson batch sizes: only non-private trials report them (`trainables.train`); a
private trial releases its run's total training time alone (docs/design.md, "Timing figures").
"""

from __future__ import annotations

import math

from trainables import names as M


def throughput_metrics(
    seconds: float, steps: int, expected_images_per_step: float | None, images_per_epoch: int
) -> dict[str, float]:
    """An epoch's system metrics (`trainables.names.SYSTEM_METRICS`) from its training wall time.

    Args:
        seconds: wall seconds of the epoch's training steps (after the device finished them).
        steps: logical batches taken in it.
        expected_images_per_step: a private trial's expected images per logical batch (q times the training images
            of all records; public), or None for a non-private trial, whose epoch is every image once.
        images_per_epoch: a non-private epoch's images (N).
    """
    steps_per_s = steps / seconds if seconds > 0 else math.nan
    images = images_per_epoch if expected_images_per_step is None else expected_images_per_step * steps
    return {
        M.SYSTEM_TRAIN_S: seconds,
        M.SYSTEM_STEP_S: seconds / steps if steps else math.nan,
        M.SYSTEM_STEPS_PER_S: steps_per_s,
        M.SYSTEM_IMAGES_PER_S: images / seconds if seconds > 0 else math.nan,
    }
