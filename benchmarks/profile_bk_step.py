"""Where a book-keeping (bk) DP step's time goes, per layer kind, beside the non-private step of the same batch.

One process, the two steps interleaved round after round (as `bench_dp_step`), medians over rounds. The bk step is
timed by wrapping the engine's pieces (no change to its code): the forward; the input-gradient backward without the
per-layer hooks; each layer's per-sample rule in the backward hook (norms: ghost or instantiated, depthwise, norms,
layer scales, biases), grouped by layer kind; the per-patient regrouping (patient unit); each layer's clipped sum, by
layer kind; the optimizer (noise, scaling, AdamW). The non-private step: forward, backward (input and weight
gradients), AdamW. Every timer is ``time.perf_counter`` around synchronous CPU work (CUDA: synchronized). Run it
with ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment to see the page faults `bench_dp_step` pays.

    python benchmarks/profile_bk_step.py --model convnext_tiny --size 224 --rounds 3
    python benchmarks/profile_bk_step.py --model convnext_atto --size 64 --mode bk-patient --rounds 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def layer_kind(path: str, module: nn.Module) -> str:
    """A readable kind for one hooked module of a timm ConvNeXt."""
    from timm.models.convnext import ConvNeXtBlock

    if isinstance(module, ConvNeXtBlock):
        return "layer scale (gamma)"
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return "depthwise conv"
    if ".mlp." in path:
        return "block MLP"
    if isinstance(module, nn.LayerNorm):
        return "layer norms"
    if path.startswith("head"):
        return "head"
    return "stem/downsample conv"


class _Clock:
    """Seconds per label within one step."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)

    def timed(self, label: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            name = label if isinstance(label, str) else label(out, *args)
            self.seconds[name] += time.perf_counter() - start
            return out

        return wrapper


def instrument(wrapped: Any, clock: _Clock) -> None:
    """Time the engine's pieces of this wrapped model (module docstring)."""
    import trainables.privacy.bk as bk
    import trainables.privacy.engine as engine

    kinds: dict[int, str] = {}  # id(LayerGrads) -> kind, for its clipped sum

    class TimedRule:
        def __init__(self, rule: bk.LayerRule, kind: str) -> None:
            self.rule, self.kind = rule, kind

        def check(self, path: str, module: nn.Module) -> None:
            self.rule.check(path, module)

        def per_sample(self, *args: Any, **kwargs: Any) -> bk.LayerGrads:
            clock.sync()
            start = time.perf_counter()
            lg = self.rule.per_sample(*args, **kwargs)
            clock.sync()
            linear = self.kind in ("block MLP", "head", "stem/downsample conv")  # the cost model's two branches
            kind = self.kind + ((" ghost" if lg.ghost else " instantiated") if linear else "")
            clock.seconds[f"norms: {kind}"] += time.perf_counter() - start
            kinds[id(lg)] = kind
            return lg

    for site in wrapped._sites:
        site.rule = TimedRule(site.rule, layer_kind(site.path, site.module))

    by_patient = bk.LayerGrads.by_patient

    def timed_by_patient(self: bk.LayerGrads, patients: bk.PatientRows) -> bk.LayerGrads:
        clock.sync()
        start = time.perf_counter()
        grouped = by_patient(self, patients)
        clock.sync()
        kind = kinds.get(id(self), "?")
        clock.seconds[f"patient grouping: {kind}"] += time.perf_counter() - start
        kinds[id(grouped)] = kind
        return grouped

    clipped_sums = bk.LayerGrads.clipped_sums

    def timed_clipped_sums(self: bk.LayerGrads, *args: Any) -> dict[str, torch.Tensor]:
        clock.sync()
        start = time.perf_counter()
        out = clipped_sums(self, *args)
        clock.sync()
        clock.seconds[f"clipped sums: {kinds.get(id(self), '?')}"] += time.perf_counter() - start
        return out

    bk.LayerGrads.by_patient = timed_by_patient  # type: ignore[method-assign]
    bk.LayerGrads.clipped_sums = timed_clipped_sums  # type: ignore[method-assign, assignment]
    engine.clipped_sum_step = clock.timed("clipped_sum_step", bk.clipped_sum_step)  # type: ignore[attr-defined]
    wrapped.per_sample = clock.timed("per_sample", wrapped.per_sample)
    time_forward(wrapped._module, clock)


def time_forward(model: nn.Module, clock: _Clock) -> None:
    """Time ``model``'s forward (from its pre-hook to its hook) under the label ``forward``."""
    marks: dict[str, float] = {}

    def started(*_: Any) -> None:
        clock.sync()
        marks["start"] = time.perf_counter()

    def done(*_: Any) -> None:
        clock.sync()
        clock.seconds["forward"] += time.perf_counter() - marks["start"]

    model.register_forward_pre_hook(started)
    model.register_forward_hook(done)


def split_bk(seconds: dict[str, float], step_s: float) -> dict[str, float]:
    """The bk step's parts: the wrappers' nested timers turned into disjoint ones that add up to the step."""
    parts = {k: v for k, v in seconds.items() if k.startswith(("norms:", "patient grouping:", "clipped sums:"))}
    hooks = sum(v for k, v in parts.items() if not k.startswith("clipped sums:"))
    sums = sum(v for k, v in parts.items() if k.startswith("clipped sums:"))
    out = {"forward": seconds["forward"]}
    out["backward (input gradients), total norms"] = seconds["per_sample"] - seconds["forward"] - hooks
    out.update(parts)
    out["clip factors, accumulation"] = seconds["clipped_sum_step"] - seconds["per_sample"] - sums
    out["noise, AdamW"] = step_s - seconds["clipped_sum_step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--mode", default="bk", choices=("bk", "bk-patient", "bk-patient-10"), help="bench_dp_step's")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as bench_dp_step.run_case
    import bench_dp_step  # benchmarks/ is on sys.path when run as a script

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    mode = args.mode
    made = bench_dp_step.make_modes(args.model, args.size, ["nonprivate", mode], args.batch, args.device)
    clock = _Clock(sync)
    instrument(made[mode].model, clock)
    time_forward(made["nonprivate"].model, clock)
    made["nonprivate"].optimizer.step = clock.timed("AdamW", made["nonprivate"].optimizer.step)
    records: dict[str, list[dict[str, float]]] = {"nonprivate": [], mode: []}
    for round_ in range(args.rounds + 1):
        for name in ("nonprivate", mode):
            clock.seconds.clear()
            sync()
            start = time.perf_counter()
            made[name].step()
            sync()
            step_s = time.perf_counter() - start
            if round_ == 0:
                continue
            if name == "nonprivate":
                forward, adamw = clock.seconds["forward"], clock.seconds["AdamW"]
                parts = {"forward": forward, "backward (input and weight gradients)": step_s - forward - adamw}
                parts["AdamW"] = adamw
            else:
                parts = split_bk(clock.seconds, step_s)
            parts["step"] = step_s
            records[name].append(parts)
    base = statistics.median(r["step"] for r in records["nonprivate"])
    print(f"{args.model} {args.size}px batch {args.batch}, {args.threads} threads, {args.device}, {args.rounds} rounds")
    for name, rounds in records.items():
        print(f"\n{name}: step {statistics.median(r['step'] for r in rounds):.3f} s (median)")
        for key in rounds[0]:
            if key == "step":
                continue
            value = statistics.median(r.get(key, 0.0) for r in rounds)
            print(f"  {key:<48} {value:8.3f} s  {value / base:6.3f} of non-private")


if __name__ == "__main__":
    main()
