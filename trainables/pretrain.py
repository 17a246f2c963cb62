"""Non-private supervised pretraining on a public source dataset: produces the ``domain`` init.

This is the study's MIMIC-CXR-supervised initialization: train the same architecture on the public
dataset's five labels without DP, then start private training elsewhere from those weights (head kept).
It reuses the trial loop with ``target_epsilon = inf``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trainables import names
from trainables.config import PretrainConfig, PrivacyConfig, SpeedConfig, TrialConfig
from trainables.models import ResolvedInit, save_weights
from trainables.names import PRETRAINED_WEIGHTS_FILE as CHECKPOINT_FILE
from trainables.train import train_trial

INFO_FILE = "pretrain.json"


def pretrain_dir(runs_root: Path, pretrain: PretrainConfig, model: str, image_size: int) -> Path:
    """Where a pretrain stage's checkpoint lives; the name is a hash of everything that determines it."""
    key = json.dumps({**asdict(pretrain), "model": model, "image_size": image_size}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return runs_root / "pretrain" / f"{model}-{pretrain.dataset}-{image_size}px-{digest}"


def run_pretrain(
    pretrain: PretrainConfig,
    init: ResolvedInit,
    model: str,
    image_size: int,
    data_root: Path,
    out_dir: Path,
    threads: int = 1,
) -> Path:
    """Train, then write ``model.safetensors`` and ``pretrain.json`` (settings + validation/test AUROC)."""
    cfg = TrialConfig(
        sweep="pretrain",
        dataset=pretrain.dataset,
        data_root=str(data_root),
        image_size=image_size,
        model=model,
        init=pretrain.init,
        init_weights=init.weights,
        lr=pretrain.lr,
        seed=pretrain.seed,
        privacy=PrivacyConfig(target_epsilon=math.inf, expected_batch_size=pretrain.batch_size, epochs=pretrain.epochs),
        speed=SpeedConfig(threads=threads),
        weight_decay=pretrain.weight_decay,
        test_every_epoch=False,
        input_mean=pretrain.input_mean,
        input_std=pretrain.input_std,
        n_boot=0,
    )

    def log_epoch(metrics: dict[str, Any], _state: object) -> None:
        print(
            f"  pretrain {model} on {pretrain.dataset}: epoch {metrics[names.EPOCH]}/{pretrain.epochs}, "
            f"loss {metrics[names.TRAIN_LOSS]:.4f}, val AUROC {metrics[names.VAL_AUROC_MACRO]:.3f}",
            flush=True,
        )

    result = train_trial(cfg, init, log_epoch)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(result.model, out_dir / CHECKPOINT_FILE)
    info = {
        "pretrain": asdict(pretrain),
        "model": model,
        "image_size": image_size,
        "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, int | float)},
    }
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    return out_dir / CHECKPOINT_FILE
