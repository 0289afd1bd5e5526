"""The data stage's split files, written a chunk at a time and read memory-mapped.

A split stays ``data/<split>.npz`` (``x.npy`` and ``y.npy``; every reader of it keeps working
with ``np.load``), but its members are stored uncompressed (ZIP_STORED), so each one is a plain
.npy lying contiguously inside the zip. ``open_split`` memory-maps ``x`` there (``np.memmap``
at the member's offset: numpy's own ``np.load(mmap_mode=)`` ignores mmap_mode for an .npz) and
reads ``y`` (small) into memory; ``write_split`` streams the rows in, chunk by chunk, from
whatever gives them, so neither side holds a whole split.

For the training loop: ``x, y = open_split(data_dir, "train")``; ``x[i:j]`` or ``x[idx]``
reads those rows only (a DataLoader worker can open its own, the file is read-only).

A large training split whose rows come from the decode cache (``write_split``: over two shards' worth,
SHARD_BYTES) is sharded: ``<split>.npz`` then holds ``y``, the shards' names (``shards``) and
row counts (``shard_rows``) and any extra arrays, and each shard ``<split>.shards/<how>.npz``
holds a run of consecutive rows' ``x``. The cuts fall before each row whose cache key (its
file's content) hashes below 1/R (R: the rows of about SHARD_BYTES), plus a forced cut after
4R rows without one: a cut depends on its own row alone, so adding, changing or removing a
file changes only the shard its rows fall in (content-defined chunking, as rsync and restic
cut files), and a rerun writes only the shards whose rows changed (a shard's name is the hash
of its rows' keys and how they were made). ``open_split`` gives a sharded ``x`` as ``Shards``,
an array-like over the shards' memmaps, so the readers do not change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from kiln.artifacts import Layout, atomic_path
from kiln.errors import PassError

log = logging.getLogger("kiln.data")

CHUNK_BYTES = 16 << 20  # rows written per chunk: about this many bytes


def chunk_rows(row_shape, dtype) -> int:
    """Rows of ``row_shape`` / ``dtype`` in one chunk of about CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize))


def _member(zf: zipfile.ZipFile, name: str, shape, dtype):
    """A writable stream of one .npy member (fixed zip timestamps: same data, same sha256),
    its header already written."""
    f = zf.open(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(v) for v in shape)}
    np.lib.format.write_array_header_1_0(f, header)
    return f


def write_npz(path: Path, arrays: dict[str, tuple[tuple, object, Callable[[], Iterable[np.ndarray]]]]) -> None:
    """An uncompressed .npz at ``path`` (atomically): each member ``name`` -> (shape, dtype,
    chunks), ``chunks()`` yielding its rows in order, any number at a time."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, (shape, dtype, chunks) in arrays.items():
            dtype = np.dtype(dtype)
            n = 0
            with _member(zf, f"{name}.npy", shape, dtype) as f:
                for c in chunks():
                    c = np.ascontiguousarray(c, dtype=dtype)
                    f.write(c.tobytes())
                    n += len(c)
            if n != shape[0]:
                raise PassError(f"data: {path}: member {name} got {n} rows, its header says {shape[0]} (a bug)")


def in_chunks(a, rows: int | None = None) -> Callable[[], Iterable[np.ndarray]]:
    """``chunks`` for ``write_npz`` over an array(-like) ``a`` indexed by slices."""
    part = row_chunks(a, rows)
    return lambda: part(0, len(a))


def row_chunks(a, rows: int | None = None) -> Callable[[int, int], Iterable[np.ndarray]]:
    """``rows(lo, hi)`` for ``write_split``: rows lo..hi of ``a`` (indexed by slices), a chunk at a time."""
    step = rows or chunk_rows(a.shape[1:], a.dtype)
    return lambda lo, hi: (np.asarray(a[i:min(i + step, hi)]) for i in range(lo, hi, step))


def shard_bounds(keys, per: int) -> list[int]:
    """[0, cut, ..., n]: where a split of rows with cache ``keys`` is cut into shards of about
    ``per`` rows: before each row whose key hashes below 1/per, and after ``4 * per`` rows
    without such a row (content-defined: a cut depends on its own row's key, so rows added or
    removed elsewhere move no cut; a forced cut moves only within its run)."""
    n, limit = len(keys), 4 * per
    blake = hashlib.blake2b
    h = np.frombuffer(b"".join(blake(bytes(k), digest_size=8).digest() for k in np.asarray(keys).tolist()), "<u8")
    cuts = [0]
    for c in [*np.flatnonzero(h <= np.uint64((2 ** 64 - 1) // per)).tolist(), n]:  # h * per < 2 ** 64
        cuts += range(cuts[-1] + limit, c, limit)  # forced, in a run of over ``limit`` rows without a cut
        if 0 < c < n:
            cuts.append(c)
    return cuts + [n]


def write_split(prev: "Previous", split: str, how: str | None, x: tuple, arrays: dict, keys=None,
                transform: str | None = None) -> None:
    """Write ``<split>.npz`` into ``prev.out_dir`` unless the last run made it the same way
    (``how``). ``x``: (shape, dtype, rows(lo, hi) -> chunks of rows lo..hi); ``arrays``: the
    other members as ``write_npz`` takes them (y, whatever its shape, and any extras), kept
    whole. With each row's cache key (``keys``) and over two shards' worth of rows (about
    SHARD_BYTES each), a training split (SHARDED) is sharded: only the shards whose rows changed are
    written, then the index; shards no longer listed are removed after it."""
    shape, dtype, rows = x
    dtype = np.dtype(dtype)
    n, name = int(shape[0]), f"{split}.npz"
    per = max(1, SHARD_BYTES // max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize))
    folder = prev.out_dir / SHARDS.format(split)
    names: list[str] = []
    if split not in SHARDED or keys is None or how is None or n <= 2 * per:  # one file, x and y together
        if not prev.unchanged(name, how):
            log.info("data: writing %s: %d samples", name, n)
            write_npz(prev.out_dir / name, {"x": (shape, dtype, lambda: rows(0, n)), **arrays})
            prev.wrote(name, how, transform, keys)
        else:
            log.info("data: %s unchanged since the last run, kept", name)
    else:
        bounds = shard_bounds(keys, per)
        written = 0
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            made = fingerprint("shard", transform, dtype.str, tuple(shape[1:]), np.asarray(keys[lo:hi]))
            shard = f"{folder.name}/{made[:32]}.npz"
            if not prev.unchanged(shard, made):
                part = ((hi - lo, *shape[1:]), dtype, lambda lo=lo, hi=hi: rows(lo, hi))
                write_npz(prev.out_dir / shard, {"x": part})
                prev.wrote(shard, made)
                written += 1
            names.append(shard)
        how = fingerprint(how, names)
        if not prev.unchanged(name, how):
            listed = np.asarray(names)
            write_npz(prev.out_dir / name, {**arrays, "shards": (listed.shape, listed.dtype, lambda: [listed]),
                                            "shard_rows": ((len(names),), np.int64, lambda: [np.diff(bounds)])})
            prev.wrote(name, how, transform, keys)
        log.info("data: %s: %d samples in %d shard(s), %d written, the others kept", name, n, len(names), written)
    if folder.is_dir():  # the shards of the last run that this one no longer lists
        keep = {Path(s).name for s in names}
        for f in folder.glob("*.npz"):
            if f.name not in keep:
                f.unlink()
        if not keep:
            with contextlib.suppress(OSError):  # a writer's leftover temporary file: kept
                folder.rmdir()


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored member's bytes begin: after its local header (30 bytes, the name, an
    extra field whose length may differ from the central directory's)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise ValueError(f"member {info.filename}: no local header at {info.header_offset}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def memmap_member(path: str | Path, name: str, mode: str = "r"):
    """Member ``name`` ("x") of the .npz at ``path`` memory-mapped (``mode`` "r": read-only;
    "c": copy-on-write, writes stay in this process), or read into memory where it cannot be
    (a compressed member)."""
    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            with zf.open(info) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
    start = _data_offset(path, info)
    with open(path, "rb") as f:
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"member {name}: .npy version {version}")
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"member {name}: a Fortran-order or object array cannot be memory-mapped")
    if int(np.prod(shape, dtype=np.int64)) == 0:
        return np.empty(shape, dtype)
    return np.memmap(path, dtype=dtype, mode=mode, offset=offset, shape=shape)


SHARD_BYTES = 16 << 20  # a shard's x holds about this many bytes (on average: the cuts are content-defined)
SHARDS = "{}.shards"  # the folder of a sharded split's shard files, beside <split>.npz
# the splits that may be sharded: those training streams through open_split (val and test are
# read whole, by np.load, in compress, export and validate; and they change only when a new group
# draws them)
SHARDED = ("train", Layout.RAW_TRAIN)


class Shards:
    """A sharded split's x: the shards' memmaps read as one array-like (``len``, ``shape``,
    ``dtype``; ``x[i]``, ``x[i:j]``, ``x[index array or mask]`` give an ndarray read from the
    shards holding those rows; ``np.asarray(x)`` reads it all)."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rest = ()
        if isinstance(index, tuple):
            index, rest = index[0], index[1:]
        if isinstance(index, (int, np.integer)):
            i = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"index {index} is out of bounds for a split of {len(self)} samples")
            s = int(np.searchsorted(self.starts, i, "right")) - 1
            row = np.asarray(self.parts[s][i - self.starts[s]])
            return row[rest] if rest else row
        idx = np.arange(len(self))[index]  # a slice, an index array or a boolean mask -> row numbers
        out = np.empty((len(idx), *self.shape[1:]), self.dtype)
        shard = np.searchsorted(self.starts, idx, "right") - 1
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            out[at] = self.parts[s][idx[at] - self.starts[s]]
        return out[(slice(None), *rest)] if rest else out

    def __iter__(self):
        for p in self.parts:
            yield from (np.asarray(r) for r in p)

    def __array__(self, dtype=None, copy=None):
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def open_x(data_dir: str | Path, split: str, mode: str = "r"):
    """``x`` of ``data/<split>.npz``: its memmap, or ``Shards`` over its shards' memmaps."""
    path = Layout.split_file(data_dir, split)
    with zipfile.ZipFile(path) as zf:
        sharded = "x.npy" not in zf.namelist()
    if not sharded:
        return memmap_member(path, "x", mode)
    with np.load(path) as z:
        names, rows = z["shards"].tolist(), z["shard_rows"]
    parts = [memmap_member(Path(data_dir) / n, "x", mode) for n in names]
    got = [len(p) for p in parts]
    if got != rows.tolist():
        raise ValueError(f"its shards hold {got} rows, the index says {rows.tolist()}")
    return Shards(parts)


def open_split(data_dir: str | Path, split: str, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``data/<split>.npz``: x memory-mapped (np.memmap, an ndarray subclass, or
    ``Shards`` of a sharded split; rows are read when indexed; ``mode`` as ``memmap_member``'s),
    y (the labels) in memory."""
    path = Layout.split_file(data_dir, split)
    try:
        x = open_x(data_dir, split, mode)
        with np.load(path) as z:
            y = z["y"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise PassError(f"{path}: cannot read the {split} split ({e}); rerun the data task") from e
    if len(x) != len(y):
        raise PassError(f"{path}: the {split} split has {len(x)} samples but {len(y)} labels; rerun the data task")
    return x, y


class Previous:
    """What the data stage's last run wrote, so that a rerun writes only what changed: per
    output file, a fingerprint of how it was made (``how``: its rows' cache keys, labels and
    transform), its stat and sha256 (``<cache>/outputs.json``), and for a split file its rows'
    keys (``<cache>/rows-<file>.npy``). A file made the same way and untouched since is kept
    as it is; a split file's rows made by the same transform (``transform``: the front end's
    settings and tensors) are copied from it instead of computed again."""

    def __init__(self, out_dir: Path, cache_dir: Path):
        self.out_dir, self.cache_dir = Path(out_dir), Path(cache_dir)
        self.record_path = self.cache_dir / "outputs.json"
        try:
            self.old = json.loads(self.record_path.read_text())
        except (OSError, ValueError):
            self.old = {}
        self.new: dict[str, dict] = {}

    def _intact(self, name: str) -> dict | None:
        r = self.old.get(name)
        try:
            st = os.stat(self.out_dir / name)
        except OSError:
            return None
        return r if r and r["stat"] == [st.st_size, st.st_mtime_ns, st.st_ino] else None

    def unchanged(self, name: str, how: str | None) -> bool:
        """True (and recorded again) when ``name`` was made by ``how`` and is untouched since."""
        r = self._intact(name) if how is not None else None
        if r is None or r["how"] != how:
            return False
        self.new[name] = r
        return True

    def rows(self, name: str, transform: str) -> tuple[Callable, dict[bytes, int]] | None:
        """(open: a fresh memmap of the old file's ``x``, {row key: row}) when ``name``'s rows
        were made by ``transform``; else None."""
        r = self._intact(name)
        if r is None or r.get("transform") != transform or not r.get("keys"):
            return None
        split = name[:-len(".npz")]
        try:
            keys = np.load(self.cache_dir / r["keys"])
            open_x(self.out_dir, split).shape  # readable
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        return (lambda: open_x(self.out_dir, split)), {k: i for i, k in enumerate(keys.tolist())}

    def wrote(self, name: str, how: str | None, transform: str | None = None, keys: np.ndarray | None = None) -> None:
        from kiln.artifacts import sha256_file

        path = self.out_dir / name
        st = os.stat(path)
        rec = {"how": how, "stat": [st.st_size, st.st_mtime_ns, st.st_ino], "sha256": sha256_file(path),
               "transform": transform, "keys": None}
        if keys is not None and transform is not None:
            rec["keys"] = f"rows-{name}.npy"
            with atomic_path(self.cache_dir / rec["keys"]) as tmp, open(tmp, "wb") as f:
                np.save(f, keys)
        self.new[name] = rec

    def sha256(self, name: str) -> str:
        return self.new[name]["sha256"]

    def shards(self) -> list[str]:
        """The shard files this run wrote or kept (``<split>.shards/<name>.npz``)."""
        return sorted(n for n in self.new if "/" in n)

    def save(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.record_path) as tmp:
            Path(tmp).write_text(json.dumps(self.new))


def fingerprint(*parts) -> str:
    """sha256 over ``parts`` (arrays by their bytes, dtype and shape; anything else by repr)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(f"{p.dtype.str}{p.shape}".encode())
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()
