"""Decoded samples cached per source file by content, decoded on every core.

The data stage (passes/data.py ``run``) opens a cache with ``active(folder, workers)``; inside
it a format's loader hands its files to ``decode``, which returns their decoded samples. A
sample's key is the sha256 of its file's bytes, the loader's decode ``settings`` (image size,
colour, sample rate, a decoder version) and the sample's own ``extra`` (GTSRB's ROI): a file
that is added or changed is decoded again, every other one is read from the cache, and a
removed one only leaves an entry that is dropped when its pack is compacted.

Storage (``<folder>/<settings hash>/``): packs of decoded rows (``pack-*.npy``, one per chunk
of decoded files, written by the worker that decoded them) and ``index.sqlite``: key -> (pack,
row) or the reason the file could not be read (so an unreadable file is not retried until it
changes), and path -> (size, mtime_ns, inode, sha256, extra, key) so that an unchanged file
read with the same extra is neither read nor hashed again (git's index does the same; a
rewrite within the same nanosecond mtime and size would be missed). sqlite (stdlib) rather
than a JSON index: lookups of 50,000+ keys and updates that commit atomically. A clean run
also leaves ``listing.npz``, that index's rows as columns, which the next run reads instead of
querying sqlite (a second saved over 50,000 files; a rerun's cost is then the files' stat).

Outside ``active`` (a format loaded directly, as tests do), ``decode`` reads every file in
this process into one array, as the loaders always did. Inside it the samples come back as
``Rows``: an array-like over the packs that reads only the rows asked for (memory-mapped, one
chunk at a time), so the data stage's memory does not grow with the data set. ``join`` puts
``Rows`` and samples a loader makes in memory (Speech Commands' silence clips) into one
array-like (``Joined``), each row still with a key. ``decode_each`` is ``decode`` for files
that give any number of samples (csv_windows' recordings, cut into windows) and JSON-able notes
with them: a pack per file in its own folder (``each-<settings hash>/``), the same keys by
content and stat-keyed shortcut, decoded on the same forked workers.

Workers are forked processes (``multiprocessing``'s fork context): the loaders' read
functions are closures, which fork inherits and a spawned process could not unpickle.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import sqlite3
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from kiln.artifacts import atomic_path, sha256_json
from kiln.errors import PassError

log = logging.getLogger("kiln.data")

CACHE_VERSION = 1  # bump when the storage changes: a new folder, old ones left to compaction
CHUNK = 256  # files a worker decodes into one pack


@dataclass
class Stats:
    """What one data stage run did: files decoded, read from the cache, hashed."""

    decoded: int = 0
    cached: int = 0
    hashed: int = 0
    workers: int = 1
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"decoded": self.decoded, "cached": self.cached, "hashed": self.hashed, "workers": self.workers,
                "seconds": round(self.seconds, 3)}


@dataclass
class _Active:
    folder: Path
    workers: int
    stats: Stats = field(default_factory=Stats)
    live: dict[str, set[str]] = field(default_factory=dict)  # settings hash -> keys used this run


_ACTIVE: _Active | None = None


def default_workers() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def active(folder: str | os.PathLike, workers: int | None = None) -> Iterator[Stats]:
    """Inside: ``decode`` caches under ``folder`` and decodes on ``workers`` processes (None:
    every core). On a clean exit, packs no sample of this run uses are compacted away."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("decode_cache.active is not reentrant")
    ctx = _Active(Path(folder), int(workers or default_workers()))
    ctx.stats.workers = ctx.workers
    ctx.folder.mkdir(parents=True, exist_ok=True)
    _ACTIVE = ctx
    try:
        yield ctx.stats
        for settings_hash, keys in ctx.live.items():
            (_EachStore if settings_hash.startswith(EACH) else _Store)(ctx.folder / settings_hash).compact(keys)
    finally:
        _ACTIVE = None


class Rows:
    """The decoded samples of one ``decode`` call, in order, backed by the cache's packs.
    Array-like enough for the data stage: ``len``, ``shape``, ``dtype``, and ``rows[i]`` with an
    integer array or a slice gives an ndarray (read from the packs memory-mapped, then
    unmapped: only what is asked for is resident)."""

    def __init__(self, folder: Path, packs: list[str], pack: np.ndarray, row: np.ndarray, shape, dtype,
                 keys: np.ndarray):
        self.folder, self.packs, self.pack, self.row = folder, packs, pack, row
        self.keys = keys  # each row's cache key (S64: its file's content, extra and settings)
        self.shape = (len(pack), *shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        packs, rows = self.pack[idx], self.row[idx]
        for p in np.unique(packs):
            at = np.flatnonzero(packs == p)
            arr = np.load(self.folder / self.packs[p], mmap_mode="r")
            try:
                out[at] = arr[rows[at]]
            finally:
                del arr  # unmapped: the pages read are not kept resident
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[slice(None)]
        return a if dtype is None else a.astype(dtype)


class Joined:
    """Parts read as one array-like, as ``Rows`` is: the cache's ``Rows`` and samples made in
    memory (Speech Commands' silence clips, cut from noise recordings), each part with a key
    per row (``keys``, S85 like Rows'), so that a split that mixes them is still sharded and
    its rows reused by key. ``rows[i]`` with an integer array or a slice gives an ndarray."""

    def __init__(self, parts: list, keys: np.ndarray):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.keys = keys
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = np.dtype(parts[0].dtype)
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index, np.int64)
        if idx.ndim == 0:
            return self[idx[None]][0]
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        part = np.searchsorted(self.starts, idx, "right") - 1
        for p in np.unique(part):
            at = np.flatnonzero(part == p)
            out[at] = self.parts[p][idx[at] - self.starts[p]]
        return out

    def __array__(self, dtype=None, copy=None):
        a = self[slice(None)]
        return a if dtype is None else a.astype(dtype)


def join(parts: Sequence[tuple[Any, Sequence[str] | None]]):
    """``[(samples, keys)]`` as one array-like, in order: ``samples`` is what ``decode``
    returned (its keys: None, Rows carry their own) or an ndarray made in memory with a key per
    row (what decides its content, at most 85 bytes). Outside ``active`` (no part is Rows):
    one concatenated ndarray, as the loaders always made."""
    if not any(isinstance(x, Rows) for x, _ in parts):
        return np.concatenate([np.asarray(x) for x, _ in parts])
    keyed = [x.keys if isinstance(x, Rows) else None if k is None else np.asarray(k, "S85") for x, k in parts]
    if any(k is None for k in keyed):
        raise ValueError("decode_cache.join: an in-memory part without keys beside the cache's Rows")
    return Joined([x for x, _ in parts], np.concatenate(keyed))


class _Store:
    """One settings hash's folder: packs and the index."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(folder / "index.sqlite", timeout=60)
        # files: a path's stat when last read, its sha256, and the extra and key it was last read with
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT, sha TEXT, "
            "extra TEXT, key TEXT);"
            "CREATE TABLE IF NOT EXISTS samples (key TEXT PRIMARY KEY, pack TEXT, row INT, error TEXT);")
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(files)")}
        for c in ("extra", "key"):  # a cache written before they were kept: its files are hashed once again
            if c not in columns:
                self.db.execute(f"ALTER TABLE files ADD COLUMN {c} TEXT")

    def close(self) -> None:
        self.db.close()

    def listing(self) -> dict[str, tuple]:
        """path -> (path, size, mtime_ns, inode, extra, key, pack, row, error) of every file whose
        sample is stored: from the snapshot ``decode`` leaves (LISTING: the index's query costs a
        second over 50,000 files), else from the index. The snapshot may lack what a run that
        failed added (those files are hashed again); compaction removes it before it drops or
        moves a sample, and writes it again after dropping only."""
        try:
            rows = _load_listing(self.folder / LISTING)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            rows = None
        if rows is None:
            rows = self.db.execute("SELECT f.path, f.size, f.mtime, f.ino, f.extra, f.key, s.pack, s.row, s.error "
                                   "FROM files f JOIN samples s ON s.key = f.key")
        return {r[0]: r for r in rows}

    def keys(self) -> set[str]:
        return {k for (k,) in self.db.execute("SELECT key FROM samples")}

    def samples(self, keys=None) -> dict[str, tuple[str | None, int | None, str | None]]:
        """key -> (pack, row, error), of ``keys`` (None: of every stored sample)."""
        if keys is None:
            return {k: (p, r, e) for k, p, r, e in self.db.execute("SELECT key, pack, row, error FROM samples")}
        q = "SELECT key, pack, row, error FROM samples WHERE key = ?"
        return {k: (p, r, e) for key in keys for k, p, r, e in self.db.execute(q, (key,))}

    def record(self, files: list[tuple], samples: list[tuple]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", files)
            self.db.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?, ?)", samples)

    def compact(self, live: set[str]) -> bool:
        """Drop the entries no sample of this run used; a pack left without a used row is
        deleted, and when half the stored rows are unused the used ones are copied into one
        new pack (so a data set that keeps changing does not grow the cache without bound).
        True when rows moved to a new pack."""
        # every key used this run is stored: as many stored as used means none is dead (a count, not 50,000 keys)
        stored = self.db.execute("SELECT count(*) FROM samples").fetchone()[0]
        dead = self.keys() - live if stored > len(live) else set()
        if not dead:
            self.close()
            return False
        snapshot = self.folder / LISTING
        try:
            listed = _load_listing(snapshot)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            listed = None
        snapshot.unlink(missing_ok=True)  # (a compaction cut short leaves none that names a dropped sample)
        rows = self.samples()
        used: dict[str, list[tuple[str, int]]] = {}
        for k in live:
            if k in rows and rows[k][0] is not None:
                used.setdefault(rows[k][0], []).append((k, rows[k][1]))
        stored = sum(1 for p, _, _ in rows.values() if p is not None)
        in_use = sum(len(v) for v in used.values())
        moves: list[tuple] = []
        if stored and in_use * 2 < stored and in_use:
            name = f"pack-{uuid.uuid4().hex}.npy"
            first = np.load(self.folder / next(iter(used)), mmap_mode="r")
            out = np.lib.format.open_memmap(self.folder / f".{name}.tmp", "w+", first.dtype, (in_use, *first.shape[1:]))
            del first
            n = 0
            for pack, entries in used.items():
                arr = np.load(self.folder / pack, mmap_mode="r")
                for k, r in entries:
                    out[n] = arr[r]
                    moves.append((name, n, k))
                    n += 1
                del arr
            out.flush()
            del out
            os.replace(self.folder / f".{name}.tmp", self.folder / name)
        with self.db:
            self.db.executemany("DELETE FROM samples WHERE key = ?", [(k,) for k in dead])
            self.db.executemany("UPDATE samples SET pack = ?, row = ? WHERE key = ?", moves)
        keep = {r[0] for r in self.db.execute("SELECT DISTINCT pack FROM samples WHERE pack IS NOT NULL")}
        self.close()
        for p in self.folder.glob("pack-*.npy"):
            if p.name not in keep:
                p.unlink()
        log.info("data: decode cache: dropped %d unused entr%s%s", len(dead), "y" if len(dead) == 1 else "ies",
                 f", compacted {in_use} rows into one pack" if moves else "")
        if listed is not None and not moves:  # (rows moved: the next run reads the index)
            _save_listing(snapshot, [r for r in listed if r[5] in live])
        return bool(moves)


LISTING = "listing.npz"  # the files index's rows as decode last left them, a column per field (no pickle)
_NUMBERS, _TEXT = ("size", "mtime", "ino", "row"), ("path", "extra", "key", "pack", "error")


def _save_listing(path: Path, rows: list[tuple]) -> None:
    """The listing's columns: numbers as int64 arrays, text as one NUL-joined UTF-8 blob a column
    (50,000 paths as a numpy str array cost a second each way; a path holds no NUL)."""
    cols = dict(zip(("path", "size", "mtime", "ino", "extra", "key", "pack", "row", "error"), zip(*rows)))
    if not rows:
        return
    failed = [e is not None for e in cols["error"]]
    cols.update(pack=[p or "" for p in cols["pack"]], row=[-1 if r is None else r for r in cols["row"]],
                error=[e or "" for e in cols["error"]])
    arrays = {k: np.asarray(cols[k], np.int64) for k in _NUMBERS}
    arrays.update({k: np.frombuffer("\0".join(cols[k]).encode("utf-8", "surrogateescape"), np.uint8) for k in _TEXT})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, failed=np.asarray(failed, bool), **arrays)


def _load_listing(path: Path) -> list[tuple]:
    with np.load(path, allow_pickle=False) as z:
        c = {k: z[k].tolist() for k in (*_NUMBERS, "failed")}
        c.update({k: z[k].tobytes().decode("utf-8", "surrogateescape").split("\0") for k in _TEXT})
    if len({len(v) for v in c.values()}) != 1:
        raise ValueError(f"{path}: columns of different lengths")
    return [(p, s, m, i, x, k, None if f else pk, None if f else r, e if f else None)
            for p, s, m, i, x, k, pk, r, e, f in zip(c["path"], c["size"], c["mtime"], c["ino"], c["extra"], c["key"],
                                                     c["pack"], c["row"], c["error"], c["failed"])]


def _key(sha: str, extra: Any) -> str:
    return hashlib.sha256(f"{sha}\0{extra!r}".encode()).hexdigest()


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# what forked workers inherit: (read, shape, dtype, catch, reason, store folder)
_JOB: tuple | None = None


def _decode_one(path: str, extra: Any, read: Callable, catch: tuple, reason: Callable):
    """(sample, None) or (None, the reason it is unreadable)."""
    try:
        return (read(Path(path)) if extra is None else read(Path(path), extra)), None
    except catch as e:
        return None, reason(e)


def _work(chunk: list[tuple[int, str, Any]]) -> list[tuple]:
    """Hash and decode ``chunk`` [(i, path, extra)] into one pack; -> [(i, sha, key, pack, row,
    error, decoded)]. A file whose content turns out to be cached (touched, not changed) is
    not decoded."""
    read, shape, dtype, catch, reason, folder = _JOB
    out, rows = [], []
    shas = [_sha(path) for _, path, _ in chunk]
    keys = [_key(sha, extra) for sha, (_, _, extra) in zip(shas, chunk)]
    db = sqlite3.connect(folder / "index.sqlite", timeout=60)  # this process's own: which keys are stored
    try:
        stored = {k for k in keys if db.execute("SELECT 1 FROM samples WHERE key = ?", (k,)).fetchone()}
    finally:
        db.close()
    for (i, path, extra), sha, key in zip(chunk, shas, keys):
        if key in stored:
            out.append((i, sha, key, None, None, None, False))
            continue
        x, err = _decode_one(path, extra, read, catch, reason)
        if err is None:
            rows.append(x)
        out.append((i, sha, key, None, len(rows) - 1 if err is None else None, err, True))
    if rows:
        name = f"pack-{uuid.uuid4().hex}.npy"
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.stack(rows).astype(dtype, copy=False).reshape(len(rows), *shape))
        out = [(i, sha, key, name if row is not None else None, row, err, d) for i, sha, key, _, row, err, d in out]
    return out


def decode(paths: Sequence[os.PathLike | str], read: Callable, shape: tuple[int, ...], dtype,
           settings: dict, extras: Sequence[Any] | None = None, catch: tuple = (Exception,),
           reason: Callable[[Exception], str] = str) -> tuple[Any, np.ndarray, dict[int, str]]:
    """Decode each file with ``read(path)`` (``read(path, extra)`` with ``extras``) -> (x, ok,
    errors): ``x`` the samples of the files that could be read, in order (an ndarray outside
    ``active``, else ``Rows``), ``ok`` a bool mask over ``paths``, ``errors`` {index: reason}
    for the others (``read`` raised one of ``catch``; ``reason`` words it). ``settings``: all
    that decides the decoded sample besides the file's bytes and its extra."""
    shape = tuple(int(v) for v in shape)
    n = len(paths)
    extras = [None] * n if extras is None else list(extras)
    if _ACTIVE is None:
        return _decode_here(paths, read, shape, dtype, extras, catch, reason)
    start = time.perf_counter()
    ctx = _ACTIVE
    settings_hash = sha256_json({"settings": settings, "shape": list(shape), "dtype": np.dtype(dtype).str,
                                 "version": CACHE_VERSION})[:20]
    store = _Store(ctx.folder / settings_hash)
    try:
        listing = store.listing()
        keys: list[str | None] = [None] * n
        known: dict[str, tuple] = {}  # key -> (pack, row, error) of the samples this call uses
        todo: list[tuple[int, str, Any]] = []
        files: list[tuple] = []
        errors: dict[int, str] = {}
        stats: dict[int, os.stat_result] = {}
        isabs, stat = os.path.isabs, os.stat
        for i, (p, extra) in enumerate(zip(paths, extras)):
            p = os.fspath(p)
            p = p if isabs(p) else os.path.abspath(p)
            try:
                st = stat(p)
            except OSError:  # missing: the reader says so in its own words, nothing to cache
                _, err = _decode_one(p, extra, read, catch, reason)
                if err is None:  # gone between the stat and the read, then back
                    raise PassError(f"data: {p} changed while the data stage read it; run it again")
                errors[i] = err
                continue
            have = listing.get(p)
            # unchanged since it was last read (git's index: size, mtime, inode), with the same extra:
            # its key and sample as then, its bytes not read again
            if have is not None and have[1] == st.st_size and have[2] == st.st_mtime_ns and have[3] == st.st_ino \
                    and have[4] == repr(extra):
                keys[i] = k = have[5]
                known[k] = have[6:]
                continue
            stats[i] = st
            todo.append((i, p, extra))
        new_samples: list[tuple] = []
        todo_path = {i: (p, extra) for i, p, extra in todo}
        if todo:
            for i, sha, key, pack, row, err, decoded in _run(todo, read, shape, dtype, catch, reason, store.folder,
                                                              ctx.workers):
                st = stats[i]
                p, extra = todo_path[i]
                files.append((p, st.st_size, st.st_mtime_ns, st.st_ino, sha, repr(extra), key))
                keys[i] = key
                ctx.stats.hashed += 1
                if decoded:
                    ctx.stats.decoded += 1
                    new_samples.append((key, pack, row, err))
                    known[key] = (pack, row, err)
            known.update(store.samples([k for k in {keys[i] for i in todo_path} if k not in known]))
        ctx.stats.cached += sum(1 for i in range(n) if keys[i] is not None) - len(new_samples)
        store.record(files, new_samples)
        if files or not (store.folder / LISTING).is_file():
            listing.update((f[0], (*f[:4], *f[5:], *known[f[6]])) for f in files)
            _save_listing(store.folder / LISTING, list(listing.values()))
        del listing  # (not kept: 50,000 files' rows are some 30 MB)
    finally:
        store.close()
    live = ctx.live.setdefault(settings_hash, set())
    packs: dict[str, int] = {}
    pack_of, row_of, row_keys = [], [], []
    ok = np.zeros(n, bool)
    live.update(k for k in keys if k is not None)
    for i, k in enumerate(keys):
        if k is None:
            continue
        pack, row, err = known[k]
        if err is not None:
            errors[i] = err
            continue
        ok[i] = True
        pack_of.append(packs.setdefault(pack, len(packs)))
        row_of.append(row)
        row_keys.append(f"{settings_hash}:{k}")
    ctx.stats.seconds += time.perf_counter() - start
    rows = Rows(store.folder, list(packs), np.asarray(pack_of, np.int32), np.asarray(row_of, np.int64), shape, dtype,
                np.asarray(row_keys, dtype="S85"))
    return rows, ok, errors


POOL_MIN = 64  # fewer files to decode than this: in this process (forking workers costs more)


def _run(todo, read, shape, dtype, catch, reason, folder: Path, workers: int) -> Iterator[tuple]:
    """_work over ``todo`` in chunks, on ``workers`` forked processes (in this one for a single
    worker, a single chunk or under POOL_MIN files)."""
    global _JOB
    per = max(1, min(CHUNK, -(-len(todo) // (workers * 4))))
    chunks = [todo[i:i + per] for i in range(0, len(todo), per)]
    _JOB = (read, shape, dtype, catch, reason, folder)
    try:
        if workers <= 1 or len(chunks) == 1 or len(todo) < POOL_MIN:
            for c in chunks:
                yield from _work(c)
            return
        with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            for part in pool.imap_unordered(_work, chunks):
                yield from part
    finally:
        _JOB = None


def _decode_here(paths, read, shape, dtype, extras, catch, reason) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    x = np.empty((len(paths), *shape), dtype)
    ok = np.zeros(len(paths), bool)
    errors: dict[int, str] = {}
    n = 0
    for i, (p, extra) in enumerate(zip(paths, extras)):
        sample, err = _decode_one(p, extra, read, catch, reason)
        if err is not None:
            errors[i] = err
            continue
        x[n] = sample
        ok[i] = True
        n += 1
    return x[:n].copy(), ok, errors  # copy: don't keep the over-allocated buffer alive


# --- files that decode to any number of samples (a recording cut into windows) -------------------

EACH = "each-"  # the prefix of decode_each's store folders (their own tables and a pack per file)


class _EachStore:
    """decode_each's folder: a pack per file (its samples, ``pack-<key>.npy``) and
    ``index.sqlite``: key -> (samples, meta JSON, error), path -> (size, mtime_ns, inode, extra,
    key) as ``_Store``'s. Few files, many samples each: no listing snapshot, no repacking."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(folder / "index.sqlite", timeout=60)
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INT, mtime INT, ino INT, extra TEXT, "
            "key TEXT);"
            "CREATE TABLE IF NOT EXISTS recordings (key TEXT PRIMARY KEY, count INT, meta TEXT, error TEXT);")

    def close(self) -> None:
        self.db.close()

    def compact(self, live: set[str]) -> bool:
        """Drop the entries and packs no file of this run used."""
        dead = {k for (k,) in self.db.execute("SELECT key FROM recordings")} - live
        with self.db:
            self.db.executemany("DELETE FROM recordings WHERE key = ?", [(k,) for k in dead])
            self.db.executemany("DELETE FROM files WHERE key = ?", [(k,) for k in dead])
        self.close()
        for p in self.folder.glob("pack-*.npy"):  # (and any a failed run left unrecorded)
            if p.name[5:-4] not in live:
                p.unlink()
        if dead:
            log.info("data: decode cache: dropped %d unused recording(s)", len(dead))
        return False


# what forked workers inherit: (read, shape, dtype, catch, reason, store folder)
_EACH_JOB: tuple | None = None


def _work_each(chunk: list[tuple[int, str, Any]]) -> list[tuple]:
    """Hash and decode ``chunk`` [(i, path, extra)], each file's samples into its own pack;
    -> [(i, key, count, meta JSON, error, decoded)]; a file whose content is stored is not decoded."""
    read, shape, dtype, catch, reason, folder = _EACH_JOB
    out = []
    db = sqlite3.connect(folder / "index.sqlite", timeout=60)
    try:
        for i, path, extra in chunk:
            key = _key(_sha(path), extra)
            have = db.execute("SELECT count, meta, error FROM recordings WHERE key = ?", (key,)).fetchone()
            if have is not None:
                out.append((i, key, *have, False))
                continue
            got, err = _decode_one(path, extra, read, catch, reason)
            if err is not None:
                out.append((i, key, 0, None, err, True))
                continue
            x, meta = got
            x = np.asarray(x).astype(dtype, copy=False).reshape(-1, *shape)
            if len(x):  # (a file that gave no sample has no pack)
                with atomic_path(folder / f"pack-{key}.npy") as tmp, open(tmp, "wb") as f:
                    np.lib.format.write_array(f, x)
            out.append((i, key, len(x), json.dumps(meta), None, True))
    finally:
        db.close()
    return out


def decode_each(paths: Sequence[os.PathLike | str], read: Callable, shape: tuple[int, ...], dtype,
                settings: dict, extras: Sequence[Any] | None = None, catch: tuple = (Exception,),
                reason: Callable[[Exception], str] = str) -> tuple[Any, list[int], list[Any], dict[int, str]]:
    """``decode`` for files that each give any number of samples: ``read(path)`` (``read(path,
    extra)``) -> (samples (k, *shape), meta: what else the file gave, JSON-able: labels, notes)
    -> (x, counts, metas, errors): ``x`` every file's samples in order (an ndarray outside
    ``active``, else ``Rows``, a row's key its file's key and its place in the file), ``counts``
    and ``metas`` per file (0 and None for a file in ``errors``). Cached per file by content as
    ``decode`` is; an exception ``read`` raises outside ``catch`` is raised (nothing cached)."""
    shape = tuple(int(v) for v in shape)
    n = len(paths)
    extras = [None] * n if extras is None else list(extras)
    counts, metas, errors = [0] * n, [None] * n, {}
    if _ACTIVE is None:
        parts = []
        for i, (p, extra) in enumerate(zip(paths, extras)):
            got, err = _decode_one(p, extra, read, catch, reason)
            if err is not None:
                errors[i] = err
                continue
            x, metas[i] = got
            parts.append(np.asarray(x).astype(dtype, copy=False).reshape(-1, *shape))
            counts[i] = len(parts[-1])
        return np.concatenate([np.empty((0, *shape), dtype), *parts]), counts, metas, errors
    start = time.perf_counter()
    ctx = _ACTIVE
    settings_hash = sha256_json({"settings": settings, "shape": list(shape), "dtype": np.dtype(dtype).str,
                                 "version": CACHE_VERSION})[:20]
    name = EACH + settings_hash
    store = _EachStore(ctx.folder / name)
    keys: list[str | None] = [None] * n
    try:
        listing = {r[0]: r for r in store.db.execute(
            "SELECT f.path, f.size, f.mtime, f.ino, f.extra, f.key, r.count, r.meta, r.error "
            "FROM files f JOIN recordings r ON r.key = f.key")}
        todo, stats, got = [], {}, {}
        for i, (p, extra) in enumerate(zip(paths, extras)):
            p = os.path.abspath(os.fspath(p))
            try:
                st = os.stat(p)
            except OSError:
                _, err = _decode_one(p, extra, read, catch, reason)
                if err is None:  # gone between the stat and the read, then back
                    raise PassError(f"data: {p} changed while the data stage read it; run it again")
                errors[i] = err
                continue
            have = listing.get(p)
            if have is not None and have[1:4] == (st.st_size, st.st_mtime_ns, st.st_ino) and have[4] == repr(extra):
                keys[i], got[i] = have[5], have[6:]
                continue
            stats[i] = (p, st, extra)
            todo.append((i, p, extra))
        files, new = [], []
        if todo:
            for i, key, count, meta, err, decoded in _run_each(todo, read, shape, dtype, catch, reason, store.folder,
                                                              ctx.workers):
                p, st, extra = stats[i]
                files.append((p, st.st_size, st.st_mtime_ns, st.st_ino, repr(extra), key))
                keys[i], got[i] = key, (count, meta, err)
                ctx.stats.hashed += 1
                if decoded:
                    ctx.stats.decoded += 1
                    new.append((key, count, meta, err))
        with store.db:
            store.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", files)
            store.db.executemany("INSERT OR REPLACE INTO recordings VALUES (?, ?, ?, ?)", new)
        ctx.stats.cached += len(got) - len(new)
    finally:
        store.close()
    ctx.live.setdefault(name, set()).update(k for k in keys if k is not None)
    packs, pack_of, row_of, row_keys = [], [], [], []
    for i in sorted(got):
        count, meta, err = got[i]
        if err is not None:
            errors[i] = err
            continue
        counts[i], metas[i] = int(count), json.loads(meta)
        if counts[i]:
            pack_of += [len(packs)] * counts[i]
            row_of += range(counts[i])
            row_keys += [f"{settings_hash}:{hashlib.sha256(f'{keys[i]}:{j}'.encode()).hexdigest()}"
                         for j in range(counts[i])]
            packs.append(f"pack-{keys[i]}.npy")
    ctx.stats.seconds += time.perf_counter() - start
    rows = Rows(store.folder, packs, np.asarray(pack_of, np.int32), np.asarray(row_of, np.int64), shape, dtype,
                np.asarray(row_keys, dtype="S85"))
    return rows, counts, metas, errors


def _run_each(todo, read, shape, dtype, catch, reason, folder: Path, workers: int) -> Iterator[tuple]:
    """_work_each over ``todo`` in chunks of a few files, on ``workers`` forked processes (in
    this one for a single worker or a single chunk)."""
    global _EACH_JOB
    per = max(1, min(16, -(-len(todo) // (workers * 4))))
    chunks = [todo[i:i + per] for i in range(0, len(todo), per)]
    _EACH_JOB = (read, shape, dtype, catch, reason, folder)
    try:
        if workers <= 1 or len(chunks) == 1:
            for c in chunks:
                yield from _work_each(c)
            return
        with multiprocessing.get_context("fork").Pool(min(workers, len(chunks))) as pool:
            for part in pool.imap_unordered(_work_each, chunks):
                yield from part
    finally:
        _EACH_JOB = None
