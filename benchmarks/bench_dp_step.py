"""DP-SGD step cost vs a non-private step, per grad-sample mode, in one run on one machine.

For each (model, image size): time a non-private AdamW step and a DP-SGD step (per-sample gradients,
clipping, noise, AdamW) on the same model, input size and batch, for every allowed mode (and stock Opacus
hooks, which is *wrong* on ConvNeXt, for reference only). Each configuration runs in a fresh subprocess
so its peak memory (CUDA: max allocated; CPU: peak RSS growth) is its own.

    python benchmarks/bench_dp_step.py                       # CPU defaults: atto 64 px, tiny 128 px
    python benchmarks/bench_dp_step.py --device cuda         # adds convnext_small 224 px
Results: JSON (default benchmarks/results/dp_step-<device>.json) with the machine described.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import time
from pathlib import Path

MODES = ("non-private", "hooks", "functorch", "stock-hooks")
CPU_CASES = (("convnext_atto", 64), ("convnext_tiny", 128))
GPU_CASES = (("convnext_atto", 64), ("convnext_tiny", 128), ("convnext_small", 224))


def _run_case(model_name: str, size: int, mode: str, batch: int, steps: int, device: str, threads: int, queue):
    import timm
    import torch
    from opacus import GradSampleModule

    from trainables.privacy.accounting import create_accountant
    from trainables.privacy.engine import make_dp_optimizer, private_step, wrap_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = timm.create_model(model_name, num_classes=5, in_chans=1, drop_path_rate=0.0).to(device)
    x = torch.rand(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 5, device=device) > 0.7).float()

    def loss_fn(logits, targets):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if mode == "non-private":
        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x), y).mean().backward()
            optimizer.step()
    else:
        if mode == "stock-hooks":
            wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        else:
            wrapped = wrap_model(model, mode)
        from trainables.privacy.engine import PerSampleGradientError, check_per_sample_gradients

        try:  # correctness on this device and size: engine vs torch.func on 4 samples
            verified = check_per_sample_gradients(wrapped, loss_fn, x[:4], y[:4]).max_relative_error
        except PerSampleGradientError as error:
            verified = str(error)
        generator = torch.Generator(device=device).manual_seed(1)
        dp_optimizer = make_dp_optimizer(optimizer, noise_multiplier=1.0, max_grad_norm=1.0,
                                         expected_batch_size=batch, noise_generator=generator,
                                         accountant=create_accountant("rdp"), sample_rate=0.01)

        def step():
            private_step(wrapped, dp_optimizer, loss_fn, (x, y), max_physical_batch_size=batch)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024)
    result = {"median_step_s": statistics.median(times), "min_step_s": min(times), "peak_memory_mib": peak}
    if mode != "non-private":
        result["per_sample_grad_check"] = verified
    queue.put(result)


def measure(model_name: str, size: int, mode: str, batch: int, steps: int, device: str, threads: int) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_run_case, args=(model_name, size, mode, batch, steps, device, threads, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        return {"error": f"exit code {process.exitcode}"}
    return queue.get()


def machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": mp.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        from importlib.metadata import version

        info["opacus"] = version("opacus")
        info["timm"] = version("timm")
    except Exception:  # noqa: BLE001 - versions are informative only
        pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="*", help="model:size pairs, e.g. convnext_small:224")
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cases = ([(c.split(":")[0], int(c.split(":")[1])) for c in args.cases] if args.cases
             else (GPU_CASES if args.device == "cuda" else CPU_CASES))
    results = []
    for model_name, size in cases:
        row = {"model": model_name, "image_size": size, "batch": args.batch}
        for mode in args.modes:
            row[mode] = measure(model_name, size, mode, args.batch, args.steps, args.device, args.threads)
            print(model_name, size, mode, row[mode], flush=True)
        base = row.get("non-private", {}).get("median_step_s")
        for mode in args.modes:
            if mode != "non-private" and base and "median_step_s" in row[mode]:
                row[mode]["time_vs_non_private"] = row[mode]["median_step_s"] / base
        results.append(row)
    out = args.out or Path(__file__).parent / "results" / f"dp_step-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(args.device), "threads": args.threads, "results": results,
                               "note": "stock-hooks computes wrong per-sample gradients on ConvNeXt; "
                                       "timed for reference only"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
