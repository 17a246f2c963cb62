"""analysis/ never imports torch (nor pyplot's global state): checked in a fresh interpreter."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import analysis

ROOT = Path(__file__).resolve().parents[2]


def test_no_analysis_module_imports_torch():
    modules = sorted(f"analysis.{m.name}" for m in pkgutil.iter_modules(analysis.__path__))
    assert {"analysis.pareto", "analysis.plots", "analysis.report", "analysis.tables", "analysis.views"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "import trainables.evaluate.bootstrap\n"
        "print('torch' in sys.modules, 'matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]
