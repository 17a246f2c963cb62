"""The Ray Tune function trainable: a thin adapter around `trainables.train.train_trial`.

The only module that imports ``ray.tune``. It reads Ray's config as a `trainables.point.TrialPoint`, resumes from Ray's
latest checkpoint (weights, optimizer, privacy ledger, RNG streams), and persists one checkpoint per
epoch plus a final one holding the final report, the evaluation tables and the selected model's weights
(`write_final_checkpoint`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from ray import tune

from trainables.models import save_weights
from trainables.names import BEST_EPOCH, DONE, FINAL_FILE, FINAL_WEIGHTS_FILE, NODE_ID, STOPPED
from trainables.names import CHECKPOINT_STATE_FILE as STATE_FILE
from trainables.point import POINT, TrialPoint
from trainables.train import SCRUBBED, TrialResult, train_trial


def dp_trial(config: dict[str, Any]) -> None:
    """Ray entry point. ``config["point"]`` is the trial point (`TrialPoint.to_ray`): its config and init are
    trained."""
    point = TrialPoint.from_ray(config[POINT])
    cfg, init = point.config, point.init

    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            final_file = Path(folder) / FINAL_FILE
            if final_file.exists():
                # Finished before the restart (Ray restarts a trial whose end its saved experiment state had not
                # recorded yet): report the same final result again, trained nothing. The checkpoint stays Ray's
                # latest, so it is not saved a second time; MLflow's callback does not log the result twice.
                tune.report(json.loads(final_file.read_text()))
                return
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
            if state.get(SCRUBBED) == STOPPED:
                # ASHA had stopped the trial and the driver scrubbed its checkpoint (`sweeps.scrub`) before Ray saved
                # the stop (a driver killed in between restarts the trial): it stays stopped, trained nothing.
                return

    def report_epoch(metrics: dict[str, Any], epoch_state: dict[str, Any] | None) -> None:
        # Staged inside the trial's own folder (private material, scrubbed with it: `sweeps.scrub`), never in /tmp: a
        # worker killed while Ray takes the checkpoint would leave the secret seeds behind there.
        with tempfile.TemporaryDirectory(dir=_staging_dir()) as folder:
            torch.save(epoch_state, Path(folder) / STATE_FILE)
            tune.report({**metrics, DONE: False}, checkpoint=tune.Checkpoint.from_directory(folder))

    final = train_trial(cfg, init, report_epoch, state)
    metrics = {**_json_safe(final.metrics), NODE_ID: ray.get_runtime_context().get_node_id(), DONE: True}
    with tempfile.TemporaryDirectory() as folder:
        write_final_checkpoint(Path(folder), final, metrics)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _staging_dir() -> str | None:
    """The trial's own folder in the sweep's Ray storage (``runs/ray/<sweep>/<trial>``), where its checkpoints are
    staged, when that storage is a local (or mounted shared) folder; else None (the system's temporary folder)."""
    try:
        path = tune.get_context().get_storage().trial_fs_path
    except Exception:  # no Tune session (a test calling dp_trial's pieces directly), or another Ray's API
        return None
    return str(path) if path and os.path.isdir(path) else None


def write_final_checkpoint(folder: Path, final: TrialResult, metrics: dict[str, Any]) -> None:
    """A finished trial's final checkpoint: its evaluation tables (`write_tables`), the selected model's weights
    (`FINAL_WEIGHTS_FILE`, safetensors) and, last, the final report (`FINAL_FILE`, which marks the checkpoint final).

    The weights are ``model.state_dict()`` alone, the parameters and buffers under their names: no optimizer state,
    RNG state or seed. For a private trial they are DP-SGD's output (the epoch chosen on validation), covered by the
    trial's epsilon like every number computed from them; ``dpsweep release --models`` publishes them. Load them with
    `trainables.models.load_weights` into the trial's model."""
    write_tables(folder, final.tables)
    save_weights(final.model, folder / FINAL_WEIGHTS_FILE)
    (folder / FINAL_FILE).write_text(json.dumps(metrics))


def write_tables(folder: Path, tables: dict[str, pd.DataFrame]) -> None:
    """Evaluation tables as parquet files (``groups``, ``bootstrap``, ``epochs``, ``predictions``)."""
    for name, table in tables.items():
        if table is not None:
            table.to_parquet(folder / f"{name}.parquet", index=False)


def _json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """Plain Python numbers; infinities stay floats (json writes them as Infinity)."""
    return {
        k: (float(v) if isinstance(v, float) or hasattr(v, "item") else v)
        for k, v in metrics.items()
        if v is None or isinstance(v, int | float | str | bool) or hasattr(v, "item")
    }


def is_final_report(result: dict[str, Any]) -> bool:
    """Whether a result is a trial's final report. ``done`` alone is not enough: Ray also sets it on the last
    epoch report of a trial its scheduler stops early (ASHA); only the final report carries ``val/best_epoch``."""
    return bool(result.get(DONE)) and BEST_EPOCH in result
