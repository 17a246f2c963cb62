"""Shared test setup: keep every test single-threaded and offline; the fixtures tests in several folders use.

Helpers that are not fixtures live in modules of their own (`tests.factories`, `tests.asserts`,
`tests.privacy.models`, ...); no test module imports from another.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

# before any test imports it: its asserts then report values as a test module's do
pytest.register_assert_rewrite("tests.asserts")


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    """The tiny synthetic site (`tests.factories.prepare_tiny_site`), prepared once per test module."""
    from tests.factories import prepare_tiny_site  # imports torch: only for the modules that train

    return prepare_tiny_site(tmp_path_factory.mktemp("data"))
