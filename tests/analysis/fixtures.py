"""A small hand-made sweep on disk: ``runs/<sweep>/{trials,epochs}.parquet`` and the Ray experiment folder
``runs/ray/<sweep>/`` with each finished trial's final checkpoint (``final.json``, ``groups.parquet``,
``bootstrap.parquet``), laid out as `sweeps.launch` and `trainables.trial` write them.

The numbers are chosen so that the tests can state every expected answer by hand:

| trial          | init   | epsilon per epoch  | val AUROC        | test AUROC at epoch |
|----------------|--------|--------------------|------------------|---------------------|
| random-eps1    | random | 0.5, 0.8, 0.99     | .60 .65 .64      | .58 .62 .66         |
| random-eps1-lr | random | 0.4, 0.7, 0.95     | .55 .60 .63      | .50 .55 .90         |
| random-eps3    | random | 0.9, 2.0, 2.95     | .70 .66 .68      | .61 .67 .69         |
| random-eps20   | random | 5.0, 12.0, 19.5    | .50 .90 .90      | .52 .91 .92         |
| random-epsinf  | random | inf x 3            | .80 .82 .82      | .79 .81 .83         |
| domain-eps1    | domain | 0.5, 0.8, 0.99     | .75 .75 .74      | .73 .76 .77         |
| domain-eps3    | domain | 0.9, 2.0, 2.95     | .70 .78 NaN      | .71 .77 .80         |
| domain-epsinf  | domain | inf x 3            | .85 .86 .84      | .84 .85 .86         |
| domain-eps8    | domain | 4.0 (then ERROR)   | .99              | .99                 |

Final metrics of each finished trial are those of its best validation epoch (first on ties). Per-epoch fairness
gaps (`FakeTrial.test_gap`, `FakeTrial.val_gap`) follow a formula in the epoch and the key's length;
``domain-eps1`` has a NaN test gap at epoch 1 (its selected epoch in bin (0, 1]).

Stored predictions: each finished trial's final checkpoint holds ``predictions.parquet`` (`fake_predictions`) on
the test rows of both datasets' manifests (`fake_manifest`, written under ``runs/data/<dataset>/16/``, the trials'
``data_root`` and ``image_size``).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.tables import TrialRecord, build_tables
from trainables import names
from trainables.data.labels import LABELS
from trainables.names import EPOCHS_FILE, TRIALS_FILE

SWEEP = "fixture"
DATASET = "synthetic-a"
EXTERNAL = "ext-b"
N_BOOT = 20
IMAGE_SIZE = 16
AGE_EDGES = (0, 40, 70, 100)
N_TEST = {DATASET: 100, EXTERNAL: 80}
"""Test images per dataset (the manifests also hold train and val rows before them)."""
INF = math.inf
NAN = math.nan


@dataclass(frozen=True)
class FakeTrial:
    key: str
    init: str
    target: float
    epsilon: tuple[float, ...]
    val: tuple[float, ...]
    test: tuple[float, ...]
    lr: float = 0.001
    status: str = "TERMINATED"
    extra: dict[str, float] = field(default_factory=dict)
    nan_test_gap_epochs: tuple[int, ...] = ()

    @property
    def best_epoch(self) -> int:
        values = np.array(self.val, dtype=float)
        return int(np.nanargmax(values)) + 1

    def final(self) -> dict[str, float]:
        """Final metrics: those of the best validation epoch, plus derived per-trial numbers."""
        if self.status != "TERMINATED":
            return {}
        best = self.best_epoch
        auroc = self.test[best - 1]
        offset = 0.01 * (len(self.key) % 7)  # distinct per trial, known from the key
        out = {
            names.EPSILON: self.epsilon[-1],
            names.BEST_EPOCH: best,
            names.EPSILON_AT_BEST_EPOCH: self.epsilon[best - 1],
            names.TEST_AUROC_MACRO: auroc,
            names.auroc_macro_ci("test", "low"): auroc - 0.03,
            names.auroc_macro_ci("test", "high"): auroc + 0.02,
            names.n_images("test"): 100,
            names.n_images(f"external/{EXTERNAL}"): 80,
            names.external_auroc(EXTERNAL): auroc - 0.05,
            names.subgroup_auroc("test", "sex", "F"): auroc + 0.01,
            names.subgroup_auroc("test", "sex", "M"): auroc - 0.01,
            names.subgroup_auroc("test", "age", "0-40"): auroc + 0.05,
            names.subgroup_auroc("test", "age", "40-70"): auroc,
            names.subgroup_auroc("test", "age", "70-100"): auroc - 0.05 - offset,
            names.auroc_gap_label_mean("test", "age"): 0.2,
            names.worst_group_auroc("test", "age"): auroc - 0.05 - offset,
        }
        out[names.auroc_gap("test", "age")] = 0.10 + offset
        out[names.auroc_gap("test", "sex")] = 0.02
        for family in names.FAIRNESS_METRICS:
            for attribute in ("sex", "age"):
                if family != "auroc_gap":
                    out[names.fairness("test", family, attribute)] = 0.1 + 0.01 * len(family)
                out[names.fairness("test", family, attribute, LABELS[0])] = 0.5  # per label: not in the tables
        return out | self.extra

    def test_gap(self, attribute: str, epoch: int) -> float:
        """Per-epoch test subgroup AUROC gap: sex 0.01 * epoch; age 0.1 * epoch + 0.01 * (len(key) % 7)."""
        if epoch in self.nan_test_gap_epochs:
            return NAN
        return round(0.01 * epoch if attribute == "sex" else 0.1 * epoch + 0.01 * (len(self.key) % 7), 6)

    def val_gap(self, attribute: str, epoch: int) -> float:
        return round(0.2 + 0.01 * epoch if attribute == "age" else 0.05, 6)

    def epochs(self) -> list[dict[str, float]]:
        rows = []
        for i, (e, v, t) in enumerate(zip(self.epsilon, self.val, self.test, strict=True)):
            row = {
                names.EPOCH: i + 1,
                names.EPSILON: e,
                names.VAL_AUROC_MACRO: v,
                names.TEST_AUROC_MACRO_AT_EPOCH: t,
                names.STEPS: 10 * (i + 1),
            }
            for attribute in ("sex", "age"):
                row[names.auroc_gap_at_epoch(attribute)] = self.test_gap(attribute, i + 1)
                row[names.auroc_gap("val", attribute)] = self.val_gap(attribute, i + 1)
            rows.append(row)
        return rows


TRIALS: tuple[FakeTrial, ...] = (
    FakeTrial("random-eps1", "random", 1.0, (0.5, 0.8, 0.99), (0.60, 0.65, 0.64), (0.58, 0.62, 0.66)),
    FakeTrial("random-eps1-lr", "random", 1.0, (0.4, 0.7, 0.95), (0.55, 0.60, 0.63), (0.50, 0.55, 0.90), lr=0.01),
    FakeTrial("random-eps3", "random", 3.0, (0.9, 2.0, 2.95), (0.70, 0.66, 0.68), (0.61, 0.67, 0.69)),
    FakeTrial("random-eps20", "random", 20.0, (5.0, 12.0, 19.5), (0.50, 0.90, 0.90), (0.52, 0.91, 0.92)),
    FakeTrial("random-epsinf", "random", INF, (INF, INF, INF), (0.80, 0.82, 0.82), (0.79, 0.81, 0.83)),
    FakeTrial(
        "domain-eps1", "domain", 1.0, (0.5, 0.8, 0.99), (0.75, 0.75, 0.74), (0.73, 0.76, 0.77), nan_test_gap_epochs=(1,)
    ),
    FakeTrial("domain-eps3", "domain", 3.0, (0.9, 2.0, 2.95), (0.70, 0.78, NAN), (0.71, 0.77, 0.80)),
    FakeTrial("domain-epsinf", "domain", INF, (INF, INF, INF), (0.85, 0.86, 0.84), (0.84, 0.85, 0.86)),
    FakeTrial("domain-eps8", "domain", 8.0, (4.0,), (0.99,), (0.99,), status="ERROR"),
)


def replicates(trial: str, dataset: str) -> np.ndarray:
    """Per-replicate macro AUROC [N_BOOT] (float32-exact values; replicate 19 undefined in every trial).

    ``domain-eps1`` vs ``random-eps1`` on any dataset: random is higher on replicates 0-2, equal on 3,
    lower on 4-18: p(domain better) = 4/19, p(random better) = 16/19.
    """
    base = 0.5 + np.arange(N_BOOT) / 64
    shift = {"domain": 4 / 64, "random": 0.0}[trial.split("-")[0]]
    values = base + shift + (1 / 128 if dataset == EXTERNAL else 0.0)
    if trial.startswith("random"):
        values[:3] = base[:3] + 5 / 64 + (1 / 128 if dataset == EXTERNAL else 0.0)
        values[3] = base[3] + 4 / 64 + (1 / 128 if dataset == EXTERNAL else 0.0)
    values[N_BOOT - 1] = np.nan
    return values


def make_sweep(runs: Path, trials: tuple[FakeTrial, ...] = TRIALS, with_ray: bool = True) -> Path:
    """Write the sweep under ``runs`` and return ``runs/<sweep>``."""
    records = []
    for trial in trials:
        params = {
            "init": trial.init,
            "target_epsilon": trial.target,
            "max_grad_norm": 1.0,
            "lr": trial.lr,
            "seed": 0,
            "dataset": DATASET,
            "model": "test_convnext",
            "accountant": "rdp",
            "delta": 6e-6,
            "privacy_unit": "image",
            "data_root": str(runs / "data"),
            "image_size": IMAGE_SIZE,
            "age_edges": list(AGE_EDGES),
        }
        records.append(
            TrialRecord(
                key=trial.key,
                status=trial.status,
                error=None if trial.status == "TERMINATED" else "BudgetError: fake",
                params=params,
                tags={"dpsweep.git_commit": "abc123"},
                final=trial.final(),
                epochs=trial.epochs(),
            )
        )
    table, epochs = build_tables(records)
    sweep_dir = runs / SWEEP
    sweep_dir.mkdir(parents=True, exist_ok=True)
    table.to_parquet(sweep_dir / TRIALS_FILE, index=False)
    epochs.to_parquet(sweep_dir / EPOCHS_FILE, index=False)
    for dataset in (DATASET, EXTERNAL):
        folder = names.dataset_dir(runs / "data", dataset, IMAGE_SIZE)
        folder.mkdir(parents=True, exist_ok=True)
        fake_manifest(dataset).to_parquet(folder / names.MANIFEST_FILE, index=False)
    if with_ray:
        for index, trial in enumerate(trials):
            write_ray_trial(runs / "ray" / SWEEP / f"dp_trial_0000{index}_{index}_point=key_{trial.key}", trial)
    return sweep_dir


def write_ray_trial(folder: Path, trial: FakeTrial) -> None:
    """Ray's trial folder: ``params.json`` and, for a finished trial, an older plain checkpoint and a final one."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps({"point": {"key": trial.key, "params": {}}}))
    plain = folder / "checkpoint_000001"
    plain.mkdir(exist_ok=True)
    (plain / "state.pt").write_bytes(b"not read")
    if trial.status != "TERMINATED":
        return
    final = folder / "checkpoint_000002"
    final.mkdir(exist_ok=True)
    (final / "final.json").write_text(json.dumps({"done": True}))
    parts = []
    for dataset in (DATASET, EXTERNAL):
        frame = pd.DataFrame(
            {"replicate": np.arange(N_BOOT), "auroc_macro": replicates(trial.key, dataset).astype(np.float32)}
        )
        for label in LABELS:
            frame[label] = frame["auroc_macro"]
        parts.append(frame.assign(dataset=dataset))
    pd.concat(parts, ignore_index=True).to_parquet(final / "bootstrap.parquet", index=False)
    groups = pd.DataFrame(
        {
            "attribute": ["sex", "sex"],
            "group": ["F", "M"],
            "group_key": ["F", "M"],
            "label": [LABELS[0]] * 2,
            "n": [50, 50],
            "auroc": [0.7, 0.6],
            "dataset": [DATASET] * 2,
        }
    )
    groups.to_parquet(final / "groups.parquet", index=False)
    fake_predictions(trial.key).to_parquet(final / names.PREDICTIONS_FILE, index=False)


def fake_manifest(dataset: str) -> pd.DataFrame:
    """A cache manifest: 40 train and 20 val rows, then `N_TEST` test rows. Test image i: sex F (even i) or M,
    ``unknown`` for the last three; age 25, 55, 85, 35, 65 by i % 5, except NaN at i = 4 and 105 at i = 9 (both in no
    age bin); view AP when i % 3 == 0 else PA; labels drawn once with a fixed seed (prevalence about 0.3)."""
    n_test, n_other = N_TEST[dataset], 60
    n = n_other + n_test
    i = np.arange(n) - n_other
    rng = np.random.default_rng(7 if dataset == DATASET else 8)
    frame = pd.DataFrame(
        {
            "image_id": [f"{dataset}-{k}" for k in range(n)],
            "patient_id": [f"p{k}" for k in range(n)],
            "split": ["train"] * 40 + ["val"] * 20 + ["test"] * n_test,
        }
    )
    for label in LABELS:
        frame[label] = (rng.random(n) < 0.3).astype("int8")
    sex = np.where(i % 2 == 0, "F", "M").astype(object)
    sex[-3:] = "unknown"
    age = np.array([25.0, 55.0, 85.0, 35.0, 65.0])[i % 5]
    age[n_other + 4], age[n_other + 9] = NAN, 105.0
    frame["sex"], frame["age"] = sex, age
    frame["view"] = np.where(i % 3 == 0, "AP", "PA")
    frame["site"] = dataset
    frame["source_path"] = [f"images/{k}.png" for k in range(n)]
    return frame


def fake_predictions(trial: str) -> pd.DataFrame:
    """The trial's per-image scores on both datasets' test rows: label * 0.35 + noise (seeded by the key)."""
    rng = np.random.default_rng(zlib.crc32(trial.encode()))
    parts = []
    for dataset in (DATASET, EXTERNAL):
        manifest = fake_manifest(dataset)
        rows = np.flatnonzero(manifest["split"].to_numpy() == "test")
        part = pd.DataFrame({"dataset": dataset, "row": rows.astype(np.int64)})
        for label in LABELS:
            truth = manifest[label].to_numpy(dtype=np.float64)[rows]
            part[names.prediction_score(label)] = (0.35 * truth + 0.65 * rng.random(len(rows))).astype(np.float32)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
