"""CSV reading shared by the formats ``csv_windows`` and ``csv_table``: Python's csv module and
numpy, with errors that name the file, the line and the column.

Line numbers are the file's own (the header is line 1), so an editor jumps to the cell. A file
that cannot be read as text at all (binary, not UTF-8, NUL bytes) is an ``UnreadableCsv``: the
formats report and skip it; a readable file with a ragged row, a missing column or a cell that
is not a number is a plain PassError, because guessing what the team meant would train on
wrong data. Also here: the scan of a data folder for CSV files (other files are reported and
skipped) and the atomic write of a synthetic tree.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.artifacts import ROOT
from kiln.errors import ManifestError, PassError
from passes.formats import MARKER, write_tree  # noqa: F401 (write_tree: the formats' writer)

log = logging.getLogger("kiln.data")
SPLITS = ("train", "val", "test")


class UnreadableCsv(PassError):
    """The file is not readable CSV text: formats report and skip it, as a corrupt image."""


@dataclass
class Table:
    """A CSV file read as text: its header and its non-blank rows with their line numbers."""

    path: Path
    header: list[str]
    rows: list[list[str]]
    lines: list[int]  # the file's line number of each row (header = line 1)

    def index(self, columns: list[str]) -> list[int]:
        """Positions of ``columns`` in the header; a missing one is a PassError naming it."""
        where = {name: i for i, name in enumerate(self.header)}
        for col in columns:
            if col not in where:
                raise PassError(f"data: {self.path}:1: missing column {col!r} (header: {','.join(self.header)!r})")
        return [where[c] for c in columns]

    def strings(self, column: str) -> list[str]:
        """One column's cells, stripped; an empty cell is a PassError naming line and column."""
        (i,) = self.index([column])
        out = [row[i].strip() for row in self.rows]
        for n, v in enumerate(out):
            if not v:
                raise PassError(f"data: {self.path}:{self.lines[n]}: column {column!r}: missing value")
        return out

    def numbers(self, columns: list[str]) -> np.ndarray:
        """float64 (rows, len(columns)); an empty, non-numeric or non-finite cell is a PassError
        naming the file, line and column."""
        idx = self.index(columns)
        cells = [[row[i] for i in idx] for row in self.rows]
        try:
            x = np.asarray(cells, dtype=np.float64).reshape(len(cells), len(idx))
        except ValueError:
            x = None  # find the offending cell below, for the message
        if x is None or not np.isfinite(x).all():
            self._bad_cell(cells, columns)
        return x

    def _bad_cell(self, cells: list[list[str]], columns: list[str]) -> None:
        for n, row in enumerate(cells):
            for col, v in zip(columns, row):
                where = f"data: {self.path}:{self.lines[n]}: column {col!r}"
                if not v.strip():
                    raise PassError(f"{where}: missing value")
                try:
                    f = float(v)
                except ValueError as e:
                    raise PassError(f"{where}: {v.strip()!r} is not a number") from e
                if not np.isfinite(f):
                    raise PassError(f"{where}: {v.strip()!r} is not a finite number (a missing value?)")
        raise PassError(f"data: {self.path}: columns {columns} do not parse as numbers")  # not reached


def read_table(path: Path) -> Table:
    """Read a CSV file with a header. Ragged rows (a field count unlike the header's) are a
    PassError naming the line; blank lines are skipped; text that is not CSV is UnreadableCsv."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UnreadableCsv(f"data: {path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a CSV file?") from e
    except OSError as e:
        raise UnreadableCsv(f"data: {path}: cannot read it: {e}") from e
    if "\0" in text:
        raise UnreadableCsv(f"data: {path}: holds NUL bytes (a binary file?), not CSV text")
    reader = csv.reader(text.splitlines())
    try:
        header = [h.strip() for h in next(reader, [])]
        if not any(header):
            raise UnreadableCsv(f"data: {path}: empty (expected a header line of column names)")
        rows, lines = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise PassError(f"data: {path}:{reader.line_num}: ragged row: {len(row)} fields, the header "
                                f"has {len(header)} ({','.join(header)!r})")
            rows.append(row)
            lines.append(reader.line_num)
    except csv.Error as e:
        raise UnreadableCsv(f"data: {path}:{reader.line_num}: not valid CSV: {e}") from e
    return Table(path, header, rows, lines)


def read_header(path: Path) -> list[str]:
    """Only the header line's column names (cheap: for ``infer`` at manifest load)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PassError(f"data: {path}: cannot read the header line: {e}") from e
    header = [h.strip() for h in header]
    if not any(header):
        raise PassError(f"data: {path}: empty (expected a header line of column names)")
    return header


def scan(folder: Path, skipped: list[str], recursive: bool = True) -> list[Path]:
    """The ``*.csv`` files under ``folder``, sorted; any other file (a stray text file, a
    README) is appended to ``skipped`` as "path: reason". Hidden files (the synthetic marker,
    editor backups) are neither."""
    folder = Path(folder)
    found = []
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts):
            continue
        if p.suffix.lower() == ".csv":
            found.append(p)
        else:
            skipped.append(f"{p}: not a .csv file")
    return found


def warn_skipped(skipped: list[str], root: Path) -> None:
    if skipped:
        log.warning("data: skipped %d file(s) under %s, first: %s", len(skipped), root, "; ".join(skipped[:5]))


def has_splits(root: Path) -> bool:
    """True when ``root`` has a ``train/`` folder: then train/ val/ test/ are the splits."""
    return (Path(root) / "train").is_dir()


def check_classes(names: list[str], counts: dict[str, int], where: str, listed: bool) -> None:
    """Every class has samples and there are at least two: else a PassError naming the class."""
    for name in names:
        if not counts.get(name):
            what = "is listed in dataset.classes but has" if listed else "has"
            raise PassError(f"data: class {name!r} {what} no samples in {where}")
    if len(names) < 2:
        raise PassError(f"data: {where} holds one class ({names[0] if names else 'none'!r}); a classifier "
                        "needs at least two")


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """Plain comma-separated, \\n line ends (the same bytes on every platform)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def read_marker(root: Path) -> dict | None:
    from kiln.artifacts import read_json

    marker = Path(root) / MARKER
    return read_json(marker) if marker.is_file() else None


def data_path(ds) -> Path:
    """``dataset.path``, relative paths from the repo."""
    p = Path(ds.path).expanduser()
    return p if p.is_absolute() else ROOT / p


def locate_csv(ds, layout, has_data: Callable[[Path], bool], missing: str) -> tuple[Path, bool]:
    """(``dataset.path``, False) when ``has_data`` finds its CSV data there, else (the
    synthetic tree, True); with ``dataset.synthetic: null`` a ManifestError ending in ``missing``."""
    path = data_path(ds)
    if has_data(path):
        return path, False
    if ds.synthetic is None:
        raise ManifestError(f"field 'dataset.path': {path} {missing}")
    return layout.synthetic, True
