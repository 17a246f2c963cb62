"""One trial in its own process, checkpointing every epoch, for the kill-and-resume test (`test_resume.py`).

Run as ``python -m tests.privacy.resume_worker RUN_DIR [--stop-after-epoch E --stop-at-batch K]`` from the
repository root. It does what the Ray adapter (`trainables.trial`) does, without Ray: it resumes from
``RUN_DIR/state.pt`` when that exists, runs `trainables.train.train_trial`, and after every epoch saves the
checkpointable state with ``torch.save`` and records the epoch's metrics.

Files in ``RUN_DIR``:

* ``config.json`` (input, see `write_config`): ``{"trial": flat TrialConfig, "init": ResolvedInit fields}``.
* ``state.pt``: the latest epoch's state, replaced atomically (temporary file + ``os.replace``), so a kill at
  any instant leaves either the previous or the new checkpoint, never a torn one. Not fsynced: the test
  kills processes, not machines.
* ``epochs.jsonl``: one line ``{"pid": ..., "metrics": {...}}`` per epoch, appended after that epoch's
  checkpoint is in place, by whichever process ran the epoch.
* ``final.json`` (final metrics), ``final_model.pt`` (the selected epoch's weights) and ``<table>.parquet``
  (the evaluation tables), written when training ends.
* ``stopped.json``: written when the run reaches its stop point (below), just before it hangs or raises.

A stop point makes the run halt mid-epoch deterministically: after epoch ``E`` has been checkpointed, the
``K``-th training batch the loop draws (so ``K - 1`` steps of epoch ``E + 1`` have run and exist only in
memory) writes ``stopped.json`` and then, in a process, sleeps until it is killed (``--stop-after-epoch``);
in-process (`run`), it raises `Stopped`. The hook sits on the training split's ``batch`` method, which the
loop calls once per logical batch, empty Poisson batches included; batches drawn before the first checkpoint
of this process (the per-sample-gradient check's) are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainables import names as M
from trainables.config import TrialConfig
from trainables.data.loaders import load_trial_data
from trainables.models import ResolvedInit
from trainables.train import train_trial

CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
EPOCHS_FILE = "epochs.jsonl"
FINAL_FILE = "final.json"
FINAL_MODEL_FILE = "final_model.pt"
STOPPED_FILE = "stopped.json"
HANG_SECONDS = 300
"""How long a stopped process waits to be killed before it gives up and exits with `NOT_KILLED_EXIT`."""
NOT_KILLED_EXIT = 3


class Stopped(RuntimeError):
    """The in-process run reached its stop point (stands in for the process being killed there)."""


@dataclass(frozen=True)
class StopPoint:
    """Where a run halts: at the ``batch``-th training batch drawn after epoch ``after_epoch`` was checkpointed.

    Attributes:
        after_epoch: the last epoch whose checkpoint is on disk when the run halts (1-based).
        batch: which training batch of the next epoch halts the run (1-based); ``batch - 1`` steps of that
            epoch have run by then and are lost with the process.
        hang: True: write ``stopped.json`` and sleep until killed (subprocess use); False: raise `Stopped`.
    """

    after_epoch: int
    batch: int
    hang: bool = True


def write_config(run_dir: Path, cfg: TrialConfig, init: ResolvedInit) -> None:
    """Write the run's input (JSON keeps floats exact: they are written with ``repr``; inf as Infinity)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(json.dumps({"trial": cfg.to_flat(), "init": asdict(init)}, indent=1))


def read_config(run_dir: Path) -> tuple[TrialConfig, ResolvedInit]:
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    return TrialConfig.from_flat(config["trial"]), ResolvedInit(**config["init"])


def read_epochs(run_dir: Path) -> list[dict[str, Any]]:
    """The ``epochs.jsonl`` records, in the order they were written."""
    path = run_dir / EPOCHS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run(run_dir: Path, stop: StopPoint | None = None, cfg: TrialConfig | None = None) -> dict[str, Any]:
    """Run (or resume) the trial described by ``run_dir/config.json`` to the end, or to ``stop``.

    Args:
        run_dir: the run's folder (see the module docstring for its files).
        stop: where to halt mid-epoch, or None to run to the end.
        cfg: overrides the configuration in ``config.json`` (to try resuming a checkpoint under another one).

    Returns:
        The final metrics.

    Raises:
        Stopped: ``stop`` was reached with ``stop.hang`` False.
    """
    file_cfg, init = read_config(run_dir)
    cfg = cfg or file_cfg
    state_path = run_dir / STATE_FILE
    state = torch.load(state_path, weights_only=False) if state_path.exists() else None
    data = load_trial_data(cfg)
    checkpointed = {"epoch": None, "batches_since": 0}

    if stop is not None:
        draw_batch = data.train.batch

        def batch_with_stop_point(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            if checkpointed["epoch"] == stop.after_epoch:
                checkpointed["batches_since"] += 1
                if checkpointed["batches_since"] == stop.batch:
                    _halt(run_dir, stop, checkpointed["epoch"])
            return draw_batch(indices)

        data.train.batch = batch_with_stop_point

    def report(metrics: dict[str, Any], epoch_state: dict[str, Any] | None) -> None:
        tmp = run_dir / f"{STATE_FILE}.tmp"
        torch.save(epoch_state, tmp)
        os.replace(tmp, state_path)
        with (run_dir / EPOCHS_FILE).open("a") as log:
            log.write(json.dumps({"pid": os.getpid(), "metrics": metrics}, default=_plain) + "\n")
        checkpointed.update(epoch=metrics[M.EPOCH], batches_since=0)

    result = train_trial(cfg, init, report, state, data=data)
    (run_dir / FINAL_FILE).write_text(json.dumps(result.metrics, default=_plain))
    torch.save(result.model.state_dict(), run_dir / FINAL_MODEL_FILE)
    for name, table in result.tables.items():
        table.to_parquet(run_dir / f"{name}.parquet", index=False)
    return result.metrics


def _halt(run_dir: Path, stop: StopPoint, epoch: int) -> None:
    marker = {"pid": os.getpid(), "checkpointed_epoch": epoch, "batch": stop.batch}
    (run_dir / STOPPED_FILE).write_text(json.dumps(marker))
    if not stop.hang:
        raise Stopped(f"stopped at batch {stop.batch} after epoch {epoch} was checkpointed")
    time.sleep(HANG_SECONDS)
    raise SystemExit(NOT_KILLED_EXIT)


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars (json writes float NaN/inf itself, as NaN/Infinity)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to JSON")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--stop-after-epoch", type=int, help="hang after this epoch is checkpointed")
    parser.add_argument("--stop-at-batch", type=int, default=1, help="... at this training batch of the next epoch")
    args = parser.parse_args(argv)
    stop = StopPoint(args.stop_after_epoch, args.stop_at_batch) if args.stop_after_epoch is not None else None
    metrics = run(args.run_dir, stop)
    print(f"done: {M.STEPS}={metrics[M.STEPS]} {M.EPSILON}={metrics[M.EPSILON]!r}", flush=True)


if __name__ == "__main__":
    main()
