"""Loader throughput on one core: preprocessed cache rows vs decoding and resizing the source JPEGs.

Generates ``--n`` grayscale JPEGs of ``--source-size`` pixels with chest-radiograph-like structure in a
temporary folder, prepares them into a cache at ``--size`` pixels (the same code as ``dpsweep prepare``)
and times, in random access order, one image at a time as a training ``Dataset`` does:

- ``cache``: `CacheSplitDataset.__getitem__`, i.e. a uint8 row read from the memory-mapped ``images.npy``
  and converted to a float32 tensor in [0, 1] (what training does);
- ``source_decode_resize``: Pillow decode of the JPEG plus a bilinear resize to ``size`` and the same
  float conversion (the cheapest on-the-fly alternative, without the study's normalization);
- ``source_full``: the study's whole preprocessing per image (`load_and_preprocess`: decode, float
  resize, min-max scaling, histogram equalization) plus the float conversion.

Files are read right after being written, so both sides read from the page cache (no disk I/O), and
torch/numpy are limited to one thread. Prints a table and writes JSON (``--out``) with images/s, the
ratios and a description of the machine. Usage::

    python benchmarks/bench_loader.py [--n 200] [--source-size 1024] [--size 224] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import PIL
import torch
from PIL import Image

from trainables.data.cache import open_cache, write_cache
from trainables.data.labels import LABELS
from trainables.data.loaders import CacheSplitDataset
from trainables.data.preprocess import PreprocessSettings, load_and_preprocess


def synthetic_radiograph(seed: int, size: int) -> np.ndarray:
    """uint8 [size, size]: body, two dark lungs, bright mediastinum and heart, ribs, gradient and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    image = 0.55 + 0.1 * y + 0.03 * rng.standard_normal()
    image = image * (np.abs(x) < 0.92 + 0.04 * rng.standard_normal())
    for side in (-1, 1):
        cx = side * rng.uniform(0.38, 0.46)
        lung = ((x - cx) / rng.uniform(0.28, 0.34)) ** 2 + ((y + 0.05) / rng.uniform(0.55, 0.65)) ** 2 < 1
        image = np.where(lung, image - 0.35, image)
    image += 0.25 * (((x + 0.05) / 0.22) ** 2 + ((y - 0.25) / 0.3) ** 2 < 1)  # heart
    image += 0.08 * np.sin(y * rng.uniform(24, 30) + 2 * x**2) * (np.abs(x) < 0.85)  # ribs
    image += 0.04 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def describe_machine() -> dict:
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads_used": 1,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "pillow": PIL.__version__,
    }


def to_tensor(pixels: np.ndarray | Image.Image) -> torch.Tensor:
    """float32 [1, H, W] in [0, 1], as `CacheSplitDataset` returns."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32) / 255.0)[None]


def time_loop(step, items, min_seconds: float) -> float:
    """Images per second of ``step(item)`` over ``items``, repeating passes until ``min_seconds``."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            step(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of source JPEGs (default 200)")
    parser.add_argument("--source-size", type=int, default=1024, help="source side in pixels (default 1024)")
    parser.add_argument("--size", type=int, default=224, help="cache side in pixels (default 224)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader.json"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = PreprocessSettings(size=args.size)

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        paths = []
        for i in range(args.n):
            paths.append(folder / f"{i:04d}.jpg")
            Image.fromarray(synthetic_radiograph(args.seed + i, args.source_size)).save(paths[-1], quality=95)
        jpeg_bytes = float(np.mean([p.stat().st_size for p in paths]))

        images = np.stack([load_and_preprocess(path, settings) for path in paths])
        manifest = pd.DataFrame(
            {
                "image_id": [p.stem for p in paths],
                "patient_id": [p.stem for p in paths],
                "split": "train",
                **{label: np.zeros(args.n, dtype=np.int8) for label in LABELS},
                "sex": "unknown",
                "age": np.nan,
                "view": "PA",
                "site": "bench",
                "source_path": [p.name for p in paths],
            }
        )
        dataset = CacheSplitDataset(open_cache(write_cache(folder / "cache", images, manifest)).split("train"))
        order = np.random.default_rng(args.seed).permutation(args.n)

        def from_source(i: int) -> torch.Tensor:
            with Image.open(paths[i]) as image:
                resized = image.convert("L").resize((args.size, args.size), Image.Resampling.BILINEAR)
            return to_tensor(resized)

        cache_rate = time_loop(lambda i: dataset[int(i)], order, min_seconds=2.0)
        decode_rate = time_loop(from_source, order, min_seconds=2.0)
        full_rate = time_loop(lambda i: to_tensor(load_and_preprocess(paths[i], settings)), order, min_seconds=2.0)
        sample, _ = dataset[0]
        assert sample.dtype == torch.float32 and 0.0 <= float(sample.min()) and float(sample.max()) <= 1.0

    result = {
        "benchmark": "loader throughput, one core, random access order, single images",
        "n_images": args.n,
        "source": {
            "format": "JPEG quality 95, grayscale",
            "side_px": args.source_size,
            "mean_bytes": jpeg_bytes,
        },
        "cache_side_px": args.size,
        "images_per_s": {
            "cache": round(cache_rate, 1),
            "source_decode_resize": round(decode_rate, 1),
            "source_full": round(full_rate, 1),
        },
        "ratio_cache_vs_decode_resize": round(cache_rate / decode_rate, 1),
        "ratio_cache_vs_full_preprocessing": round(cache_rate / full_rate, 1),
        "target_ratio": 20,
        "machine": describe_machine(),
    }
    print(f"{'loader':<24}{'images/s':>12}")
    for name, rate in result["images_per_s"].items():
        print(f"{name:<24}{rate:>12.1f}")
    print(
        f"cache is {result['ratio_cache_vs_decode_resize']}x decode+resize and "
        f"{result['ratio_cache_vs_full_preprocessing']}x the full preprocessing (target >= 20x); "
        f"{result['machine']['cpu']}, 1 thread"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
