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

import contextlib
import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from kiln.artifacts import ROOT
from kiln.errors import PassError
from passes.formats import MARKER, synthetic_or_refuse, write_tree  # noqa: F401 (write_tree: the formats' writer)

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


def _text_lines(f, path: Path) -> Iterator[str]:
    """The file's lines; a NUL byte (Python's csv module takes it since 3.11) is UnreadableCsv."""
    for line in f:
        if "\0" in line:
            raise UnreadableCsv(f"data: {path}: holds NUL bytes (a binary file?), not CSV text")
        yield line


def _records(f, path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every record; text that is not CSV is UnreadableCsv."""
    reader = csv.reader(_text_lines(f, path))
    try:
        for row in reader:
            yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise UnreadableCsv(f"data: {path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a CSV file?") from e
    except OSError as e:
        raise UnreadableCsv(f"data: {path}: cannot read it: {e}") from e
    except csv.Error as e:
        raise UnreadableCsv(f"data: {path}:{reader.line_num}: not valid CSV: {e}") from e


def _data_rows(records: Iterator[tuple[int, list[str]]], path: Path, header: list[str]):
    """The non-blank rows; a ragged one is a PassError naming the line."""
    n = len(header)
    for line, row in records:
        if len(row) != n or not row[0].strip():  # the usual row (first cell set) is checked no further
            if not "".join(row).strip():
                continue
            if len(row) != n:
                raise PassError(f"data: {path}:{line}: ragged row: {len(row)} fields, the header "
                                f"has {n} ({','.join(header)!r})")
        yield line, row


@contextlib.contextmanager
def open_rows(path: Path) -> Iterator[tuple[list[str], Iterator[tuple[int, list[str]]]]]:
    """(header, rows) of a CSV file read as a stream, one row at a time (memory stays flat
    whatever the file's size): ``rows`` yields (line number, fields) of each non-blank row. The
    errors are read_table's, raised as the rows are read."""
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise UnreadableCsv(f"data: {path}: cannot read it: {e}") from e
    with f:
        records = _records(f, path)
        _, header = next(records, (0, []))
        header = [h.strip() for h in header]
        if not any(header):
            raise UnreadableCsv(f"data: {path}: empty (expected a header line of column names)")
        yield header, _data_rows(records, path, header)


def read_table(path: Path) -> Table:
    """Read a CSV file with a header. Ragged rows (a field count unlike the header's) are a
    PassError naming the line; blank lines are skipped; text that is not CSV is UnreadableCsv."""
    rows, lines = [], []
    with open_rows(path) as (header, stream):
        for line, row in stream:
            rows.append(row)
            lines.append(line)
    return Table(Path(path), header, rows, lines)


def label_values(path: Path, label: str) -> set[str]:
    """The distinct values of one column, streamed (infer's class names): a missing column or an
    empty cell is a PassError naming it."""
    with open_rows(path) as (header, rows):
        (i,) = Table(Path(path), header, [], []).index([label])
        return collect(path, label, i, rows, set())


def collect(path: Path, label: str, i: int, rows, found: set[str], watch=None) -> set[str]:
    """Add column ``i``'s values to ``found``; feed every row to ``watch`` (a RunningIndex) too."""
    for line, row in rows:
        v = row[i].strip()
        if not v:
            raise PassError(f"data: {path}:{line}: column {label!r}: missing value")
        found.add(v)
        if watch is not None:
            watch.feed(row)
            if watch.settled:
                watch = None
    return found


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
    return synthetic_or_refuse(ds, path, layout, missing)


# --- index columns: pandas' to_csv writes the row number as an unnamed first column ----------

MIN_INDEX_ROWS = 3  # fewer rows say nothing: 0, 1 is as likely a binary feature


def unnamed(column: str) -> bool:
    """A column without a name: empty (pandas' to_csv writes its index so) or pandas' own name
    for an empty header cell read back, ``Unnamed: <n>``."""
    return not column or re.fullmatch(r"Unnamed: \d+(_level_\d+)?", column) is not None


def _integer(cell: str) -> int | None:
    s = cell.strip()
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


class RunningIndex:
    """Which of some columns (header positions) hold the row number in one file: integers
    0..n-1 or 1..n, exactly +1 per row, over at least MIN_INDEX_ROWS rows. Fed row by row;
    ``settled`` once no column can be one any more (the caller may stop reading then)."""

    def __init__(self, header: list[str], positions: list[int]):
        self.header = header
        self.positions = list(positions)
        self.expect: dict[int, int | None] = {i: None for i in positions}  # position -> its next value
        self.rows = 0

    def feed(self, row: list[str]) -> None:
        self.rows += 1
        for i, want in list(self.expect.items()):
            v = _integer(row[i])
            if v is None or (v not in (0, 1) if want is None else v != want):
                del self.expect[i]
            else:
                self.expect[i] = v + 1

    def watch(self, rows) -> None:
        """Feed rows until settled (or the file ends)."""
        for _, row in rows:
            if self.settled:
                return
            self.feed(row)

    @property
    def settled(self) -> bool:
        return not self.expect

    def found(self) -> list[str]:
        return [self.header[i] for i in self.expect] if self.rows >= MIN_INDEX_ROWS else []


# --- the infer cache: what infer read, keyed by the files' paths, sizes and mtimes -------------


def _stamp(files: list[Path], code: list[str]) -> dict:
    """What the cached answer depends on: each file's path, size and mtime_ns, and the code that
    computed it (the format module and this one: a change of either recomputes)."""
    import hashlib

    h = hashlib.sha256()
    for src in (*code, __file__):
        h.update(Path(src).read_bytes())
    stats = []
    for p in files:
        st = os.stat(p)
        stats.append([str(p), st.st_size, st.st_mtime_ns])
    return {"code": h.hexdigest(), "files": stats}


def cached_infer(kind: str, settings: dict, root: Path, files: list[Path], code: list[str],
                 compute: Callable[[], tuple[dict, list[str]]]) -> dict:
    """``compute()``'s result -- (result, notes to log) -- from build/infer/ when none of
    ``files`` changed (path, size, mtime_ns) since it was computed, with the same ``settings``
    and code; else computed now and stored (atomically). The notes are logged either way, so a
    left-out column is reported at every load. Reading a large CSV at each manifest load made
    every doit command wait for it; a stat per file does not."""
    from kiln.artifacts import build_root, read_json, sha256_json, write_json

    ident = {"kind": kind, "root": os.path.abspath(root), "settings": settings}
    cache = build_root() / "infer" / f"{kind}-{sha256_json(ident)[:24]}.json"
    try:
        stamp = _stamp(files, code)
    except OSError:  # a file went away under us: compute, and let load report it
        stamp = None
    hit = None
    if stamp is not None and cache.is_file():
        try:
            entry = read_json(cache)
            if entry["stamp"] == stamp and entry["identity"] == ident:
                hit = dict(entry["result"]), [str(n) for n in entry["notes"]]
        except (OSError, ValueError, KeyError, TypeError):  # unreadable or not ours: compute again
            hit = None
    if hit is not None:
        result, notes = hit
    else:
        result, notes = compute()
        if stamp is not None:
            try:
                write_json(cache, {"identity": ident, "stamp": stamp, "result": result, "notes": notes})
            except OSError as e:  # a read-only build dir: infer still answers, uncached
                log.debug("data: cannot write the infer cache %s: %s", cache, e)
    for note in notes:
        log.warning("%s", note)
    return result
