"""The environment a sweep will run in, checked before anything runs (`preflight`; ``dpsweep ui``'s: `check_ui`).

A valid sweep file (`sweeps.spec`) can still fail where it runs: trials that ask for more CPUs or GPUs than any
machine Ray can use wait forever; a model the DP engine cannot wrap, or an init's weight file that is no checkpoint
of the model, fails inside every trial; an unwritable or full ``runs/``, a tracking store that is down or a Ray
address that answers nothing fail after minutes, or hang. `preflight` answers each with a `PreflightError` naming
the field (or flag, or environment variable), the value and the fix, before Ray starts, before any file is written
and before any trial. The dry run (``dpsweep sweep --dry-run``) and `sweeps.launch.run_sweep` both call it, so the
dry run's exit 0 means the real run can start here.

What it checks, in this order (cheap first):

1. **Ray**: ``--address`` or ``$RAY_ADDRESS`` is ``local``, ``auto`` (a cluster started on this machine), ``host:port``
   or ``ray://host:port``, and a gRPC server answers there within `CONNECT_TIMEOUT_S` (`_not_grpc`).
2. **Resources**: one trial's ``resources.cpu`` and ``resources.gpu`` fit on one node: this machine for a local Ray
   (``os.cpu_count()``, the GPUs torch sees), the Ray this process is connected to, or, in the real run only, the
   alive nodes of the cluster at the address (joined for a moment; a dry run does not join a cluster, which would
   write Ray's session files). ``speed.device: cuda`` needs ``resources.gpu > 0``. ``speed.threads`` is not held
   to ``resources.cpu``: more threads than reserved CPUs only oversubscribe them.
3. **Folders**: ``runs`` (``--runs``, ``$DPSWEEP_RUNS``) and the folders the real run writes under ``data.root``
   (``--data``, ``$DPSWEEP_DATA``: each training set's privacy ledger, synthetic datasets not yet generated) are
   folders or can be created, and are writable (`os.access`; the real run also creates and deletes a temporary file
   in them).
4. **Tracking**: the store of ``tracking.uri`` (or ``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db``) has a scheme
   MLflow 3 serves (a plain folder or ``file:`` only with ``MLFLOW_ALLOW_FILE_STORE``): an SQLite file that is a
   database (or new) in a writable folder, a server or database that answers within `CONNECT_TIMEOUT_S`.
5. **Models**: every (model, init) is built as its trials build it, on the meta device (no memory, no download;
   `trainables.models.create_meta_model`): the init's weight file is read as a checkpoint and its tensors matched to
   the model's; a batch of ``data.image_size`` images goes through it; for a sweep with private targets it is
   wrapped by the engine of ``speed.grad_sample_mode`` (`trainables.privacy.engine.wrap_model`), which refuses
   modules it cannot train privately (BatchNorm).
6. **Disk**: the free space of each filesystem the sweep writes to holds at least what the sweep will certainly
   write there (`disk_need`): each trial's final weights, one epoch checkpoint per trial running at once, small
   tables; the synthetic datasets to generate.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from trainables.config import is_private
from trainables.errors import UserError

if TYPE_CHECKING:  # the planner imports pandas and torch: `check_ui` needs neither
    from sweeps.plan import SweepPaths
    from sweeps.spec import SweepSpec

CONNECT_TIMEOUT_S = 5.0
"""How long a Ray address, a tracking server or database may take to answer a connection."""
EPOCH_CHECKPOINT_COPIES = 4
"""Model-sized tensors in a trial's epoch checkpoint: the last and the selected weights, AdamW's two moments."""
TABLE_BYTES_PER_TRIAL = 64 * 1024
"""The least a trial adds to the tables and MLflow (its rows, params, metrics, evaluation tables)."""
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
"""Tracking stores in a database server: scheme -> its default port."""
UNCHECKED_SCHEMES = ("databricks", "databricks-uc", "uc")
"""Tracking schemes MLflow serves through credentials of its own: left to the real run's first MLflow call."""
RAY_ADDRESS = re.compile(r"(?P<client>ray://)?(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):(?P<port>\d+)")
"""``host:port`` (a cluster's GCS) or ``ray://host:port`` (Ray Client); an IPv6 host in brackets."""


class PreflightError(UserError):
    """The sweep cannot run in this environment; the message names the field, flag or variable, the value and the
    fix."""


def preflight(spec: SweepSpec, paths: SweepPaths, *, address: str | None = None, dry_run: bool) -> None:
    """Check the environment a valid sweep will run in (module docstring); raise `PreflightError` for the first
    problem. ``address``: ``--address`` (None: ``$RAY_ADDRESS``, else a local Ray). ``dry_run``: write nothing
    and join no cluster; otherwise writability is also probed with a temporary file and a cluster's nodes are read."""
    target = ray_target(address)
    nodes = _nodes(target, dry_run)
    _check_resources(spec, target, nodes)
    _check_folders(spec, paths, probe=not dry_run)
    _check_tracking(paths)
    model_bytes = _check_models(spec, paths)
    _check_disk(spec, paths, model_bytes, nodes)


# ----------------------------------------------------------------------------------------------------------------
# Ray: where the trials run, and what its nodes offer


@dataclass(frozen=True)
class RayTarget:
    """The Ray a sweep's trials would run on.

    Attributes:
        given: the address as given (None: a local Ray).
        where: how the address was given, for messages (``--address x``, ``$RAY_ADDRESS = 'x'``).
        host, port: the address's host and port (None for a local Ray).
    """

    given: str | None
    where: str = ""
    host: str | None = None
    port: int | None = None

    @property
    def local(self) -> bool:
        return self.host is None


def ray_target(address: str | None) -> RayTarget:
    """The Ray `run_sweep` would start or join for ``address`` (else ``$RAY_ADDRESS``), its address checked: the
    form Ray reads, and a gRPC answer within `CONNECT_TIMEOUT_S` (`_not_grpc`; Ray itself would hang for minutes or
    fail with a traceback).

    Raises:
        PreflightError: a malformed address, no running cluster for ``auto``, or nothing answering at the address.
    """
    given = address or os.environ.get("RAY_ADDRESS") or None
    if given is None:
        return RayTarget(None)
    where = f"--address {given}" if address else f"$RAY_ADDRESS = {given!r}"
    clear = "leave out --address" if address else "unset RAY_ADDRESS"
    value = given.strip()
    if value == "local":
        return RayTarget(None, where)
    if value == "auto":
        value = _running_cluster(where)
    match = RAY_ADDRESS.fullmatch(value)
    port = int(match["port"]) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise PreflightError(
            f"{where} is not a Ray address; give host:port (a cluster's head, e.g. head-node:6379), "
            f"ray://host:port (Ray Client, e.g. ray://head-node:10001) or auto (a cluster started on this machine), "
            f"or {clear} to run on a local Ray"
        )
    host = match["host"].strip("[]")
    problem = _unreachable(host, port) if _env_true("RAY_USE_TLS") else _not_grpc(host, port)
    if problem:
        raise PreflightError(
            f"{where}: no Ray cluster answers at {host}:{port} ({problem}); start the cluster there (`ray start "
            f"--head`) or fix the address (the head's GCS port, 6379 by default, or ray://host:10001), or {clear} to "
            "run on a local Ray"
        )
    return RayTarget(given, where, host, port)


def _running_cluster(where: str) -> str:
    """The address of the cluster ``auto`` means (`ray start` on this machine), as Ray finds it."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except (ConnectionError, ValueError) as error:
        raise PreflightError(
            f"{where}: no running Ray cluster was found on this machine ({_first_line(error)}); start one with "
            "`ray start --head`, give its address, or leave --address and RAY_ADDRESS unset to run on a local Ray"
        ) from None
    return found or "local"


HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""The HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server (a Ray head's GCS, a Ray Client server)
answers with a SETTINGS frame of its own (frame type 4, the fourth byte)."""


def _not_grpc(host: str, port: int) -> str | None:
    """Why host:port is not a gRPC server answering within `CONNECT_TIMEOUT_S` (None: it is one). Ray's own
    connection to a port that accepts connections but is not its GCS (a dashboard's, a silent one) retries for
    minutes; a cluster with TLS (``RAY_USE_TLS``) is only checked for a connection (`_unreachable`)."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as connection:
            connection.sendall(HTTP2_HELLO)
            answer = connection.recv(9)
    except socket.gaierror:
        return f"host {host!r} is unknown"
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as error:
        return error.strerror or str(error)
    if len(answer) < 4 or answer[3] != 4:
        return "something answers there, but not as a Ray cluster does (gRPC)"
    return None


def _unreachable(host: str, port: int) -> str | None:
    """Why nothing accepts a TCP connection at host:port within `CONNECT_TIMEOUT_S` (None: something does)."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except socket.gaierror:
        return f"host {host!r} is unknown"
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as error:
        return error.strerror or str(error)


@dataclass(frozen=True)
class Nodes:
    """What the nodes a trial could be placed on offer (one dict of Ray resources per node), and where they are."""

    resources: list[dict[str, float]]
    where: str


def _nodes(target: RayTarget, dry_run: bool) -> Nodes | None:
    """The nodes of the Ray the sweep would use: the Ray this process is already connected to; this machine for a
    local Ray (`os.cpu_count`, the GPUs torch sees); in the real run the alive nodes of the cluster at the address
    (joined and left again: `run_sweep` joins it for the sweep). None for a cluster in a dry run."""
    imported = sys.modules.get("ray")
    if imported is not None and imported.is_initialized():
        alive = [node["Resources"] for node in imported.nodes() if node["Alive"]]
        return Nodes(alive, "the Ray this process is joined to")
    if target.local:
        import torch

        gpus = torch.cuda.device_count()
        return Nodes([{"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}], "this machine")
    if dry_run:
        return None
    import ray

    try:
        ray.init(address=target.given, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as error:  # Ray's own error types (auth, version mismatch, ...): all mean "cannot join"
        auth = "; a cluster with token authentication needs RAY_AUTH_MODE=token (docs/clusters.md)" * (
            "auth" in str(error).lower()
        )
        raise PreflightError(
            f"{target.where}: Ray cannot join the cluster there ({type(error).__name__}: {_first_line(error)}){auth}; "
            "fix the address or the cluster"
        ) from None
    try:
        alive = [node["Resources"] for node in ray.nodes() if node["Alive"]]  # type: ignore[no-untyped-call]
        return Nodes(alive, f"the Ray cluster at {target.given}")
    finally:
        ray.shutdown()


def _check_resources(spec: SweepSpec, target: RayTarget, nodes: Nodes | None) -> None:
    """A trial's CPUs and GPUs fit on one node (Ray places a trial on one node, and waits forever for one that
    fits); ``speed.device: cuda`` reserves a GPU."""
    cpu, gpu = spec.resources.cpu, spec.resources.gpu
    if spec.speed.device == "cuda" and gpu == 0:
        raise PreflightError(
            f"{spec.source}: speed.device = 'cuda' with resources.gpu = 0: Ray reserves no GPU for such a trial, so "
            "trials would share the GPUs Ray gives to others unscheduled (or see none, with "
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1); give resources.gpu > 0 (e.g. 1, or 0.25 for four trials per GPU), "
            "or speed.device: auto"
        )
    if nodes is None:
        return
    if any(node.get("CPU", 0) >= cpu and node.get("GPU", 0) >= gpu for node in nodes.resources):
        return
    most_cpus = max((node.get("CPU", 0) for node in nodes.resources), default=0)
    most_gpus = max((node.get("GPU", 0) for node in nodes.resources), default=0)
    one_node = "" if len(nodes.resources) == 1 else " on one node"
    elsewhere = ", or run on a cluster that has them (--address)" if target.local else ""
    if gpu > most_gpus:
        has = "no GPU" if most_gpus == 0 else f"at most {most_gpus:g} GPU{'s' * (most_gpus != 1)}{one_node}"
        device = " (with speed.device: auto or cpu)" if spec.speed.device == "cuda" else ""
        raise PreflightError(
            f"{spec.source}: resources.gpu = {gpu:g}: each trial reserves {gpu:g} GPU{'s' * (gpu > 1)} but "
            f"{nodes.where} has {has}, so Ray would wait for them forever; give resources.gpu: 0 to train on "
            f"CPUs{device}{elsewhere}"
        )
    if cpu > most_cpus:
        raise PreflightError(
            f"{spec.source}: resources.cpu = {cpu:g}: each trial reserves {cpu:g} CPUs but {nodes.where} has "
            f"{'only ' if one_node == '' else 'at most '}{most_cpus:g}{one_node}, so Ray would wait for them forever; "
            f"give resources.cpu at most {most_cpus:g}{elsewhere}"
        )
    raise PreflightError(
        f"{spec.source}: resources.cpu = {cpu:g} with resources.gpu = {gpu:g}: no node of {nodes.where} has both "
        "for one trial, so Ray would wait for them forever; lower resources.cpu or resources.gpu"
    )


# ----------------------------------------------------------------------------------------------------------------
# Folders and the tracking store


def _check_folders(spec: SweepSpec, paths: SweepPaths, probe: bool) -> None:
    """``runs`` and the folders the real run writes under ``data.root`` are folders, or can be created, and are
    writable."""
    runs = as_given(paths.runs_field, paths.runs_root)
    for folder in (paths.runs_root, paths.sweep_dir(spec), paths.ray_experiment(spec), paths.runs_root / "mlartifacts"):
        _check_writable(folder, runs, "the sweep's tables, checkpoints and MLflow store go there", probe)
    from trainables.data.ledger import ledger_dir

    data = as_given(paths.data_field, paths.data_root)
    for name in dict.fromkeys((*spec.data.train, *_synthetic_to_generate(spec, paths))):
        if name in spec.data.train:
            purpose = f"the privacy ledger of {name} is kept there"
            _check_writable(ledger_dir(paths.data_root, name), data, purpose, probe)
        else:
            purpose = f"the synthetic dataset {name} is generated there"
            _check_writable(_dataset_dir(spec, paths, name), data, purpose, probe)


def _check_writable(folder: Path, where: str, purpose: str, probe: bool) -> None:
    """``folder`` is a writable folder, or can be created in one (``where``: the field and value it comes from)."""
    existing = _existing_part(folder)
    fix = "name a writable folder, or make it writable"
    if existing.is_symlink() and not existing.exists():
        raise PreflightError(f"{where}: {existing} is a link to nothing ({purpose}); {fix}")
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be created: {existing} is a file"
        raise PreflightError(f"{where}: {folder} {what}, not a folder ({purpose}); {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = _read_only_filesystem(existing)
        how = "is on a read-only filesystem" if read_only else "is not writable by this user"
        raise PreflightError(f"{where}: {existing} {how} ({purpose}); {fix}")
    if probe:
        try:
            with tempfile.TemporaryFile(dir=existing, prefix=".dpsweep-probe-"):
                pass
        except OSError as error:
            raise PreflightError(
                f"{where}: no file can be written in {existing} ({error.strerror or error}; {purpose}); {fix}"
            ) from None


def _existing_part(path: Path) -> Path:
    """``path``, or the nearest of its parents that exists (what must be writable for it to be created)."""
    while not path.exists() and not path.is_symlink() and path != path.parent:
        path = path.parent
    return path


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_tracking(paths: SweepPaths) -> None:
    """The tracking store of ``tracking.uri`` or ``$MLFLOW_TRACKING_URI``, else ``<runs>/mlflow.db``: a scheme
    MLflow 3 serves, reachable, writable."""
    uri = paths.tracking_uri
    if paths.tracking_field:
        where, drop = as_given(paths.tracking_field, uri), ", or remove it to use runs/mlflow.db"
    else:  # the default store, in the runs folder
        where, drop = f"{as_given(paths.runs_field, paths.runs_root)} (its MLflow store {uri})", ""
    scheme = urlsplit(uri).scheme.lower()
    base = scheme.split("+")[0]
    if base in ("", "file"):
        if not _env_true("MLFLOW_ALLOW_FILE_STORE"):
            raise PreflightError(
                f"{where} is a folder (MLflow's file store), which MLflow 3 refuses; give a database such as "
                f"sqlite:///path/mlflow.db or a server such as http://host:5000{drop} (or set "
                "MLFLOW_ALLOW_FILE_STORE=true to use the file store anyway)"
            )
        folder = Path(urlsplit(uri).path if base == "file" else uri).expanduser().resolve()
        _check_writable(folder, where, "MLflow's file store", probe=False)
    elif base == "sqlite":
        _check_sqlite(uri, where, drop)
    elif base in ("http", "https"):
        problem = _http_unreachable(uri)
        if problem:
            raise PreflightError(
                f"{where}: the MLflow server does not answer ({problem}); start it (`mlflow server --host ... "
                f"--port ...`) or fix the address{drop}"
            )
    elif base in DATABASE_PORTS:
        parts = urlsplit(uri)
        if not parts.hostname:
            raise PreflightError(f"{where} names no database host; give {base}://user:password@host:port/db{drop}")
        port = parts.port or DATABASE_PORTS[base]
        problem = _unreachable(parts.hostname, port)
        if problem:
            raise PreflightError(
                f"{where}: the database server does not answer at {parts.hostname}:{port} ({problem}); start it or "
                f"fix the address{drop}"
            )
    elif base not in UNCHECKED_SCHEMES:
        raise PreflightError(
            f"{where}: MLflow has no tracking store for the scheme {scheme!r}; give sqlite:///path/mlflow.db, "
            f"http(s)://host:port (a tracking server) or a database URI ({', '.join(DATABASE_PORTS)}){drop}"
        )


def _check_sqlite(uri: str, where: str, drop: str) -> None:
    """An SQLite tracking store: a file path (not the in-memory database), which is an SQLite database or can be
    created, in a writable folder (MLflow creates missing folders)."""
    rest = uri.split("://", 1)[1].split("?", 1)[0]
    if rest in ("", "/", "/:memory:"):
        raise PreflightError(
            f"{where} is an in-memory database, which every MLflow client of the sweep would see empty; give a file, "
            f"sqlite:///path/mlflow.db{drop}"
        )
    path = Path(rest[1:] if rest.startswith("/") else rest).expanduser().resolve()
    if path.is_dir():
        raise PreflightError(f"{where}: {path} is a folder, not a database file; name a file such as {path}/mlflow.db")
    if path.exists():
        try:
            with open(path, "rb") as file:
                header = file.read(16)
        except OSError as error:
            raise PreflightError(
                f"{where}: the database {path} cannot be read ({error.strerror}); fix its permissions"
            ) from None
        if header and header != b"SQLite format 3\x00":
            raise PreflightError(f"{where}: {path} is not an SQLite database; name a new file{drop}")
        if not os.access(path, os.W_OK):
            raise PreflightError(f"{where}: the database {path} is not writable; make it writable{drop}")
    _check_writable(path.parent, where, "SQLite writes its journal beside the database", probe=False)


def _http_unreachable(uri: str) -> str | None:
    """Why an HTTP(S) tracking server gives no answer to ``GET <uri>/health`` within `CONNECT_TIMEOUT_S` (None:
    it answers, whatever the status; MLflow's own first call says more if it is not an MLflow server)."""
    parts = urlsplit(uri)
    if not parts.hostname:
        return "the address names no host"
    try:
        parts.port  # noqa: B018 (raises for a port that is not a number)
    except ValueError as error:
        return str(error)
    context = None
    if parts.scheme == "https" and _env_true("MLFLOW_TRACKING_INSECURE_TLS"):
        import ssl

        context = ssl._create_unverified_context()  # as MLflow does with this variable
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S, context=context):
            return None
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, socket.gaierror):
            return f"host {parts.hostname!r} is unknown"
        if isinstance(reason, TimeoutError | socket.timeout):
            return f"no answer within {CONNECT_TIMEOUT_S:g} s"
        return getattr(reason, "strerror", None) or str(reason)
    except TimeoutError:
        return f"no answer within {CONNECT_TIMEOUT_S:g} s"
    except OSError as error:  # a connection closed without an answer, and the like
        return error.strerror or str(error) or type(error).__name__


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true")


# ----------------------------------------------------------------------------------------------------------------
# Models: built as the trials build them, on the meta device


def _check_models(spec: SweepSpec, paths: SweepPaths) -> dict[str, int]:
    """Build every (model, init) as its trials would (`create_meta_model`), run a batch of ``data.image_size``
    images through it and, for a sweep with private targets, wrap it for ``speed.grad_sample_mode``. Inits that do
    not resolve (missing weights) are the plan's to report (`sweeps.plan`). Returns each model's bytes (its state
    dict in float32)."""
    from sweeps.plan import ensure_pretrained
    from trainables.models import InitError, WeightsFileError, create_meta_model, resolve_init

    private = any(is_private(eps) for eps in spec.axes.target_epsilon)
    model_bytes: dict[str, int] = {}
    for m, model in enumerate(spec.models):
        model_field = f"model[{m}]" if len(spec.models) > 1 else "model"
        starts = [(i, init) for i, init in enumerate(spec.inits)]
        if spec.pretrain is not None and spec.pretrain.init not in spec.inits:
            starts.append((-1, spec.pretrain.init))  # the pretrain stage's start
        for i, init in starts:
            domain = ensure_pretrained(spec, paths, model, run_if_missing=False) if init == "domain" else None
            try:
                resolved = resolve_init(init, model, spec.init_weights_for(init, model), domain)
            except InitError:
                continue
            try:
                with _quiet_timm():
                    net = create_meta_model(model, resolved)
            except WeightsFileError as error:
                raise PreflightError(f"{spec.source}: {_weights_field(spec, init, i)}: {error}") from None
            _check_forward(spec, model_field, model, net)
            if private and i >= 0:
                _check_engine(spec, model_field, model, net)
            model_bytes[model] = sum(t.numel() * 4 for t in net.state_dict().values())
    return model_bytes


def _weights_field(spec: SweepSpec, init: str, index: int) -> str:
    """The sweep file's field that chose an init's weight file."""
    if init in spec.init_weights:
        return f"init_weights.{init}"
    if init == "domain":
        return f"inits[{index}] (the pretrain stage's checkpoint; delete it to pretrain again)"
    return f"inits[{index}] (the Hugging Face cache)" if index >= 0 else "pretrain.init (the Hugging Face cache)"


@contextlib.contextmanager
def _quiet_timm() -> Iterator[None]:
    """timm logs how it adapts pretrained weights (stem, head) as warnings; a check prints nothing."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_forward(spec: SweepSpec, model_field: str, model: str, net: Any) -> None:
    """A batch of two ``data.image_size`` images goes through the model (on the meta device: shapes only)."""
    import torch

    size = spec.data.image_size
    try:
        net(torch.empty(2, 1, size, size, device="meta"))
    except NotImplementedError:
        return  # an operation without a meta kernel: nothing known either way
    except Exception as error:  # the model's own shape checks: any error means "cannot take these images"
        raise PreflightError(
            f"{spec.source}: {model_field} = {model!r} cannot take data.image_size = {size} images "
            f"({type(error).__name__}: {_first_line(error)}); choose another image size or another model"
        ) from None


def _check_engine(spec: SweepSpec, model_field: str, model: str, net: Any) -> None:
    """The engine of ``speed.grad_sample_mode`` wraps the model (`wrap_model`, as every private trial does)."""
    from trainables.privacy.engine import wrap_model

    mode = spec.speed.grad_sample_mode
    try:
        wrap_model(net, mode)
    except (ValueError, NotImplementedError) as error:
        mixing = _batch_mixing_modules(net)
        if mixing:
            name, kind = mixing[0]
            raise PreflightError(
                f"{spec.source}: {model_field} = {model!r} has {len(mixing)} module(s) such as {name} ({kind}) that "
                "compute statistics over the batch (BatchNorm), which mixes the records of a batch: no "
                "grad_sample_mode can train it with DP; choose a model without them (e.g. convnext_small), or train "
                "it only at privacy.target_epsilon .inf"
            ) from None
        other = "functorch" if mode == "bk" else "bk"
        raise PreflightError(
            f"{spec.source}: {model_field} = {model!r} cannot be trained with speed.grad_sample_mode = {mode!r}: "
            f"{_first_line(error, limit=600)}; use speed.grad_sample_mode: {other}, or another model"
        ) from None


def _batch_mixing_modules(net: Any) -> list[tuple[str, str]]:
    """Modules with trainable parameters and buffers (BatchNorm's running statistics): what Opacus refuses in every
    mode."""
    return [
        (name, type(module).__name__)
        for name, module in net.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False)) and any(True for _ in module.buffers(False))
    ]


# ----------------------------------------------------------------------------------------------------------------
# Disk space


@dataclass(frozen=True)
class DiskNeed:
    """Bytes the sweep will certainly write under a folder; ``where`` names its field and value."""

    folder: Path
    where: str
    bytes: int


def disk_need(spec: SweepSpec, paths: SweepPaths, model_bytes: dict[str, int], concurrent: int) -> list[DiskNeed]:
    """A lower bound of what the sweep writes: under ``runs``, every trial's final weights and tables, and one epoch
    checkpoint (`EPOCH_CHECKPOINT_COPIES` model-sized tensors) per trial running at once (``concurrent``, at least
    1); under ``data.root``, each synthetic dataset not yet generated (one byte per pixel)."""
    if spec.search in ("grid", "proxy"):  # proxy: its phase 1 (phase 2 adds one trial per cell)
        trial_models = [point.model for point in spec.grid()]
    elif spec.selection is not None:  # the expected number of candidates (their number is secret)
        trial_models = [cell.model for cell in spec.cells() for _ in range(math.ceil(spec.selection.mean_trials))]
    else:
        assert spec.optuna is not None
        trial_models = [cell.model for cell in spec.cells() for _ in range(spec.optuna.trials_per_target)]
    weights = sum(model_bytes.get(model, 0) for model in trial_models)
    largest = max(model_bytes.values(), default=0)
    running = max(1, min(concurrent, len(trial_models)))
    runs_bytes = weights + running * EPOCH_CHECKPOINT_COPIES * largest + len(trial_models) * TABLE_BYTES_PER_TRIAL
    needs = [DiskNeed(paths.runs_root, as_given(paths.runs_field, paths.runs_root), runs_bytes)]
    from trainables.data.synthetic import site_profile

    for name in _synthetic_to_generate(spec, paths):
        n_images = spec.data.synthetic_images or site_profile(name).n_images
        size = spec.data.image_size
        where = as_given(paths.data_field, paths.data_root)
        needs.append(DiskNeed(_dataset_dir(spec, paths, name), where, n_images * size * size))
    return needs


def _check_disk(spec: SweepSpec, paths: SweepPaths, model_bytes: dict[str, int], nodes: Nodes | None) -> None:
    """Each filesystem the sweep writes to has room for `disk_need`'s lower bound of what it writes there."""
    concurrent = spec.optuna.max_concurrent if spec.optuna is not None else spec.resources.max_concurrent
    if not concurrent and nodes is not None:
        concurrent = sum(_trials_on(node, spec.resources.cpu, spec.resources.gpu) for node in nodes.resources)
    by_filesystem: dict[int, list[DiskNeed]] = {}
    for need in disk_need(spec, paths, model_bytes, concurrent):
        existing = _existing_part(need.folder)
        by_filesystem.setdefault(existing.stat().st_dev, []).append(need)
    for needs in by_filesystem.values():
        total = sum(need.bytes for need in needs)
        free = free_bytes(_existing_part(needs[0].folder))
        if free < total:
            where = " and ".join(dict.fromkeys(need.where for need in needs))
            raise PreflightError(
                f"{where}: the sweep writes at least {_size(total)} there (each trial's final weights and tables, "
                f"the epoch checkpoints of the trials running at once, synthetic data to generate) but only "
                f"{_size(free)} is free; free some space or point it at a folder on a larger disk"
            )


def _trials_on(node: dict[str, float], cpu: float, gpu: float) -> int:
    """How many trials of ``cpu`` CPUs and ``gpu`` GPUs fit on a node at once."""
    fits = math.floor(node.get("CPU", 0) / cpu + 1e-9)
    if gpu > 0:
        fits = min(fits, math.floor(node.get("GPU", 0) / gpu + 1e-9))
    return fits


def free_bytes(folder: Path) -> int:
    """Free bytes for this user on the filesystem of ``folder``."""
    return shutil.disk_usage(folder).free


def _size(n_bytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000  # type: ignore[assignment]
    raise AssertionError


def _synthetic_to_generate(spec: SweepSpec, paths: SweepPaths) -> list[str]:
    """The synthetic datasets the real run will generate (those not yet prepared at the sweep's image size): training,
    external, pretraining and proxy sets."""
    from trainables import names as N
    from trainables.data.synthetic import SYNTHETIC_DATASETS

    pretrain = [spec.pretrain.dataset] if spec.pretrain is not None else []
    proxy = [spec.proxy.dataset] if spec.proxy is not None else []  # a proxy sweep's phase 1 trains on it
    return [
        name
        for name in dict.fromkeys((*spec.data.train, *spec.data.external, *pretrain, *proxy))
        if name in SYNTHETIC_DATASETS and not (_dataset_dir(spec, paths, name) / N.MANIFEST_FILE).exists()
    ]


def _dataset_dir(spec: SweepSpec, paths: SweepPaths, name: str) -> Path:
    from trainables.names import dataset_dir

    return dataset_dir(paths.data_root, name, spec.data.image_size)


# ----------------------------------------------------------------------------------------------------------------
# dpsweep ui


def check_ui(runs: Path, port: int) -> Path:
    """``dpsweep ui``'s environment, before it prints any link: the runs folder holds an MLflow database, and
    ``port`` is a TCP port free on 127.0.0.1. Returns the database.

    Raises:
        PreflightError: naming ``--runs`` or ``--port``, the value and the fix.
    """
    if not 1 <= port <= 65535:
        raise PreflightError(f"--port {port} is not a TCP port; give one from 1 to 65535, e.g. --port 5000")
    if not runs.is_dir():
        what = "is not a folder" if runs.exists() else "does not exist"
        raise PreflightError(f"--runs {runs} {what}; give the runs folder of a sweep (default runs)")
    db = runs / "mlflow.db"
    if not db.is_file():
        raise PreflightError(f"--runs {runs}: no MLflow database at {db}; run `make sweep` first, or give --runs")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the UI's server binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            used = error.errno == errno.EADDRINUSE
            problem = "is in use on 127.0.0.1 (another MLflow UI?)" if used else f"cannot be used ({error.strerror})"
            raise PreflightError(f"--port {port} {problem}; give a free port, e.g. --port {_free_port()}") from None
    return db


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def as_given(field: str, value: object) -> str:
    """How a value was given, for messages: ``--runs /x`` (a flag), ``runs = '/x'`` (a sweep-file field),
    ``$DPSWEEP_RUNS = '/x'`` (an environment variable)."""
    return f"{field} {value}" if field.startswith("--") else f"{field} = {str(value)!r}"


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()
    return text[0][:limit] if text else type(error).__name__
