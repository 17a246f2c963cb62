"""One command at a time per sweep (`sweeps.lock`): a second `dpsweep sweep` of a sweep in use exits 2 naming the
PID that holds it, a lock left by a dead process is taken over, one from another host is honoured.

The two-`dpsweep sweep` case with a real sweep running is in `test_fault_tolerance.py` (its first run is the holder);
here the holder is a plain process that takes the lock and waits, so nothing trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sweeps.cli import main
from sweeps.lock import LockHolder, SweepLockedError, live_holder, read_holder, sweep_lock
from tests.sweeps.tiny import tiny_yaml
from trainables.names import SWEEP_LOCK_FILE

NAME = "locked"


def holder_process(sweep_dir: Path) -> subprocess.Popen:
    """A process that takes the sweep's lock, says so on stdout, and waits until killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from sweeps.lock import sweep_lock
        with sweep_lock(Path({str(sweep_dir)!r}), {NAME!r}):
            print("held", flush=True)
            time.sleep(120)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen]:
    process = holder_process(tmp_path / "runs" / NAME)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(sweep_dir: Path, **fields: object) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = {**LockHolder.of_this_process().__dict__, **fields}
    (sweep_dir / SWEEP_LOCK_FILE).write_text(json.dumps(lock))


def cli(tmp_path: Path, *args: str) -> list[str]:
    sweep_file = tmp_path / f"{NAME}.yaml"
    sweep_file.write_text(tiny_yaml(name=NAME))
    return [args[0], str(sweep_file), "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), *args[1:]]


def test_a_second_sweep_exits_2_naming_the_pid_of_the_first(tmp_path, holder, capsys):
    assert main(cli(tmp_path, "sweep")) == 2
    err = capsys.readouterr().err
    assert err.startswith("dpsweep: error: ") and "Traceback" not in err
    assert f"sweep {NAME!r} is in use by pid {holder.pid}" in err and f"kill {holder.pid}" in err
    assert "(`-c`)" in err  # the holder's command line (`python -c CODE`: its sys.argv)
    assert main(cli(tmp_path, "sweep", "--fresh")) == 2, "--fresh must not delete a sweep in use"
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert main(cli(tmp_path, "release", "--out", str(tmp_path / "bundle"))) == 2
    assert f"in use by pid {holder.pid}" in capsys.readouterr().err and not (tmp_path / "bundle").exists()
    assert main(cli(tmp_path, "sweep", "--dry-run")) == 0  # the dry run takes no lock, and says who holds it
    assert f"sweep {NAME!r} is in use now by pid {holder.pid} on host" in capsys.readouterr().out
    assert read_holder(tmp_path / "runs" / NAME).pid == holder.pid  # nobody took it


def test_a_killed_holder_leaves_a_stale_lock_that_the_next_command_takes_over(tmp_path, holder):
    sweep_dir = tmp_path / "runs" / NAME
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_holder(sweep_dir).pid == holder.pid and live_holder(sweep_dir) is None
    said: list[str] = []
    with sweep_lock(sweep_dir, NAME, log=said.append) as me:
        assert read_holder(sweep_dir) == me and me.pid == os.getpid()
    assert len(said) == 1 and f"stale lock of a command no longer running (pid {holder.pid} on host" in said[0]
    assert not (sweep_dir / SWEEP_LOCK_FILE).exists()


def test_a_lock_whose_pid_now_runs_another_process_is_stale(tmp_path):
    """A PID reused after its holder died: the start time recorded with it tells them apart."""
    sweep_dir = tmp_path / "runs" / NAME
    write_lock(sweep_dir, process_start="1")  # this (live) process, started at another time
    assert live_holder(sweep_dir) is None
    said: list[str] = []
    with sweep_lock(sweep_dir, NAME, log=said.append):
        pass
    assert len(said) == 1 and "taking over" in said[0]
    write_lock(sweep_dir, pid=dead_pid())
    with sweep_lock(sweep_dir, NAME, log=said.append):
        pass
    assert len(said) == 2


def test_a_lock_from_another_host_is_honoured_with_the_way_out(tmp_path):
    sweep_dir = tmp_path / "runs" / NAME
    write_lock(sweep_dir, host="elsewhere", pid=dead_pid())
    with pytest.raises(SweepLockedError) as refused, sweep_lock(sweep_dir, NAME):
        pass
    message = str(refused.value)
    assert "on another host" in message and "host elsewhere" in message
    assert f"delete {sweep_dir / SWEEP_LOCK_FILE}" in message
    assert (sweep_dir / SWEEP_LOCK_FILE).exists()


def test_the_lock_goes_with_an_exception_and_its_folder_if_it_made_it_and_nothing_else_was_written(tmp_path):
    made, kept = tmp_path / "runs" / "made", tmp_path / "runs" / "kept"
    with pytest.raises(KeyboardInterrupt), sweep_lock(made, "made"):
        assert (made / SWEEP_LOCK_FILE).exists()
        raise KeyboardInterrupt  # Ctrl-C
    assert not made.exists()
    with sweep_lock(kept, "kept"):
        (kept / "sweep.json").write_text("{}")
    assert sorted(p.name for p in kept.iterdir()) == ["sweep.json"]


def test_a_process_releases_only_its_own_lock(tmp_path):
    """A lock taken over meanwhile (the holder was wrongly thought dead) is the new holder's: the old one's release
    leaves it."""
    sweep_dir = tmp_path / "runs" / NAME
    with sweep_lock(sweep_dir, NAME):
        write_lock(sweep_dir, token="another")
    assert read_holder(sweep_dir).token == "another"


def test_an_unreadable_lock_is_stale(tmp_path):
    sweep_dir = tmp_path / "runs" / NAME
    sweep_dir.mkdir(parents=True)
    (sweep_dir / SWEEP_LOCK_FILE).write_text("{not json")
    assert live_holder(sweep_dir) is None
    with sweep_lock(sweep_dir, NAME, log=lambda line: None) as me:
        assert read_holder(sweep_dir) == me
