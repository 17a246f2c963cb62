"""One DP trial end to end on a GPU (when one is present): the device path of `train_trial`.

Prepares a small synthetic site, runs `trainables.train.train_trial` with ``speed.device = cuda`` for a
private and a non-private trial, checks the per-sample-gradient self-check ran on the GPU, that spent
epsilon <= target, and reports wall time per epoch. Writes JSON (default benchmarks/results/gpu_trial.json).

    python benchmarks/gpu_trial.py --model convnext_small --size 128 --images 1200
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from trainables import names as M
from trainables.config import PrivacyConfig, SpeedConfig, TrialConfig
from trainables.data.synthetic import prepare_synthetic
from trainables.models import resolve_init
from trainables.names import MANIFEST_FILE, dataset_dir
from trainables.privacy.accounting import calibrate_noise_multiplier, sample_rate_and_steps
from trainables.train import train_trial


def run(model: str, size: int, images: int, epsilon: float, epochs: int, batch: int, root: Path) -> dict:
    prepare_synthetic("synthetic-a", root, size=size, n_images=images)
    manifest = pd.read_parquet(dataset_dir(root, "synthetic-a", size) / MANIFEST_FILE, columns=["split"])
    n_train = int((manifest["split"] == "train").sum())
    q, steps = sample_rate_and_steps(n_train, batch, epochs)
    sigma = calibrate_noise_multiplier(epsilon, 1e-5, q, steps) if math.isfinite(epsilon) else 0.0
    cfg = TrialConfig(
        sweep="gpu",
        dataset="synthetic-a",
        data_root=str(root),
        image_size=size,
        model=model,
        init="random",
        init_weights=None,
        lr=5e-4,
        seed=0,
        input_mean=0.5,
        input_std=0.25,
        n_boot=200,
        privacy=PrivacyConfig(
            target_epsilon=epsilon,
            delta=1e-5,
            max_grad_norm=1.0,
            expected_batch_size=batch,
            epochs=epochs,
            noise_multiplier=sigma,
            sample_rate=q if sigma else 0.0,
            steps=steps,
        ),
        speed=SpeedConfig(device="cuda", max_physical_batch_size=batch * 2, eval_batch_size=256),
    )
    epoch_times, last = [], [time.perf_counter()]

    def report(metrics, state):
        now = time.perf_counter()
        epoch_times.append(now - last[0])
        last[0] = now
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}, flush=True)

    start = time.perf_counter()
    result = train_trial(cfg, resolve_init("random", model), report)
    final = result.metrics
    row = {
        "model": model,
        "image_size": size,
        "n_train": n_train,
        "target_epsilon": epsilon,
        "sigma": sigma,
        "steps": steps,
        "epsilon_spent": final[M.EPSILON],
        "test_auroc_macro": final[M.TEST_AUROC_MACRO],
        "seconds_per_epoch": epoch_times,
        "total_seconds": time.perf_counter() - start,
        "model_device": str(next(result.model.parameters()).device),
    }
    assert row["model_device"].startswith("cuda"), row
    if math.isfinite(epsilon):
        assert final[M.EPSILON] <= epsilon, row
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_small")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu_trial.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: this check needs one")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for epsilon in (3.0, math.inf):
            rows.append(run(args.model, args.size, args.images, epsilon, args.epochs, args.batch, Path(root)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": {
                    "gpu": torch.cuda.get_device_name(0),
                    "torch": torch.__version__,
                    "platform": platform.platform(),
                },
                "trials": rows,
            },
            indent=2,
            default=str,
        )
    )
    print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
