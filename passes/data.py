"""The data pass: GTSRB on disk -> content-hashed train/val/test splits.

Reads the real GTSRB layout (``Final_Training/Images/000NN/GT-000NN.csv`` + ``*.ppm``, and
``Final_Test/Images/GT-final_test.csv`` when present). No data set can be downloaded on the build
machines, so ``synthesize_gtsrb`` draws a stand-in in the *same* layout: the loader never knows
the difference, and a real GTSRB dropped in later takes the same code path.
"""

from __future__ import annotations

import csv
import logging
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.artifacts import atomic_path, read_json, sha256_file, write_json
from kiln.errors import PassError

log = logging.getLogger("kiln.data")

from passes.synth_gtsrb import CSV_COLUMNS, MARKER, NUM_CLASSES, TEST_CSV, synthesize_gtsrb  # noqa: F401
LAYOUT = ("Final_Training/Images/000NN/GT-000NN.csv + *.ppm per class "
          "(optional: Final_Test/Images/*.ppm + GT-final_test.csv)")

# ----------------------------------------------------------------------------------------------
# Loading a GTSRB tree (real or synthetic).


def is_gtsrb(root: Path) -> bool:
    """True when ``root`` holds a GTSRB ``Final_Training/Images`` tree."""
    return (Path(root) / "Final_Training" / "Images").is_dir()


def _int(csv_path: Path, line: int, col: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as e:
        raise PassError(f"data: {csv_path}:{line}: column {col!r}: {value!r} is not an integer") from e


def _read_gt_csv(csv_path: Path) -> list[tuple[Path, tuple[int, int, int, int], int]]:
    """-> [(image path, inclusive ROI, class id)]; any malformed cell is a PassError naming it."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=";")
            header = [h.strip() for h in next(reader, [])]
            missing = [col for col in CSV_COLUMNS if col not in header]
            if missing:
                raise PassError(f"data: {csv_path}:1: missing column {missing[0]!r} (header: {';'.join(header)!r}; "
                                f"expected {';'.join(CSV_COLUMNS)!r})")
            idx = {col: header.index(col) for col in CSV_COLUMNS}
            return [_parse_row(csv_path, reader.line_num, row, idx) for row in reader
                    if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PassError(f"data: {csv_path}: cannot read the label file: {e}") from e


def _parse_row(csv_path: Path, line: int, row: list[str], idx: dict[str, int]):
    for col, i in idx.items():
        if i >= len(row) or not row[i].strip():
            raise PassError(f"data: {csv_path}:{line}: column {col!r} is missing")
    v = {col: _int(csv_path, line, col, row[i].strip()) for col, i in idx.items() if col != "Filename"}
    if not 0 <= v["ClassId"] < NUM_CLASSES:
        raise PassError(f"data: {csv_path}:{line}: column 'ClassId': {v['ClassId']} is outside 0..{NUM_CLASSES - 1}")
    roi = (v["Roi.X1"], v["Roi.Y1"], v["Roi.X2"], v["Roi.Y2"])
    return csv_path.parent / row[idx["Filename"]].strip(), roi, v["ClassId"]


def _load_image(path: Path, roi, size_hw) -> np.ndarray:
    """Crop to the (inclusive) ROI, resize bilinear. Raises OSError/ValueError on a bad image."""
    with Image.open(path) as im:
        im = im.convert("RGB")  # forces the decode, so truncated files fail here
    x1, y1 = max(0, roi[0]), max(0, roi[1])
    x2, y2 = min(im.width - 1, roi[2]), min(im.height - 1, roi[3])
    if x2 < x1 or y2 < y1:
        raise ValueError(f"ROI {roi} lies outside the {im.width}x{im.height} image")
    im = im.crop((x1, y1, x2 + 1, y2 + 1)).resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    return np.asarray(im, np.uint8)


def _load_rows(rows, size_hw, root: Path, skipped: list) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(rows), *size_hw, 3), np.uint8)
    y = np.empty(len(rows), np.int64)
    n = 0
    for path, roi, cid in rows:
        try:
            x[n] = _load_image(path, roi, size_hw)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # FileNotFoundError and PIL's UnidentifiedImageError are OSErrors
            reason = "missing" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
            skipped.append({"path": path.relative_to(root).as_posix(), "reason": reason})
            continue
        y[n] = cid
        n += 1
    return x[:n].copy(), y[:n].copy()  # copy: don't keep the over-allocated buffer alive


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError) as e:
        raise PassError(f"data: image_size must be (height, width), got {image_size!r}") from e
    if h < 1 or w < 1:
        raise PassError(f"data: image_size must be positive, got {image_size!r}")
    return h, w


def _test_csv(root: Path) -> Path | None:
    # the labelled GT-final_test.csv is a separate download from the test images: accept it
    # in the images folder (as documented) or one or two levels up, where its zip unpacks
    for d in (root / "Final_Test" / "Images", root / "Final_Test", root):
        if (d / TEST_CSV).is_file():
            return d / TEST_CSV
    return None


def load_gtsrb(root: Path, image_size: tuple[int, int]):
    """Read a GTSRB tree -> (train_x, train_y, test_x, test_y, report).

    x: uint8 N x H x W x 3 (``image_size`` is (height, width)), cropped to each image's ROI;
    y: int64. test_x/test_y are None without a labelled Final_Test. Images that can't be read
    are skipped and counted in ``report``; a malformed CSV or missing layout is a PassError.
    """
    root = Path(root)
    size = _check_size(image_size)
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
    train_x, train_y = _load_rows(rows, size, root, skipped)
    if not len(train_y):
        raise PassError(f"data: none of the {len(rows)} training images under {images} could be read; "
                        f"first: {skipped[0]['path']} ({skipped[0]['reason']})")
    test_x = test_y = None
    test_csv = _test_csv(root)
    if test_csv is not None:
        test_x, test_y = _load_rows(_read_test_rows(test_csv, root), size, root, skipped)
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
    images = root / "Final_Test" / "Images"
    return [(images / p.name, roi, cid) for p, roi, cid in _read_gt_csv(test_csv)]


# ----------------------------------------------------------------------------------------------
# The pass: split, write the split files and the on-board runner's input file, describe them.


def _stratified(y: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split indices per class by ``fractions``; returns [rest, *parts]. Each class keeps >= 1 in rest."""
    rng = np.random.default_rng(seed)
    parts: list[list] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        counts = [int(round(len(idx) * f)) for f in fractions]
        while sum(counts) >= len(idx) and any(counts):  # tiny classes: train must keep one
            counts[int(np.argmax(counts))] -= 1
        start = len(idx) - sum(counts)
        parts[0].append(idx[:start])
        for i, n in enumerate(counts):
            parts[i + 1].append(idx[start:start + n])
            start += n
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def _write_npz(path: Path, **arrays) -> None:
    """Like np.savez, but with fixed zip timestamps so the same data gives the same sha256."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            with zf.open(zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)


def _write_runner_inputs(path: Path, x: np.ndarray) -> None:
    """Raw little-endian float32 N x C x H x W in [0, 1]: what the C++ runner feeds the model."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(x), 1024):  # chunks: the float copy of all of GTSRB's test set is 150 MB
            f.write((x[i:i + 1024].transpose(0, 3, 1, 2).astype("<f4") / np.float32(255)).tobytes())


def _split_gtsrb(dataset_root: Path, image_size, val: float, test: float, seed: int):
    train_x, train_y, test_x, test_y, report = load_gtsrb(dataset_root, image_size)
    if test_x is not None:
        rest, val_i = _stratified(train_y, (val,), seed)
        splits = {"train": (train_x[rest], train_y[rest]), "val": (train_x[val_i], train_y[val_i]),
                  "test": (test_x, test_y)}
    else:
        rest, val_i, test_i = _stratified(train_y, (val, test), seed)
        splits = {name: (train_x[i], train_y[i]) for name, i in (("train", rest), ("val", val_i), ("test", test_i))}
    marker = dataset_root / MARKER
    source = {"format": "gtsrb", "num_classes": NUM_CLASSES, "channels": 3,
              "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "Final_Test" if test_x is not None else "split of Final_Training"}
    return splits, report, source


def _split_digits(path: Path, image_size, val: float, test: float, seed: int):
    from passes import digits

    x, y, report = digits.load_digits(path, image_size)
    rest, val_i, test_i = _stratified(y, (val, test), seed)
    # the boards may get only a prefix of the test set (validation.samples): mix the classes
    test_i = np.random.default_rng([seed, 3]).permutation(test_i)
    splits = {name: (x[i], y[i]) for name, i in (("train", rest), ("val", val_i), ("test", test_i))}
    return splits, report, {"format": "digits", "num_classes": digits.NUM_CLASSES, "channels": 1,
                            "synthetic": None, "test_source": "split of the digits file"}


def prepare(dataset_root: Path, out_dir: Path, image_size, val: float, test: float, seed: int,
            format: str = "gtsrb") -> dict:
    """Load the data set at ``dataset_root`` (a GTSRB tree, or a digits file), split it and write
    the data pass's outputs to ``out_dir``.

    GTSRB: Final_Test, when labelled, is the test split; otherwise ``test`` of the training
    images is. ``val`` of the training images (stratified, seeded) is the validation split.
    Returns what it writes to ``out_dir/data.json``.
    """
    dataset_root, out_dir = Path(dataset_root), Path(out_dir)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PassError(f"data: split fractions must be in [0, 1) and sum below 1, got val={val} test={test}")
    size = _check_size(image_size)
    split_fn = _split_digits if format == "digits" else _split_gtsrb
    splits, report, source = split_fn(dataset_root, size, val, test, seed)
    for name, (x, y) in splits.items():
        log.info("data: writing %s split: %d images", name, len(y))
        _write_npz(out_dir / f"{name}.npz", x=x, y=y)
    x, y = splits["test"]
    if not len(y):
        log.warning("data: the test split is empty (test=%s and no labelled test set)", test)
    _write_runner_inputs(out_dir / "test_inputs.bin", x)
    write_json(out_dir / "test_labels.json", [int(v) for v in y])
    files = ["train.npz", "val.npz", "test.npz", "test_inputs.bin", "test_labels.json"]
    k = source["num_classes"]
    info = {
        "pass": "data", **source, "image_size": list(size),
        "counts": {n: len(v[1]) for n, v in splits.items()},
        "class_counts": {n: np.bincount(v[1], minlength=k).tolist() for n, v in splits.items()},
        "test_inputs": {"file": "test_inputs.bin", "dtype": "float32", "byteorder": "little",
                        "layout": "NCHW", "shape": [len(y), source["channels"], *size], "scale": "pixel / 255"},
        "load": report,
        "files": {f: sha256_file(out_dir / f) for f in files},
        "params": {"dataset_root": str(dataset_root), "image_size": list(size), "val": val, "test": test, "seed": seed},
    }
    write_json(out_dir / "data.json", info)  # last: its presence means every output above is complete
    log.info("data: wrote %s (train %d, val %d, test %d)", out_dir, *info["counts"].values())
    return info
