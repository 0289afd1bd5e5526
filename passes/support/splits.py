"""The data stage's split files, written a chunk at a time and read memory-mapped.

A split stays ``data/<split>.npz`` (``x.npy`` and ``y.npy``; every reader of it keeps working
with ``np.load``), but its members are stored uncompressed (ZIP_STORED), so each one is a plain
.npy lying contiguously inside the zip. ``open_split`` memory-maps ``x`` there (``np.memmap``
at the member's offset: numpy's own ``np.load(mmap_mode=)`` ignores mmap_mode for an .npz) and
reads ``y`` (small) into memory; ``write_split`` streams the rows in, chunk by chunk, from
whatever gives them, so neither side holds a whole split.

For the training loop: ``x, y = open_split(data_dir, "train")``; ``x[i:j]`` or ``x[idx]``
reads those rows only (a DataLoader worker can open its own, the file is read-only).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from kiln.artifacts import Layout, atomic_path
from kiln.errors import PassError

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
    step = rows or chunk_rows(a.shape[1:], a.dtype)
    return lambda: (np.asarray(a[i:i + step]) for i in range(0, len(a), step))


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


def open_split(data_dir: str | Path, split: str, mode: str = "r") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of ``data/<split>.npz``: x memory-mapped (np.memmap, an ndarray subclass; rows
    are read when indexed; ``mode`` as ``memmap_member``'s), y an int64 array in memory."""
    path = Layout.split_file(data_dir, split)
    try:
        x = memmap_member(path, "x", mode)
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
        try:
            keys = np.load(self.cache_dir / r["keys"])
            memmap_member(self.out_dir / name, "x").shape  # readable
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        return (lambda: memmap_member(self.out_dir / name, "x")), {k: i for i, k in enumerate(keys.tolist())}

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
