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


def test_the_summary_shows_mean_sd_and_n_over_seeds_per_cell_within_100_characters():
    """The hand-made two-seed table of `tests.analysis.test_seeds` (numbers computed by hand there)."""
    from sweeps.summary import SUMMARY_WIDTH, seed_table
    from tests.analysis.seed_tables import hand_trials

    trials = hand_trials()
    trials[N.auroc_gap("test", "sex")] = 0.02
    text = seed_table(trials)
    lines = text.splitlines()
    assert max(map(len, lines)) <= SUMMARY_WIDTH, text
    header = next(line for line in lines if line.split()[:2] == ["init", "target"])
    assert header.split() == ["init", "target", "test", "AUROC", "95%", "interval", "age", "gap", "sex", "gap"]
    rows = {tuple(line.split()[:2]): line for line in lines[lines.index(header) + 1 :]}
    assert (
        rows[("random", "1")].split()[2:]
        == "0.670 +/- 0.042 (2) [0.289, 1.051] 0.100 +/- - (1) 0.020 +/- 0.000 (2)".split()
    )
    assert rows[("random", "non-DP")].split()[2:8] == "0.830 +/- 0.036 (3) [0.740, 0.920]".split()
    assert rows[("domain", "1")].split()[2:7] == "0.750 +/- - (1) -".split()  # one seed: no sd, no interval
    assert seed_table(trials[trials["seed"] == 0]) is None  # one seed per cell: no table


def test_the_seed_table_leaves_metrics_out_rather_than_grow_past_100_characters():
    from sweeps.summary import SUMMARY_WIDTH, seed_table
    from tests.analysis.seed_tables import hand_trials

    trials = hand_trials()
    trials[N.auroc_gap("test", "sex")] = 0.02
    trials.loc[trials["init"] == "domain", ["model", "dataset"]] = ["convnext_small", "chexpert"]  # shown: they differ
    text = seed_table(trials)
    assert max(map(len, text.splitlines())) <= SUMMARY_WIDTH, text
    assert "model" in text and "95% interval" in text
    assert text.splitlines()[-1] == "(left out for width: sex gap; the report has every metric)"
