"""The data stage: what a dataset format loads -> content-hashed train/val/test splits and the
boards' test inputs. Formats are modules in passes/formats/, chosen by ``dataset.format``."""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path

import numpy as np

from kiln.artifacts import Layout, atomic_path, sha256_file, write_json
from kiln.errors import PassError
from kiln.registry import implementation
from kiln.schema.datasets import raw_augmented
from kiln.tasks.regression import target_stats
from passes.formats import Loaded

log = logging.getLogger("kiln.data")


STRATA = 10  # a regressor's numeric labels are split as classes are, on this many quantile bins


def _strata(y: np.ndarray) -> np.ndarray:
    """The labels a split is stratified on: class labels as they are; numeric labels (a
    regressor's) binned at their quantiles, so every split spans the label's range."""
    if not np.issubdtype(y.dtype, np.floating) or not len(y):
        return y
    edges = np.unique(np.quantile(y, np.linspace(0, 1, STRATA + 1)[1:-1]))
    return np.searchsorted(edges, y, side="right").astype(np.int64)


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
    """Raw little-endian float32 N x C x H x W in [0, 1]: what the C++ runner feeds a model
    without a front end."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(x), 1024):  # chunks: the float copy of all of GTSRB's test set is 150 MB
            f.write((x[i:i + 1024].transpose(0, 3, 1, 2).astype("<f4") / np.float32(255)).tobytes())


def _write_raw_inputs(path: Path, x: np.ndarray) -> None:
    """The raw samples as the board gets them (int16 audio, uint8 pixels, float32 sensor values),
    little-endian, in the data set's layout: the library's front end computes the features."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes())


RAW_DTYPES = {"image": np.uint8, "audio": np.int16, "sequence": np.float32, "table": np.float32}


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError) as e:
        raise PassError(f"data: image_size must be (height, width), got {image_size!r}") from e
    if h < 1 or w < 1:
        raise PassError(f"data: image_size must be positive, got {image_size!r}")
    return h, w


SPLIT_VERSION = 2  # 2: whole groups (recording, speaker, track) per split, never single samples
SPEAKER = re.compile(r"(?:^|/)([^/]+?)_nohash_[^/]*$")  # Speech Commands: <word>/<speaker>_nohash_<n>.wav


def _group_of(rule: str, source: str) -> str:
    """The group of one sample whose source file is ``source`` (see dataset.split.group_by)."""
    if rule in ("file", "recording"):
        return source
    m = (SPEAKER if rule == "speaker" else re.compile(rule)).search(source)
    if m is None:
        return source
    return m.group(1) if m.re.groups else m.group(0)


def group_ids(loaded: Loaded, split: str, rule: str) -> np.ndarray | None:
    """Each sample's group in ``split`` under ``rule``; None: every sample is its own group (the
    format has no source files, or ``rule`` is "none")."""
    sources = loaded.sources.get(split)
    if rule == "none" or sources is None:
        return None
    return np.asarray([_group_of(rule, s) for s in sources], dtype=object)


def _group_split(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
                 what: str) -> tuple[np.ndarray, np.ndarray]:
    """(rest, part) indices: about ``fraction`` of the samples of each class in ``part``, whole
    groups only.

    With groups, a seeded greedy pass over the groups in random order: first one group for every
    class that has one to spare, then any group that fills more of a class's shortfall than it
    overshoots; a class's last group always stays in the rest (training). Kiln's own rather than
    scikit-learn's StratifiedGroupKFold, whose folds of 1/k neither promise every class a group in
    the held-out part nor keep a class's last group for training."""
    uniq, inv = np.unique(groups.astype(str), return_inverse=True)
    classes = int(y.max()) + 1 if len(y) else 0
    hist = np.zeros((len(uniq), classes), np.int64)  # samples of each class in each group
    np.add.at(hist, (inv, y), 1)
    left = (hist > 0).sum(axis=0)  # groups of each class still in the rest
    if not (left >= 2).any():
        raise PassError(f"data: no class has samples in two groups ({len(uniq)} group(s): "
                        f"{', '.join(map(repr, uniq[:3].tolist()))}{', ...' if len(uniq) > 3 else ''}), so no {what} "
                        "split can be cut without sharing a group with training; add recordings, or ship the split "
                        "as folders (train/ val/ test/), or set dataset.split.group_by")
    target = fraction * hist.sum(axis=0)
    got = np.zeros(classes, np.int64)
    taken = np.zeros(len(uniq), bool)
    order = np.random.default_rng([seed, 7]).permutation(len(uniq))

    def take(g: int) -> None:
        nonlocal left, got
        taken[g] = True
        left = left - (hist[g] > 0)
        got = got + hist[g]

    def spare(g: int) -> bool:  # taking g leaves every class it holds a group in the rest
        return not taken[g] and bool((left[hist[g] > 0] >= 2).all())

    for c in np.random.default_rng([seed, 8]).permutation(classes):  # every class a group, where it can
        if got[c] == 0:
            options = [g for g in order if hist[g, c] and spare(g)]
            if options:
                take(min(options, key=lambda g: hist[g].sum()))
    for g in order:  # then fill the shortfalls
        if spare(g):
            fill = np.minimum(hist[g], np.maximum(target - got, 0)).sum()
            if fill > hist[g].sum() - fill:
                take(g)
    part = np.flatnonzero(taken[inv])
    return np.flatnonzero(~taken[inv]), part


def _take(xy, i: np.ndarray, groups: np.ndarray | None):
    return (xy[0][i], xy[1][i]), (None if groups is None else groups[i])


def _splits(loaded: Loaded, val: float, test: float, seed: int, rule: str) -> tuple[dict, dict]:
    """train/val/test and each one's groups: a shipped test (validation) split stays the test
    (validation) split; otherwise ``test`` (``val``) of the data is split off, whole groups only
    (stratified, seeded; the test split shuffled: the boards may get only a prefix,
    validation.samples)."""
    rest, groups = loaded.train, group_ids(loaded, "train", rule)
    if groups is None or len(set(groups)) == len(groups):  # every sample its own group: per class at once
        return _sample_splits(loaded, val, test, seed), {
            n: group_ids(loaded, n, rule) for n in ("train", "val", "test")}
    out, out_groups = {}, {}
    if loaded.test is not None:
        out["test"], out_groups["test"] = loaded.test, group_ids(loaded, "test", rule)
    else:
        keep, part = _group_split(_strata(rest[1]), groups, test, seed, "test")
        part = np.random.default_rng([seed, 3]).permutation(part)
        out["test"], out_groups["test"] = _take(rest, part, groups)
        rest, groups = _take(rest, keep, groups)
    if loaded.val is not None:
        out["val"], out_groups["val"] = loaded.val, group_ids(loaded, "val", rule)
    else:  # val of the whole, taken from what is left
        keep, part = _group_split(_strata(rest[1]), groups, val / (1 - (test if loaded.test is None else 0)), seed, "val")
        out["val"], out_groups["val"] = _take(rest, part, groups)
        rest, groups = _take(rest, keep, groups)
    out["train"], out_groups["train"] = rest, groups
    names = ("train", "val", "test")
    return {n: out[n] for n in names}, {n: out_groups[n] for n in names}


def _sample_splits(loaded: Loaded, val: float, test: float, seed: int) -> dict:
    """train/val/test of samples that share no file: stratified per class, seeded."""
    x, y = loaded.train
    fractions = (() if loaded.val is not None else (val,)) + (() if loaded.test is not None else (test,))
    parts = _stratified(_strata(y), fractions, seed)
    out = {"train": (x[parts[0]], y[parts[0]])}
    rest = iter(parts[1:])
    out["val"] = loaded.val if loaded.val is not None else (lambda i: (x[i], y[i]))(next(rest))
    if loaded.test is not None:
        out["test"] = loaded.test
    else:
        test_i = np.random.default_rng([seed, 3]).permutation(next(rest))
        out["test"] = (x[test_i], y[test_i])
    return {name: out[name] for name in ("train", "val", "test")}


def _group_report(rule: str, groups: dict) -> dict:
    """data.json's record of the groups: the rule and, per split, how many and which."""
    out: dict = {"by": rule if any(g is not None for g in groups.values()) else "sample"}
    for name, g in groups.items():
        out[name] = {"count": None, "names": None} if g is None else \
            {"count": len(set(g)), "names": sorted(set(g.astype(str).tolist()))}
    shared = {}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        if groups[a] is not None and groups[b] is not None:
            both = sorted(str(g) for g in set(groups[a].astype(str)) & set(groups[b].astype(str)))
            if both:
                shared[f"{a}+{b}"] = both
                log.warning("data: %d group(s) (%s) are in both the %s and the %s split as the data set ships "
                            "them, first: %s: those samples are not held out", len(both), out["by"], a, b,
                            ", ".join(both[:3]))
    out["shared"] = shared
    return out


def _check_class_coverage(splits: dict, classes: list[str]) -> None:
    """Every class is in train (else the net cannot learn it) and in test (the requirements are
    judged there: a class without a test sample would be judged on nothing): a PassError naming
    the class and split; a class missing from val is warned about (compression would judge it
    on nothing)."""
    for name in ("train", "test", "val"):
        counts = np.bincount(splits[name][1], minlength=len(classes))
        missing = [classes[c] for c in np.flatnonzero(counts == 0)]
        if not missing:
            continue
        total = {c: int(sum(np.count_nonzero(s[1] == classes.index(c)) for s in splits.values())) for c in missing}
        detail = ", ".join(f"{c!r} ({total[c]} sample(s) in all)" for c in missing[:5])
        if name == "val":
            log.warning("data: the val split has no sample of class(es) %s: compression judges them on nothing", detail)
            continue
        raise PassError(f"data: the {name} split has no sample of class(es) {detail}; "
                        + ("the requirements are judged on the test split, so every class needs test samples: "
                           "add data for it (several files or recordings: one group goes to one split), or give "
                           "a test/ folder holding every class" if name == "test" else
                           "every class needs training samples: add data for it"))


IMBALANCE_RATIO = 10.0  # a split whose largest class has over this many times its smallest's samples is warned of


def report_class_counts(splits: dict, classes: list[str]) -> list[str]:
    """Log each class's samples per split (a table, as data.json's ``class_counts`` holds them)
    and warn of a split whose largest class has over ``IMBALANCE_RATIO`` times the samples of its
    smallest (classes without samples left out: _check_class_coverage speaks of them), naming
    both classes and the split. Returns the warnings."""
    counts = {n: np.bincount(y, minlength=len(classes)) for n, (_, y) in splits.items()}
    width = max([5, *map(len, classes)])
    lines = [f"{'class':<{width}} " + " ".join(f"{n:>7}" for n in counts)]
    lines += [f"{c:<{width}} " + " ".join(f"{int(v[i]):>7}" for v in counts.values()) for i, c in enumerate(classes)]
    log.info("data: samples per class and split:\n%s", "\n".join(lines))
    warnings = []
    for name, v in counts.items():
        held = np.flatnonzero(v > 0)
        if len(held) < 2:
            continue
        big, small = held[np.argmax(v[held])], held[np.argmin(v[held])]
        ratio = v[big] / v[small]
        if ratio > IMBALANCE_RATIO:
            warnings.append(f"data: the {name} split is imbalanced: class '{classes[big]}' has {int(v[big])} samples, "
                            f"class '{classes[small]}' {int(v[small])} ({ratio:.1f}x, over {IMBALANCE_RATIO:g}x); "
                            "accuracy then says little of the small classes: read the per-class report, and "
                            "consider training.class_weights: balanced")
            log.warning("%s", warnings[-1])
    return warnings


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
    raw_train = _raw_train_extras(ds, root) if raw_augmented(ds) else None
    return prepare(fmt.load(ds, root), layout.data, size, ds.split.val, ds.split.test, ds.split.seed,
                   params={"dataset_root": str(root)}, front_end=front_end_of(ds), group_by=ds.split.group_by,
                   raw_train=raw_train)


NOISE_FOLDER = "_background_noise_"  # Speech Commands' folder of long noise recordings


def _raw_train_extras(ds, root: Path) -> dict:
    """What raw_train.npz holds beside the raw training samples: for audio with
    ``augment.noise``, the noise clips (``noise``: int16, concatenated; ``noise_starts``: where
    each begins), each at least one clip long (a shorter one repeats)."""
    noise = getattr(ds.augment, "noise", None)
    if noise is None:
        return {}
    from passes.formats.audio_folders import read_wav
    from passes.formats.support.folders import resolve

    folder = resolve(noise.folder) if noise.folder else Path(root) / NOISE_FOLDER
    files = sorted(folder.glob("*.wav")) if folder.is_dir() else []
    if not files:
        raise PassError(f"dataset.augment.noise: no WAV files in {folder}"
                        + ("" if noise.folder else f" (the data set's {NOISE_FOLDER}; set dataset.augment.noise.folder)"))
    length, clips = int(ds.raw_shape()[0]), []
    for f in files:
        try:
            x = read_wav(f, ds.sample_rate)
        except Exception as e:  # the reader's Unreadable and OSError
            raise PassError(f"dataset.augment.noise: {f}: {e}") from e
        clips.append(np.resize(x, max(len(x), length)))
    log.info("data: %d background noise file(s) from %s for augmentation", len(clips), folder)
    return {"noise": np.concatenate(clips), "noise_starts": np.cumsum([0] + [len(c) for c in clips[:-1]])}


def front_end_of(ds) -> dict | None:
    """What the data stage needs of a dataset's front end (None: pixels scaled on the host)."""
    fe = getattr(ds, "front_end", None)
    if fe is None:
        return None
    return {"settings": fe, "layout": ds.layout, "raw_shape": list(ds.raw_shape()),
            "sample_rate": getattr(ds, "sample_rate", None)}


def _apply_front_end(front_end: dict, splits: dict, out_dir: Path) -> tuple[dict, dict]:
    """Fit the front end on the training split, compute every split's features with it (the
    same graph the library runs) and keep the raw samples the boards and the export's parity
    check need. Returns (splits of features, front_end.json's contents)."""
    from passes import frontends

    fe, layout, sr = front_end["settings"], front_end["layout"], front_end["sample_rate"]
    raw_dtype = np.dtype(RAW_DTYPES[layout])
    for name, (x, _) in splits.items():
        if x.dtype != raw_dtype or tuple(x.shape[1:]) != tuple(front_end["raw_shape"]):
            raise PassError(f"data: the {name} split's raw samples are {x.dtype} {tuple(x.shape[1:])}, "
                            f"expected {raw_dtype} {tuple(front_end['raw_shape'])} (a bug in the format)")
    impl = implementation(fe)
    stats = impl.fit(fe, layout, splits["train"][0])
    out = {}
    for name, (x, y) in splits.items():
        log.info("data: %s front end on the %s split (%d samples)", fe.kind, name, len(y))
        out[name] = (frontends.features(fe, layout, x, stats, sr), y)
    _write_npz(out_dir / Layout.RAW_NPZ, val=splits["val"][0], test=splits["test"][0])
    if front_end.get("raw_train") is not None:  # training augments raw samples, then runs the front end
        _write_npz(Layout.split_file(out_dir, Layout.RAW_TRAIN), x=splits["train"][0], y=splits["train"][1],
                   **front_end["raw_train"])
    info = {"kind": fe.kind, "settings": fe.model_dump(), "layout": layout, "raw_shape": front_end["raw_shape"],
            "raw_dtype": raw_dtype.name, "sample_rate": sr, "stats": stats,
            "output_shape": list(fe.output_shape(layout, tuple(front_end["raw_shape"]), sr))}
    return out, info


def prepare(loaded: Loaded, out_dir: Path, image_size, val: float, test: float, seed: int,
            params: dict | None = None, front_end: dict | None = None, group_by: str | None = None,
            raw_train: dict | None = None) -> dict:
    """Split what a format loaded and write the data stage's outputs to ``out_dir``.

    A shipped test split (GTSRB's labelled Final_Test) is the test split; otherwise ``test`` of
    the data is. ``val`` of the rest (stratified, seeded) is the validation split. Returns what
    it writes to ``out_dir/data.json``. With ``raw_train`` (a front end, and training augments raw
    samples) the raw training split is kept too, in raw_train.npz with ``raw_train``'s arrays.
    """
    out_dir = Path(out_dir)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PassError(f"data: split fractions must be in [0, 1) and sum below 1, got val={val} test={test}")
    size = _check_size(image_size)
    rule = group_by or loaded.group_by
    if rule == "none" and any(len(set(v)) < len(v) for v in loaded.sources.values()):
        log.warning("data: dataset.split.group_by is none: samples cut from one file may land in train and test "
                    "alike, and the test accuracy then overstates what the board will see")
    splits, groups = _splits(loaded, val, test, seed, rule)
    report, source = loaded.report, loaded.source
    numeric = np.issubdtype(splits["train"][1].dtype, np.floating)  # a regressor's label is a number
    if not numeric:
        _check_class_coverage(splits, [str(c) for c in source.get("classes") or range(source["num_classes"])])
        report_class_counts(splits, [str(c) for c in source.get("classes") or range(source["num_classes"])])
    raw_test = splits["test"][0]
    keep_raw = front_end is not None and raw_train is not None
    files = [f for f in Layout.data_files(front_end is not None, keep_raw) if f != Layout.DATA_JSON]  # data.json: last
    fe_info = None
    if front_end is not None:
        splits, fe_info = _apply_front_end({**front_end, "raw_train": raw_train}, splits, out_dir)
        write_json(out_dir / Layout.FRONT_END_JSON, fe_info)
    for name, (x, y) in splits.items():
        log.info("data: writing %s split: %d samples", name, len(y))
        _write_npz(Layout.split_file(out_dir, name), x=x, y=y)
    y = splits["test"][1]
    if not len(y):
        log.warning("data: the test split is empty (test=%s and no labelled test set)", test)
    if fe_info is None:
        _write_runner_inputs(out_dir / Layout.TEST_INPUTS, raw_test)
        test_inputs = {"file": Layout.TEST_INPUTS, "dtype": "float32", "byteorder": "little", "layout": "NCHW",
                       "shape": [len(y), source["channels"], *size], "scale": "pixel / 255"}
    else:
        _write_raw_inputs(out_dir / Layout.TEST_INPUTS, raw_test)
        test_inputs = {"file": Layout.TEST_INPUTS, "dtype": fe_info["raw_dtype"], "byteorder": "little",
                       "layout": fe_info["layout"], "shape": [len(y), *fe_info["raw_shape"]],
                       "scale": f"raw samples ({fe_info['kind']} front end in the library)"}
    write_json(out_dir / Layout.TEST_LABELS, [float(v) if numeric else int(v) for v in y])
    k = source["num_classes"]
    info = {
        "pass": "data", **source, "image_size": list(size),
        "counts": {n: len(v[1]) for n, v in splits.items()},
        "class_counts": None if numeric else {n: np.bincount(v[1], minlength=k).tolist() for n, v in splits.items()},
        # a regressor's targets are standardized by the training split's statistics (kiln/tasks/regression.py)
        **({"target": target_stats(splits["train"][1])} if numeric else {}),
        "test_inputs": test_inputs, "front_end": fe_info, "groups": _group_report(rule, groups),
        "load": report,
        "files": {f: sha256_file(out_dir / f) for f in files},
        "params": {**(params or {}), "image_size": list(size), "val": val, "test": test, "seed": seed,
                   "group_by": rule, "split_version": SPLIT_VERSION,
                   "front_end": None if front_end is None else front_end["settings"].model_dump()},
    }
    write_json(out_dir / Layout.DATA_JSON, info)  # last: its presence means every output above is complete
    log.info("data: wrote %s (train %d, val %d, test %d)", out_dir, *info["counts"].values())
    return info
