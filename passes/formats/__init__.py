"""Dataset formats, one module each, chosen by a manifest's ``dataset.format`` (the
``Dataset`` union in kiln/schema/datasets.py names each module). The data stage (passes/data.py) splits
and writes what a format loads. A format module has

* ``locate(ds, layout) -> (Path, bool)``: where the data is, and whether it must first be
  generated there (``synthesize``); cheap, no data read (doit calls it when it lists tasks). A
  missing data set is a ManifestError naming ``dataset.path``.
* ``load(ds, root) -> Loaded``: the raw samples and labels; unreadable files are reported
  (how many, the first paths) and skipped; a malformed file is a PassError naming it.
* ``infer(ds, root) -> dict`` (formats of a team's own data): the class names (and a table's
  feature columns) when the manifest does not list them; cheap, called when the manifest loads.
* ``synthesize(ds, dest)`` (optional): a deterministic synthetic data set in the format's own
  on-disk layout, so the default run needs no download.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kiln.artifacts import Layout, write_json
from kiln.errors import ManifestError, PassError

log = logging.getLogger("kiln.data")
MARKER = Layout.SYNTHETIC_MARKER  # written into a synthetic tree: what generated it, with which params


@dataclass
class Loaded:
    """What a format loads: raw samples in the dataset's layout (``_DatasetBase.layout``: uint8
    N x H x W x C images, int16 N x L audio, float32 N x L x C sequences, float32 N x F tables)
    and int64 labels (a regressor's: float64 values; a detector's: float32 (N, max_objects, 5) rows
    [class, cx, cy, w, h], the box as fractions of the image, padding rows all -1:
    support/boxes.py); ``test`` (``val``) is None when the data set ships no test (validation)
    split: the data stage splits one off the training data."""

    train: tuple[Any, Any]
    test: tuple[Any, Any] | None
    report: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    val: tuple[Any, Any] | None = None
    # per split ("train", "val", "test"), each sample's source file relative to the data set's
    # root, in sample order: samples of one file are one group that a split never cuts (see
    # dataset.split.group_by). A split without an entry: every sample is its own source.
    sources: dict[str, list[str]] = field(default_factory=dict)
    group_by: str = "file"  # the format's default dataset.split.group_by


def did_you_mean(path: Path) -> Path | None:
    """For a ``path`` that does not exist: an existing path one typo away (the deepest existing
    folder's entry closest to the first missing name, then the rest as written), else None."""
    import difflib

    path = Path(path)
    if path.exists():
        return None
    parts = path.parts
    for i in range(len(parts) - 1, 0, -1):
        base = Path(*parts[:i])
        if base.is_dir():
            try:
                names = [p.name for p in base.iterdir()]
            except OSError:
                return None
            close = difflib.get_close_matches(parts[i], names, n=1, cutoff=0.75)
            guess = base.joinpath(close[0], *parts[i + 1:]) if close else None
            return guess if guess is not None and guess.exists() else None
    return None


def synthetic_or_refuse(ds, path: Path, layout, missing: str) -> tuple[Path, bool]:
    """Where a data set that holds no data at ``path`` comes from: (the synthetic tree, True)
    when the manifest asks for synthetic data (``dataset.synthetic`` written in it: the fallback
    is opt-in, so a mistyped path never trains on generated data unasked); else a ManifestError
    naming ``dataset.path`` that ends in ``missing``. A path one typo away from an existing one
    is refused either way, naming it."""
    guess = did_you_mean(path)
    if guess is not None:
        raise ManifestError(f"field 'dataset.path': {path} does not exist; did you mean {guess}?")
    if ds.synthetic is None or "synthetic" not in ds.model_fields_set:
        raise ManifestError(f"field 'dataset.path': {path} {missing}; to try the app before its data exists, "
                            "add 'synthetic: {}' to dataset (a synthetic set in the same layout under build/; "
                            "its reports say so)")
    return (None if layout is None else layout.synthetic), True


def write_tree(dest: Path, marker: dict, fill: Callable[[Path], int | None]) -> dict:
    """Write a synthetic tree at ``dest`` atomically: ``fill(tmp)`` writes the files (returns how
    many) into a folder beside ``dest`` that is renamed into place, so ``dest`` is either absent,
    the old tree or complete. An existing ``dest`` is replaced only if it is a synthetic tree
    (has the marker) or empty: a team's data is never overwritten."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or (not (dest / MARKER).is_file() and any(dest.iterdir()))):
        raise PassError(f"data: {dest} exists and is not a Kiln synthetic set (no {MARKER}); refusing to overwrite it")
    start = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        count = fill(tmp) or 0
        write_json(tmp / MARKER, marker)
        if dest.exists():  # a folder can't be os.replace'd onto a non-empty one: swap
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / "tree")
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("data: synthesized %d files at %s in %.1f s", count, dest, seconds)
    return {**marker, "root": str(dest), "files": count, "seconds": round(seconds, 2)}
