"""Builders the tests share: the tiny synthetic site, the one recipe for a `TrialConfig`, and a tiny trial run.

Not a test module: tests import from here, and their fixtures live in the ``conftest.py`` files.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainables import names as M
from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
from trainables.data.cache import open_cache
from trainables.data.synthetic import prepare_synthetic
from trainables.models import resolve_init
from trainables.privacy.patients import group_patients
from trainables.privacy.planning import plan_privacy
from trainables.train import TrialResult, train_trial

TINY_DATASET, TINY_SIZE, TINY_IMAGES, TINY_BATCH = "synthetic-a", 32, 240, 16  # 178 training images, q = 1/12

_SECTIONS = {"privacy": PrivacyConfig, "speed": SpeedConfig}
_OWNER = {f.name: section for section, kind in _SECTIONS.items() for f in dataclasses.fields(kind)}
_TOP_LEVEL = {f.name for f in dataclasses.fields(TrialConfig)} - set(_SECTIONS)


def prepare_tiny_site(data_root: Path) -> Path:
    """The tiny synthetic site the end-to-end trial tests train on (32 px, 240 images)."""
    prepare_synthetic(TINY_DATASET, data_root, size=TINY_SIZE, n_images=TINY_IMAGES)
    return data_root


def tiny_trial_config(data_root: Path, target_epsilon: float = 4.0, epochs: int = 2, **changes: Any) -> TrialConfig:
    """A `test_convnext` trial on a prepared site, its privacy planned like the sweep launcher plans it.

    The plan (`trainables.privacy.planning.plan_privacy`: q and steps from N, sigma calibrated to the target) is
    for N = the training split's images, or its patients when ``privacy_unit="patient"``, read from the cache at
    ``data_root / dataset / image_size``. Defaults: the tiny site (`prepare_tiny_site`), delta 1e-5, an expected
    batch of 16, no bootstrap.

    Args:
        data_root: the folder of the prepared datasets.
        target_epsilon: the plan's target (``math.inf``: the non-private baseline).
        epochs: the plan's epochs.
        changes: any other field, by its flat name (`TrialConfig.to_flat`'s: the sweep file's and MLflow's), e.g.
            ``seed=7``, ``reproducible_noise=True``, ``grad_sample_mode="hooks"``; each goes to its section.

    Raises:
        TypeError: a change that names no field (``privacy``/``speed`` themselves included: change their fields).
    """
    sections: dict[str, dict[str, Any]] = {section: {} for section in _SECTIONS}
    top: dict[str, Any] = {}
    for name, value in changes.items():
        if name in _OWNER:
            sections[_OWNER[name]][name] = value
        elif name in _TOP_LEVEL:
            top[name] = value
        else:
            raise TypeError(
                f"tiny_trial_config: {name!r} is not a flat field name (`TrialConfig.to_flat`'s); pass the fields "
                "of privacy and speed themselves, e.g. grad_sample_mode='hooks'"
            )
    top = {
        "sweep": "tiny",
        "dataset": TINY_DATASET,
        "image_size": TINY_SIZE,
        "model": "test_convnext",
        "init": "random",
        "init_weights": None,
        "lr": 1e-3,
        "seed": 0,
        "n_boot": 0,
        **top,
    }
    privacy = PrivacyConfig(
        **{
            "target_epsilon": target_epsilon,
            "delta": 1e-5,
            "expected_batch_size": TINY_BATCH,
            "epochs": epochs,
            **sections["privacy"],
        }
    )
    train = open_cache(Path(data_root) / top["dataset"] / str(top["image_size"])).split("train")
    n_records = (
        group_patients(train.patient_id, privacy.max_images_per_patient).n_patients
        if privacy.max_images_per_patient is not None  # set exactly when privacy_unit is "patient"
        else len(train)
    )
    return TrialConfig(
        **top,
        data_root=str(data_root),
        privacy=plan_privacy(privacy, n_records),
        speed=SpeedConfig(**sections["speed"]),
    )


def pinned_config(sigma: float = 1.2, q: float = 0.1) -> TrialConfig:
    """A private trial whose plan is given, not planned: sigma, q and 30 steps, target epsilon 2, no data behind it
    (for the ledger and checkpoint tests, which pin these numbers)."""
    return TrialConfig(
        sweep="s",
        dataset="d",
        data_root="/d",
        image_size=32,
        model="test_convnext",
        init="random",
        init_weights=None,
        lr=1e-3,
        seed=0,
        privacy=PrivacyConfig(target_epsilon=2.0, noise_multiplier=sigma, sample_rate=q, steps=30),
    )


def split_system_metrics(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, system metrics) of one epoch report or final report."""
    system = {k: v for k, v in metrics.items() if k.startswith(M.SYSTEM_PREFIX)}
    return {k: v for k, v in metrics.items() if k not in system}, system


@dataclass
class TinyRun:
    """Every epoch's report split into its results (``epochs``, equal between runs that replay alike) and its
    system metrics (``system``: timing, different in every run), the epoch checkpoints and the result."""

    epochs: list[dict[str, Any]]
    states: list[dict[str, Any]]
    result: TrialResult
    system: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def run_tiny_trial(cfg: TrialConfig, state: dict[str, Any] | None = None, **options: Any) -> TinyRun:
    """Train ``cfg`` in this process (optionally resuming ``state``; ``options`` go to `train_trial`), keeping every
    epoch's report."""
    epochs, states, system = [], [], []

    def report(metrics: dict[str, Any], epoch_state: dict[str, Any] | None) -> None:
        results, timing = split_system_metrics(metrics)
        epochs.append(results)
        system.append(timing)
        states.append(copy.deepcopy(epoch_state))

    result = train_trial(cfg, resolve_init("random", cfg.model), report, state, **options)
    return TinyRun(epochs, states, result, system)
