"""Compare three ways of tuning DP-SGD on the synthetic twin: the full private grid, a private selection, and the
public-proxy search (TAN scaling) with top_k 1 and 3. Not run in CI.

Per cell (init x target epsilon) it reports the tuning-inclusive epsilon (grid: RDP composition of the cell's trials,
`sweeps.tuning_cost.tuning_cost`; private selection and proxy k > 1: the selection's; proxy k = 1: the one trial's own
accountant's, as the ledger records it),
the compute spent (sample-passes: steps x expected batch, summed over every trial that ran, proxy ones included; and
their training seconds), the best test macro AUROC of what the cell releases (selected by validation), and for the
proxy Kendall's tau between the proxy's ranking of the grid candidates (validation AUROC on the public set) and the
private grid's ranking of the same candidates.

    python benchmarks/bench_search.py [--quick] [--out PATH] [--work DIR]

The full run: 14,054 training images at 32 px, test_convnext, inits random and domain, targets 2 and 8, a grid
of 5 lrs x 2 clips (10 candidates per cell), the proxy's phase 1 at B_sim = 64; ``--quick`` a tiny version (600
images, 1 init, 1 target, 2 lrs, 1 epoch) to check the script works. The benchmark reads the sweeps' private storage
(every candidate of a selection, its count included): a measurement on synthetic data, never a release.
``--out`` defaults to benchmarks/results/search-cpu.json (``search-cpu-quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from trainables import names as N

ROOT = Path(__file__).resolve().parents[1]


def base_spec(quick: bool) -> dict[str, Any]:
    """The shared sweep settings (the grid's axes included)."""
    if quick:
        return {
            "data": {"train": "synthetic-a", "image_size": 32, "synthetic_images": 600},
            "model": "test_convnext",
            "inits": ["random"],
            "privacy": {"target_epsilon": [2], "max_grad_norm": [1.0], "expected_batch_size": 64, "epochs": 1},
            "training": {"lr": [0.002, 0.0002]},
            "evaluation": {"n_boot": 10},
            "resources": {"cpu": 1},
        }
    return {
        "data": {"train": "synthetic-a", "image_size": 32, "synthetic_images": 20_000},  # 14,054 training images
        "model": "test_convnext",
        "inits": ["random", "domain"],
        "pretrain": {"dataset": "synthetic-source", "epochs": 2},
        "privacy": {"target_epsilon": [2, 8], "max_grad_norm": [0.5, 2.0], "expected_batch_size": 256, "epochs": 2},
        "training": {"lr": [0.0003, 0.001, 0.002, 0.005, 0.01]},  # 10 candidates per cell: proxy k=1 trains 1 of 10
        "evaluation": {"n_boot": 50},
        "resources": {"cpu": 1},
    }


def variants(quick: bool) -> dict[str, dict[str, Any]]:
    """Each search's sweep file (as a dict)."""
    base = base_spec(quick)
    lrs = base["training"]["lr"]
    clips = base["privacy"]["max_grad_norm"]
    grid = {**copy.deepcopy(base), "name": "bench-grid"}
    selection = copy.deepcopy(base)
    selection.update(name="bench-selection", search="private_selection")
    selection["privacy"] = {k: v for k, v in selection["privacy"].items() if k not in ("max_grad_norm",)}
    batch, epochs = selection["privacy"].pop("expected_batch_size"), selection["privacy"].pop("epochs")
    selection.pop("training")
    selection["selection"] = {
        "distribution": "logarithmic",
        "mean_trials": 2 if quick else 4,
        "lr": [min(lrs), max(lrs)],
        "max_grad_norm": [min(clips), max(clips)],
        "expected_batch_size": [batch],
        "epochs": [epochs],
    }
    proxies = {}
    for k in (1, 3):
        proxy = {**copy.deepcopy(base), "name": f"bench-proxy-k{k}", "search": "proxy"}
        proxy["proxy"] = {"dataset": "synthetic-source", "batch_size": 64, "top_k": k}
        if k > 1:
            proxy["selection"] = {"distribution": "logarithmic", "mean_trials": 2 if quick else 4}
        proxies[f"proxy_k{k}"] = proxy
    return {"grid": grid, "private_selection": selection, **proxies}


def run_variant(raw: dict[str, Any], work: Path) -> tuple[Any, Any, pd.DataFrame, pd.DataFrame, float]:
    """Run one sweep under ``work``: (spec, paths, its trial table, every trial record's table incl. unreleased
    candidates and proxy trials, wall seconds)."""
    from analysis.tables import build_tables
    from sweeps.launch import run_sweep
    from sweeps.plan import SweepPaths
    from sweeps.results import experiment_records
    from sweeps.spec import parse_spec

    spec = parse_spec(raw, source=f"{raw['name']}.yaml")
    paths = SweepPaths.for_spec(spec, runs=str(work / "runs"), data=str(work / "data"))
    started = time.perf_counter()
    trials = run_sweep(spec, paths, fresh=True, log=lambda _: None)
    seconds = time.perf_counter() - started
    everything, _ = build_tables(experiment_records(paths.ray_experiment(spec)), {})
    return spec, paths, trials, everything, seconds


def compute(trials: pd.DataFrame) -> dict[str, float]:
    """Sample-passes (steps x expected batch) and training seconds of the trials that ran, in all and on the private
    data alone (a proxy sweep's phase 1 trains on the public set)."""
    from sweeps.proxy import PHASE_PARAM

    ran = trials[trials["status"] == N.TERMINATED]
    private = ran if PHASE_PARAM not in ran else ran[ran[PHASE_PARAM].astype(str) != "proxy"]
    passes = ran["steps"] * ran["expected_batch_size"]
    seconds = ran.get(N.SYSTEM_TOTAL_TRAIN_S, pd.Series(0.0, index=ran.index)).fillna(0)
    return {
        "sample_passes": float(passes.sum()),
        "private_sample_passes": float(passes[private.index].sum()),
        "train_seconds": float(seconds.sum()),
        "private_train_seconds": float(seconds[private.index].sum()),
        "trials_run": len(ran),
        "private_trials_run": len(private),
    }


def cell_of(trials: pd.DataFrame) -> pd.Series:
    return trials["init"].astype(str) + "-eps" + trials["target_epsilon"].map(lambda e: f"{e:g}")


def best_test_auroc(released: pd.DataFrame) -> float:
    done = released[released["status"] == N.TERMINATED]
    if done.empty:
        return math.nan
    return float(done.loc[done[N.VAL_SELECTED_AUROC_MACRO].idxmax(), N.TEST_AUROC_MACRO])


def kendall_tau(proxy_json: Path, grid: pd.DataFrame, cell: str) -> float:
    """Kendall's tau between the proxy's and the private grid's validation ranking of the same candidates."""
    from scipy.stats import kendalltau

    candidates = [c for c in json.loads(proxy_json.read_text())["candidates"] if c["cell"] == cell]
    private = dict(zip(grid["trial"], grid[N.VAL_SELECTED_AUROC_MACRO], strict=True))
    pairs = [(c["proxy_val_auroc"], private.get(c["proxy_of"])) for c in candidates]
    pairs = [(p, q) for p, q in pairs if p is not None and q is not None and math.isfinite(p) and math.isfinite(q)]
    if len(pairs) < 2:
        return math.nan
    tau = kendalltau([p for p, _ in pairs], [q for _, q in pairs]).statistic
    return float(tau)


def summarize(
    name: str, spec: Any, paths: Any, trials: pd.DataFrame, everything: pd.DataFrame, grid: pd.DataFrame | None
) -> dict[str, Any]:
    from sweeps.proxy import PHASE_PARAM, PROXY_FILE
    from sweeps.tuning_cost import tuning_cost

    selection_file = paths.sweep_dir(spec) / N.SELECTION_FILE
    selections = (
        {c["cell"]: c["epsilon"] for c in json.loads(selection_file.read_text())["cells"]}
        if selection_file.is_file()
        else {}
    )
    private_rows = trials if PHASE_PARAM not in trials else trials[trials[PHASE_PARAM].astype(str) != "proxy"]
    cells = {}
    for cell in sorted(set(cell_of(private_rows))):
        rows = private_rows[cell_of(private_rows) == cell]
        if cell in selections:
            epsilon = selections[cell]
        elif len(rows) == 1:  # one trial (proxy k = 1): its own accountant's epsilon, as the ledger records it
            epsilon = float(rows[N.EPSILON].iloc[0])
        else:
            cost = tuning_cost(rows)
            epsilon = math.nan if cost is None else float(cost.epsilon)
        entry = {"tuning_inclusive_epsilon": epsilon, "best_test_auroc": best_test_auroc(rows)}
        proxy_json = paths.sweep_dir(spec) / PROXY_FILE
        if proxy_json.is_file() and grid is not None:
            entry["kendall_tau_vs_grid"] = kendall_tau(proxy_json, grid, cell)
        cells[cell] = entry
    return {"search": name, "compute": compute(everything), "cells": cells}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny version, to check the script works")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "dpsweep-bench-search")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "benchmarks" / "results" / f"search-cpu{'-quick' if args.quick else ''}.json"
    import ray

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    grid_table = None
    try:
        for name, raw in variants(args.quick).items():
            spec, paths, trials, everything, seconds = run_variant(raw, args.work)
            if name == "grid":
                grid_table = trials
            summary = summarize(name, spec, paths, trials, everything, grid_table)
            summary["compute"]["wall_seconds"] = seconds
            results.append(summary)
            print(json.dumps(summary, indent=1))
    finally:
        ray.shutdown()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "written": datetime.now(UTC).isoformat(),
                "quick": args.quick,
                "total_wall_seconds": time.perf_counter() - started,
                "commit": subprocess.run(
                    ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
                ).stdout.strip(),
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
                "settings": base_spec(args.quick),
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
