"""Dataset format ``gtsrb``: the real GTSRB on-disk layout.

Reads ``Final_Training/Images/000NN/GT-000NN.csv`` + ``*.ppm``, and
``Final_Test/Images/GT-final_test.csv`` when present. No data set can be downloaded on the
build machines, so ``synthesize`` draws a stand-in in the *same* layout (support/gtsrb_synth.py): the
loader never knows the difference, and a real GTSRB dropped in later takes the same code path.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.artifacts import ROOT, read_json
from kiln.errors import PassError
from passes.formats import Loaded, synthetic_or_refuse
from passes.formats.support.folders import Unreadable
from passes.formats.image_folders import open_image
from passes.support import decode_cache
from passes.formats.support.gtsrb_synth import CSV_COLUMNS, MARKER, NUM_CLASSES, TEST_CSV, synthesize_gtsrb

log = logging.getLogger("kiln.data")
LAYOUT = ("Final_Training/Images/000NN/GT-000NN.csv + *.ppm per class "
          "(optional: Final_Test/Images/*.ppm + GT-final_test.csv)")


def locate(ds, layout) -> tuple[Path, bool]:
    """(the GTSRB tree, False) when ``dataset.path`` holds one, else (the synthetic tree under
    build/, True) when ``dataset.synthetic`` is on."""
    path = Path(ds.path) if Path(ds.path).is_absolute() else ROOT / ds.path
    if is_gtsrb(path):
        return path, False
    return synthetic_or_refuse(ds, path, layout, "holds no GTSRB tree (Final_Training/Images); unpack GTSRB there")


def synthesize(ds, dest: Path) -> dict:
    syn = ds.synthetic
    return synthesize_gtsrb(dest, per_class=syn.per_class, test_per_class=syn.test_per_class, seed=syn.seed)


# GTSRB's training images are tracks of 30 frames of one physical sign (``<track>_<frame>.ppm``):
# a track is a group, or its near-identical frames would sit in train and validation alike
TRACK = r"Images/(\d+/\d+)_\d+\.ppm$"


def load(ds, root: Path) -> Loaded:
    sources: dict[str, list[str]] = {}
    train_x, train_y, test_x, test_y, report = load_gtsrb(root, tuple(ds.image_size), sources)
    marker = Path(root) / MARKER
    source = {"format": "gtsrb", "num_classes": NUM_CLASSES, "channels": 3,
              "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "Final_Test" if test_x is not None else "split of Final_Training"}
    # Kiln's synthetic tree only names its frames as tracks: each is drawn on its own (a file a group)
    return Loaded((train_x, train_y), None if test_x is None else (test_x, test_y), report, source,
                  sources=sources, group_by="file" if source["synthetic"] else TRACK)


def is_gtsrb(root: Path) -> bool:
    """True when ``root`` holds a GTSRB ``Final_Training/Images`` tree."""
    return (Path(root) / "Final_Training" / "Images").is_dir()


def _int(csv_path: Path, line: int, col: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise PassError(f"data: {csv_path}:{line}: column {col!r}: {value!r} is not an integer") from e


def _read_gt_csv(csv_path: Path) -> list[tuple[str, tuple[int, int, int, int], int]]:
    """-> [(image path, inclusive ROI, class id)]; any malformed cell is a PassError naming it.
    Paths are strings: pathlib's joins cost seconds over GTSRB's 50,000 rows, on every rerun."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=";")
            header = [h.strip() for h in next(reader, [])]
            missing = [col for col in CSV_COLUMNS if col not in header]
            if missing:
                raise PassError(f"data: {csv_path}:1: missing column {missing[0]!r} (header: {';'.join(header)!r}; "
                                f"expected {';'.join(CSV_COLUMNS)!r})")
            idx = {col: header.index(col) for col in CSV_COLUMNS}
            folder = os.path.join(csv_path.parent, "")
            at = tuple(idx[c] for c in ("Filename", "Width", "Height", *_ROI_COLUMNS))
            return [_parse_row(csv_path, folder, reader.line_num, row, idx, at) for row in reader
                    if "".join(row).strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PassError(f"data: {csv_path}: cannot read the label file: {e}") from e


_ROI_COLUMNS = ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def _parse_row(csv_path: Path, folder: str, line: int, row: list[str], idx: dict[str, int], at: tuple[int, ...]):
    try:  # the common case, quickly (50,000 rows); a malformed row is worded by the checks below
        f, w, h, x1, y1, x2, y2, c = at
        name, cid = row[f].strip(), int(row[c])
        roi = (int(row[x1]), int(row[y1]), int(row[x2]), int(row[y2]))
        int(row[w]), int(row[h])
        if name and 0 <= cid < NUM_CLASSES:
            return folder + name, roi, cid
    except (IndexError, ValueError):
        pass
    for col, i in idx.items():
        if i >= len(row) or not row[i].strip():
            raise PassError(f"data: {csv_path}:{line}: column {col!r} is missing")
    v = {col: _int(csv_path, line, col, row[i].strip()) for col, i in idx.items() if col != "Filename"}
    if not 0 <= v["ClassId"] < NUM_CLASSES:
        raise PassError(f"data: {csv_path}:{line}: column 'ClassId': {v['ClassId']} is outside 0..{NUM_CLASSES - 1}")
    roi = (v["Roi.X1"], v["Roi.Y1"], v["Roi.X2"], v["Roi.Y2"])
    return folder + row[idx["Filename"]].strip(), roi, v["ClassId"]


def _load_image(path: Path, roi, size_hw) -> np.ndarray:
    """Crop to the (inclusive) ROI, resize bilinear. Raises Unreadable/ValueError on a bad image.
    Decoded as image_folders decodes (EXIF orientation applied, 16-bit scaled to 8 bits)."""
    im = open_image(path, "RGB")
    x1, y1 = max(0, roi[0]), max(0, roi[1])
    x2, y2 = min(im.width - 1, roi[2]), min(im.height - 1, roi[3])
    if x2 < x1 or y2 < y1:
        raise ValueError(f"ROI {roi} lies outside the {im.width}x{im.height} image")
    im = im.crop((x1, y1, x2 + 1, y2 + 1)).resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    return np.asarray(im, np.uint8)


DECODER_VERSION = 1  # bump whenever _load_image changes, so the data stage's decode cache is not used


def _reason(e: Exception) -> str:
    # open_image wraps what Pillow raises (a missing file: FileNotFoundError) in Unreadable
    if isinstance(e.__cause__, FileNotFoundError):
        return "missing"
    return str(e) if isinstance(e, Unreadable) else f"{type(e).__name__}: {e}"


def _load_rows(rows, size_hw, root: Path, skipped: list, kept: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``rows`` (through the data stage's decode cache, keyed by each file's bytes
    and its ROI, when one is open), their class ids; unreadable ones go to ``skipped``."""
    paths = [p for p, _, _ in rows]
    x, ok, errors = decode_cache.decode(
        paths, lambda p, roi: _load_image(p, roi, size_hw), (*size_hw, 3), np.uint8,
        {"format": "gtsrb", "size": list(size_hw), "decoder": DECODER_VERSION},
        extras=[tuple(roi) for _, roi, _ in rows], catch=(Unreadable, ValueError), reason=_reason)
    prefix = f"{root}/"  # string slicing: Path.relative_to costs seconds over 50,000 files

    def rel(p: str) -> str:
        return p[len(prefix):] if p.startswith(prefix) else Path(p).relative_to(root).as_posix()

    skipped += [{"path": rel(paths[i]), "reason": r} for i, r in sorted(errors.items())]
    kept += [rel(p) for p, good in zip(paths, ok) if good]
    return x, np.asarray([cid for (_, _, cid), good in zip(rows, ok) if good], np.int64)


def _test_csv(root: Path) -> Path | None:
    # the labelled GT-final_test.csv is a separate download from the test images: accept it
    # in the images folder (as documented) or one or two levels up, where its zip unpacks
    for d in (root / "Final_Test" / "Images", root / "Final_Test", root):
        if (d / TEST_CSV).is_file():
            return d / TEST_CSV
    return None


def load_gtsrb(root: Path, image_size: tuple[int, int], sources: dict[str, list[str]] | None = None):
    """Read a GTSRB tree -> (train_x, train_y, test_x, test_y, report).

    x: uint8 N x H x W x 3 (``image_size`` is (height, width)), cropped to each image's ROI;
    y: int64. test_x/test_y are None without a labelled Final_Test. Images that can't be read
    are skipped and counted in ``report``; a malformed CSV or missing layout is a PassError.
    ``sources`` gets each sample's image path (under ``root``) per split.
    """
    sources = {} if sources is None else sources
    root = Path(root)
    size = tuple(int(v) for v in image_size)
    images = root / "Final_Training" / "Images"
    if not images.is_dir():
        raise PassError(f"data: {images} not found; expected a GTSRB tree under {root}: {LAYOUT}")
    rows = []
    for d in sorted(p for p in images.iterdir() if p.is_dir() and not p.name.startswith(".")):
        csvs = sorted(d.glob("GT-*.csv"))
        if not csvs:
            raise PassError(f"data: {d} has no GT-*.csv label file; expected {LAYOUT}")
        rows += _read_gt_csv(csvs[0])
    if not rows:
        raise PassError(f"data: no labelled images under {images}; expected {LAYOUT}")
    skipped: list = []
    train_x, train_y = _load_rows(rows, size, root, skipped, sources.setdefault("train", []))
    if not len(train_y):
        raise PassError(f"data: none of the {len(rows)} training images under {images} could be read; "
                        f"first: {skipped[0]['path']} ({skipped[0]['reason']})")
    test_x = test_y = None
    test_csv = _test_csv(root)
    if test_csv is not None:
        test_x, test_y = _load_rows(_read_test_rows(test_csv, root), size, root, skipped, sources.setdefault("test", []))
    elif (root / "Final_Test").is_dir():
        log.warning("data: %s has no %s (the labels are a separate GTSRB download); "
                    "splitting the test set off Final_Training instead", root / "Final_Test", TEST_CSV)
    if skipped:
        log.warning("data: skipped %d unreadable image(s) under %s, first: %s", len(skipped), root,
                    "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:5]))
    report = {"skipped": len(skipped), "skipped_examples": skipped[:5], "train_images": len(train_y),
              "test_images": 0 if test_y is None else len(test_y),
              "test_csv": None if test_csv is None else test_csv.relative_to(root).as_posix()}
    log.info("data: loaded %d training and %d test images from %s", report["train_images"],
             report["test_images"], root)
    return train_x, train_y, test_x, test_y, report


def _read_test_rows(test_csv: Path, root: Path):
    # filenames in GT-final_test.csv are relative to Final_Test/Images wherever the csv lies
    images = os.path.join(root, "Final_Test", "Images", "")
    return [(images + os.path.basename(p), roi, cid) for p, roi, cid in _read_gt_csv(test_csv)]
