"""What every dataset adapter returns, and the strict CSV helpers they share.

An adapter reads one dataset's official label/metadata files and returns a `SourceTable`: one row per
candidate image with the harmonized labels still carrying the *uncertain* code (-1), the official split
where the dataset has one, normalized sex, age in years and the image path relative to the dataset
root. ``prepare`` then applies the uncertain-label policy, assigns splits and preprocesses the pixels.

Error messages name the file, the 1-based physical line where the offending record starts (the header
is line 1; quoted fields that span several lines, as PadChest's ``Report``, are counted line by line), the
column and the value, so a user can open the file and look.
"""

from __future__ import annotations

import csv
import functools
import gzip
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.data.labels import LABELS, SEXES
from trainables.errors import UserError

UNCERTAIN = -1
"""Label code for "mentioned as uncertain" (CheXpert labeler -1), resolved by the uncertain policy."""

OFFICIAL_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""Values of ``official_split``; the empty string means "the dataset has no official split"."""

RECORD_COLUMNS: tuple[str, ...] = (
    "image_id",
    "patient_id",
    "official_split",
    *LABELS,
    "sex",
    "age",
    "view",
    "site",
    "source_path",
)
"""Columns of `SourceTable.records`. Labels are int8 in {1, 0, -1 (uncertain)}."""


class DatasetError(UserError, ValueError):
    """The dataset's files are missing, malformed or inconsistent; the message names file, row and fix."""


@dataclass(frozen=True)
class SourceTable:
    """One dataset's candidate images, read from its official files.

    Attributes:
        records: one row per image, columns `RECORD_COLUMNS`, in file order.
        excluded: rows left out by design, reason -> count (e.g. lateral views, studies without labels).
        skipped: rows left out because their input is bad, as ``{"source_path", "reason"}`` dicts.
        notes: how labels, demographics and splits were derived (copied into the dataset card).
        issues: counts of repaired metadata, e.g. ages outside [0, 120] set to missing.
        patient_attributes: per-record values that should be the same on every image of a patient (e.g.
            PadChest's birth year), name -> str array aligned with ``records``; ``""`` = not recorded.
            ``prepare`` reports the patients whose images disagree (sex is always checked).
        image_is_patient: the dataset publishes no patient id, so each image is its own patient.
    """

    records: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: tuple[str, ...] = ()
    issues: dict[str, int] = field(default_factory=dict)
    patient_attributes: Mapping[str, np.ndarray] = field(default_factory=dict)
    image_is_patient: bool = False


@dataclass(frozen=True)
class Adapter:
    """A registry entry: how to read one dataset's official distribution.

    Attributes:
        name: registry name, also the cache folder name (``<out>/<name>/<size>``).
        title: human-readable dataset name and version.
        load: ``load(root, **options) -> SourceTable``.
        options: adapter option name -> help text (the CLI turns ``patients_csv`` into ``--patients-csv``).
        missing_labels: study labels this distribution cannot provide, label -> why. Their manifest
            column is all 0 and means "unknown", not "negative"; the card lists them and a sweep must not
            train or evaluate them (`trainables.data.registry.missing_labels`).
    """

    name: str
    title: str
    load: Callable[..., SourceTable]
    options: Mapping[str, str] = field(default_factory=dict)
    missing_labels: Mapping[str, str] = field(default_factory=dict)

    def read(self, root: Path, **options: object) -> SourceTable:
        """Check the options, then load. Options whose value is None count as not given."""
        given = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = sorted(self.options) or "none"
            raise DatasetError(f"{self.name}: unknown adapter option(s) {unknown}; valid options: {valid}")
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(
                f"{self.name}: dataset root {root} does not exist or is not a directory; pass the folder "
                "that holds the dataset's official files (see docs/datasets.md)"
            )
        return self.load(root, **given)


def line(path: Path | str, index: int) -> int:
    """1-based physical line of ``path`` on which the data record with 0-based index ``index`` starts.

    The header is line 1. Records are counted as `read_table` reads them (blank lines skipped), and quoted
    fields holding line breaks count every physical line, so the number is the one an editor shows.
    Tables keep the index `read_table` gave them (record position in the file) through filtering, so
    error messages point at the right line even for a subset of rows. The file is scanned once, only when
    an error message needs a line.
    """
    stat = Path(path).stat()
    return int(_record_lines(str(path), stat.st_mtime_ns, stat.st_size)[int(index)])


@functools.lru_cache(maxsize=8)
def _record_lines(path: str, mtime_ns: int, size: int) -> np.ndarray:
    """Start line of every data record of a CSV (``.gz`` read through gzip), in file order; cached per
    file version (modification time and size)."""
    opener = gzip.open if path.endswith(".gz") else open
    starts: list[int] = []
    with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        previous_end, header_seen = 0, False
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num
            if not row:  # a blank line; pandas skips it too
                continue
            if header_seen:
                starts.append(start)
            header_seen = True
    return np.asarray(starts, dtype=np.int64)


def find_file(root: Path, candidates: Iterable[str], dataset: str) -> Path:
    """The first of ``candidates`` (paths relative to ``root``) that exists.

    Raises:
        DatasetError: none exists; the message lists every name tried.
    """
    candidates = list(candidates)
    for candidate in candidates:
        path = root / candidate
        if path.is_file():
            return path
    raise DatasetError(f"{dataset}: none of {candidates} found under {root}; is this the dataset's root folder?")


def read_table(path: Path, required: Iterable[str], **read_csv_options: object) -> pd.DataFrame:
    """Read a CSV with every cell as a string (blank = ``""``) and check the required columns.

    Args:
        path: the CSV file (``.csv`` or ``.csv.gz``).
        required: columns that must be present, spelled exactly.
        **read_csv_options: passed to `pandas.read_csv` (e.g. ``sep``).

    Raises:
        DatasetError: the file is missing or unparsable, or a required column is missing (the message
            names the missing columns and lists the columns found).
    """
    if not path.is_file():
        raise DatasetError(f"{path} not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, **read_csv_options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as error:
        raise DatasetError(f"{path}: cannot be read as CSV ({type(error).__name__}: {error})") from error
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {missing}; columns found: {list(table.columns)}. The file must keep "
            "the official column names (renamed or re-exported files are not accepted)"
        )
    return table.reset_index(drop=True)


def check_unique(values: pd.Series, path: Path | str, what: str) -> None:
    """Raise `DatasetError` naming the file, the first duplicated id and its lines."""
    duplicated = values[values.duplicated()]
    if len(duplicated):
        first = duplicated.iloc[0]
        lines = [line(path, i) for i in values.index[(values == first).to_numpy()]]
        raise DatasetError(f"{path}: duplicate {what} {first!r} (lines {lines}); each {what} must appear once")


def parse_findings(
    table: pd.DataFrame,
    columns: Mapping[str, str],
    path: Path,
    *,
    uncertain: bool,
    positive: Iterable[float] = (1.0,),
    negative: Iterable[float] = (0.0,),
    blank: bool = True,
) -> dict[str, np.ndarray]:
    """Parse numeric label columns into int8 codes 1 / 0 / -1; blank ("not mentioned") becomes 0.

    Args:
        table: string table from `read_table`.
        columns: harmonized label -> source column.
        path: the file, for error messages.
        uncertain: whether -1 (uncertain) is part of the coding.
        positive: source values coded 1.
        negative: source values coded 0.
        blank: whether a blank cell is part of the coding (then it means "not mentioned" and codes 0).

    Raises:
        DatasetError: a value outside the coding (names file, line, column and value).
    """
    positive, negative = tuple(positive), tuple(negative)
    out: dict[str, np.ndarray] = {}
    for label, column in columns.items():
        raw = table[column].astype(str).str.strip()
        values = pd.to_numeric(raw.where(raw != ""), errors="coerce").to_numpy(dtype=np.float64)
        codes = np.zeros(len(raw), dtype=np.int8)
        codes[np.isin(values, positive)] = 1
        known = np.isin(values, positive + negative) | ((raw == "").to_numpy() & blank)
        if uncertain:
            codes[values == -1.0] = UNCERTAIN
            known |= values == -1.0
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            coding = ", ".join(
                [f"{v:g} (positive)" for v in positive]
                + [f"{v:g} (negative)" for v in negative]
                + (["-1 (uncertain)"] if uncertain else [])
                + (["blank (not mentioned)"] if blank else [])
            )
            raise DatasetError(
                f"{path}: line {line(path, table.index[i])}, column {column!r}: value {raw.iloc[i]!r} is "
                f"outside the label coding; expected {coding}"
            )
        out[label] = codes
    return out


def map_values(table: pd.DataFrame, column: str, mapping: Mapping[str, str], path: Path, what: str) -> np.ndarray:
    """Map a coded string column (stripped, exact match) through ``mapping``; unknown codes raise.

    Raises:
        DatasetError: a value not in ``mapping`` (names file, line, column, value and the valid codes).
    """
    raw = table[column].astype(str).str.strip()
    mapped = raw.map(mapping)
    bad = mapped.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{path}: line {line(path, table.index[i])}, column {column!r}: {what} {raw.iloc[i]!r} is not a "
            f"known code; expected one of {sorted(mapping)}"
        )
    codes: np.ndarray = mapped.to_numpy(dtype=object).astype(str)
    return codes


def parse_numbers(table: pd.DataFrame, column: str, path: Path, what: str) -> np.ndarray:
    """Parse a numeric column; blank becomes NaN, anything else non-numeric raises `DatasetError`."""
    raw = table[column].astype(str).str.strip()
    values: np.ndarray = pd.to_numeric(raw.where(raw != ""), errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & (raw != "").to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{path}: line {line(path, table.index[i])}, column {column!r}: {what} {raw.iloc[i]!r} is not a number"
        )
    return values


def clean_ages(ages: np.ndarray, *, zero_is_missing: bool = False) -> tuple[np.ndarray, int]:
    """Ages in years with implausible values set to NaN.

    Args:
        ages: float years, NaN = missing.
        zero_is_missing: the dataset codes a missing age as 0 (CheXpert).

    Returns:
        (ages, number of non-missing values outside [0, 120] that were set to NaN).
    """
    ages = np.asarray(ages, dtype=np.float64).copy()
    if zero_is_missing:
        ages[ages == 0] = np.nan
    implausible = ~np.isnan(ages) & ((ages < 0) | (ages > 120))
    ages[implausible] = np.nan
    return ages, int(implausible.sum())


def check_patient_splits(patient_id: pd.Series, split: pd.Series, where: str) -> None:
    """Raise `DatasetError` if a patient appears in more than one official split."""
    frame = pd.DataFrame({"patient": patient_id.to_numpy(), "split": split.to_numpy()})
    per_patient = frame.groupby("patient", sort=True)["split"].nunique()
    leaked = per_patient[per_patient > 1]
    if len(leaked):
        patient = leaked.index[0]
        splits = sorted(frame.loc[frame["patient"] == patient, "split"].unique())
        raise DatasetError(
            f"{where}: patient {patient!r} is in official splits {splits} ({len(leaked)} such patient(s)); "
            "an official split must be patient-disjoint"
        )


def make_records(
    *,
    image_id: Iterable[str],
    patient_id: Iterable[str],
    labels: Mapping[str, np.ndarray],
    sex: Iterable[str],
    age: Iterable[float],
    view: Iterable[str] | str,
    site: str,
    source_path: Iterable[str],
    official_split: Iterable[str] | str = "",
) -> pd.DataFrame:
    """Assemble `SourceTable.records` from per-image columns (scalars are broadcast)."""
    frame = pd.DataFrame(
        {
            "image_id": pd.Series(list(image_id), dtype=object).astype(str),
            "patient_id": pd.Series(list(patient_id), dtype=object).astype(str),
        }
    )
    frame["official_split"] = official_split if isinstance(official_split, str) else list(official_split)
    for label in LABELS:
        frame[label] = np.asarray(labels[label], dtype=np.int8)
    frame["sex"] = list(sex)
    frame["age"] = np.asarray(list(age), dtype=np.float64)
    frame["view"] = view if isinstance(view, str) else list(view)
    frame["site"] = site
    frame["source_path"] = list(source_path)
    unknown_sex = set(frame["sex"]) - set(SEXES)
    if unknown_sex:
        raise ValueError(f"adapter bug: sex codes {sorted(unknown_sex)} are not in {SEXES}")
    return frame[list(RECORD_COLUMNS)]
