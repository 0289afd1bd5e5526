"""The data stage: what a dataset format loads -> content-hashed train/val/test splits and the
boards' test inputs. Formats are modules in passes/formats/, chosen by ``dataset.format``."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from kiln.artifacts import atomic_path, sha256_file, write_json
from kiln.errors import PassError
from kiln.registry import implementation
from passes.formats import Loaded

log = logging.getLogger("kiln.data")


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


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError) as e:
        raise PassError(f"data: image_size must be (height, width), got {image_size!r}") from e
    if h < 1 or w < 1:
        raise PassError(f"data: image_size must be positive, got {image_size!r}")
    return h, w


def _splits(loaded: Loaded, val: float, test: float, seed: int) -> dict:
    """train/val/test: a shipped test split stays the test split; otherwise ``test`` of the
    data is split off (shuffled: the boards may get only a prefix, validation.samples)."""
    x, y = loaded.train
    if loaded.test is not None:
        rest, val_i = _stratified(y, (val,), seed)
        return {"train": (x[rest], y[rest]), "val": (x[val_i], y[val_i]), "test": loaded.test}
    rest, val_i, test_i = _stratified(y, (val, test), seed)
    test_i = np.random.default_rng([seed, 3]).permutation(test_i)
    return {name: (x[i], y[i]) for name, i in (("train", rest), ("val", val_i), ("test", test_i))}


def synthesize(project, layout) -> None:
    """The synth stage: the format's synthetic data set, in its own on-disk layout."""
    ds = project.dataset
    fmt = implementation(ds)
    root, synthetic = fmt.locate(ds, layout)
    if not synthetic:
        raise PassError(f"data: {project.name}'s data set at {root} is real; nothing to synthesize")
    fmt.synthesize(ds, root)


def run(project, layout) -> dict:
    """The data stage: load the manifest's data set with its format, split it and write the
    stage's outputs to ``layout.data``."""
    ds = project.dataset
    fmt = implementation(ds)
    root, _ = fmt.locate(ds, layout)
    size = _check_size(ds.image_size)
    return prepare(fmt.load(ds, root), layout.data, size, ds.split.val, ds.split.test, ds.split.seed,
                   params={"dataset_root": str(root)})


def prepare(loaded: Loaded, out_dir: Path, image_size, val: float, test: float, seed: int,
            params: dict | None = None) -> dict:
    """Split what a format loaded and write the data stage's outputs to ``out_dir``.

    A shipped test split (GTSRB's labelled Final_Test) is the test split; otherwise ``test`` of
    the data is. ``val`` of the rest (stratified, seeded) is the validation split. Returns what
    it writes to ``out_dir/data.json``.
    """
    out_dir = Path(out_dir)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PassError(f"data: split fractions must be in [0, 1) and sum below 1, got val={val} test={test}")
    size = _check_size(image_size)
    splits, report, source = _splits(loaded, val, test, seed), loaded.report, loaded.source
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
        "params": {**(params or {}), "image_size": list(size), "val": val, "test": test, "seed": seed},
    }
    write_json(out_dir / "data.json", info)  # last: its presence means every output above is complete
    log.info("data: wrote %s (train %d, val %d, test %d)", out_dir, *info["counts"].values())
    return info
