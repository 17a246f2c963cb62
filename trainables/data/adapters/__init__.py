"""Registry of real chest X-ray datasets that ``dpsweep prepare`` can turn into a cache.

Each entry reads one dataset's official distribution (see ``docs/datasets.md`` and each module's
docstring for files, label harmonization, demographics, views and splits). Look-ups go by name::

    table = get_adapter("chexpert").read(Path("/data/CheXpert-v1.0"))
"""

from __future__ import annotations

from trainables.data.adapters import chestxray14, chexpert, mimic_cxr, padchest, uka_cxr, vindr_cxr
from trainables.data.adapters.base import Adapter, DatasetError, SourceTable

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        chexpert.ADAPTER,
        mimic_cxr.ADAPTER,
        chestxray14.ADAPTER,
        padchest.ADAPTER,
        vindr_cxr.ADAPTER,
        uka_cxr.ADAPTER,
        vindr_cxr.KAGGLE_ADAPTER,
    )
}
"""Dataset name -> adapter, in the order of the study's protocol table, then other distributions of them."""

PREPARABLE: tuple[str, ...] = tuple(ADAPTERS)
"""Names accepted by ``dpsweep prepare`` for real data."""


def get_adapter(name: str) -> Adapter:
    """The adapter registered under ``name``.

    Raises:
        DatasetError: unknown name; the message lists the valid ones.
    """
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; preparable datasets: {list(PREPARABLE)}") from None


__all__ = ["ADAPTERS", "PREPARABLE", "Adapter", "DatasetError", "SourceTable", "get_adapter"]
