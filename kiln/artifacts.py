"""Build layout, atomic writes and content hashes.

Every output is written to a temporary file in the same directory and renamed into place, so a
crash never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
_UMASK = os.umask(0)
os.umask(_UMASK)


def build_root() -> Path:
    """The build directory: ``$KILN_BUILD`` or ``<repo>/build``."""
    return Path(os.environ.get("KILN_BUILD", ROOT / "build")).resolve()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual mode
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def tree_fingerprint(root: str | os.PathLike) -> str:
    """Hash of every file's relative path, size and mtime under ``root`` ('' if absent).

    Cheap enough for tens of thousands of images, and it changes when a file is added,
    removed or rewritten, which is what an incremental data task needs to know. Symlinks are
    followed as the formats' loaders follow them (a class folder that is a link to another
    folder: its files count, under the link's name, and so does where it points); a link to a
    folder it is inside of (a loop) is hashed by its target, not walked, so it cannot hang.
    """
    root = Path(root)
    if root.is_file():  # a data set that is one file (e.g. digits.csv.gz)
        st = root.stat()
        return hashlib.sha256(f"{root.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    if not root.is_dir():
        return ""
    return hashlib.sha256("\n".join(row for _, row in _tree_rows(root)).encode()).hexdigest()


def tree_files(root: str | os.PathLike) -> list[str]:
    """The files ``tree_fingerprint`` hashes: paths relative to ``root`` (links followed)."""
    return [rel for rel, row in _tree_rows(Path(root)) if rel is not None]


def _tree_rows(root: Path) -> Iterator[tuple[str | None, str]]:
    """(relative path of a file or None, its fingerprint row), depth first, a folder's files
    (sorted) before its subfolders (sorted): for a tree without links, the rows (and so the
    fingerprint) that os.walk gave before links were followed."""
    # (path, relative path, is a link, the (device, inode) of the folders above it)
    stack: list[tuple[str, str, bool, frozenset]] = [(str(root), "", False, frozenset())]
    while stack:
        path, rel, link, above = stack.pop()
        try:
            st = os.stat(path)
            if link:
                yield None, f"{rel}\0-> {os.path.realpath(path)}"
            key = (st.st_dev, st.st_ino)
            if key in above:  # a link to a folder this one is inside of: a loop
                yield None, f"{rel}\0loop"
                continue
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:  # unlistable, or gone since it was listed
            yield None, f"{rel}\0unreadable {e.errno}"
            continue
        subdirs = []
        for e in entries:
            name = os.path.join(rel, e.name)
            try:
                is_dir = e.is_dir()  # follows a link
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append((e.path, name, e.is_symlink(), above | {key}))
                continue
            try:
                fst = os.stat(e.path)
            except OSError as err:  # a dangling link (the loaders skip it): still part of the tree
                yield None, f"{name}\0broken {err.errno}"
                continue
            yield name, f"{name}\0{fst.st_size}\0{fst.st_mtime_ns}"
        stack.extend(reversed(subdirs))


class Layout:
    """Where every artifact of one app lives under the build directory: each file name is
    spelled here and nowhere else.

    build/<app>/synthetic/              a synthetic data set (.kiln-synthetic.json says what made it)
    build/<app>/data/                   the data stage's outputs: train/val/test.npz, test_inputs.bin,
                                        test_labels.json, data.json (+ front_end.json, raw.npz,
                                        raw_train.npz when training augments raw samples)
    build/<app>/                        model.pt, metrics.json, compressed.pt, compress.json,
                                        model.onnx, export.json (+ front_end.onnx)
    build/<app>/type/<board type>/      per board type: tune.json, model.so, compile.json (+ front_end.so)
    build/<app>/runs/<run id>/<inst>/   what one deploy saw on one board instance: run.json, result.json
    build/<app>/runs/<run id>/report.json   that run's report
    build/<app>/last/<inst>.json        the last run on each instance (the hil task's doit target)
    build/<app>/report.json             the last report (the deploy task's doit target)
    """

    # names within a folder, for code that is handed the folder rather than a Layout (the data
    # stage writes into, and the ONNX export reads from, whatever data folder it is given)
    SYNTHETIC_MARKER = ".kiln-synthetic.json"  # in a synthetic tree: what generated it, with which params
    SPLITS = ("train", "val", "test")  # data/<split>.npz
    TEST_INPUTS = "test_inputs.bin"  # the boards' inputs, raw
    TEST_LABELS = "test_labels.json"
    DATA_JSON = "data.json"  # the data stage's record, written last
    FRONT_END_JSON = "front_end.json"  # the front end's fitted settings
    RAW_NPZ = "raw.npz"  # the raw val/test samples a front end's library reads
    # the raw training samples (x, y; audio: the background noise too), kept only when training
    # augments raw samples before the front end (kiln.schema.datasets.raw_augmented)
    RAW_TRAIN = "raw_train"  # a split name: data/raw_train.npz

    def __init__(self, app: str):
        self.app = app
        self.root = build_root() / app
        self.synthetic = self.root / "synthetic"
        self.data = self.root / "data"
        self.model_pt = self.root / "model.pt"
        self.metrics = self.root / "metrics.json"
        self.compressed_pt = self.root / "compressed.pt"
        self.compress_json = self.root / "compress.json"
        self.onnx = self.root / "model.onnx"
        self.export_json = self.root / "export.json"
        self.front_end_onnx = self.root / "front_end.onnx"
        self.report = self.root / "report.json"

    # the data stage's outputs
    @staticmethod
    def split_file(data_dir: str | os.PathLike, split: str) -> Path:
        """``<data_dir>/<split>.npz`` (train, val, test)."""
        return Path(data_dir) / f"{split}.npz"

    def split(self, split: str) -> Path:
        return self.split_file(self.data, split)

    @property
    def test_inputs(self) -> Path:
        return self.data / self.TEST_INPUTS

    @property
    def test_labels(self) -> Path:
        return self.data / self.TEST_LABELS

    @property
    def data_json(self) -> Path:
        return self.data / self.DATA_JSON

    @property
    def front_end_json(self) -> Path:
        return self.data / self.FRONT_END_JSON

    @property
    def raw_npz(self) -> Path:
        return self.data / self.RAW_NPZ

    @property
    def raw_train_npz(self) -> Path:
        return self.split_file(self.data, self.RAW_TRAIN)

    @classmethod
    def data_files(cls, front_end: bool, raw_train: bool = False) -> list[str]:
        """The data stage's outputs, named within its folder, its record (data.json) among them."""
        return [*(f"{s}.npz" for s in cls.SPLITS), cls.TEST_INPUTS, cls.TEST_LABELS, cls.DATA_JSON,
                *((cls.FRONT_END_JSON, cls.RAW_NPZ) if front_end else ()),
                *((f"{cls.RAW_TRAIN}.npz",) if front_end and raw_train else ())]

    # per board type
    def board_type(self, board_type: str) -> Path:
        return self.root / "type" / board_type

    def library(self, board_type: str) -> Path:
        return self.board_type(board_type) / "model.so"

    def front_end_library(self, board_type: str) -> Path:
        """The front end's own library, built by the compile stage next to the model's."""
        return self.board_type(board_type) / "front_end.so"

    def front_end_compile_json(self, board_type: str) -> Path:
        return self.board_type(board_type) / "front_end.compile.json"

    def compile_json(self, board_type: str) -> Path:
        return self.board_type(board_type) / "compile.json"

    def tune_json(self, board_type: str) -> Path:
        return self.board_type(board_type) / "tune.json"

    # per run and instance
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def run_json(self, run_id: str, instance: str) -> Path:
        return self.run_dir(run_id) / instance / "run.json"

    def result(self, run_id: str, instance: str) -> Path:
        return self.run_dir(run_id) / instance / "result.json"

    def run_report(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "report.json"

    def last_run(self, instance: str) -> Path:
        """The hil task's target: a copy of the last run.json on ``instance``, with its run id."""
        return self.root / "last" / f"{instance}.json"


def new_run_id() -> str:
    """A run id: ``$KILN_RUN_ID``, else UTC time and pid (two runs at once never share one)."""
    import time

    return os.environ.get("KILN_RUN_ID") or time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{os.getpid()}"


def tuning_root() -> Path:
    """MetaSchedule tuning databases, one per board type and target, shared by every app."""
    return build_root() / "tune"


def runner_dir(arch: str) -> Path:
    return build_root() / "runner" / arch


RUNNER = "kiln-runner"  # the on-board runner's file name, in its bundle and on the board
RUNNER_JSON = "runner.json"  # the bundle's record: each file's sha256


def runner_file(arch: str) -> Path:
    return runner_dir(arch) / RUNNER


def runner_json(arch: str) -> Path:
    return runner_dir(arch) / RUNNER_JSON


def runtime_cache() -> Path:
    """Downloaded board runtimes: ``$KILN_CACHE`` or ``<repo>/build/cache``, shared by every
    build directory (tests build elsewhere but reuse the ~100 MB aarch64 wheel)."""
    return Path(os.environ.get("KILN_CACHE", ROOT / "build" / "cache")).resolve()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the ``with`` block, between
    processes; the kernel drops it if the holder dies. SQLite answers "database is locked" at
    once, whatever its busy timeout, when two processes create one file and switch it to WAL
    together: its users open it under this lock."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
