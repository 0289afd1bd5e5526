"""The data stage: what a dataset format loads -> content-hashed train/val/test splits and the
boards' test inputs. Formats are modules in passes/formats/, chosen by ``dataset.format``."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np

from kiln.artifacts import Layout, atomic_path, sha256_file, write_json
from kiln.errors import PassError
from kiln.registry import implementation
from kiln.schema.datasets import raw_augmented
from kiln.tasks.regression import target_stats
from passes.formats import Loaded
from passes.support import decode_cache, splits

log = logging.getLogger("kiln.data")


def _write_npz(path: Path, **arrays) -> None:
    """An uncompressed .npz with fixed zip timestamps (the same data gives the same sha256),
    each array written a chunk at a time (an array, a ``_Part`` or the decode cache's Rows)."""
    splits.write_npz(path, {n: (a.shape, a.dtype, splits.in_chunks(a)) for n, a in arrays.items()})


def _write_runner_inputs(path: Path, x) -> None:
    """Raw little-endian float32 N x C x H x W in [0, 1]: what the C++ runner feeds a model
    without a front end."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(x), 1024):  # chunks: the float copy of all of GTSRB's test set is 150 MB
            f.write((x[i:i + 1024].transpose(0, 3, 1, 2).astype("<f4") / np.float32(255)).tobytes())


def _write_raw_inputs(path: Path, x) -> None:
    """The raw samples as the board gets them (int16 audio, uint8 pixels, float32 sensor values),
    little-endian, in the data set's layout: the library's front end computes the features."""
    step = splits.chunk_rows(x.shape[1:], x.dtype)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for i in range(0, len(x), step):
            f.write(np.ascontiguousarray(x[i:i + step], dtype=np.dtype(x.dtype).newbyteorder("<")).tobytes())


RAW_DTYPES = {"image": np.uint8, "audio": np.int16, "sequence": np.float32, "table": np.float32}


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError) as e:
        raise PassError(f"data: image_size must be (height, width), got {image_size!r}") from e
    if h < 1 or w < 1:
        raise PassError(f"data: image_size must be positive, got {image_size!r}")
    return h, w


SPLIT_VERSION = 3  # 2: whole groups (recording, speaker, track) per split, never single samples;
# 3: each group's split drawn by a seeded hash of its name (stable as files come and go)
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


def _unit(seed: int, salt: int, names) -> np.ndarray:
    """A number in [0, 1) per name, from a seeded hash of the name alone: a name draws the same
    number whatever else the data set holds."""
    out = np.empty(len(names), np.float64)
    for i, n in enumerate(names):
        d = hashlib.blake2b(f"{seed}\0{salt}\0{n}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "little") / 2.0 ** 64
    return out


def _sample_keys(loaded: Loaded, split: str) -> list[str]:
    """A name per sample that does not depend on the other samples: its source file and its
    place among that file's samples (the sample's index where the format gives no sources)."""
    sources = loaded.sources.get(split)
    if sources is None:
        return [str(i) for i in range(len(getattr(loaded, split)[1]))]
    seen: dict[str, int] = {}
    keys = []
    for s in sources:
        k = seen[s] = seen.get(s, -1) + 1
        keys.append(f"{s}#{k}")
    return keys


def _assign(y: np.ndarray, groups: np.ndarray, bands: dict[int, tuple[float, float]], seed: int,
            grouped: bool) -> np.ndarray:
    """Each sample's split (0 train, 1 val, 2 test), whole groups only: a group goes to the
    part whose band [lo, hi) holds its seeded hash (``_unit``), so about ``hi - lo`` of each
    class's groups land there and a group's split depends on its name alone: adding, changing
    or removing files moves no other group. Then, for small classes, whole groups move: a class
    whose groups all drew a held-out part keeps the one nearest the training band for training,
    and a held-out part without a group of a class takes one, of the smallest hash, from
    training, else from the other held-out part, where that leaves every class the group holds
    a group there. (Only in such a small class can a later file move an old group: the moves
    depend on the class's other groups.) Kiln's own
    rather than scikit-learn's StratifiedGroupKFold: its folds are a draw over the whole set,
    so one added file moves other groups (and it promises no class a held-out group)."""
    uniq, inv = np.unique(groups.astype(str), return_inverse=True)
    classes = int(y.max()) + 1 if len(y) else 0
    hist = np.zeros((len(uniq), classes), np.int32)  # samples of each class in each group
    np.add.at(hist, (inv, y), 1)
    has = hist > 0
    if grouped and not (has.sum(axis=0) >= 2).any():
        raise PassError(f"data: no class has samples in two groups ({len(uniq)} group(s): "
                        f"{', '.join(map(repr, uniq[:3].tolist()))}{', ...' if len(uniq) > 3 else ''}), so no held-out "
                        "split can be cut without sharing a group with training; add recordings, or ship the split "
                        "as folders (train/ val/ test/), or set dataset.split.group_by")
    u = _unit(seed, 0, uniq.tolist())
    part = np.zeros(len(uniq), np.int8)
    for p, (lo, hi) in bands.items():
        part[(u >= lo) & (u < hi)] = p
    for c in range(classes):  # every class keeps a training group
        mine = np.flatnonzero(has[:, c])
        if len(mine) and not (part[mine] == 0).any():
            part[mine[np.argmax(u[mine])]] = 0
    for p in sorted(bands, reverse=True):  # test first, then val: every class a group where it can
        for c in range(classes):
            mine = np.flatnonzero(has[:, c])
            if not len(mine) or (part[mine] == p).any():
                continue
            for donor in (0, *(q for q in bands if q != p)):  # training's groups first, then the other part's
                held = (has & (part == donor)[:, None]).sum(axis=0)  # groups of each class in the donor
                spare = [g for g in mine[np.argsort(u[mine])] if part[g] == donor and (held[has[g]] >= 2).all()]
                if spare:
                    part[spare[0]] = p
                    break
    return part[inv]


def _test_order(keys: list[str], idx: np.ndarray, seed: int) -> np.ndarray:
    """The test split's samples in a seeded order that depends on each sample's name alone
    (the boards may get only a prefix, validation.samples)."""
    return idx[np.argsort(_unit(seed, 3, [keys[i] for i in idx]), kind="stable")]


class _Part:
    """One split's samples: rows ``idx`` of ``x`` (an array, or the decode cache's Rows: read
    a chunk at a time when the split is written), their labels ``y``."""

    def __init__(self, x, idx: np.ndarray | None, y: np.ndarray):
        self.x, self.idx = x, (np.arange(len(y)) if idx is None else idx)
        self.y = y if idx is None else y[idx]
        self.shape = (len(self.idx), *x.shape[1:])
        self.dtype = x.dtype
        # each row's decode-cache key (what its file held, how it was decoded); None: not cached
        self.keys = None if getattr(x, "keys", None) is None else x.keys[self.idx]

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, s) -> np.ndarray:
        return np.asarray(self.x[self.idx[s]])

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


STRATA = 10  # a regressor's numeric labels are split as classes are, on this many quantile bins


def _strata(y: np.ndarray) -> np.ndarray:
    """The labels a split is stratified on: class labels as they are; numeric labels (a
    regressor's) binned at their quantiles, so every split spans the label's range."""
    if y.ndim == 3:  # a detector's scenes (N, max_objects, 5): each scene's commonest class, empty ones apart
        return _scene_strata(y)
    if not np.issubdtype(y.dtype, np.floating) or not len(y):
        return y
    edges = np.unique(np.quantile(y, np.linspace(0, 1, STRATA + 1)[1:-1]))
    return np.searchsorted(edges, y, side="right").astype(np.int64)


def _scene_strata(y: np.ndarray) -> np.ndarray:
    """A stratum per scene of a detector's labels (rows [class, cx, cy, w, h], padding -1): the
    class it holds most objects of (the lower on a tie), or one past the last class when empty."""
    cls = y[..., 0].astype(np.int64)
    k = int(cls.max()) + 1 if cls.size else 0
    counts = np.zeros((len(y), k + 1), np.int64)
    scene = np.repeat(np.arange(len(y)), cls.shape[1])
    real = cls.ravel() >= 0
    np.add.at(counts, (scene[real], cls.ravel()[real]), 1)
    counts[:, k] = counts[:, :k].sum(axis=1) == 0
    return counts.argmax(axis=1)


def _objects(y: np.ndarray, k: int) -> list[int]:
    """A detector's objects per class in labels ``y`` (N, max_objects, 5)."""
    cls = y[..., 0][y[..., 0] >= 0].astype(np.int64)
    return np.bincount(cls, minlength=k).tolist()


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


def _unnamed_splits(loaded: Loaded, val: float, test: float, seed: int) -> dict:
    """train/val/test of a data set whose samples have no source files (generated, or rows of
    one file): nothing can be added to one file at a time, so the exact stratified draw per
    class (seeded) stays, as before split version 3."""
    x, y = loaded.train
    y = np.asarray(y)
    fractions = (() if loaded.val is not None else (val,)) + (() if loaded.test is not None else (test,))
    parts = _stratified(_strata(y), fractions, seed)
    rest = iter(parts[1:])
    out = {"train": _Part(x, parts[0], y)}
    out["val"] = _Part(loaded.val[0], None, np.asarray(loaded.val[1])) if loaded.val is not None else \
        _Part(x, next(rest), y)
    out["test"] = _Part(loaded.test[0], None, np.asarray(loaded.test[1])) if loaded.test is not None else \
        _Part(x, np.random.default_rng([seed, 3]).permutation(next(rest)), y)
    return out


def _splits(loaded: Loaded, val: float, test: float, seed: int, rule: str) -> tuple[dict, dict]:
    """train/val/test (``_Part``) and each one's groups: a shipped test (validation) split stays
    the test (validation) split; otherwise ``test`` (``val``) of the data is split off, whole
    groups only, by ``_assign`` (the test split in a seeded order); samples without source files
    by ``_unnamed_splits``."""
    names = ("train", "val", "test")
    if loaded.sources.get("train") is None:
        return _unnamed_splits(loaded, val, test, seed), {n: group_ids(loaded, n, rule) for n in names}
    x, y = loaded.train
    groups = group_ids(loaded, "train", rule)
    keys = _sample_keys(loaded, "train")
    grouped = groups is not None and len(set(groups)) < len(groups)
    bands, lo = {}, 0.0
    if loaded.test is None:
        bands[2], lo = (0.0, test), test
    if loaded.val is None:
        bands[1] = (lo, lo + val)
    which = _assign(_strata(np.asarray(y)), np.asarray(keys, dtype=object) if groups is None else groups, bands, seed,
                    grouped)
    parts, out_groups = {}, {}
    for n, p in (("train", 0), ("val", 1), ("test", 2)):
        shipped = getattr(loaded, n) if n != "train" else None
        if shipped is not None:
            parts[n], out_groups[n] = _Part(shipped[0], None, np.asarray(shipped[1])), group_ids(loaded, n, rule)
            continue
        idx = np.flatnonzero(which == p)
        if n == "test":
            idx = _test_order(keys, idx, seed)
        parts[n] = _Part(x, idx, np.asarray(y))
        out_groups[n] = None if groups is None else groups[idx]
    return {n: parts[n] for n in names}, {n: out_groups[n] for n in names}


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
    stage's outputs to ``layout.data``. The formats that read a file per sample decode through
    the decode cache (``layout.data/cache``, passes/support/decode_cache.py) on
    ``dataset.workers`` processes: a rerun decodes only the files added or changed."""
    ds = project.dataset
    fmt = implementation(ds)
    root, _ = fmt.locate(ds, layout)
    size = _check_size(ds.image_size)
    raw_train = _raw_train_extras(ds, root) if raw_augmented(ds) else None
    with decode_cache.active(Path(layout.data) / CACHE_DIR, ds.workers) as stats:
        loaded = fmt.load(ds, root)
        loaded.report = {**loaded.report, "decode": stats.as_dict()}
        log.info("data: %d file(s) decoded on %d worker(s), %d from the cache (%.1f s)", stats.decoded,
                 stats.workers, stats.cached, stats.seconds)
        return prepare(loaded, layout.data, size, ds.split.val, ds.split.test, ds.split.seed,
                       params={"dataset_root": str(root)}, front_end=front_end_of(ds), group_by=ds.split.group_by,
                       raw_train=raw_train)


CACHE_DIR = "cache"  # under build/<app>/data: the decode cache


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


def _how(*parts) -> str | None:
    """How an output is made (splits.fingerprint), or None when a part's rows are not cached
    (no keys): then it is always written again."""
    if any(isinstance(p, _Part) and p.keys is None for p in parts):
        return None
    return splits.fingerprint(*[(p.keys, p.y) if isinstance(p, _Part) else p for p in parts])


def _emit(prev: splits.Previous, name: str, how: str | None, write, transform: str | None = None,
          keys=None) -> None:
    """Write output ``name`` with ``write()`` unless the last run made it the same way."""
    if prev.unchanged(name, how):
        log.info("data: %s unchanged since the last run, kept", name)
        return
    write()
    prev.wrote(name, how, transform, keys)


def _features(fe, layout, sr, stats, part: "_Part", reuse, step: int):
    """``rows(lo, hi)``: chunks of the front end's features of rows lo..hi of ``part``: rows the
    last run computed with the same transform (``reuse``: (open its x, {key: row})) are copied
    from its file."""
    from passes import frontends

    def chunks(lo, hi):
        copied = 0
        for i in range(lo, hi, step):
            at = np.arange(i, min(i + step, hi))
            if reuse is None or part.keys is None:
                yield frontends.features(fe, layout, part[at], stats, sr)
                continue
            old_x, old_rows = reuse[0](), reuse[1]
            rows = np.asarray([old_rows.get(k, -1) for k in part.keys[at].tolist()], np.int64)
            hit = rows >= 0
            out = np.empty((len(at), *old_x.shape[1:]), np.float32)
            out[hit] = old_x[rows[hit]]
            del old_x  # unmapped: its pages are not kept resident
            if not hit.all():
                out[~hit] = frontends.features(fe, layout, part[at[~hit]], stats, sr)
            copied += int(hit.sum())
            yield out
        log.info("data: front end: %d of %d samples' features copied from the last run's file", copied, hi - lo)
    return chunks


def _transform(fe, layout, raw_shape, stats, sr) -> str:
    """The front end as it computes features: its settings and its module's tensors."""
    from passes import frontends

    mod = frontends.module(fe, layout, tuple(raw_shape), stats, sr)
    return splits.fingerprint(fe.model_dump(mode="json"), layout, list(raw_shape), sr, type(mod).__name__,
                              *[(k, v.detach().cpu().numpy()) for k, v in mod.state_dict().items()])


def _apply_front_end(front_end: dict, parts: dict, out_dir: Path, prev: splits.Previous) -> tuple[dict, dict]:
    """Fit the front end on the training split and write the raw samples the boards and the
    export's parity check need. Returns (per split: the writer of its features, the same graph
    the library runs, a chunk at a time; front_end.json's contents)."""
    fe, layout, sr = front_end["settings"], front_end["layout"], front_end["sample_rate"]
    raw_dtype = np.dtype(RAW_DTYPES[layout])
    for name, part in parts.items():
        if part.dtype != raw_dtype or tuple(part.shape[1:]) != tuple(front_end["raw_shape"]):
            raise PassError(f"data: the {name} split's raw samples are {part.dtype} {tuple(part.shape[1:])}, "
                            f"expected {raw_dtype} {tuple(front_end['raw_shape'])} (a bug in the format)")
    _emit(prev, Layout.RAW_NPZ, _how(Layout.RAW_NPZ, parts["val"], parts["test"]),
          lambda: _write_npz(out_dir / Layout.RAW_NPZ, val=parts["val"], test=parts["test"]))
    train = parts["train"]
    if front_end.get("raw_train") is not None:  # training augments raw samples, then runs the front end
        path = Layout.split_file(out_dir, Layout.RAW_TRAIN)
        extras = {k: np.asarray(v) for k, v in front_end["raw_train"].items()}
        how = _how(path.name, train, *(a for kv in sorted(extras.items()) for a in kv))
        splits.write_split(prev, Layout.RAW_TRAIN, how, (train.shape, train.dtype, splits.row_chunks(train)),
                           {n: (a.shape, a.dtype, splits.in_chunks(a)) for n, a in {"y": train.y, **extras}.items()},
                           train.keys)
        train = splits.open_x(out_dir, Layout.RAW_TRAIN)  # the fit reads it from there
    impl = implementation(fe)
    stats = impl.fit(fe, layout, train)
    raw_shape = tuple(front_end["raw_shape"])
    c, h, w = fe.output_shape(layout, raw_shape, sr)
    transform = _transform(fe, layout, raw_shape, stats, sr)
    writers = {}
    for name, part in parts.items():
        fname = Layout.split_file(out_dir, name).name
        writers[name] = ((len(part), h, w, c), np.float32,
                         _features(fe, layout, sr, stats, part, prev.rows(fname, transform),
                                   splits.chunk_rows(raw_shape, np.float32)))
    info = {"kind": fe.kind, "settings": fe.model_dump(), "layout": layout, "raw_shape": front_end["raw_shape"],
            "raw_dtype": raw_dtype.name, "sample_rate": sr, "stats": stats,
            "output_shape": list(fe.output_shape(layout, raw_shape, sr))}
    return {"writers": writers, "transform": transform}, info


def prepare(loaded: Loaded, out_dir: Path, image_size, val: float, test: float, seed: int,
            params: dict | None = None, front_end: dict | None = None, group_by: str | None = None,
            raw_train: dict | None = None) -> dict:
    """Split what a format loaded and write the data stage's outputs to ``out_dir``.

    A shipped test split (GTSRB's labelled Final_Test) is the test split; otherwise about
    ``test`` of the data is; about ``val`` of the data is the validation split (whole groups,
    each drawn by a seeded hash of its name: ``_assign``). Returns what it writes to
    ``out_dir/data.json``. With ``raw_train`` (a front end, and training augments raw samples)
    the raw training split is kept too, in raw_train.npz with ``raw_train``'s arrays. Every
    array is written a chunk at a time (passes/support/splits.py): the samples are never all in
    memory when the format loaded them through the decode cache.
    """
    out_dir = Path(out_dir)
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise PassError(f"data: split fractions must be in [0, 1) and sum below 1, got val={val} test={test}")
    size = _check_size(image_size)
    rule = group_by or loaded.group_by
    if rule == "none" and any(len(set(v)) < len(v) for v in loaded.sources.values()):
        log.warning("data: dataset.split.group_by is none: samples cut from one file may land in train and test "
                    "alike, and the test accuracy then overstates what the board will see")
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, groups = _splits(loaded, val, test, seed, rule)
    labels = {n: (None, p.y) for n, p in parts.items()}
    report, source = loaded.report, loaded.source
    boxes = parts["train"].y.ndim == 3  # a detector's: (N, max_objects, 5) rows [class, cx, cy, w, h], padding -1
    numeric = not boxes and np.issubdtype(parts["train"].y.dtype, np.floating)  # a regressor's label is a number
    classes = [str(c) for c in source.get("classes") or range(source["num_classes"])]
    if not numeric and not boxes:  # (a scene may hold any classes, or none)
        _check_class_coverage(labels, classes)
        report_class_counts(labels, classes)
    raw_test = parts["test"]
    keep_raw = front_end is not None and raw_train is not None
    files = [f for f in Layout.data_files(front_end is not None, keep_raw) if f != Layout.DATA_JSON]  # data.json: last
    prev = splits.Previous(out_dir, out_dir / CACHE_DIR)  # what the last run wrote: kept where unchanged
    fe_info = None
    label_dtype = np.float32 if boxes else np.float64 if numeric else np.int64
    if front_end is not None:
        made, fe_info = _apply_front_end({**front_end, "raw_train": raw_train}, parts, out_dir, prev)
        writers, transform = made["writers"], made["transform"]
        write_json(out_dir / Layout.FRONT_END_JSON, fe_info)
    else:
        writers = {n: (p.shape, p.dtype, splits.row_chunks(p)) for n, p in parts.items()}
        transform = "raw samples"
    for name, part in parts.items():
        path = Layout.split_file(out_dir, name)  # sharded when large (passes/support/splits.py write_split)
        splits.write_split(prev, name, _how(path.name, transform, part), writers[name],
                           {"y": (part.y.shape, label_dtype, splits.in_chunks(part.y))}, part.keys, transform)
    y = parts["test"].y
    if not len(y):
        log.warning("data: the test split is empty (test=%s and no labelled test set)", test)
    if fe_info is None:
        _emit(prev, Layout.TEST_INPUTS, _how(Layout.TEST_INPUTS, "float32 NCHW", raw_test),
              lambda: _write_runner_inputs(out_dir / Layout.TEST_INPUTS, raw_test))
        test_inputs = {"file": Layout.TEST_INPUTS, "dtype": "float32", "byteorder": "little", "layout": "NCHW",
                       "shape": [len(y), source["channels"], *size], "scale": "pixel / 255"}
    else:
        _emit(prev, Layout.TEST_INPUTS, _how(Layout.TEST_INPUTS, "raw", raw_test),
              lambda: _write_raw_inputs(out_dir / Layout.TEST_INPUTS, raw_test))
        test_inputs = {"file": Layout.TEST_INPUTS, "dtype": fe_info["raw_dtype"], "byteorder": "little",
                       "layout": fe_info["layout"], "shape": [len(y), *fe_info["raw_shape"]],
                       "scale": f"raw samples ({fe_info['kind']} front end in the library)"}
    if boxes:  # a detector's: each test scene's objects [class, cx, cy, w, h], padding dropped
        test_labels = [[[int(r[0]), *(round(float(c), 6) for c in r[1:])] for r in v if r[0] >= 0] for v in y]
    else:
        test_labels = [float(v) if numeric else int(v) for v in y]
    write_json(out_dir / Layout.TEST_LABELS, test_labels)
    k = source["num_classes"]
    info = {
        "pass": "data", **source, "image_size": list(size),
        "counts": {n: len(p) for n, p in parts.items()},
        "class_counts": {n: _objects(p.y, k) for n, p in parts.items()} if boxes else None if numeric else
        {n: np.bincount(p.y, minlength=k).tolist() for n, p in parts.items()},  # a detector's: objects per class
        **({"objects": {n: int((p.y[..., 0] >= 0).sum()) for n, p in parts.items()}} if boxes else {}),
        # a regressor's targets are standardized by the training split's statistics (kiln/tasks/regression.py)
        **({"target": target_stats(parts["train"].y)} if numeric else {}),
        "test_inputs": test_inputs, "front_end": fe_info, "groups": _group_report(rule, groups),
        "load": report,
        "files": {f: prev.sha256(f) if f in prev.new else sha256_file(out_dir / f) for f in [*files, *prev.shards()]},
        "params": {**(params or {}), "image_size": list(size), "val": val, "test": test, "seed": seed,
                   "group_by": rule, "split_version": SPLIT_VERSION,
                   "front_end": None if front_end is None else front_end["settings"].model_dump()},
    }
    prev.save()
    write_json(out_dir / Layout.DATA_JSON, info)  # last: its presence means every output above is complete
    log.info("data: wrote %s (train %d, val %d, test %d)", out_dir, *info["counts"].values())
    return info
