"""One command at a time writes a sweep: the lock file ``runs/<sweep>/sweep.lock``.

Two ``dpsweep sweep`` of one sweep at once would train the same trials twice side by side (two Ray drivers, one Ray
folder, one MLflow parent run: results that depend on which writer came last). So `sweep_lock` creates the lock file
atomically (written aside, then linked into place: of two processes exactly one creates it, and none reads it half
written) with the holder's PID, host, start time and command, and removes it when the command ends: normally, on an
exception or Ctrl-C (the context manager), or at interpreter exit (`atexit`, a backstop).
A process killed outright (SIGKILL, power loss) leaves its lock behind:

- on the same host, a lock whose PID is no longer running (or now runs another program: the process start time is
  recorded where ``/proc`` has it) is **stale**: the next command takes it over and says so;
- from another host (a shared runs folder), the PID cannot be checked: the lock is honoured, and the message tells
  how to remove it if that run is gone.

Takeovers are serialized by an advisory ``flock`` on the sweep folder, so two commands that find one stale lock
cannot both take it over. `dpsweep sweep` and `dpsweep audit` hold the lock (both write ``runs/<sweep>/``);
`dpsweep release` refuses while it is held (`refuse_while_held`); `dpsweep table` and ``--dry-run`` only say so
(`held_note`): the tables they show are then a snapshot the running sweep rewrites when it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from trainables import names as N
from trainables.errors import UserError

Log = Callable[[str], None]


class SweepLockedError(UserError):
    """Another command holds the sweep's lock; the message names it (PID, host, command) and the way out."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a sweep's lock: what ``sweep.lock`` holds.

    Attributes:
        pid: the holding process (on ``host``).
        host: the host name of the holding process (`socket.gethostname`).
        started: when it took the lock (local time, ISO 8601).
        command: its command line.
        process_start: the process's start time in clock ticks since boot (``/proc/<pid>/stat``; None where there is
            no ``/proc``): a PID reused by another process has another start time.
        token: unique per lock taken, so that a process removes only its own lock.
    """

    pid: int
    host: str
    started: str
    command: str
    process_start: str | None
    token: str

    @classmethod
    def of_this_process(cls) -> LockHolder:
        pid = os.getpid()
        return cls(
            pid=pid,
            host=socket.gethostname(),
            started=datetime.now().astimezone().isoformat(timespec="seconds"),
            command=shlex.join(sys.argv),
            process_start=_process_start(pid),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        """``pid 1234 on host gpu-3 since 2026-12-01T10:00:00+01:00 (`dpsweep sweep smoke.yaml`)``."""
        return f"pid {self.pid} on host {self.host} since {self.started} (`{self.command}`)"

    @property
    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def is_alive(self) -> bool:
        """Whether the holder still runs; True for a holder on another host (it cannot be checked from here)."""
        if not self.on_this_host:
            return True
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it exists
            pass
        start = _process_start(self.pid)
        return self.process_start is None or start is None or start == self.process_start


def lock_path(sweep_dir: Path) -> Path:
    return sweep_dir / N.SWEEP_LOCK_FILE


def read_holder(sweep_dir: Path) -> LockHolder | None:
    """The lock's holder as written (alive or not); None without a lock. An unreadable lock (a holder killed while
    writing it) reads as a dead holder on this host."""
    try:
        text = lock_path(sweep_dir).read_text()
    except (FileNotFoundError, NotADirectoryError):  # no lock (or no folder: `runs` is a file, refused by preflight)
        return None
    try:
        return LockHolder(**json.loads(text))
    except (ValueError, TypeError):
        return LockHolder(0, socket.gethostname(), "?", f"(unreadable lock: {text[:80]!r})", None, "")


def live_holder(sweep_dir: Path) -> LockHolder | None:
    """The lock's holder if it (possibly) still runs: alive on this host, or on another host; None when the sweep is
    free (no lock, or a stale one)."""
    holder = read_holder(sweep_dir)
    return holder if holder is not None and holder.is_alive() else None


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, sweep: str, log: Log = print) -> Iterator[LockHolder]:
    """Hold the sweep's lock for the ``with`` block (creating ``sweep_dir`` if needed); a stale lock is taken over.

    Raises:
        SweepLockedError: another live command (or one on another host) holds it.
    """
    created = not sweep_dir.exists()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    me = LockHolder.of_this_process()
    _acquire(sweep_dir, sweep, me, log)
    release = _Release(sweep_dir, me, remove_folder=created)
    atexit.register(release)
    try:
        yield me
    finally:
        release()
        atexit.unregister(release)


def refuse_while_held(sweep_dir: Path, sweep: str, action: str) -> None:
    """Raise `SweepLockedError` when a live command holds the sweep's lock (``action``: what would be refused)."""
    holder = live_holder(sweep_dir)
    if holder is not None:
        raise SweepLockedError(_held_message(sweep_dir, sweep, holder, action))


def held_note(sweep_dir: Path, sweep: str) -> str | None:
    """One line saying that a live command holds the sweep's lock, or None."""
    holder = live_holder(sweep_dir)
    if holder is None:
        return None
    return f"sweep {sweep!r} is in use now by {holder.describe()}"


def _acquire(sweep_dir: Path, sweep: str, me: LockHolder, log: Log) -> None:
    if _create(sweep_dir, me):
        return
    with _takeover_guard(sweep_dir):  # one takeover at a time: it re-reads the lock it replaces
        holder = read_holder(sweep_dir)
        if holder is not None and holder.is_alive():
            raise SweepLockedError(_held_message(sweep_dir, sweep, holder, "another run of it"))
        if holder is not None:
            lock_path(sweep_dir).unlink(missing_ok=True)
            log(f"sweep {sweep!r}: taking over the stale lock of a command no longer running ({holder.describe()})")
        if not _create(sweep_dir, me):  # a command that created it in between holds it now
            holder = read_holder(sweep_dir)
            assert holder is not None
            raise SweepLockedError(_held_message(sweep_dir, sweep, holder, "another run of it"))


def _create(sweep_dir: Path, me: LockHolder) -> bool:
    """Create the lock file holding ``me``; False if it exists. Written beside it first and then linked into place
    (``link`` fails on an existing name, as ``O_CREAT | O_EXCL`` does), so that no reader ever sees it half written."""
    draft = sweep_dir / f".{N.SWEEP_LOCK_FILE}.{me.token}"
    draft.write_text(json.dumps(asdict(me), indent=2))
    try:
        os.link(draft, lock_path(sweep_dir))
    except FileExistsError:
        return False
    finally:
        draft.unlink()
    return True


@contextlib.contextmanager
def _takeover_guard(sweep_dir: Path) -> Iterator[None]:
    fd = os.open(sweep_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


class _Release:
    """Removes this process's lock once (a process forked from the holder, e.g. a data loader, removes nothing), and
    the sweep folder if the lock created it and nothing else was written there."""

    def __init__(self, sweep_dir: Path, me: LockHolder, remove_folder: bool):
        self.sweep_dir, self.me, self.remove_folder = sweep_dir, me, remove_folder
        self.done = False

    def __call__(self) -> None:
        if self.done or os.getpid() != self.me.pid:
            return
        self.done = True
        holder = read_holder(self.sweep_dir)
        if holder is not None and holder.token == self.me.token:
            lock_path(self.sweep_dir).unlink(missing_ok=True)
        if self.remove_folder:
            with contextlib.suppress(OSError):
                self.sweep_dir.rmdir()  # only if empty


def _held_message(sweep_dir: Path, sweep: str, holder: LockHolder, refused: str) -> str:
    lock = lock_path(sweep_dir)
    if holder.on_this_host:
        return (
            f"sweep {sweep!r} is in use by {holder.describe()}, so {refused} is refused; wait for it to end, or stop "
            f"it (kill {holder.pid}), then run again (lock: {lock})"
        )
    return (
        f"sweep {sweep!r} is in use by {holder.describe()}, on another host, so {refused} is refused; that process "
        f"cannot be checked from {socket.gethostname()}: wait for it to end, or if it is gone (its machine stopped), "
        f"delete {lock} and run again"
    )


def _process_start(pid: int) -> str | None:
    """The process's start time since boot in clock ticks (field 22 of ``/proc/<pid>/stat``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]
