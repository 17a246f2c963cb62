"""`make setup`'s installer: runs pip and prints a few progress lines instead of minutes of silence or pages of pip.

Standard library only (it runs before the venv has anything). pip's full output goes to a log file; the console gets
one line when pip starts installing, one every `EVERY_PACKAGES` packages collected or `EVERY_S` seconds, and the end.
On failure the log's last lines are printed, with the log's path, and pip's exit status is returned.

    python3 sweeps/_install.py LOG PYTHON PIP-ARGS...

setuptools' "Editable installation" notice (a `BuildBackendWarning` printed on every editable install, an
information message, not a problem) is filtered by exactly that message; every other warning stays.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

EVERY_PACKAGES = 25
EVERY_S = 30.0
TAIL_LINES = 40
QUIET_WARNINGS = "ignore:Editable installation"  # setuptools' InformationOnly notice, matched by its message


def clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print("usage: python3 sweeps/_install.py LOG PYTHON PIP-ARGS...", file=sys.stderr)
        return 2
    log_path, python, pip_args = Path(argv[0]), argv[1], argv[2:]
    env = {**os.environ, "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_WARNINGS]))}
    command = [python, "-m", "pip", "install", "--progress-bar", "off", *pip_args]
    start = time.monotonic()
    collected, last_note, last_count, last_package = 0, start, 0, ""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    print(f"setup: pip install {' '.join(pip_args)} (full log: {log_path})", flush=True)
    with (
        log_path.open("w") as log,
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as pip,
    ):
        assert pip.stdout is not None
        for line in pip.stdout:
            log.write(line)
            tail.append(line.rstrip())
            now = time.monotonic()
            if line.startswith("Collecting "):
                collected += 1
                last_package = line.split()[1]
                if collected - last_count >= EVERY_PACKAGES or now - last_note >= EVERY_S:
                    print(f"setup:   {collected} packages collected (last: {last_package}) [{clock(now - start)}]")
                    last_note, last_count = now, collected
                    sys.stdout.flush()
            elif line.startswith("Installing collected packages:"):
                count = len(line.split(":", 1)[1].split(","))
                plural = "s" if count != 1 else ""
                print(f"setup:   installing {count} package{plural} [{clock(now - start)}]", flush=True)
                last_note = now
            elif now - last_note >= EVERY_S:
                print(f"setup:   still working ({collected} collected) [{clock(now - start)}]", flush=True)
                last_note = now
    if pip.returncode != 0:
        print("\n".join(tail), file=sys.stderr)
        print(f"setup: pip failed (exit {pip.returncode}); the full log is {log_path}", file=sys.stderr)
        return pip.returncode
    print(f"setup:   done in {clock(time.monotonic() - start)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
