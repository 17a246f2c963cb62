"""What produced a result: the code's git commit and the versions of the libraries that determine results.

Every trial row and MLflow run carries these (as ``dpsweep.<key>`` tags and trials.parquet columns).
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PROVENANCE_PACKAGES = ("torch", "opacus", "timm", "ray", "mlflow", "numpy", "scikit-learn")


def version_keys() -> tuple[str, ...]:
    """The ``<package>_version`` keys of `provenance`."""
    return tuple(f"{p.replace('-', '_')}_version" for p in PROVENANCE_PACKAGES)


def provenance() -> dict[str, str]:
    """Git commit of the code (``unknown`` outside a checkout; ``-dirty`` suffix with local changes) and
    versions of the libraries that determine results (``missing`` when not installed)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    info = {"git_commit": commit}
    for package, key in zip(PROVENANCE_PACKAGES, version_keys(), strict=True):
        try:
            info[key] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[key] = "missing"
    return info
