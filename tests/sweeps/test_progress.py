"""The console's progress lines: short, aligned, with the sweep's status after each finished trial."""

from __future__ import annotations

from types import SimpleNamespace

from sweeps.tracking import ProgressCallback
from tests.sweeps.points import tiny_point
from trainables import names as N
from trainables.point import POINT


def trial(key: str, status: str) -> SimpleNamespace:
    return SimpleNamespace(config={POINT: tiny_point(2.0, key=key).to_ray()}, status=status, local_path="/x")


def test_epoch_and_done_lines_are_aligned_and_the_status_counts_trials():
    lines: list[str] = []
    progress = ProgressCallback(n_trials=4, key_width=len("random-epsinf"), log=lines.append)
    trials = [
        trial("random-eps1", "RUNNING"),
        trial("random-epsinf", "RUNNING"),
        trial("a", "TERMINATED"),
        trial("b", "PENDING"),
    ]
    progress.on_trial_result(0, trials, trials[0], {N.EPOCH: 1, N.VAL_AUROC_MACRO: 0.61, N.EPSILON: 0.5})
    progress.on_trial_result(0, trials, trials[1], {N.EPOCH: 1, N.VAL_AUROC_MACRO: 0.7, N.EPSILON: float("inf")})
    assert lines[0].index("val AUROC") == lines[1].index("val AUROC")  # aligned on the longest key
    final = {N.DONE: True, N.BEST_EPOCH: 1, N.TEST_AUROC_MACRO: 0.6, N.EPSILON: 0.99}
    progress.on_trial_result(0, trials, trials[0], final)
    assert lines[2].startswith("  done   random-eps1")
    assert lines[3].startswith("  [2/4 done, 1 running, 1 pending |") and "ETA" in lines[3]
    assert all(len(line) <= 100 for line in lines)
