"""`dpsweep prepare` throughput and memory at real scale: ChestX-ray14 with 1024x1024 8-bit PNGs at 224 px.

Writing ChestX-ray14's 112,120 images at 1024x1024 (~100 GiB) is out of reach here, so two measurements
stand in for one full run:

1. ``throughput``: the first ``--n`` rows of the released ``Data_Entry_2017_v2020.csv`` (torchxrayvision's
   copy) with a 1024x1024 8-bit PNG for each, in the official ``images/`` layout, prepared at ``--size``
   with 1 and with 2 workers, interleaved, ``--repeats`` times each. ``--distinct`` different radiograph-
   like PNGs are written (`bench_loader.synthetic_radiograph`, ~0.7 MB each) and the rows link to them in
   turn: decoding cost is per image, but every file is read from the page cache (no disk I/O). Each run is
   a fresh process; it reports the wall time of `prepare_dataset`, the card's preprocessing throughput,
   and peak memory: ``VmHWM`` of the main process (resident, including mapped file pages) and the largest
   worker's ``ru_maxrss``.
   The machine's load makes wall-clock rates noisy, so each run also reports CPU seconds of the main
   process and of the workers: ``images_per_cpu_second`` (images / CPU seconds of the process(es) that
   decode) is what one worker does on a core of its own.
2. ``streaming``: 2 workers at a quarter of ``--n`` and at ``--n``, to show that the main process's peak
   memory does not grow with the number of images (rows are written with positioned writes; nothing maps
   or holds the image array; the main process only collects results).
3. ``full_list``: all 112,120 rows, every image a link to one tiny PNG on tmpfs, ``--size 8``: the
   metadata stage and per-image bookkeeping at full scale (CSV, splits, manifest, card), with its memory.

The extrapolation to the full list is ``full_list`` wall time + 112,120 / throughput (pixels of 224 px
images add 50 kB per image on disk, not in memory). Absolute times depend on the machine and its load;
this machine's 2 cores were shared with other work when these numbers were taken. Usage::

    python benchmarks/bench_prepare.py [--n 2000] [--distinct 200] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import describe_machine, synthetic_radiograph

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import trainables.data.prepare as module
from trainables.data.prepare import prepare_dataset
root, out, size, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
started = time.perf_counter()
folder = prepare_dataset("chestxray14", root, size=size, out=out, workers=workers)
wall = time.perf_counter() - started
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
card = json.loads((folder / "card.json").read_text())
print(json.dumps({
    "code": module.__file__,
    "wall_seconds": wall,
    "timing": card["prepare_timing"],
    "n_images": card["n_images"],
    "main_peak_rss_mib": int(status["VmHWM"].split()[0]) / 1024,
    "largest_worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "cpu_seconds_main": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
    "cpu_seconds_workers": sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2]),
}))
"""


def released_entries() -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchxrayvision (dev extra) is needed for the released Data_Entry_2017_v2020.csv")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Data_Entry_2017_v2020.csv.gz"


def layout(root: Path, lines: list[str], header: str, images: list[Path]) -> None:
    """Data_Entry CSV of ``lines``, split lists (patient id divisible by 5 -> test), ``images/`` links."""
    root.mkdir(parents=True)
    (root / "Data_Entry_2017_v2020.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    names = [line.split(",", 1)[0] for line in lines]
    test = [int(line.split(",")[3]) % 5 == 0 for line in lines]
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n, t in zip(names, test, strict=True) if not t))
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n, t in zip(names, test, strict=True) if t))
    (root / "images").mkdir()
    for k, name in enumerate(names):
        os.symlink(images[k % len(images)], root / "images" / name)


def run(root: Path, out: Path, size: int, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    repo = Path(__file__).resolve().parents[1]  # the child imports this checkout's code (cwd comes first on sys.path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(out), str(size), str(workers)],
        check=True, capture_output=True, text=True, env=env, cwd=repo,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare.json")
    args = parser.parse_args()

    text = gzip.decompress(released_entries().read_bytes()).decode()
    header, *lines = text.strip().split("\n")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    shm = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        pngs = []
        for seed in range(args.distinct):
            path = work / "sources" / f"{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_radiograph(seed, 1024)).save(path)
            pngs.append(path)
        png_mib = statistics.mean(p.stat().st_size for p in pngs) / 2**20
        layout(work / "subset", lines[: args.n], header, pngs)
        layout(work / "quarter", lines[: args.n // 4], header, pngs)

        throughput: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeats):  # interleaved: both worker counts see the same load over time
            for workers in (1, 2):
                throughput[workers].append(run(work / "subset", work / "out", args.size, workers))
        streaming = {
            "n_quarter": run(work / "quarter", work / "out", args.size, 2),
            "n": throughput[2][-1],
        }
        tiny = shm / "placeholder.png"
        Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(tiny)
        layout(shm / "full", lines, header, [tiny])
        full_list = run(shm / "full", shm / "out", 8, 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    rates = {w: statistics.median(r["timing"]["images_per_second"] for r in runs) for w, runs in throughput.items()}
    walls = {w: statistics.median(r["wall_seconds"] for r in runs) for w, runs in throughput.items()}
    extrapolated = {w: full_list["wall_seconds"] + len(lines) / rates[w] for w in rates}
    per_cpu = {  # images per CPU second of the decoding processes: the main one for 1 worker, else the pool
        w: statistics.median(
            r["n_images"] / (r["cpu_seconds_main"] if w == 1 else r["cpu_seconds_workers"]) for r in runs
        )
        for w, runs in throughput.items()
    }
    main_share = statistics.median(r["cpu_seconds_main"] / r["cpu_seconds_workers"] for r in throughput[2])
    unloaded = {w: full_list["wall_seconds"] + len(lines) / (w * per_cpu[w]) for w in per_cpu}
    result = {
        "what": f"dpsweep prepare chestxray14 --size {args.size}: {args.n} rows of Data_Entry_2017_v2020.csv, "
        f"1024x1024 8-bit PNGs (~{png_mib:.2f} MiB each, page cache), medians of {args.repeats} interleaved runs",
        "images_per_second": rates,
        "images_per_second_per_worker": {w: rates[w] / w for w in rates},
        "wall_seconds": walls,
        "runs": throughput,
        "streaming_main_peak_rss_mib": {
            f"{args.n // 4} images": streaming["n_quarter"]["main_peak_rss_mib"],
            f"{args.n} images": streaming["n"]["main_peak_rss_mib"],
        },
        "full_list_112120_rows_at_8px": full_list,
        "extrapolated_full_wall_hours": {w: extrapolated[w] / 3600 for w in extrapolated},
        "images_per_cpu_second_per_worker": per_cpu,
        "main_cpu_per_worker_cpu_with_2_workers": main_share,
        "projected_full_wall_hours_one_core_per_worker": {w: unloaded[w] / 3600 for w in unloaded},
        "machine": {**describe_machine(), "note": "2 cores shared with other jobs while measuring"},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for w in rates:
        print(f"workers={w}: {rates[w]:.1f} images/s ({rates[w] / w:.1f} per worker), {args.n} images in "
              f"{walls[w]:.1f} s; 112,120 images: ~{extrapolated[w] / 3600:.2f} h")  # fmt: skip
    for w in per_cpu:
        print(f"workers={w}: {per_cpu[w]:.1f} images per CPU second per worker; with a core per worker, 112,120 "
              f"images: ~{unloaded[w] / 3600:.2f} h")  # fmt: skip
    print(f"main process CPU with 2 workers: {main_share:.2f} of the workers' CPU")
    print(f"main peak RSS (2 workers): {streaming['n_quarter']['main_peak_rss_mib']:.0f} MiB at {args.n // 4} images, "
          f"{streaming['n']['main_peak_rss_mib']:.0f} MiB at {args.n}; full 112,120-row list at 8 px: "
          f"{full_list['main_peak_rss_mib']:.0f} MiB, {full_list['wall_seconds']:.1f} s")  # fmt: skip
    print(f"largest worker peak RSS: {max(r['largest_worker_peak_rss_mib'] for r in throughput[2]):.0f} MiB")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
