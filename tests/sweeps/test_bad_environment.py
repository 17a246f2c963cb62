"""A valid sweep that cannot run where it is started is refused before anything runs (`sweeps.preflight`): by
``dpsweep sweep --dry-run`` with exit status 2 and one message naming the field, flag or variable and the value, by
the real run in the same words before it writes anything, and within seconds (nothing waits for a server or a
cluster longer than `CONNECT_TIMEOUT_S`, set to 1 s here).

Each case is `BASE` (which dry-runs with exit 0 here) plus one problem of issue 23 ("No surprises", part B): more
CPUs or GPUs than the machine has, a model the DP engine cannot wrap, weight files that are no checkpoint of the
model, ``runs`` and ``data.root`` that cannot be written or are full, a tracking store of a bad scheme, unwritable or
down, a Ray address that is malformed or answers nothing; and ``dpsweep ui``'s port and folder. Strings in a case
may hold placeholders filled per test (`Places`).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file

import sweeps.preflight
from sweeps.cli import main
from tests.ports import LOOPBACK, free_port
from tests.sweeps.refusals import BASE, assert_refused, edited

CASE_SECONDS = 30
"""The most one refusal may take on a loaded machine (the dry run of `BASE` itself takes a few seconds)."""
TAG = "test_convnext.r160_in1k"
"""A timm weight tag of the test model: an init whose weights come from ``init_weights``."""
ENVIRONMENT = ("RAY_ADDRESS", "DPSWEEP_RUNS", "DPSWEEP_DATA", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")
NO_GPU = torch.cuda.device_count() == 0


@dataclass(frozen=True)
class Env:
    """One problem: edits to `BASE`, extra command-line arguments, environment variables and text files to create
    (paths under the test's folder), the field (flag, variable) the message must name and the value it must show
    (None: none checked). ``runs``/``data``: pass ``--runs``/``--data`` (under the test's folder) unless the case sets
    them another way."""

    edits: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    named: str = ""
    value: str | None = None
    runs: bool = True
    data: bool = True


def env(named: str, value: str | None, *, id: str, gpu: bool = False, **options: Any) -> Any:
    marks = [pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")] if gpu else []
    return pytest.param(Env(named=named, value=value, **options), id=id, marks=marks)


@dataclass(frozen=True)
class Places:
    """What a case's placeholders stand for: ``{tmp}`` the test's folder, ``{file}`` a text file in it, ``{weights}``
    the folder of `weight_files`, ``{closed}`` a port nothing listens on, ``{silent}`` a port that accepts
    connections and never answers, ``{web}`` the port of an HTTP server, ``{ro}`` a read-only folder (the last three
    only made when a case names them)."""

    tmp: Path
    weights: Path
    closed: int
    silent: int = 0
    web: int = 0
    ro: Path | None = None

    def fill(self, value: Any) -> Any:
        if isinstance(value, str):
            names = {"tmp": self.tmp, "file": self.tmp / "a-file", "weights": self.weights, "ro": self.ro}
            return value.format(closed=self.closed, silent=self.silent, web=self.web, **names)
        if isinstance(value, dict):
            return {self.fill(k): self.fill(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.fill(v) for v in value)
        return value


RESOURCES = [
    # Issue 23: planned fine, then waited for resources forever.
    env("resources.cpu", "64", id="cpu-64", edits={"resources.cpu": 64}),
    env("resources.cpu", "4096", id="cpu-4096", edits={"resources.cpu": 4096}),
    env("resources.cpu", "63.5", id="cpu-63.5", edits={"resources.cpu": 63.5}),
    env("resources.gpu", "1", id="gpu-1", gpu=True, edits={"resources.gpu": 1}),
    env("resources.gpu", "0.25", id="gpu-0.25", gpu=True, edits={"resources.gpu": 0.25}),
    env("resources.gpu", "2", id="gpu-2", gpu=True, edits={"resources.gpu": 2}),
    env("resources.gpu", "1", id="cuda-gpu-1", gpu=True, edits={"resources.gpu": 1, "speed.device": "cuda"}),
    # Issue 23: failed inside a trial.
    env("speed.device", "'cuda' with resources.gpu = 0", id="cuda-no-gpu-share", edits={"speed.device": "cuda"}),
]

MODELS = [
    # Issue 23: resnet50's BatchNorm failed inside every private trial.
    env("model = 'resnet50'", "bn1 (BatchNorm2d)", id="resnet50", edits={"model": "resnet50"}),
    env(
        "model = 'resnet50'",
        "BatchNorm",
        id="resnet50-hooks",
        edits={"model": "resnet50", "speed.grad_sample_mode": "hooks"},
    ),
    env(
        "model = 'test_resnet'",
        "BatchNorm",
        id="test_resnet-functorch",
        edits={"model": "test_resnet", "speed.grad_sample_mode": "functorch"},
    ),
    env("model = 'test_efficientnet'", "BatchNorm", id="test_efficientnet", edits={"model": "test_efficientnet"}),
    env(
        "model[1] = 'test_resnet'",
        "BatchNorm",
        id="second-model",
        edits={
            "model": ["test_convnext", "test_resnet"],
            "privacy.max_grad_norm": {"test_convnext": 1, "test_resnet": 1},
        },
    ),
    env("model = 'test_vit'", "speed.grad_sample_mode = 'bk'", id="bk-without-rule", edits={"model": "test_vit"}),
    env(
        "data.image_size = 32",
        "'vit_tiny_patch16_224'",
        id="image-size",
        edits={"model": "vit_tiny_patch16_224", "speed.grad_sample_mode": "functorch"},
    ),
]


def weights(file: str, shown: str, *, id: str) -> Any:
    """``init_weights`` of the `TAG` init set to a file of `weight_files` that is not its checkpoint."""
    edits = {"inits": ["random", TAG], "init_weights": {TAG: f"{{weights}}/{file}"}}
    return env(f"init_weights.{TAG}", shown, id=id, edits=edits)


WEIGHTS = [
    # Issue 23: an init weights file that is a text file failed inside a trial.
    weights("text.safetensors", "text.safetensors is not a safetensors file", id="text-safetensors"),
    weights("text.pth", "text.pth is not a checkpoint", id="text-pth"),
    weights("empty.safetensors", "empty.safetensors is not a safetensors file", id="empty"),
    weights("truncated.safetensors", "truncated.safetensors is not a safetensors file", id="truncated"),
    weights("safetensors.pth", "safetensors.pth is not a checkpoint", id="safetensors-named-pth"),
    weights("pickled-model.pth", "pickled Python objects", id="pickled-model"),
    weights("no-state-dict.pth", "holds no state dict", id="no-state-dict"),
    weights("other-arch.safetensors", f"does not hold {TAG} weights", id="other-architecture"),
    weights("other-arch.pth", "have other shapes", id="other-architecture-pth"),
    weights("resnet.safetensors", "tensors are missing", id="resnet-weights"),
    env(
        f"init_weights.{TAG}",
        "text.safetensors",
        id="pretrain-init",
        edits={
            "pretrain.dataset": "synthetic-source",
            "pretrain.init": TAG,
            "init_weights": {TAG: "{weights}/text.safetensors"},
        },
    ),
]

FOLDERS = [
    # Issue 23: `runs` pointing at a file, or an unwritable folder (13 tracebacks after a trial had trained).
    env("--runs {file}", "is a file", id="runs-flag-file", args=("--runs", "{file}"), runs=False),
    env("runs = '{file}'", "is a file", id="runs-field-file", edits={"runs": "{file}"}, runs=False),
    env("$DPSWEEP_RUNS = '{file}'", "is a file", id="runs-env-file", env={"DPSWEEP_RUNS": "{file}"}, runs=False),
    env("--runs {file}/below", "cannot be created", id="runs-below-file", args=("--runs", "{file}/below"), runs=False),
    env("--runs {tmp}/runs", "bad-inputs is a file", id="sweep-folder-file", files=("runs/bad-inputs",)),
    env("--runs {ro}", "{ro} is ", id="runs-read-only", args=("--runs", "{ro}"), runs=False),
    env("runs = '{ro}/runs'", "{ro} is ", id="runs-field-read-only", edits={"runs": "{ro}/runs"}, runs=False),
    env("--data {file}", "is a file", id="data-flag-file", args=("--data", "{file}"), data=False),
    env("data.root = '{file}'", "is a file", id="data-field-file", edits={"data.root": "{file}"}, data=False),
    env("$DPSWEEP_DATA = '{file}'", "is a file", id="data-env-file", env={"DPSWEEP_DATA": "{file}"}, data=False),
    env("--data {ro}", "privacy ledger of synthetic-a", id="data-read-only", args=("--data", "{ro}"), data=False),
]

TRACKING = [
    # Issue 23: a bad scheme (traceback), an unwritable sqlite (traceback after 114 s), a server that is down (hung).
    env("tracking.uri = 'foo://bar'", "scheme 'foo'", id="scheme", edits={"tracking.uri": "foo://bar"}),
    env("tracking.uri = 'mlruns'", "file store", id="file-store-folder", edits={"tracking.uri": "mlruns"}),
    env(
        "tracking.uri = 'file://{tmp}/mlruns'",
        "file store",
        id="file-store-uri",
        edits={"tracking.uri": "file://{tmp}/mlruns"},
    ),
    env(
        "tracking.uri", "{file} is a file", id="sqlite-below-file", edits={"tracking.uri": "sqlite:///{file}/mlflow.db"}
    ),
    env(
        "tracking.uri",
        "is not an SQLite database",
        id="sqlite-text-file",
        edits={"tracking.uri": "sqlite:///{tmp}/text.db"},
    ),
    env(
        "tracking.uri",
        "is a folder, not a database file",
        id="sqlite-folder",
        edits={"tracking.uri": "sqlite:///{tmp}"},
    ),
    env("tracking.uri = 'sqlite://'", "in-memory", id="sqlite-memory", edits={"tracking.uri": "sqlite://"}),
    env("tracking.uri", "{ro} is ", id="sqlite-read-only", edits={"tracking.uri": "sqlite:///{ro}/mlflow.db"}),
    env("tracking.uri", "Connection refused", id="server-down", edits={"tracking.uri": "http://127.0.0.1:{closed}"}),
    env(
        "tracking.uri", "no answer within 1 s", id="server-silent", edits={"tracking.uri": "http://127.0.0.1:{silent}"}
    ),
    env("tracking.uri", "names no host", id="server-no-host", edits={"tracking.uri": "http://:5000"}),
    env("tracking.uri", "Connection refused", id="https-down", edits={"tracking.uri": "https://127.0.0.1:{closed}"}),
    env(
        "tracking.uri",
        "database server does not answer",
        id="postgres-down",
        edits={"tracking.uri": "postgresql://user@127.0.0.1:{closed}/mlflow"},
    ),
    env("tracking.uri", "names no database host", id="mysql-no-host", edits={"tracking.uri": "mysql://user@/mlflow"}),
    env(
        "$MLFLOW_TRACKING_URI = 'foo://bar'", "scheme 'foo'", id="env-scheme", env={"MLFLOW_TRACKING_URI": "foo://bar"}
    ),
    env("--runs {tmp}/runs", "mlflow.db is not an SQLite database", id="default-store-text", files=("runs/mlflow.db",)),
]

RAY = [
    # Issue 23: RAY_ADDRESS=garbage or an unreachable --address were tracebacks.
    env("$RAY_ADDRESS = 'garbage'", "not a Ray address", id="env-garbage", env={"RAY_ADDRESS": "garbage"}),
    env("$RAY_ADDRESS = 'head:port'", "not a Ray address", id="env-port-name", env={"RAY_ADDRESS": "head:port"}),
    env("$RAY_ADDRESS", "Connection refused", id="env-down", env={"RAY_ADDRESS": "127.0.0.1:{closed}"}),
    env("$RAY_ADDRESS", "Connection refused", id="env-client-down", env={"RAY_ADDRESS": "ray://127.0.0.1:{closed}"}),
    env("--address garbage", "not a Ray address", id="flag-garbage", args=("--address", "garbage")),
    env("--address 127.0.0.1:70000", "not a Ray address", id="flag-port-range", args=("--address", "127.0.0.1:70000")),
    env("--address http://head:8265", "not a Ray address", id="flag-dashboard", args=("--address", "http://head:8265")),
    env("--address 127.0.0.1:", "Connection refused", id="flag-down", args=("--address", "127.0.0.1:{closed}")),
    # Ray's own connection to a port that is not a cluster's retried for minutes.
    env("--address 127.0.0.1:", "no answer within 1 s", id="flag-silent", args=("--address", "127.0.0.1:{silent}")),
    env("$RAY_ADDRESS", "not as a Ray cluster does", id="env-web-server", env={"RAY_ADDRESS": "127.0.0.1:{web}"}),
]

CASES = [*RESOURCES, *MODELS, *WEIGHTS, *FOLDERS, *TRACKING, *RAY]


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> Path:
    """Files that are not `TAG`'s checkpoint: text, empty, truncated, pickled, other architectures."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    rgb = timm.create_model("test_convnext")  # the shape of TAG's weights: RGB stem, 1000 classes
    tensors = {k: v.contiguous() for k, v in rgb.state_dict().items()}
    save_file(tensors, folder / "good.safetensors")
    torch.save(rgb.state_dict(), folder / "good.pth")
    (folder / "text.safetensors").write_text("weights: see the shared drive\n")
    (folder / "text.pth").write_text("weights: see the shared drive\n")
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "truncated.safetensors").write_bytes((folder / "good.safetensors").read_bytes()[:4000])
    (folder / "safetensors.pth").write_bytes((folder / "good.safetensors").read_bytes())
    torch.save(rgb, folder / "pickled-model.pth")
    torch.save({"epoch": 3, "lr": 0.1}, folder / "no-state-dict.pth")
    other = timm.create_model("test_convnext2").state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, folder / "other-arch.safetensors")
    torch.save({"state_dict": other, "epoch": 3}, folder / "other-arch.pth")
    resnet = timm.create_model("test_resnet").state_dict()
    save_file({k: v.contiguous() for k, v in resnet.items()}, folder / "resnet.safetensors")
    return folder


@pytest.fixture
def read_only(tmp_path) -> Iterator[Path]:
    """A folder nothing can be written in: a read-only filesystem for root (who writes into any folder), a folder
    without write permission for anyone else."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"no read-only folder for root here (mount: {mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) but never answers."""
    with socket.socket() as server:
        server.bind((LOOPBACK, 0))
        server.listen(8)
        yield server.getsockname()[1]


class Health(http.server.BaseHTTPRequestHandler):
    """``GET /health``: 200 OK, as an MLflow server answers it; anything else 404."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web_port() -> Iterator[int]:
    """The port of an HTTP server on the loopback interface."""
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path) -> None:
    """No variable of the caller's leaks in; relative folders resolve in an empty working folder; short timeouts."""
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sweeps.preflight, "CONNECT_TIMEOUT_S", 1.0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def run_case(case: Env, places: Places, monkeypatch, *, dry_run: bool) -> int:
    """``dpsweep sweep`` on the case's sweep file (`places_for` wrote it), with its arguments and variables."""
    sweep_file = places.tmp / "sweep.yaml"
    for name, value in case.env.items():
        monkeypatch.setenv(name, places.fill(value))
    args = ["sweep", str(sweep_file), *places.fill(case.args)]
    args += ["--runs", str(places.tmp / "runs")] * case.runs + ["--data", str(places.tmp / "data")] * case.data
    return main(args + ["--dry-run"] * dry_run)


def places_for(case: Env, tmp_path: Path, request: pytest.FixtureRequest, weight_files: Path) -> Places:
    """The case's places, its files and its sweep file (``tmp/sweep.yaml``) written."""
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "text.db").write_text("not a database\n")
    for name in case.files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("not what it should be\n")
    uses = repr(case)
    ro = request.getfixturevalue("read_only") if "{ro}" in uses else None
    silent = request.getfixturevalue("silent_port") if "{silent}" in uses else 0
    web = request.getfixturevalue("web_port") if "{web}" in uses else 0
    places = Places(tmp_path, weight_files, free_port(), silent, web, ro)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(places.fill(edited(case.edits))))
    return places


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


@pytest.mark.parametrize("case", CASES)
def test_the_dry_run_refuses_an_environment_the_sweep_cannot_run_in(
    case: Env, tmp_path, request, weight_files, monkeypatch, capsys
):
    places = places_for(case, tmp_path, request, weight_files)
    before = files_under(tmp_path)
    start = time.perf_counter()
    status = run_case(case, places, monkeypatch, dry_run=True)
    elapsed = time.perf_counter() - start
    assert_refused(status, capsys.readouterr().err, places.fill(case.named), places.fill(case.value))
    assert elapsed < CASE_SECONDS
    assert files_under(tmp_path) == before  # nothing written


BY_ID = {case.id: case for case in CASES}
REAL_RUN = [
    BY_ID[id]
    for id in (
        "cpu-64",
        "cuda-no-gpu-share",
        "resnet50",
        "text-safetensors",
        "runs-read-only",
        "data-read-only",
        "scheme",
        "server-down",
        "env-garbage",
        "flag-down",
    )
]


@pytest.mark.parametrize("case", REAL_RUN)
def test_the_real_run_refuses_the_same_before_writing_anything(
    case: Env, tmp_path, request, weight_files, monkeypatch, capsys
):
    """`run_sweep` asks the same checks first: the same message, no ``runs/<sweep>``, no data, no ledger, no
    trial."""
    places = places_for(case, tmp_path, request, weight_files)
    before = files_under(tmp_path)
    assert run_case(case, places, monkeypatch, dry_run=True) == 2
    dry_err = capsys.readouterr().err
    status = run_case(case, places, monkeypatch, dry_run=False)
    err = capsys.readouterr().err
    assert_refused(status, err, places.fill(case.named), places.fill(case.value))
    assert err == dry_err
    assert files_under(tmp_path) == before


def test_a_full_disk_is_refused_naming_the_folders_on_it(tmp_path, monkeypatch, capsys):
    """Issue 23: a full disk failed after a trial had trained. Here the runs and data folders share the test's
    filesystem; it is said to have 1 kB free."""
    monkeypatch.setattr(sweeps.preflight, "free_bytes", lambda folder: 1000)
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(BASE))
    args = ["sweep", str(sweep_file), "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")]
    before = files_under(tmp_path)
    for dry_run in (True, False):
        status = main(args + ["--dry-run"] * dry_run)
        err = capsys.readouterr().err
        assert_refused(status, err, f"--runs {tmp_path / 'runs'} and --data {tmp_path / 'data'}", "only 1.0 kB")
    assert files_under(tmp_path) == before


def test_the_disk_need_counts_weights_checkpoints_and_synthetic_data(tmp_path):
    """`disk_need`'s lower bound for `BASE` (2 trials of test_convnext, 2 at once): 2 final weights + 2 epoch
    checkpoints of 4 copies + 2 x 64 kB of tables under runs; 60 images of 32 x 32 bytes per synthetic dataset to
    generate (the training and the external set)."""
    from sweeps.plan import SweepPaths
    from sweeps.spec import parse_spec

    spec = parse_spec(BASE)
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    runs, *data = sweeps.preflight.disk_need(spec, paths, {"test_convnext": 1000}, concurrent=2)
    assert runs.bytes == 2 * 1000 + 2 * 4 * 1000 + 2 * 64 * 1024
    assert [(need.folder.parent.name, need.bytes) for need in data] == [("synthetic-a", 61440), ("synthetic-b", 61440)]
    (runs,) = sweeps.preflight.disk_need(spec, paths, {"test_convnext": 1000}, concurrent=0)[:1]
    assert runs.bytes == 2 * 1000 + 1 * 4 * 1000 + 2 * 64 * 1024  # at least one trial runs


def test_the_disk_need_counts_the_proxy_dataset_a_proxy_sweep_generates(tmp_path):
    """A proxy sweep's phase 1 trains on ``proxy.dataset``: generated at the sweep's size and count when missing."""
    from sweeps.plan import SweepPaths
    from sweeps.spec import parse_spec

    spec = parse_spec(edited({"search": "proxy", "proxy": {"dataset": "synthetic-source", "batch_size": 4}}))
    paths = SweepPaths.for_spec(spec, runs=str(tmp_path / "runs"), data=str(tmp_path / "data"))
    _, *data = sweeps.preflight.disk_need(spec, paths, {"test_convnext": 1000}, concurrent=2)
    assert [(need.folder.parent.name, need.bytes) for need in data] == [
        ("synthetic-a", 61440),
        ("synthetic-b", 61440),
        ("synthetic-source", 61440),
    ]


GOOD = [
    pytest.param({}, (), {}, id="base"),
    pytest.param({"model": "resnet50", "privacy.target_epsilon": [float("inf")]}, (), {}, id="batchnorm-baseline"),
    pytest.param({"model": "test_vit", "speed.grad_sample_mode": "functorch"}, (), {}, id="vit-functorch"),
    pytest.param({"inits": ["random", TAG], "init_weights": {TAG: "{weights}/good.safetensors"}}, (), {}, id="weights"),
    pytest.param({"inits": ["random", TAG], "init_weights": {TAG: "{weights}/good.pth"}}, (), {}, id="weights-pth"),
    pytest.param({}, ("--address", "local"), {}, id="address-local"),
    pytest.param({"tracking.uri": "sqlite:///{tmp}/new/folder/mlflow.db"}, (), {}, id="sqlite-new-folder"),
    pytest.param({"tracking.uri": "file://{tmp}/mlruns"}, (), {"MLFLOW_ALLOW_FILE_STORE": "true"}, id="file-store"),
    pytest.param({"runs": "{tmp}/not/yet/there"}, (), {}, id="runs-to-create"),
]


@pytest.mark.parametrize(("edits", "args", "variables"), GOOD)
def test_a_sweep_that_can_run_here_still_dry_runs_with_exit_0(
    edits, args, variables, tmp_path, request, weight_files, monkeypatch, capsys
):
    """The controls: BatchNorm is fine without DP, a ViT with the engine that covers it, a checkpoint of the
    architecture (RGB stem, 1000 classes: timm adapts both), folders and stores that do not exist yet."""
    case = Env(edits=edits, args=args, env=variables, runs="runs" not in edits)
    places = places_for(case, tmp_path, request, weight_files)
    before = files_under(tmp_path)
    status = run_case(case, places, monkeypatch, dry_run=True)
    assert status == 0, capsys.readouterr().err
    assert files_under(tmp_path) == before


def test_a_tracking_server_that_answers_passes(tmp_path, web_port, monkeypatch, capsys):
    """Any HTTP answer counts (MLflow's own first call, in the real run, says more if it is not MLflow's)."""
    case = Env(edits={"tracking.uri": f"http://{LOOPBACK}:{web_port}"})
    places = Places(tmp_path, tmp_path, 0)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(edited(case.edits)))
    assert run_case(case, places, monkeypatch, dry_run=True) == 0, capsys.readouterr().err


UI = [
    pytest.param(["--port", "0"], "--port 0", "from 1 to 65535", id="port-0"),
    pytest.param(["--port", "70000"], "--port 70000", "from 1 to 65535", id="port-70000"),
    pytest.param(["--port", "-5"], "--port -5", "from 1 to 65535", id="port-negative"),
    pytest.param(["--port", "{used}"], "--port {used}", "is in use on 127.0.0.1", id="port-in-use"),
    pytest.param(["--runs", "{tmp}/nowhere"], "--runs {tmp}/nowhere", "does not exist", id="runs-missing"),
    pytest.param(["--runs", "{tmp}/empty"], "--runs {tmp}/empty", "no MLflow database", id="runs-without-db"),
    pytest.param(["--runs", "{tmp}/a-file"], "--runs {tmp}/a-file", "is not a folder", id="runs-a-file"),
]


@pytest.mark.parametrize(("args", "field", "value"), UI)
def test_dpsweep_ui_refuses_before_printing_links(args, field, value, tmp_path, capsys):
    """Issue 23: a port in use or out of range printed working-looking links and exited 0."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mlflow.db").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("")
    with socket.socket() as used:
        used.bind((LOOPBACK, 0))
        used.listen(1)
        names = {"tmp": tmp_path, "used": used.getsockname()[1]}
        filled = [a.format(**names) for a in args]
        status = main(["ui", *(["--runs", str(runs)] if "--runs" not in filled else []), *filled])
    captured = capsys.readouterr()
    assert_refused(status, captured.err, field.format(**names), value)
    assert captured.out == ""  # no link printed


def test_a_free_port_and_a_database_pass_the_ui_check(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "mlflow.db").write_bytes(b"")
    assert sweeps.preflight.check_ui(runs, free_port()) == runs / "mlflow.db"


@pytest.mark.slow
def test_a_cluster_too_small_for_one_trial_is_refused_by_the_real_run(tmp_path, monkeypatch, capsys):
    """With Ray already joined (here a local Ray of 1 CPU), its nodes are what a trial must fit on."""
    import ray

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(edited({"resources.cpu": 2})))
    before = files_under(tmp_path)
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    capsys.readouterr()  # Ray's own start-up lines
    try:
        status = main(["sweep", str(sweep_file), "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data")])
    finally:
        ray.shutdown()
    assert_refused(status, capsys.readouterr().err, "resources.cpu = 2", "the Ray this process is joined to")
    assert files_under(tmp_path) == before


def test_there_are_at_least_35_environment_cases():
    """Issue 23 asks for 100 bad inputs across this module and test_bad_inputs.py (which has more than 100 of the
    sweep file's); at least 35 of them are the environment's, each with its own id."""
    ids = [case.id for case in CASES] + [case.id for case in UI]
    assert len(ids) == len(set(ids)) and len(ids) >= 35
