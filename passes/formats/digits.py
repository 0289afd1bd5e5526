"""Dataset format ``digits``: handwritten digits in scikit-learn's on-disk format
(``digits.csv.gz``: one row per 8x8 image, 64 pixel values 0..16 then the label), the set of
1,797 real digits that scikit-learn ships. The data stage (passes/data.py) splits and writes
what it returns."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.artifacts import ROOT
from kiln.errors import ManifestError, PassError
from passes.formats import Loaded

log = logging.getLogger("kiln.data")
NUM_CLASSES = 10
SIDE = 8


def shipped_path() -> Path:
    """The digits file inside the installed scikit-learn (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise PassError("data: dataset.path 'sklearn' needs scikit-learn installed (it ships the digits set)")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"


def resolve(path: str, root: Path) -> Path:
    if path == "sklearn":
        return shipped_path()
    p = Path(path)
    return p if p.is_absolute() else root / p


def locate(ds, layout) -> tuple[Path, bool]:
    try:
        path = resolve(ds.path, ROOT)
    except PassError as e:
        raise ManifestError(f"field 'dataset.path': {e}") from e
    if not path.is_file():
        raise ManifestError(f"field 'dataset.path': no digits file at {path} (expected 'sklearn' or a digits.csv(.gz))")
    return path, False


def load(ds, root: Path) -> Loaded:
    x, y, report = load_digits(root, tuple(ds.image_size))
    return Loaded((x, y), None, report, {"format": "digits", "num_classes": NUM_CLASSES, "channels": 1,
                                         "synthetic": None, "test_source": "split of the digits file"})


def load_digits(path: Path, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(x uint8 N x H x W x 1, y int64, report). Malformed rows are reported and skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            lines = f.read().splitlines()
    except (OSError, EOFError) as e:
        raise PassError(f"data: cannot read digits file {path}: {e}") from e
    rows, labels, skipped = [], [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            vals = [float(v) for v in line.split(",")]
            if len(vals) != SIDE * SIDE + 1 or not 0 <= vals[-1] < NUM_CLASSES or min(vals[:-1]) < 0 or max(vals[:-1]) > 16:
                raise ValueError(f"expected 64 pixels in 0..16 and a label 0..9, got {len(vals)} values")
        except ValueError as e:
            skipped.append(f"{path}:{n}: {e}")
            continue
        rows.append(vals[:-1])
        labels.append(int(vals[-1]))
    if skipped:
        log.warning("data: skipped %d malformed rows of %s, first: %s", len(skipped), path, skipped[:5])
    if not rows:
        raise PassError(f"data: {path} holds no valid digit rows (expected 65 comma-separated values per line)")
    px = np.clip(np.asarray(rows, dtype=np.float32) * 16, 0, 255).astype(np.uint8).reshape(-1, SIDE, SIDE)
    if tuple(image_size) != (SIDE, SIDE):
        h, w = image_size
        px = np.stack([np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR)) for im in px])
    report = {"source": str(path), "images": len(rows), "skipped": len(skipped), "skipped_examples": skipped[:5]}
    return px[..., None], np.asarray(labels, dtype=np.int64), report
