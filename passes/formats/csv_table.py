"""Dataset format ``csv_table``: one row per sample, feature columns and a label column.

``<root>`` (``dataset.path``) is one CSV file, or a folder with ``train.csv`` (and optionally
``val.csv``, ``test.csv``: the splits), or a folder of any ``*.csv`` files that are read one
after the other as the training data. Other files in the folder are reported and skipped.

The features are ``dataset.features`` or, unset, every column but the label in file order,
less the index pandas' ``to_csv`` writes: a column without a name, or one that holds the row
number (0..n-1 or 1..n, +1 per row) in the first file, is left out with a warning naming the
file and column (a listed one stays, warned of). ``infer`` streams the first file only until no
column can be an index, and the label column when the classes are not listed; its answer is
cached under build/infer/ by the files' sizes and mtimes. The label column holds class names (any strings; numbers
are names too), or for a regressor (the manifest's ``regression`` section) numbers, the target. A missing value, a cell that is not a number or a ragged row is a PassError
naming file, line and column. Raw samples: float32 N x F, as the board receives them.

``synthesize`` writes ``train.csv`` and ``test.csv`` of gaussian clusters with class-dependent
means plus nonlinear features of them (this module's second half).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kiln.errors import ManifestError, PassError
from passes.formats import Loaded, synthetic_or_refuse
from passes.formats.support.csvio import (SPLITS, RunningIndex, UnreadableCsv, cached_infer, check_classes, collect, label_values,
                                  locate_csv, open_rows, read_marker, read_table, scan, unnamed, warn_skipped, write_csv,
                                  write_tree)

log = logging.getLogger("kiln.data")


def _has_data(path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return path.is_dir() and any(p.is_file() and p.suffix.lower() == ".csv" for p in path.iterdir())


def locate(ds, layout) -> tuple[Path, bool]:
    """(``dataset.path``, False) when it is a CSV file or a folder of them, else (the
    synthetic table, True)."""
    return locate_csv(ds, layout, _has_data, "is no CSV file nor a folder of them and dataset.synthetic is null; "
                      "put the table there or enable synthetic data")


def _files(root: Path, skipped: list[str]) -> dict[str, list[Path]]:
    """split -> its files: the one file, train/val/test.csv, or every *.csv for training."""
    if root.is_file():
        return {"train": [root]}
    found = scan(root, skipped, recursive=False)
    named = {p.stem.lower(): p for p in found}
    if "train" in named:
        for p in found:
            if p.stem.lower() not in SPLITS:
                skipped.append(f"{p}: not train.csv, val.csv or test.csv (the splits beside train.csv)")
        return {s: [named[s]] for s in SPLITS if s in named}
    return {"train": found}


def _candidates(ds, header: list[str]) -> tuple[list[int], list[str]]:
    """(positions of the columns that may be features, notes on the unnamed ones left out):
    every column but the label when ``dataset.features`` is unset."""
    keep, notes = [], []
    for i, c in enumerate(header):
        if c == ds.label:
            continue
        if unnamed(c):
            notes.append(f"column {i + 1} ({c!r}) has no name")
        else:
            keep.append(i)
    return keep, notes


def _choose(path: Path, header: list[str], watch: RunningIndex, unnamed_notes: list[str]) -> tuple[list[str], list[str]]:
    """(the feature columns, warnings): ``dataset.features`` unset, every column but the label,
    less the unnamed ones and those that hold the row number (pandas' index: a model would learn
    the row order -- a table sorted by class gives a perfect, meaningless score)."""
    index = watch.found()
    features = [header[i] for i in watch.positions if header[i] not in index]
    why = unnamed_notes + [f"column {c!r} holds the row number (0..n-1 or 1..n)" for c in index]
    notes = [f"data: {path}: {w}: left out of the features (a pandas index written by to_csv?); list "
             "dataset.features to choose the columns yourself" for w in why]
    return features, notes


def _warn_listed_index(ds, table) -> None:
    """``dataset.features`` lists a column that holds the row number: the user asked for it,
    so it stays, but the score it gives is likely meaningless."""
    positions = table.index(list(ds.features))
    watch = RunningIndex(table.header, positions)
    watch.watch(zip(table.lines, table.rows))
    for c in watch.found():
        log.warning("data: %s: column %r listed in dataset.features holds the row number (0..n-1 or 1..n): the "
                    "model may learn the row order rather than the data", table.path, c)


def _infer_table(ds, files: dict[str, list[Path]]) -> tuple[dict, list[str]]:
    """(infer's answer, warnings), reading the files as streams: the first file's header and,
    ``dataset.features`` unset, its rows until no column can be an index; ``dataset.classes``
    unset, every file's label column."""
    first = files["train"][0]
    out, notes, found = {}, [], set()
    try:
        with open_rows(first) as (header, rows):
            if ds.label not in header:
                raise PassError(f"data: {first}:1: missing column {ds.label!r} (dataset.label; header: "
                                f"{','.join(header)!r})")
            positions, unnamed_notes = ([], []) if ds.features else _candidates(ds, header)
            watch = RunningIndex(header, positions)
            try:
                if ds.classes or ds._numeric:
                    watch.watch(rows)
                else:
                    collect(first, ds.label, header.index(ds.label), rows, found, watch)
            except UnreadableCsv:
                watch = RunningIndex(header, positions)  # load skips this file: no verdict on its rows
            out["features"], notes = (list(ds.features), []) if ds.features else \
                _choose(first, header, watch, unnamed_notes)
    except UnreadableCsv as e:
        raise PassError(f"data: {first}: cannot read the header line: {str(e).removeprefix('data: ')}") from e
    if not ds.classes and not ds._numeric:
        for path in (p for ps in files.values() for p in ps if p != first):
            try:
                found |= label_values(path, ds.label)
            except UnreadableCsv:
                continue  # load reports it
        out["classes"] = sorted(found)
    return out, notes


def infer(ds, root: Path) -> dict:
    """The feature columns (the first file's, less an index column) and, unless listed, the
    class names (sorted); the generator's when the table is still to be synthesized. The
    answer is cached under build/infer/ by the files' paths, sizes and mtimes: a second load
    reads no CSV."""
    root = Path(root)
    if not _has_data(root):
        synthetic_or_refuse(ds, root, None, "holds no CSV table")
        if ds._numeric:  # a regressor's label is a number: no classes
            return {"features": synthetic_features(ds)}
        return {"classes": synthetic_classes(ds), "features": synthetic_features(ds)}
    files = _files(root, [])
    settings = {"label": ds.label, "features": ds.features, "classes": bool(ds.classes) or ds._numeric}
    return cached_infer("csv_table", settings, root, [p for ps in files.values() for p in ps], [__file__],
                        lambda: _infer_table(ds, files))


def _read(ds, path: Path, features: list[str] | None, skipped: list[str], first: bool = False):
    """(x float32 (n, F), labels, features) of one file, or None when it is not readable CSV.
    ``features`` None: the file's columns but the label, less an index column (warned);
    ``first`` (the first file read): a listed feature that holds the row number is warned of."""
    try:
        table = read_table(path)
    except UnreadableCsv as e:
        skipped.append(str(e).removeprefix("data: "))
        return None
    table.index([ds.label])
    if first and ds.features:
        _warn_listed_index(ds, table)
    if features is None:
        positions, unnamed_notes = _candidates(ds, table.header)
        watch = RunningIndex(table.header, positions)
        watch.watch(zip(table.lines, table.rows))
        features, notes = _choose(path, table.header, watch, unnamed_notes)
        for note in notes:
            log.warning("%s", note)
    if not features:
        raise PassError(f"data: {path}:1: no feature columns (the header has only the label {ds.label!r}"
                        " and unnamed or index columns)")
    labels = table.numbers([ds.label])[:, 0] if ds._numeric else table.strings(ds.label)  # a regressor's: numbers
    return table.numbers(features).astype(np.float32), labels, features


def load(ds, root: Path) -> Loaded:
    """Every split's rows -> Loaded; classes in ``dataset.classes`` order or sorted."""
    root = Path(root)
    if not _has_data(root):
        raise PassError(f"data: {root} holds no CSV table (a .csv file, or train.csv / *.csv in a folder)")
    skipped: list[str] = []
    features = ds.feature_names  # the manifest's, or those infer read; else the first file's
    parts: dict[str, list] = {}
    for split, paths in _files(root, skipped).items():
        for path in paths:
            got = _read(ds, path, features, skipped, first=not parts)
            if got is not None:
                features = got[2]
                parts.setdefault(split, []).append(got[:2])
    warn_skipped(skipped, root)
    if "train" not in parts:
        raise PassError(f"data: no readable training table under {root}"
                        + (f"; first skipped: {skipped[0]}" if skipped else ""))
    joined = {s: (np.concatenate([x for x, _ in ps]), [v for _, ls in ps for v in ls]) for s, ps in parts.items()}
    if ds._numeric:
        return _numeric_loaded(ds, root, joined, features, skipped)
    names = list(ds.classes) if ds.classes else sorted({v for _, ls in joined.values() for v in ls})
    arrays, unlisted, index = {}, 0, {n: i for i, n in enumerate(names)}
    for split, (x, labels) in joined.items():
        keep = np.array([v in index for v in labels], bool)
        unlisted += int((~keep).sum())
        y = np.array([index[v] for v, k in zip(labels, keep) if k], np.int64)
        arrays[split] = (np.ascontiguousarray(x[keep]), y)
    if unlisted:
        log.warning("data: %d row(s) of %s skipped: their label is not in dataset.classes", unlisted, root)
    y = arrays["train"][1]
    check_classes(names, {n: int((y == i).sum()) for i, n in enumerate(names)}, f"the training rows of {root}",
                  bool(ds.classes))
    n = sum(len(v[1]) for v in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "rows": {s: len(v[1]) for s, v in arrays.items()}, "unlisted_rows": unlisted, "features": features}
    source = {"format": "csv_table", "num_classes": len(names), "channels": 1, "classes": names, "features": features,
              "synthetic": read_marker(root) if root.is_dir() else None,
              "test_source": "test.csv" if "test" in arrays else "split of the table"}
    log.info("data: %d rows of %d features from %s", n, len(features), root)
    return Loaded(arrays["train"], arrays.get("test"), report, source, arrays.get("val"))


def _numeric_loaded(ds, root: Path, joined: dict, features: list[str], skipped: list[str]) -> Loaded:
    """A regressor's rows -> Loaded: the label column's numbers as float64 targets (no classes)."""
    arrays = {s: (np.ascontiguousarray(x), np.asarray(v, np.float64)) for s, (x, v) in joined.items()}
    n = sum(len(v[1]) for v in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "rows": {s: len(v[1]) for s, v in arrays.items()}, "features": features}
    source = {"format": "csv_table", "num_classes": 1, "channels": 1, "classes": None, "target_column": ds.label,
              "features": features, "synthetic": read_marker(root) if root.is_dir() else None,
              "test_source": "test.csv" if "test" in arrays else "split of the table"}
    log.info("data: %d rows of %d features and the numeric label %r from %s", n, len(features), ds.label, root)
    return Loaded(arrays["train"], arrays.get("test"), report, source, arrays.get("val"))


# --- the synthetic table -------------------------------------------------------------------------

GENERATOR_VERSION = 1
FEATURES = 12  # 8..16 as the issue asks: 6 informative, 4 nonlinear mixes of them, 2 of noise


def synthetic_classes(ds) -> list[str]:
    """``dataset.classes`` or class0, class1, ... (zero-padded, so sorted is numeric order)."""
    if ds.classes:
        return list(ds.classes)
    k = ds.synthetic.classes
    return [f"class{i:0{len(str(k - 1))}d}" for i in range(k)]


def synthetic_features(ds) -> list[str]:
    return list(ds.features) if ds.features else [f"f{i:02d}" for i in range(FEATURES)]


def _rows(means: np.ndarray, per_class: int, rng: np.random.Generator, f: int) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, f), class index) shuffled: the informative features are the class mean plus unit
    noise; then products, squares and a sine of them; the last columns are pure noise."""
    k, d = means.shape
    y = rng.permutation(np.repeat(np.arange(k), per_class))
    base = means[y] + rng.normal(0, 1, (len(y), d))
    mixes = [base[:, 0] * base[:, 1], np.sin(base[:, 2]) * 3, base[:, 3] ** 2 - base[:, 4],
             np.abs(base[:, 5]) * base[:, 0]]
    cols = [base[:, i] for i in range(d)] + mixes
    while len(cols) < f:
        cols.append(rng.normal(0, 1, len(y)))
    return np.stack(cols[:f], axis=1), y


def _means(k: int, rng: np.random.Generator) -> np.ndarray:
    """(k, 6) class means: up to 6 classes on orthogonal directions 3 units out (every pair
    4.2 noise stds apart), more at random."""
    if k > 6:
        return rng.normal(0, 2.0, (k, 6))
    q, _ = np.linalg.qr(rng.normal(0, 1, (6, k)))
    return 3.0 * q.T


def _value(x: np.ndarray) -> np.ndarray:
    """A regressor's synthetic target: a smooth, partly nonlinear function of the informative
    features (on a scale far from unit, as real labels are) plus a little noise of its own."""
    noise = np.sin(x.sum(axis=1) * 7.0) * 0.1  # deterministic in the row
    return 50.0 + 10.0 * (x[:, 0] - 0.5 * x[:, 1] + 0.3 * x[:, 2] ** 2 + np.tanh(x[:, 3]) + noise)


def synthesize(ds, dest: Path) -> dict:
    """Write ``train.csv`` (per_class rows per class) and ``test.csv`` (test_per_class) at
    ``dest``: gaussian clusters, deterministic in the seed (same seed, same bytes)."""
    syn = ds.synthetic
    names, features = synthetic_classes(ds), synthetic_features(ds)
    if len(features) < 6:
        raise ManifestError(f"field 'dataset.features': the synthetic table has at least 6 features, "
                            f"got {len(features)}")
    means = _means(len(names), np.random.default_rng([syn.seed, 0]))
    marker = {"generator": "kiln synthetic table", "version": GENERATOR_VERSION, "classes": names, "features": features,
              "per_class": syn.per_class, "test_per_class": syn.test_per_class, "seed": syn.seed}

    def fill(tmp: Path) -> None:
        for split, count, stream in (("train", syn.per_class, 1), ("test", syn.test_per_class, 2)):
            x, y = _rows(means, count, np.random.default_rng([syn.seed, stream]), len(features))
            labels = [f"{v:.5f}" for v in _value(x)] if ds._numeric else [names[c] for c in y]
            write_csv(tmp / f"{split}.csv", [*features, ds.label],
                      [[*(f"{v:.5f}" for v in row), lab] for row, lab in zip(x, labels)])

    out = write_tree(dest, marker, fill)
    log.info("data: synthesized a table of %d features, %d + %d rows per class at %s", len(features),
             syn.per_class, syn.test_per_class, dest)
    return out
