"""The guarantee a sweep prints is the one its trials get: secret noise, nothing private released unaccounted.

One sweep file run twice under two names, in one runs folder (so one MLflow store): the private trials draw
different noise and batches (their per-epoch validation AUROC differ) while the non-private baselines, which have
no mechanism, match bit for bit; no private trial releases a raw batch loss; and the secret seeds, read back from
the trials' own checkpoints (the only place they live while a trial runs), appear in no output: MLflow params, tags
and metrics, the parquet tables, Ray's result logs and experiment state, the console.

A third sweep ends its trials the other ways, STOPPED by ASHA and ERROR (its worker killed, no retry left): no
checkpoint it leaves holds a secret seed or generator state (`sweeps.scrub`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from sweeps import scrub
from sweeps.launch import run_sweep
from sweeps.plan import SweepPaths
from sweeps.spec import parse_spec
from tests.ray_files import read_json
from tests.secret_bytes import found_in, generator_spellings, seed_spellings
from tests.sweeps.tiny import tiny_yaml
from trainables import names as M
from trainables.train import SCRUBBED, SECRET_KEYS

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
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for name in NAMES:
            spec = parse_spec(yaml.safe_load(tiny_yaml(name=name, data={"synthetic_images": 400})), source=name)
            paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
            runs[name] = (spec, paths, run_sweep(spec, paths, log=console.append))
    finally:
        ray.shutdown()
        watcher.stop()
    return runs, "\n".join(console), watcher.seeds, watcher.spellings


class CheckpointWatcher(threading.Thread):
    """Reads the secret seeds and generator states out of the trials' epoch checkpoints while the sweep runs: a
    finished trial's final checkpoint replaces them (Ray keeps one) and an ended trial's are scrubbed, so after the
    sweep they exist nowhere on disk. ``spellings``: how a file could hold any of them (`tests.secret_bytes`)."""

    def __init__(self, ray_dir: Path) -> None:
        super().__init__(daemon=True)
        self.ray_dir, self.seeds, self.spellings, self._halt = ray_dir, set(), set(), threading.Event()

    def run(self) -> None:
        seen: set[Path] = set()
        while not self._halt.is_set():
            for state_file in set(self.ray_dir.rglob(M.CHECKPOINT_STATE_FILE)) - seen:
                try:
                    self.read(state_file)
                except Exception:  # being written, or already replaced: try again next round
                    continue
                seen.add(state_file)
            self._halt.wait(0.1)

    def read(self, state_file: Path) -> None:
        """Keep the secrets of one checkpoint."""
        state = torch.load(state_file, map_location="cpu", weights_only=False)
        seeds = (state.get("secret_seeds") or {}).values()
        self.seeds.update(seeds)
        self.spellings.update(form for seed in seeds for form in seed_spellings(seed))
        for name in ("sampler_rng", "noise_rng"):
            if isinstance(state.get(name), torch.Tensor):
                self.spellings |= generator_spellings(state[name])

    def stop(self) -> None:
        self._halt.set()
        self.join()


def epochs_of(paths: SweepPaths, name: str) -> pd.DataFrame:
    return pd.read_parquet(paths.runs_root / name / M.EPOCHS_FILE)


def test_private_trials_draw_fresh_noise_while_baselines_replay_exactly(two_runs):
    runs, *_ = two_runs
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
    runs, *_ = two_runs
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
    runs, *_ = two_runs
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
    runs, console, seeds, _ = two_runs
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


def test_no_file_a_sweep_leaves_holds_a_seed_or_generator_state(two_runs):
    """Byte for byte, every file under runs/: Ray's experiment state (pickled trial configs, searcher and scheduler,
    callbacks), its result logs, MLflow's store and artifacts, the tables."""
    runs, _, _, spellings = two_runs
    _, paths, _ = runs[NAMES[0]]
    assert len(spellings) > 4 * 3  # each secret seed's bytes, windows of each generator state
    assert (paths.ray_storage / NAMES[0] / "tuner.pkl").is_file()  # the pickled experiment is among the files
    assert not found_in(_files(paths.runs_root), spellings)


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


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
    runs, *_ = two_runs
    _, paths, _ = runs[NAMES[0]]
    artifacts = [p for p in Path(paths.runs_root / "mlartifacts").rglob("*") if p.is_file()]
    assert artifacts, "the evaluation tables should be logged"
    assert not [p for p in artifacts if p.suffix == ".pt" or p.name == M.CHECKPOINT_STATE_FILE]
    # Every trial finished: Ray kept only its final checkpoint (tables and report), so no secret seed is left.
    assert not list(paths.ray_storage.rglob(M.CHECKPOINT_STATE_FILE))


# ----------------------------------------------------------------------------------------------------
# Trials that end early: STOPPED by ASHA, ERROR after a kill

ENDED_EARLY = "secret-ended"
VICTIM_SEED, STOPPED_SEEDS = 0, (3, 4)
# Three private trials, one after the other. At lr 1e-5 the weights barely move in two epochs, so a trial's validation
# AUROC is its initialisation's, which its public seed fixes (on these 200 images of the twin's generator version 2:
# seed 0 0.60, seed 3 0.585, seed 4 0.35; a few thousandths from run to run). The first (seed 0) has its worker
# killed after its first epoch and no retry left: ERROR. ASHA (reduction factor 100: a trial below the best so far at
# epoch 1 stops) stops the other two.
ENDED_EARLY_SPEC = tiny_yaml(
    name=ENDED_EARLY,
    data={"synthetic_images": 200},
    privacy={"target_epsilon": [2], "expected_batch_size": 16, "epochs": 2},
    training={"lr": [1e-5], "seed": [VICTIM_SEED, *STOPPED_SEEDS]},
    early_stopping={"grace_period": 1, "reduction_factor": 100},
    resources={"max_concurrent": 1, "max_failures": 0},
)


class WorkerKiller(threading.Thread):
    """SIGKILLs the Ray worker of the trial whose key contains ``key_part`` once the driver has logged the trial's
    first epoch (so ASHA has its number), as a crash would; only a process this test's Ray started."""

    def __init__(self, experiment: Path, key_part: str) -> None:
        super().__init__(daemon=True)
        self.experiment, self.key_part, self.killed, self._halt = experiment, key_part, None, threading.Event()

    def run(self) -> None:
        while self.killed is None and not self._halt.is_set():
            for params in self.experiment.glob("*/params.json"):
                results = params.with_name("result.json")
                if self.key_part not in read_json(params)["point"]["key"] or not results.exists():
                    continue
                first = results.read_text().split("\n", 1)
                if len(first) == 2:  # the first epoch's line, complete
                    pid = json.loads(first[0])["pid"]
                    assert _descends_from(pid, os.getpid()), f"pid {pid} is not a worker of this test's Ray"
                    os.kill(pid, signal.SIGKILL)
                    self.killed = pid
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


@pytest.fixture(scope="module")
def ended_early(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("ended")
    spec = parse_spec(yaml.safe_load(ENDED_EARLY_SPEC), source=ENDED_EARLY)
    paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
    watcher = CheckpointWatcher(paths.ray_storage)
    killer = WorkerKiller(paths.ray_experiment(spec), f"seed{VICTIM_SEED}")
    original = scrub.scrub_checkpoint

    def read_then_scrub(path: Path, ended: str) -> bool:  # the driver scrubs in this process: read them first
        watcher.read(path)
        return original(path, ended)

    watcher.start()
    killer.start()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(scrub, "scrub_checkpoint", read_then_scrub)
            trials = run_sweep(spec, paths, log=lambda line: None)
    finally:
        ray.shutdown()
        killer.stop()
        watcher.stop()
    return paths, trials.set_index("trial"), killer.killed, watcher


def test_stopped_and_failed_trials_leave_checkpoints_without_secrets(ended_early):
    paths, trials, killed, watcher = ended_early
    seed = {key: int(key.rsplit("-seed", 1)[1]) for key in trials.index}
    status = {seed[key]: s for key, s in trials["status"].items()}
    # Ray (2.60) saves a trial whose worker died on its last attempt as still RUNNING, so the table says INCOMPLETE;
    # the driver saw the error (on_trial_error) and scrubbed it.
    assert killed is not None and status[VICTIM_SEED] in (M.ERROR, M.INCOMPLETE), status
    assert [status[s] for s in STOPPED_SEEDS] == [M.STOPPED] * len(STOPPED_SEEDS), (
        f"ASHA should stop the trials of seeds {STOPPED_SEEDS}; their initial AUROCs may have changed: {status}; "
        f"epochs:\n{epochs_of(paths, ENDED_EARLY)[['trial', M.VAL_AUROC_MACRO]]}"
    )
    assert len(watcher.seeds) == 2 * 3  # every trial checkpointed its sampler and noise seeds, read before scrubbing
    ended = {}
    for path in sorted(paths.ray_storage.rglob(M.CHECKPOINT_STATE_FILE)):
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert not set(SECRET_KEYS) & set(state), f"{path} keeps {sorted(set(SECRET_KEYS) & set(state))}"
        assert state["best_weights"] is not None and state["history"]  # what the selected model needs stays
        ended[seed[read_json(path.parent.parent / "params.json")["point"]["key"]]] = state[SCRUBBED]
    # Each trial left its epoch-1 checkpoint (none finished), marked with how it ended.
    assert ended == {VICTIM_SEED: M.ERROR, **{s: M.STOPPED for s in STOPPED_SEEDS}}
    assert not found_in(_files(paths.runs_root), watcher.spellings)
