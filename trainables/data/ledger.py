"""Where a dataset's privacy ledger lives and how rows reach it: appended, never rewritten.

The ledger of dataset ``NAME`` is the folder ``<data_root>/NAME/ledger/`` beside its prepared caches, shared by every
image size: a dataset prepared at 64 and at 224 pixels holds the same patients in the same splits (the split comes
from the dataset's key, `trainables.data.prepare`), so a run at either size touches the same people. Each append
writes one new file ``<UTC time>-<random>.jsonl`` (one JSON object per `trainables.privacy.ledger.LedgerEntry`),
created under a temporary name and linked into place, so a reader never sees half a file, concurrent writers
(sweeps on one dataset, an audit) never overwrite each other, and no existing file is ever opened for writing.
Reading concatenates the files in name order (time order).

Like the prepared cache, the ledger is private material: it lists every run on the training split (including, for
private selection, how many runs there were). Resetting it is deliberate: move the folder away (documented in
docs/design.md); no dpsweep command deletes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import os
import socket
import tempfile
import uuid
from collections.abc import Iterable
from pathlib import Path

from trainables.errors import UserError
from trainables.privacy.ledger import LedgerEntry

__all__ = ["LEDGER_DIR", "LedgerError", "append_entries", "ledger_dir", "now", "read_ledger", "writer"]

LEDGER_DIR = "ledger"


class LedgerError(UserError, ValueError):
    """A ledger file cannot be read or written; the message names the file and the fix."""


def ledger_dir(data_root: str | Path, dataset: str) -> Path:
    """``<data_root>/<dataset>/ledger/``."""
    return Path(data_root) / dataset / LEDGER_DIR


def now() -> str:
    """The current UTC time as ISO 8601 (the ledger's ``time``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def writer() -> tuple[str, str]:
    """(user, host) of this process, for the ledger's ``user`` and ``host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return user, socket.gethostname()


def append_entries(data_root: str | Path, dataset: str, entries: Iterable[LedgerEntry]) -> Path | None:
    """Append ``entries`` to the dataset's ledger as one new file; None when there is nothing to append.

    Raises:
        LedgerError: the ledger folder cannot be created or written (the message names it).
    """
    rows = [dataclasses.asdict(entry) for entry in entries]
    if not rows:
        return None
    folder = ledger_dir(data_root, dataset)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    target = folder / f"{stamp}-{uuid.uuid4().hex[:12]}.jsonl"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=".part-", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                out.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
                out.flush()
                os.fsync(out.fileno())
            os.link(temporary, target)  # fails rather than replace: a ledger file is never rewritten
        finally:
            Path(temporary).unlink(missing_ok=True)
    except OSError as error:
        raise LedgerError(
            f"cannot append to the privacy ledger {folder} ({error.strerror or error}); make that folder writable "
            "(it lives beside the prepared dataset): runs on the training split must be recorded before they start"
        ) from None
    return target


OPTIONAL_FIELDS = frozenset({"selection_mean", "selection_shape", "selection_candidates"})
"""Fields a row written before private selection lacks (their defaults: an ordinary run)."""


def read_ledger(data_root: str | Path, dataset: str) -> list[LedgerEntry]:
    """Every row of the dataset's ledger, oldest first; empty when it has none.

    Raises:
        LedgerError: a ledger file is unreadable or holds a malformed row (file and line named).
    """
    folder = ledger_dir(data_root, dataset)
    if not folder.is_dir():
        return []
    entries = []
    known = {f.name for f in dataclasses.fields(LedgerEntry)}
    for path in sorted(folder.glob("*.jsonl")):
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise LedgerError(f"cannot read the privacy ledger file {path} ({error.strerror or error})") from None
        for number, line in enumerate(lines, start=1):
            try:
                row = json.loads(line)
                if not OPTIONAL_FIELDS <= known or not known - OPTIONAL_FIELDS <= set(row) <= known:
                    raise ValueError(f"fields {sorted(set(row) ^ known)} differ from a ledger entry's")
                entries.append(LedgerEntry(**row))
            except (ValueError, TypeError) as error:
                raise LedgerError(
                    f"{path}, line {number}: not a ledger entry ({error}); the ledger is append-only: restore the "
                    "file from a backup rather than editing it"
                ) from None
    return entries
