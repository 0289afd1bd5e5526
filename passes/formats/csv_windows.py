"""Dataset format ``csv_windows``: time-series CSV files cut into windows.

Layouts (``<root>`` is ``dataset.path``; with a ``train/`` folder, ``train/ val/ test/`` under it
are the splits, each laid out the same way):

* ``label`` set: ``<root>/**/*.csv``, each file a recording with a timestamp column, the channel
  columns and a label column. Consecutive rows of one label form a segment; windows of
  ``window`` rows every ``stride`` rows are cut within a segment, so a window never spans two
  labels, two files or a gap in the timestamps.
* ``label: null``: ``<root>/<class>/*.csv`` or ``<root>/<class>.csv``, one label per file.

For a regressor (the manifest's ``regression`` section) the label column holds numbers: a
segment ends only at a file's end or a gap, and a window's target is the label of its last row
(the value at the time the window ends); ``label: null`` has no numeric target (refused at load).

Timestamps (when ``timestamp`` names a column) must increase: a row whose timestamp is not
after the previous one is a PassError naming file and line. Steps that disagree with
``sample_rate`` (a gap, or a rate that is not the manifest's) are reported (file, line) and a gap
ends the segment. Files that are not CSV (a stray text file, a binary) are reported and skipped.
Raw samples: float32 N x window x C (C = ``len(columns)``), as the board receives them.

Each recording goes through the data stage's decode cache (passes/support/decode_cache.py
``decode_each``: per file by its bytes, read on every core): its windows and what else it gave
(their labels, its notes) are that file's entry, so a rerun parses and cuts only the recordings
added or changed. A PassError in a file (timestamps that go back, a missing column) is raised
as before (the files of its split read in that run are not recorded).

``synthesize`` writes a three-axis accelerometer recording of a few activities (this module's
second half) as the same CSV files, ``train/`` and ``test/`` being different recordings.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ManifestError, PassError
from passes.formats import Loaded, synthetic_or_refuse
from passes.formats.support.csvio import (SPLITS, locate_csv, UnreadableCsv, cached_infer, check_classes, has_splits, label_values,
                                  read_marker, read_table, scan, warn_skipped, write_csv, write_tree)
from passes.support import decode_cache

log = logging.getLogger("kiln.data")
GAP = 1.5       # a step over GAP sample periods is a gap: reported, and it ends the segment
FAST = 0.5      # a step under FAST periods disagrees with sample_rate: reported
RATE_TOL = 0.02  # the median step may differ from 1 / sample_rate by this fraction before it is reported


def _has_data(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return path.is_dir() and any(p.is_file() for p in path.rglob("*.csv"))


def locate(ds, layout) -> tuple[Path, bool]:
    """(``dataset.path``, False) when it holds CSV files, else (the synthetic tree, True)."""
    return locate_csv(ds, layout, _has_data, "holds no CSV files and dataset.synthetic is null; put the "
                      "recordings there (see passes/formats/csv_windows.py) or enable synthetic data")


def infer(ds, root: Path) -> dict:
    """The class names, sorted: the label column's values (or the class folders and files);
    the generator's activities when the data is still to be synthesized. The channel columns
    are always listed (``dataset.columns``), never inferred: an index column is never used
    unless named there."""
    root = Path(root)
    if ds._numeric:  # a regressor's label is a number: no classes to infer
        if not _has_data(root):
            synthetic_or_refuse(ds, root, None, "holds no CSV files")
            raise ManifestError(f"field 'dataset.path': {root} holds no CSV files, and the synthetic recordings "
                                "have activity names for labels: a regressor needs recordings with a numeric label "
                                "column")
        return {}
    if not _has_data(root):
        synthetic_or_refuse(ds, root, None, "holds no CSV files")
        return {"classes": sorted(synthetic_classes(ds))}
    folders = _split_folders(root).values()
    if ds.label is None:  # the class folders' and files' names: no CSV read
        return {"classes": sorted({name for folder in folders for name in _class_files(folder, [])})}
    files = [p for folder in folders for p in (scan(folder, []) if folder.is_dir() else [folder])]

    def labels() -> tuple[dict, list[str]]:
        found: set[str] = set()
        for path in files:
            try:
                found |= label_values(path, ds.label)  # streamed: memory stays flat
            except UnreadableCsv:
                continue  # load reports it
        return {"classes": sorted(found)}, []

    # cached by the files' sizes and mtimes: a second manifest load reads no CSV
    return cached_infer("csv_windows", {"label": ds.label}, root, files, [__file__], labels)


# --- reading -------------------------------------------------------------------------------------


@dataclass
class _Split:
    """Windows cut from one split's files, labelled by class name."""

    x: Any = field(default_factory=list)  # _cut: one file's windows, a list; _read: the split's (ndarray or Rows)
    labels: list[str] = field(default_factory=list)
    files: int = 0
    unused_rows: int = 0  # rows in segments shorter than a window or of unlisted classes
    seen: set = field(default_factory=set)  # every label of a row, windows or not
    sources: list[Path] = field(default_factory=list)  # each window's recording (its file)


def _split_folders(root: Path) -> dict[str, Path]:
    if root.is_file() or not has_splits(root):
        return {"train": root}
    return {s: root / s for s in SPLITS if (root / s).is_dir()}


def _class_files(folder: Path, skipped: list[str]) -> dict[str, list[Path]]:
    """``label: null``: class name -> its files (``<class>/*.csv`` and ``<class>.csv``)."""
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            out.setdefault(p.name, []).extend(scan(p, skipped))
        elif p.suffix.lower() == ".csv":
            out.setdefault(p.stem, []).append(p)
        else:
            skipped.append(f"{p}: not a .csv file")
    return out


def _timestamps(ds, table, warnings: list[str]) -> np.ndarray:
    """Row indices where a gap in the timestamps starts a new segment. Non-increasing
    timestamps are a PassError; gaps and a rate unlike ``sample_rate`` are reported."""
    if ds.timestamp is None or len(table.rows) < 2:
        return np.empty(0, np.int64)
    t = table.numbers([ds.timestamp])[:, 0]
    dt = np.diff(t)
    back = np.flatnonzero(dt <= 0)
    if back.size:
        i = back[0] + 1
        raise PassError(f"data: {table.path}:{table.lines[i]}: column {ds.timestamp!r}: timestamp {t[i]:g} is not "
                        f"after the previous row's {t[i - 1]:g} (timestamps must increase)")
    period = 1.0 / ds.sample_rate
    gaps = np.flatnonzero(dt > GAP * period)
    fast = np.flatnonzero(dt < FAST * period)
    for idx, what in ((gaps, "gap"), (fast, "step")):
        if idx.size:
            i = idx[0] + 1
            warnings.append(f"{table.path}:{table.lines[i]}: {idx.size} timestamp {what}(s) unlike sample_rate "
                            f"{ds.sample_rate:g} Hz (period {period:g} s), first {dt[idx[0]]:g} s")
    median = float(np.median(dt))
    if abs(median * ds.sample_rate - 1) > RATE_TOL:
        warnings.append(f"{table.path}: the timestamps say {1 / median:g} Hz, dataset.sample_rate is "
                        f"{ds.sample_rate:g} Hz")
    return gaps + 1


def _windows(ds, x: np.ndarray) -> np.ndarray:
    """(n, window, C) windows of one segment, every ``stride`` rows, none past its end."""
    if len(x) < ds.window:
        return np.empty((0, ds.window, x.shape[1]), np.float32)
    view = np.lib.stride_tricks.sliding_window_view(x, ds.window, axis=0)[::ds.stride]  # (n, C, window)
    return view.transpose(0, 2, 1)


def _cut(ds, x: np.ndarray, labels: list[str | None], breaks: np.ndarray, out: _Split, path: Path) -> None:
    """Cut one file's rows into segments (label changes and gaps) and those into windows;
    rows labelled None (a class the manifest does not list) are left out."""
    starts = {0, len(labels), *breaks.tolist()}
    starts.update(i for i in range(1, len(labels)) if labels[i] != labels[i - 1])
    bounds = sorted(starts)
    for s, e in zip(bounds, bounds[1:]):
        w = _windows(ds, x[s:e]) if labels[s] is not None else None
        if w is None or not len(w):
            out.unused_rows += e - s
            continue
        out.x.append(w)
        out.labels += [labels[s]] * len(w)
        out.sources += [path] * len(w)


def _cut_numeric(ds, x: np.ndarray, values: np.ndarray, breaks: np.ndarray, out: _Split, path: Path) -> None:
    """A regressor's windows: segments end at gaps only (the label changes every row); each
    window's target is the label of its last row."""
    bounds = sorted({0, len(values), *breaks.tolist()})
    for s, e in zip(bounds, bounds[1:]):
        w = _windows(ds, x[s:e])
        if not len(w):
            out.unused_rows += e - s
            continue
        out.x.append(w)
        out.labels += values[s + ds.window - 1:e:ds.stride][:len(w)].tolist()
        out.sources += [path] * len(w)


HERE = "\0path\0"  # a file's path in its cached notes: the notes name it where it is now
DECODER_VERSION = 1  # bump whenever reading or cutting changes, so the data stage's decode cache is not used


def _recording(ds, listed: set[str] | None, path: Path, label: str | None = None) -> tuple[np.ndarray, dict]:
    """One file: its channels (float32), labels, timestamps, then its windows -> (windows, meta):
    each window's label, the file's notes (its path as HERE), the labels seen, the rows no
    window used; ``unreadable`` (why) for a file that is not CSV. What the decode cache keeps
    of a recording (passes/support/decode_cache.py ``decode_each``)."""
    meta = {"labels": [], "notes": [], "seen": [], "unused_rows": 0, "empty": False, "unreadable": None}
    empty = np.empty((0, ds.window, len(ds.columns)), np.float32)
    try:
        table = read_table(path)
    except UnreadableCsv as e:
        meta["unreadable"] = str(e).removeprefix("data: ").replace(str(path), HERE)
        return empty, meta
    if not table.rows:
        meta["empty"] = True
        return empty, meta
    if ds.timestamp is not None and ds.timestamp not in table.header:
        raise PassError(f"data: {path}:1: missing column {ds.timestamp!r} (dataset.timestamp; set it to null when "
                        f"the files have no timestamps; header: {','.join(table.header)!r})")
    x = table.numbers(list(ds.columns)).astype(np.float32)
    out, notes = _Split(), []
    if ds._numeric:  # a regressor's: each window's target is its last row's value
        _cut_numeric(ds, x, table.numbers([ds.label])[:, 0], _timestamps(ds, table, notes), out, path)
    else:
        labels = table.strings(ds.label) if label is None else [label] * len(table.rows)
        unlisted = sorted({v for v in labels if listed is not None and v not in listed})
        if unlisted:
            notes.append(f"{path}: rows of label(s) {', '.join(unlisted)} skipped (not in dataset.classes)")
            labels = [v if v in listed else None for v in labels]
        out.seen.update(v for v in set(labels) if v is not None)
        _cut(ds, x, labels, _timestamps(ds, table, notes), out, path)
    meta.update(labels=out.labels, notes=[n.replace(str(path), HERE) for n in notes], seen=sorted(out.seen),
                unused_rows=out.unused_rows)
    return (np.concatenate(out.x) if out.x else empty), meta


def _read(ds, files: list[tuple[Path, str | None]], listed: set[str] | None, skipped: list[str],
          warnings: list[str], out: _Split) -> None:
    """The windows of ``files`` [(path, its class or None: the label column's)] into ``out``,
    through the data stage's decode cache when one is open (per file by its bytes, on every
    core: a rerun cuts only the recordings added or changed)."""
    settings = {"format": "csv_windows", "window": ds.window, "stride": ds.stride, "columns": list(ds.columns),
                "timestamp": ds.timestamp, "sample_rate": ds.sample_rate, "label": ds.label,
                "numeric": bool(ds._numeric), "listed": sorted(listed) if listed is not None else None,
                "gap": GAP, "fast": FAST, "rate_tol": RATE_TOL, "decoder": DECODER_VERSION}
    x, counts, metas, errors = decode_cache.decode_each(
        [p for p, _ in files], lambda p, label=None: _recording(ds, listed, p, label), (ds.window, len(ds.columns)),
        np.float32, settings, extras=[label for _, label in files], catch=())
    for i, ((path, _), n, meta) in enumerate(zip(files, counts, metas)):
        if i in errors or meta["unreadable"] is not None:  # (errors: a file gone since the scan)
            skipped.append(errors[i] if i in errors else meta["unreadable"].replace(HERE, str(path)))
            continue
        out.files += 1
        if meta["empty"]:
            log.warning("data: %s has a header and no rows", path)
        warnings += [note.replace(HERE, str(path)) for note in meta["notes"]]
        out.labels += meta["labels"]
        out.seen.update(meta["seen"])
        out.unused_rows += meta["unused_rows"]
        out.sources += [path] * n
    out.x = x


def _load_split(ds, folder: Path, listed: set[str] | None, skipped: list[str], warnings: list[str]) -> _Split:
    out = _Split()
    if ds.label is None and not folder.is_dir():
        raise PassError(f"data: {folder} is a file; with dataset.label null the data is <class>/*.csv or "
                        "<class>.csv files in a folder")
    if ds.label is not None:
        _read(ds, [(p, None) for p in (scan(folder, skipped) if folder.is_dir() else [folder])], listed, skipped,
              warnings, out)
        return out
    files = []
    for name, paths in _class_files(folder, skipped).items():
        if not paths:
            raise PassError(f"data: class folder {folder / name} holds no CSV files (an empty class)")
        if listed is not None and name not in listed:
            warnings.append(f"{folder / name}: class {name!r} skipped (not in dataset.classes)")
            continue
        files += [(p, name) for p in paths]
    _read(ds, files, listed, skipped, warnings, out)
    return out


def _arrays(ds, split: _Split, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index = {n: i for i, n in enumerate(names)}
    return split.x, np.asarray([index[v] for v in split.labels], np.int64)


def load(ds, root: Path) -> Loaded:
    """Windows of every split -> Loaded; classes in ``dataset.classes`` order or sorted."""
    root = Path(root)
    if not _has_data(root):
        raise PassError(f"data: {root} holds no CSV files; expected {'<class>/*.csv' if ds.label is None else '*.csv'}"
                        " (optionally under train/ val/ test/)")
    listed = set(ds.classes) if ds.classes else None
    skipped: list[str] = []
    warnings: list[str] = []
    splits = {name: _load_split(ds, folder, listed, skipped, warnings) for name, folder in _split_folders(root).items()}
    warn_skipped(skipped, root)
    if warnings:
        log.warning("data: %d timestamp/label note(s) in %s, first: %s", len(warnings), root, "; ".join(warnings[:5]))
    if "train" not in splits or not splits["train"].files:
        raise PassError(f"data: no readable CSV file for training under {root}"
                        + (f"; first skipped: {skipped[0]}" if skipped else ""))
    if ds._numeric:
        return _numeric_loaded(ds, root, splits, skipped, warnings)
    names = list(ds.classes) if ds.classes else sorted(set().union(*(s.seen for s in splits.values())))
    train = splits["train"]
    where = (f"the training windows of {root} (window {ds.window}, stride {ds.stride}; segments shorter "
             "than a window give none)")
    check_classes(names, {n: train.labels.count(n) for n in names}, where, bool(ds.classes))
    arrays = {name: _arrays(ds, s, names) for name, s in splits.items()}
    n = sum(len(y) for _, y in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "files": {k: s.files for k, s in splits.items()}, "windows": {k: len(a[1]) for k, a in arrays.items()},
              "unused_rows": sum(s.unused_rows for s in splits.values()),
              "notes": len(warnings), "notes_examples": warnings[:5]}
    source = {"format": "csv_windows", "num_classes": len(names), "channels": len(ds.columns), "classes": names,
              "synthetic": read_marker(root) if root.is_dir() else None,
              "test_source": "test/ recordings" if "test" in arrays else "split of the recordings"}
    log.info("data: %d windows of %d x %d from %s", n, ds.window, len(ds.columns), root)
    sources = {name: [_relative(p, root) for p in s.sources] for name, s in splits.items()}
    return Loaded(arrays["train"], arrays.get("test"), report, source, arrays.get("val"), sources, "recording")


def _numeric_loaded(ds, root: Path, splits: dict, skipped: list[str], warnings: list[str]) -> Loaded:
    """A regressor's windows -> Loaded: float64 targets (each window's last label), no classes."""
    if not splits["train"].labels:
        raise PassError(f"data: no training window under {root} (window {ds.window}, stride {ds.stride}; segments "
                        "shorter than a window give none)")
    arrays = {name: (s.x, np.asarray(s.labels, np.float64)) for name, s in splits.items()}
    n = sum(len(y) for _, y in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "files": {k: s.files for k, s in splits.items()}, "windows": {k: len(a[1]) for k, a in arrays.items()},
              "unused_rows": sum(s.unused_rows for s in splits.values()),
              "notes": len(warnings), "notes_examples": warnings[:5]}
    source = {"format": "csv_windows", "num_classes": 1, "channels": len(ds.columns), "classes": None,
              "target_column": ds.label, "synthetic": read_marker(root) if root.is_dir() else None,
              "test_source": "test/ recordings" if "test" in arrays else "split of the recordings"}
    log.info("data: %d windows of %d x %d and the numeric label %r from %s", n, ds.window, len(ds.columns), ds.label,
             root)
    sources = {name: [_relative(p, root) for p in s.sources] for name, s in splits.items()}
    return Loaded(arrays["train"], arrays.get("test"), report, source, arrays.get("val"), sources, "recording")


def _relative(path: Path, root: Path) -> str:
    """A recording's name for the split's groups: its path under ``root`` (``root`` a file: its name)."""
    return path.name if path == root else path.relative_to(root).as_posix()


# --- the synthetic accelerometer -----------------------------------------------------------------

GRAVITY = 9.81
GENERATOR_VERSION = 1
# activity -> (step frequency Hz, amplitude m/s^2, noise m/s^2); the shapes are in _body
ACTIVITIES = {"idle": (0.2, 0.1, 0.05), "walk": (2.0, 2.5, 0.25), "run": (2.9, 6.0, 0.5), "jump": (1.0, 22.0, 0.4),
              "stairs": (1.5, 3.0, 0.3), "cycle": (1.2, 1.5, 0.15)}
DEFAULT_ORDER = ("idle", "walk", "run", "jump", "stairs", "cycle")  # the first synthetic.classes of these


def synthetic_classes(ds) -> list[str]:
    """The activities the generator records: ``dataset.classes`` (each a known activity) or
    the first ``synthetic.classes`` of DEFAULT_ORDER."""
    if ds.classes:
        unknown = [c for c in ds.classes if c not in ACTIVITIES]
        if unknown:
            raise ManifestError(f"field 'dataset.classes': the synthetic accelerometer records "
                                f"{', '.join(DEFAULT_ORDER)}; it has no {unknown[0]!r} (list known activities, or give real data in dataset.path)")
        return list(ds.classes)
    k = ds.synthetic.classes
    if k > len(DEFAULT_ORDER):
        raise ManifestError(f"field 'dataset.synthetic.classes': the synthetic accelerometer records at most "
                            f"{len(DEFAULT_ORDER)} activities ({', '.join(DEFAULT_ORDER)}), got {k}")
    return list(DEFAULT_ORDER[:k])


def _body(activity: str, t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) body acceleration (lateral, forward, vertical), m/s^2, without gravity; frequency,
    amplitude and phase vary per segment."""
    f0, a0, _ = ACTIVITIES[activity]
    f, a = f0 * rng.uniform(0.9, 1.1), a0 * rng.uniform(0.8, 1.2)
    p1, p2, p3 = rng.uniform(0, 2 * np.pi, 3)
    th = 2 * np.pi * f * t + p1 + 0.3 * np.sin(2 * np.pi * 0.1 * t + p2)  # the cadence drifts a little
    lat = fwd = vert = np.zeros_like(t)
    if activity == "idle":  # standing still: only sway
        lat, fwd = a * np.sin(th), a * np.cos(0.7 * th + p3)
    elif activity in ("walk", "run"):
        vert = a * (np.sin(th) + (0.35 if activity == "walk" else 0.5) * np.sin(2 * th + p2))
        fwd, lat = 0.5 * a * np.sin(th + np.pi / 2), 0.3 * a * np.sin(th / 2 + p3)
    elif activity == "stairs":
        vert = a * (np.sin(th) + 0.6 * np.sin(3 * th + p2))
        fwd, lat = 0.8 * a * np.cos(th), 0.2 * a * np.sin(th / 2 + p3)
    elif activity == "cycle":
        fwd, vert, lat = a * np.sin(th), 0.6 * a * np.cos(th), 0.4 * a * np.sin(2 * th + p3)
    elif activity == "jump":  # free fall (no felt gravity) in flight, a spike at landing
        ph = np.mod(th / (2 * np.pi), 1.0)
        vert = np.where(ph < 0.45, -GRAVITY, 0.0) + a * np.exp(-((ph - 0.5) / 0.04) ** 2) \
            + 0.4 * a * np.exp(-((ph - 0.95) / 0.03) ** 2)
        fwd = 0.1 * a * np.exp(-((ph - 0.5) / 0.06) ** 2)
    return np.stack([lat, fwd, vert], axis=1)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """How the device sits on the body this segment: a random roll/pitch up to 20 degrees and
    a yaw up to 30, so the gravity direction moves from segment to segment."""
    r, p, y = np.radians(rng.uniform(-12, 12)), np.radians(rng.uniform(-12, 12)), np.radians(rng.uniform(-20, 20))
    rx = np.array([[1, 0, 0], [0, np.cos(r), -np.sin(r)], [0, np.sin(r), np.cos(r)]])
    ry = np.array([[np.cos(p), 0, np.sin(p)], [0, 1, 0], [-np.sin(p), 0, np.cos(p)]])
    rz = np.array([[np.cos(y), -np.sin(y), 0], [np.sin(y), np.cos(y), 0], [0, 0, 1]])
    return rz @ ry @ rx


def segment(activity: str, n: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) accelerometer samples (ax, ay, az) of one activity, gravity included."""
    t = np.arange(n) / sample_rate
    felt = _body(activity, t, rng) + np.array([0.0, 0.0, GRAVITY])
    noise = rng.normal(0, ACTIVITIES[activity][2], (n, 3))
    return felt @ _rotation(rng).T + noise


def _segment_windows(total: int, rng: np.random.Generator) -> list[int]:
    """Split ``total`` windows into segments of 2..5 windows (random lengths): many short
    segments, so a class is seen in many orientations and at many frequencies."""
    out = []
    while total > 0:
        w = min(total, int(rng.integers(2, 6)))
        out.append(w)
        total -= w
    return out


def _recordings(counts: dict[str, list[int]], n_rec: int, rng: np.random.Generator) -> list[list[tuple[str, int]]]:
    """Order the segments at random, never two of one class in a row within a recording (they
    would merge into one longer segment), cut into about ``n_rec`` recordings."""
    left = {c: list(ws) for c, ws in counts.items()}
    total = sum(len(ws) for ws in left.values())
    per_rec = max(1, math.ceil(total / n_rec))
    recs, cur, prev = [], [], None
    while any(left.values()):
        choices = [c for c in sorted(left) if left[c] and c != prev]
        if not choices or len(cur) >= per_rec:  # a dead end (only the last class left) or a full file
            recs.append(cur)
            cur, prev = [], None
            continue
        weights = np.array([len(left[c]) for c in choices], float)
        prev = choices[int(rng.choice(len(choices), p=weights / weights.sum()))]
        cur.append((prev, left[prev].pop()))
    return recs + [cur] if cur else recs


def _fmt(v: float) -> str:
    return f"{v:.4f}"


def _write_split(ds, folder: Path, names: list[str], per_class: int, n_rec: int, rng: np.random.Generator) -> None:
    counts = {c: _segment_windows(per_class, rng) for c in names}
    axes = list(ds.columns)
    head = ([ds.timestamp] if ds.timestamp else []) + axes + ([ds.label] if ds.label else [])
    files = _recordings(counts, n_rec, rng) if ds.label else [[(c, w)] for c in names for w in counts[c]]
    for i, rec in enumerate(files):
        rows = []
        for activity, w in rec:
            n = ds.window + (w - 1) * ds.stride  # exactly w windows
            for v in segment(activity, n, ds.sample_rate, rng):
                rows.append([*map(_fmt, v), *([activity] if ds.label else [])])
        if ds.timestamp:
            rows = [[f"{k / ds.sample_rate:.6f}", *r] for k, r in enumerate(rows)]
        path = folder / f"recording{i:02d}.csv" if ds.label else folder / rec[0][0] / f"{rec[0][0]}_{i:03d}.csv"
        write_csv(path, head, rows)


def synthesize(ds, dest: Path) -> dict:
    """Write the synthetic accelerometer recordings at ``dest``: ``train/`` (per_class windows
    per class) and ``test/`` (test_per_class), different recordings; same seed, same bytes."""
    syn = ds.synthetic
    names = sorted(synthetic_classes(ds))
    if len(ds.columns) != 3:
        raise ManifestError(f"field 'dataset.columns': the synthetic accelerometer has 3 axes, got "
                            f"{len(ds.columns)} columns ({', '.join(ds.columns)})")
    marker = {"generator": "kiln synthetic accelerometer", "version": GENERATOR_VERSION, "classes": names,
              "per_class": syn.per_class, "test_per_class": syn.test_per_class, "seed": syn.seed,
              "sample_rate": ds.sample_rate, "window": ds.window, "stride": ds.stride, "columns": list(ds.columns)}

    def fill(tmp: Path) -> None:
        _write_split(ds, tmp / "train", names, syn.per_class, 3, np.random.default_rng([syn.seed, 1]))
        _write_split(ds, tmp / "test", names, syn.test_per_class, 2, np.random.default_rng([syn.seed, 2]))

    out = write_tree(dest, marker, fill)
    log.info("data: synthesized %d train + %d test windows of %s at %s", syn.per_class * len(names),
             syn.test_per_class * len(names), ", ".join(names), dest)
    return out
