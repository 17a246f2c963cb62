"""The layers import downwards only: the DP mechanism and its statistics (`trainables.privacy`) never import the
training loop, the audit runners, data loaders or models; the schema (`trainables.names`) imports nothing from
`trainables`. Each check imports the modules in a fresh interpreter and lists what came along."""

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import trainables.privacy

ROOT = Path(__file__).resolve().parents[1]
PRIVACY_MODULES = sorted(f"trainables.privacy.{m.name}" for m in pkgutil.iter_modules(trainables.privacy.__path__))
PRIVACY_MAY_IMPORT = {"trainables", "trainables.config", "trainables.errors", "trainables.names"}
"""Besides `trainables.privacy.*`: the configs (what a mechanism is parameterised by), errors and the schema."""


def imported_trainables_modules(*modules: str) -> set[str]:
    """The ``trainables`` modules in ``sys.modules`` after importing ``modules`` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'trainables' or m.startswith('trainables.'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_privacy_modules_are_all_listed():
    assert {"trainables.privacy.engine", "trainables.privacy.setup", "trainables.privacy.audit"} <= set(PRIVACY_MODULES)


def test_nothing_under_privacy_imports_the_loop_data_or_models():
    imported = imported_trainables_modules(*PRIVACY_MODULES)
    assert set(PRIVACY_MODULES) <= imported
    outside = {m for m in imported if not m.startswith("trainables.privacy") and m not in PRIVACY_MAY_IMPORT}
    assert not outside, f"trainables.privacy imports {sorted(outside)}"
    assert "trainables.train" not in imported


def test_the_schema_imports_nothing_from_trainables():
    assert imported_trainables_modules("trainables.names") == {"trainables", "trainables.names"}


def test_the_loop_and_the_audit_runners_import_their_layers():
    """The check above is not vacuous: the runners beside the loop do import the loop and the data loaders."""
    imported = imported_trainables_modules("trainables.audit")
    assert {"trainables.train", "trainables.steps", "trainables.data.loaders", "trainables.models"} <= imported
