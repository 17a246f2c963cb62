"""The guarantee a sweep prints is the one its trials get: secret noise, nothing private released unaccounted.

One sweep file run twice under two names, in one runs folder (so one MLflow store): the private trials draw
different noise and batches (their per-epoch validation AUROC differ) while the non-private baselines, which have
no mechanism, match bit for bit; no private trial releases a raw batch loss; and the secret seeds, read back from
the trials' own checkpoints (the only place they live), appear in no output: MLflow params, tags and metrics, the
parquet tables, Ray's result logs, the console.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from sweeps.launch import run_sweep
from sweeps.plan import SweepPaths
from sweeps.spec import parse_spec
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M

pytestmark = pytest.mark.slow

NAMES = ("secret-a", "secret-b")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("secret")
    console: list[str] = []
    runs = {}
    watcher = CheckpointWatcher(root / "runs" / "ray")
    watcher.start()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in NAMES:
            spec = parse_spec(yaml.safe_load(tiny_yaml(name=name, data={"synthetic_images": 400})), source=name)
            paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
            runs[name] = (spec, paths, run_sweep(spec, paths, log=console.append))
    finally:
        ray.shutdown()
        watcher.stop()
    return runs, "\n".join(console), watcher.seeds


class CheckpointWatcher(threading.Thread):
    """Reads the secret seeds out of the trials' epoch checkpoints while the sweep runs: a finished trial's final
    checkpoint replaces them (Ray keeps one), so after the sweep the seeds exist nowhere on disk."""

    def __init__(self, ray_dir: Path) -> None:
        super().__init__(daemon=True)
        self.ray_dir, self.seeds, self._halt = ray_dir, set(), threading.Event()

    def run(self) -> None:
        seen: set[Path] = set()
        while not self._halt.is_set():
            for state_file in set(self.ray_dir.rglob(M.CHECKPOINT_STATE_FILE)) - seen:
                try:
                    state = torch.load(state_file, map_location="cpu", weights_only=False)
                except Exception:  # being written, or already replaced: try again next round
                    continue
                seen.add(state_file)
                self.seeds.update((state.get("secret_seeds") or {}).values())
            self._halt.wait(0.1)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def epochs_of(paths: SweepPaths, name: str) -> pd.DataFrame:
    return pd.read_parquet(paths.runs_root / name / M.EPOCHS_FILE)


def test_private_trials_draw_fresh_noise_while_baselines_replay_exactly(two_runs):
    runs, _, _ = two_runs
    (_, paths, trials_a), (_, _, trials_b) = runs[NAMES[0]], runs[NAMES[1]]
    assert (trials_a["status"] == M.TERMINATED).all() and (trials_b["status"] == M.TERMINATED).all()
    a, b = epochs_of(paths, NAMES[0]), epochs_of(paths, NAMES[1])
    private = a["target_epsilon"].map(math.isfinite)
    assert private.any() and (~private).any()
    key = ["trial", M.EPOCH]
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(a) == len(b)
    is_private = merged["target_epsilon_a"].map(math.isfinite)
    same_seed_private = merged[is_private]
    # Same config and seed, yet different noise and batches: the validation AUROC of the private epochs differ.
    assert (same_seed_private[f"{M.VAL_AUROC_MACRO}_a"] != same_seed_private[f"{M.VAL_AUROC_MACRO}_b"]).all()
    baseline = merged[~is_private]
    pd.testing.assert_series_equal(
        baseline[f"{M.VAL_AUROC_MACRO}_a"], baseline[f"{M.VAL_AUROC_MACRO}_b"], check_names=False
    )
    # The epsilon spent is the accountant's, the same in both runs.
    pd.testing.assert_series_equal(
        same_seed_private[f"{M.EPSILON}_a"], same_seed_private[f"{M.EPSILON}_b"], check_names=False
    )


def test_no_private_trial_releases_its_batch_loss(two_runs):
    runs, _, _ = two_runs
    _, paths, _ = runs[NAMES[0]]
    for name in NAMES:
        epochs = epochs_of(paths, name)
        private = epochs[epochs["target_epsilon"].map(math.isfinite)]
        assert M.TRAIN_LOSS not in private.columns or private[M.TRAIN_LOSS].isna().all()
    client = MlflowClient(paths.tracking_uri)
    for run in _child_runs(client, paths):
        if run.data.tags.get("dpsweep.private") == "true":
            assert M.TRAIN_LOSS not in run.data.metrics, run.data.tags[M.TRIAL_KEY_TAG]
            assert not client.get_metric_history(run.info.run_id, M.TRAIN_LOSS)


def test_every_private_trial_states_its_guarantee(two_runs):
    runs, _, _ = two_runs
    _, paths, trials = runs[NAMES[0]]
    private = trials[trials["target_epsilon"].map(math.isfinite)]
    for statement in private[M.GUARANTEE]:
        for words in (
            "-DP",
            "unit: one image",
            "add/remove adjacency",
            "treated as public",
            "accountant rdp",
            "os.urandom",
            "Outside it",
        ):
            assert words in statement, (words, statement)
    baseline = trials[~trials["target_epsilon"].map(math.isfinite)]
    assert baseline[M.GUARANTEE].str.startswith("none").all()


def test_no_seed_that_drives_noise_or_sampling_is_in_any_output(two_runs):
    runs, console, seeds = two_runs
    _, paths, _ = runs[NAMES[0]]
    assert len(seeds) >= 2 * 2  # one private trial per run, a sampler and a noise seed each
    spellings = {form for seed in seeds for form in _spellings(seed)}
    outputs = [console]
    client = MlflowClient(paths.tracking_uri)
    for run in _child_runs(client, paths):
        outputs += [json.dumps(run.data.params), json.dumps(run.data.tags), repr(run.data.metrics)]
    for preview in (paths.runs_root / "mlartifacts").rglob("*.csv"):  # every artifact table's CSV twin
        outputs.append(preview.read_text())
    for name in NAMES:
        for table in (paths.runs_root / name).glob("*.parquet"):
            outputs.append(pd.read_parquet(table).to_csv())
        for log in paths.ray_experiment(runs[name][0]).rglob("*"):
            if log.is_file() and "checkpoint_" not in str(log) and log.suffix in (".json", ".csv", ".log", ".txt"):
                outputs.append(log.read_text(errors="replace"))
    text = "\n".join(outputs)
    leaked = sorted(s for s in spellings if s in text)
    assert not leaked, f"secret seed material in the outputs: {leaked[:5]}"


def _child_runs(client: MlflowClient, paths: SweepPaths) -> list:
    runs = []
    for name in NAMES:
        experiment = client.get_experiment_by_name(name)
        runs += [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(M.ROLE_TAG) == "trial"]
    return runs


def _spellings(seed: int) -> set[str]:
    """How a leaked seed could be written: decimal and hex of the whole seed and of its 64-bit words (shorter
    pieces would match digits of unrelated floats and run ids by chance)."""
    words = {seed} | {(seed >> shift) & 0xFFFF_FFFF_FFFF_FFFF for shift in (0, 64)}
    return {form for word in words if word > 2**40 for form in (str(word), f"{word:x}")}


def test_checkpoints_are_not_logged_as_artifacts_and_finished_trials_keep_no_seeds(two_runs):
    runs, _, _ = two_runs
    _, paths, _ = runs[NAMES[0]]
    artifacts = [p for p in Path(paths.runs_root / "mlartifacts").rglob("*") if p.is_file()]
    assert artifacts, "the evaluation tables should be logged"
    assert not [p for p in artifacts if p.suffix == ".pt" or p.name == M.CHECKPOINT_STATE_FILE]
    # Every trial finished: Ray kept only its final checkpoint (tables and report), so no secret seed is left.
    assert not list(paths.ray_storage.rglob(M.CHECKPOINT_STATE_FILE))
