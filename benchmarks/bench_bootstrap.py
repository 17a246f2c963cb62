"""Time the paired bootstrap of AUROC on one core: 1,000 replicates x 30,000 images x 5 labels by default.

Measures `bootstrap_indices` plus `bootstrap_auroc` (the work `evaluate_split` does for its CIs) on
synthetic binormal scores with ties, checks a few replicates against sklearn, and writes JSON with the
machine described. Target: under 10 s.

    python benchmarks/bench_bootstrap.py [--n-images 30000] [--n-boot 1000] [--out PATH]

``--out`` defaults to benchmarks/results/bootstrap.json. The load average is recorded because a shared
machine's other work slows the run down.
"""

from __future__ import annotations

import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # one core, before numpy loads

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from trainables.evaluate.bootstrap import bootstrap_auroc, bootstrap_indices  # noqa: E402

TARGET_SECONDS = 10.0


def _machine() -> dict[str, object]:
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(affinity) if affinity is not None else None,
        "load_average_1_5_15_min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _data(n_images: int, n_labels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.05, 0.4, n_labels)  # rare to common labels
    y = (rng.random((n_images, n_labels)) < prevalence).astype(np.int8)
    score = (y + rng.normal(size=y.shape)).astype(np.float32).astype(np.float64)  # float32 scores: ties
    return y, score


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=30_000)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--n-labels", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bootstrap.json"))
    args = parser.parse_args(argv)

    y, score = _data(args.n_images, args.n_labels, args.seed)
    index_seconds, auroc_seconds = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        indices = bootstrap_indices(args.n_images, args.n_boot, seed=args.seed)
        drawn = time.perf_counter()
        replicates = bootstrap_auroc(y, score, indices)
        done = time.perf_counter()
        index_seconds.append(drawn - start)
        auroc_seconds.append(done - drawn)

    checked = range(0, args.n_boot, max(1, args.n_boot // 5))
    max_abs_error = max(
        abs(replicates[b, j] - roc_auc_score(y[indices[b], j], score[indices[b], j]))
        for b in checked
        for j in range(args.n_labels)
    )
    totals = [a + b for a, b in zip(index_seconds, auroc_seconds, strict=True)]
    result = {
        "benchmark": "paired bootstrap AUROC (bootstrap_indices + bootstrap_auroc)",
        "n_images": args.n_images,
        "n_boot": args.n_boot,
        "n_labels": args.n_labels,
        "repeats": args.repeats,
        "seconds_indices": index_seconds,
        "seconds_auroc": auroc_seconds,
        "seconds_total_median": statistics.median(totals),
        "seconds_total_min": min(totals),
        "target_seconds": TARGET_SECONDS,
        "meets_target": statistics.median(totals) < TARGET_SECONDS,
        "max_abs_error_vs_sklearn": float(max_abs_error),
        "replicates_checked_vs_sklearn": len(checked) * args.n_labels,
        "machine": _machine(),
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"bootstrap AUROC: {args.n_boot} replicates x {args.n_images} images x {args.n_labels} labels: "
        f"median {result['seconds_total_median']:.2f} s (indices {statistics.median(index_seconds):.2f} s, "
        f"AUROC {statistics.median(auroc_seconds):.2f} s; target < {TARGET_SECONDS:.0f} s), "
        f"max |error| vs sklearn {max_abs_error:.1e} -> {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
