"""A sweep file's text run end to end on a private local Ray, for the end-to-end sweep tests."""

from collections.abc import Iterator
from contextlib import contextmanager

import yaml

from sweeps.launch import run_sweep
from sweeps.plan import SweepPaths
from sweeps.spec import SweepSpec, parse_spec


@contextmanager
def local_sweep(
    tmp_path_factory, text: str, source: str, num_gpus: int = 0
) -> Iterator[tuple[SweepSpec, SweepPaths, object]]:
    """Run the sweep in ``text`` under a fresh temporary folder; yields (spec, paths, trials table). ``num_gpus``
    declares that many GPUs to Ray (none need exist: trials that set ``speed.device: cpu`` only share them)."""
    import ray

    root = tmp_path_factory.mktemp("sweep")
    spec = parse_spec(yaml.safe_load(text), source=source)
    paths = SweepPaths.for_spec(spec, runs=str(root / "runs"), data=str(root / "data"))
    ray.init(address="local", num_cpus=2, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        yield spec, paths, run_sweep(spec, paths)
    finally:
        ray.shutdown()
