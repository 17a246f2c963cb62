"""Reading files that Ray writes while a test watches them: tolerate partial writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def read_json(path: Path, timeout_s: float = 30.0, interval_s: float = 0.05) -> Any:
    """``path``'s JSON once it is complete: Ray writes ``params.json`` (and others) in place, so a reader can
    see an empty or half-written file; retry until it parses, and raise the last error after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise
            time.sleep(interval_s)
