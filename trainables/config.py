"""TrialConfig: the typed, immutable description of one trial, built from Ray's flat config dict.

Privacy knobs (they change the guarantee) live in `PrivacyConfig`; speed knobs (they never change results
or the guarantee) live in `SpeedConfig`. The driver calibrates the noise multiplier and fills the derived
privacy fields (`noise_multiplier`, `sample_rate`, `steps`) before a trial starts; the trial re-checks them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class PrivacyConfig:
    """Everything that changes the DP guarantee.

    Attributes:
        target_epsilon: epsilon the planned steps end at (``inf`` = non-private baseline: no clipping,
            no noise, shuffled batches).
        delta: the (epsilon, delta) delta; must be < 1/N_train.
        max_grad_norm: per-sample clipping bound C (L2 over all trainable parameters).
        expected_batch_size: expected logical batch size B; Poisson sample rate q = 1/ceil(N/B).
        epochs: planned epochs; steps = epochs * ceil(N/B).
        accountant: ``rdp`` (default, the study's) or ``prv``; calibration and reporting use the same one.
        privacy_unit: ``image`` (each image is a record; add/remove adjacency).
        secure_mode: cryptographically secure noise (Opacus secure_mode; slower).
        noise_multiplier: sigma (noise std = sigma * C), calibrated by the driver; 0 when non-private.
        sample_rate: Poisson sample rate q, derived by the driver from N and B.
        steps: total planned DP-SGD steps, derived by the driver.
    """

    target_epsilon: float
    delta: float = 6e-6
    max_grad_norm: float = 1.0
    expected_batch_size: int = 32
    epochs: int = 3
    accountant: str = "rdp"
    privacy_unit: str = "image"
    secure_mode: bool = False
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0

    @property
    def is_private(self) -> bool:
        return math.isfinite(self.target_epsilon)


@dataclass(frozen=True)
class SpeedConfig:
    """Knobs that change speed or memory only, never results' distribution or the guarantee.

    Attributes:
        grad_sample_mode: ``bk`` (book-keeping, the fastest), ``hooks`` (Opacus, fixed conv sampler), ``functorch``.
        device: ``auto`` (the trial's GPU when Ray gave it one, else CPU), ``cpu`` or ``cuda``.
        max_physical_batch_size: largest batch run at once; logical batches are split (virtual batches).
        threads: torch intra-op threads per trial.
        eval_batch_size: batch size for evaluation forward passes.
    """

    grad_sample_mode: str = "bk"
    device: str = "auto"
    max_physical_batch_size: int = 64
    threads: int = 1
    eval_batch_size: int = 256


@dataclass(frozen=True)
class TrialConfig:
    """One trial: a grid point of the sweep plus the sweep-wide settings it needs."""

    sweep: str
    dataset: str
    data_root: str
    image_size: int
    model: str
    init: str
    init_weights: str | None
    lr: float
    seed: int
    privacy: PrivacyConfig
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    weight_decay: float = 0.01
    input_mean: float = 0.0
    input_std: float = 1.0
    pos_weight: str = "uniform"
    external_datasets: tuple[str, ...] = ()
    model_selection: str = "best_val"
    eval_test_every_epoch: bool = True
    n_boot: int = 200
    age_edges: tuple[float, ...] = (0, 40, 70, 100)
    calibration_tolerance: float = 0.01

    def to_flat(self) -> dict[str, Any]:
        """Flat dict (``privacy.x`` / ``speed.x`` keys) for Ray's param_space and MLflow params."""
        flat: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("privacy", "speed"):
                flat.update({f"{f.name}.{k}": v for k, v in asdict(value).items()})
            elif isinstance(value, tuple):
                flat[f.name] = list(value)
            else:
                flat[f.name] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialConfig:
        """Inverse of `to_flat`; unknown keys are an error (they mean a spec/trial version mismatch)."""
        nested: dict[str, dict[str, Any]] = {"privacy": {}, "speed": {}}
        nested_known = {name: {f.name for f in fields(kind)}
                        for name, kind in (("privacy", PrivacyConfig), ("speed", SpeedConfig))}
        top: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in flat.items():
            head, _, rest = key.partition(".")
            if rest and head in nested and rest in nested_known[head]:
                nested[head][rest] = value
            elif key in known:
                top[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise KeyError(f"unknown trial config key {key!r}")
        return cls(privacy=PrivacyConfig(**nested["privacy"]), speed=SpeedConfig(**nested["speed"]), **top)
