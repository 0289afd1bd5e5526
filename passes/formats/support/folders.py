"""What the class-folder formats share (image_folders, audio_folders): finding the data,
scanning ``<root>/<class>/<file>`` or ``<root>/{train,val,test}/<class>/<file>``, the class
list, reporting what is skipped, the ``Loaded`` they return, and writing a synthetic tree.

The rules, the same for every folder format:

* classes are the class folders' names, sorted, unless the manifest lists them (the list fixes
  the output order); with train/ val/ test/ they are read from train/;
* a file that is not data (another extension, a ``.DS_Store``) or a folder inside a class
  folder is reported and skipped; so is a file the format cannot read (its loader says why);
* a class folder without data files, a data set of one class, a listed class without a folder,
  a class in val/ or test/ that train/ lacks, and a mix of split and class folders are errors
  naming the folder or field.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kiln.artifacts import ROOT, read_json
from kiln.errors import ManifestError, PassError
from passes.formats import MARKER, Loaded, synthetic_or_refuse, write_tree  # noqa: F401 (write_tree: the formats' writer)
from passes.support import decode_cache

log = logging.getLogger("kiln.data")

SPLITS = ("train", "val", "test")
EXAMPLES = 5  # skipped files named in the log and the report


@dataclass
class Scan:
    """The files of a class-folder tree: per split, (file, class index) sorted by class then name.

    ``splits`` always has "train" (everything, without split folders); "val"/"test" only when the
    tree has those folders. ``skipped`` holds "path: reason" of files that are not data."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # class folders not in dataset.classes


def resolve(path: str) -> Path:
    """``dataset.path``, relative paths against the repository root."""
    p = Path(path)
    return p if p.is_absolute() else ROOT / p


def _subdirs(d: Path) -> list[Path]:
    """The folders in ``d``, sorted by name; hidden ones (.git, .ipynb_checkpoints) are not classes."""
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _is_data(p: Path, exts: tuple[str, ...]) -> bool:
    return p.is_file() and p.suffix.lower() in exts


def split_dirs(root: Path) -> dict[str, Path] | None:
    """{split: folder} when ``root`` holds train/ (val/, test/) above its class folders, else None
    (``root`` holds the class folders). A mix of both is ambiguous: a PassError."""
    names = [d.name for d in _subdirs(root)]
    present = [n for n in names if n in SPLITS]
    if not present:
        return None
    others = [n for n in names if n not in SPLITS]
    if "train" not in present:
        if others:  # a class named "test" among class folders: the tree has no split folders
            return None
        raise PassError(f"data: {root} holds {'/ '.join(present)}/ but no train/ folder; expected "
                        f"<root>/<class>/... or <root>/train/<class>/... (val/ and test/ optional)")
    if others:
        raise PassError(f"data: {root} mixes split folders ({', '.join(present)}) with other folders "
                        f"({', '.join(others[:5])}); put every class folder under train/ (val/, test/)")
    return {n: root / n for n in SPLITS if n in present}


def has_data(root: Path, exts: tuple[str, ...]) -> bool:
    """True when ``root`` holds at least one data file in a class folder (cheap: stops at the
    first). Used by ``locate`` to tell a team's data from a path that is not there yet."""
    if not root.is_dir():
        return False
    try:
        splits = split_dirs(root)
    except PassError:
        return True  # something is there: let load say what is wrong with it
    for top in (splits or {"train": root}).values():
        for d in _subdirs(top):
            if any(_is_data(p, exts) for p in d.iterdir()):
                return True
    return False


def locate(ds, layout, exts: tuple[str, ...], what: str) -> tuple[Path, bool]:
    """(``dataset.path``, False) when it holds data, else (the synthetic tree, True) when
    ``dataset.synthetic`` is set, else a ManifestError naming ``dataset.path``."""
    path = resolve(ds.path)
    if has_data(path, exts):
        return path, False
    return synthetic_or_refuse(ds, path, layout, f"holds no {what} in class folders (expected <path>/<class>/*"
                               f"{'|*'.join(exts)} or <path>/train/<class>/...)")


def infer_classes(root: Path) -> list[str]:
    """The class folders' names, sorted (from train/ when the tree has split folders)."""
    splits = split_dirs(root)
    top = splits["train"] if splits else root
    return [d.name for d in _subdirs(top)]


def infer(ds, root: Path, exts: tuple[str, ...], what: str, synthetic_names: Callable[[int], list[str]]) -> dict:
    """{"classes": [...]}: the folders' names (sorted) when ``root`` holds data, else the
    generator's names when the data will be synthesized there, sorted too: the order ``load``
    reads them in once they are folders."""
    root = Path(root)
    if not has_data(root, exts):
        synthetic_or_refuse(ds, root, None, f"holds no {what} to read the classes from")
        return {"classes": sorted(synthetic_names(ds.synthetic.classes))}
    names = infer_classes(root)
    if len(names) < 2:
        raise ManifestError(f"field 'dataset.classes': {root} holds {len(names)} class folder(s) "
                            f"({', '.join(names) or 'none'}); a classifier needs at least two")
    return {"classes": names}


def _scan_split(top: Path, split: str, classes: list[str], exts: tuple[str, ...], scan: Scan,
                listed: bool) -> list[tuple[Path, int]]:
    index = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    for d in _subdirs(top):
        if d.name not in index:
            if listed or split == "train":
                scan.ignored.append(str(d))
                continue
            raise PassError(f"data: {d}: class {d.name!r} is in {split}/ but not in train/ "
                            f"(classes: {', '.join(classes)})")
        found = 0
        for p in sorted(d.iterdir(), key=lambda p: p.name):
            if _is_data(p, exts):
                files.append((p, index[d.name]))
                found += 1
            else:
                kind = "a folder" if p.is_dir() else f"not a {'/'.join(exts)} file"
                scan.skipped.append(f"{p}: {kind}")
        if not found:
            raise PassError(f"data: class folder {d} holds no {'/'.join(exts)} files (an empty class)")
    for p in sorted(top.iterdir(), key=lambda p: p.name):
        if p.is_file() and p.name != MARKER:
            scan.skipped.append(f"{p}: not in a class folder")
    return sorted(files, key=lambda f: (f[1], f[0].name))


def scan(root: Path, listed: list[str] | None, exts: tuple[str, ...]) -> Scan:
    """Scan a class-folder tree. ``listed``: the manifest's ``classes`` (fixes the order), or None
    (the folders' names, sorted). Raises PassError for the errors in this module's docstring."""
    root = Path(root)
    if not root.is_dir():
        raise PassError(f"data: {root} is not a folder; expected <root>/<class>/... class folders")
    splits = split_dirs(root) or {"train": root}
    top = splits["train"]
    found = [d.name for d in _subdirs(top)]
    if listed:
        missing = [c for c in listed if c not in found]
        if missing:
            raise PassError(f"data: field 'dataset.classes': class {missing[0]!r} has no folder {top / missing[0]} "
                            f"(folders: {', '.join(found) or 'none'})")
        classes = list(listed)
    else:
        classes = found
    if len(classes) < 2:
        raise PassError(f"data: {top} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}); "
                        "a classifier needs at least two classes")
    result = Scan(root, classes, {})
    for split, d in splits.items():
        result.splits[split] = _scan_split(d, split, classes, exts, result, bool(listed))
    if result.ignored:
        log.warning("data: ignoring %d folder(s) not in dataset.classes: %s", len(result.ignored),
                    "; ".join(result.ignored[:EXAMPLES]))
    return result


def load_files(files: list[tuple[Path, int]], read: Callable[[Path], np.ndarray], shape: tuple[int, ...],
               dtype, skipped: list[str], kept: list[Path] | None = None,
               settings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read each file with ``read`` (which raises ``Unreadable`` with the reason) into one
    (N, *shape) array and int64 labels; unreadable files go to ``skipped``, the files read (in
    sample order) to ``kept``. Through the decode cache (passes/support/decode_cache.py, when
    the data stage has one open; ``settings``: all that decides a decoded sample besides the
    file's bytes) the samples are the cache's Rows, decoded on every core."""
    paths = [p for p, _ in files]
    x, ok, errors = decode_cache.decode(paths, read, shape, dtype, settings or {"read": repr(read)},
                                        catch=(Unreadable,))
    skipped += [f"{paths[i]}: {e}" for i, e in sorted(errors.items())]
    if kept is not None:
        kept += [p for p, good in zip(paths, ok) if good]
    return x, np.asarray([label for (_, label), good in zip(files, ok) if good], np.int64)


class Unreadable(Exception):
    """A file a format cannot read (corrupt, or not in the manifest's sample rate/channels/width):
    reported and skipped, never raised to the user."""


def check_classes(scan_: Scan, y: np.ndarray, split: str) -> None:
    """Every class keeps a readable training sample: one whose files are all unreadable is an error."""
    counts = np.bincount(y, minlength=len(scan_.classes))
    empty = [c for c, n in zip(scan_.classes, counts) if n == 0]
    if split == "train" and empty:
        raise PassError(f"data: none of the files of class {empty[0]!r} under {scan_.root} could be read "
                        f"(see the skipped files above)")


def load_tree(ds, root: Path, exts: tuple[str, ...], read: Callable[[Path], np.ndarray], dtype,
              fmt: str, group_by: str = "file", settings: dict | None = None) -> Loaded:
    """Scan and read a class-folder tree into a ``Loaded``: per split (N, *ds.raw_shape()) of
    ``dtype`` and int64 labels in class order, and each sample's file (``group_by``: the
    format's default grouping of them); what was skipped is logged and reported. ``settings``:
    what decides a decoded sample besides its file (the decode cache's key)."""
    root = Path(root)
    sc = scan(root, ds.classes, exts)
    shape = tuple(ds.raw_shape())
    arrays, sources = {}, {}
    for split, files in sc.splits.items():
        kept: list[Path] = []
        arrays[split] = load_files(files, read, shape, dtype, sc.skipped, kept, {"format": fmt, **(settings or {})})
        sources[split] = [p.relative_to(root).as_posix() for p in kept]
        check_classes(sc, arrays[split][1], split)
        if split != "train" and not len(arrays[split][1]):
            raise PassError(f"data: {root / split} holds no readable files")
    if sc.skipped:
        log.warning("data: skipped %d file(s) under %s, first: %s", len(sc.skipped), root,
                    "; ".join(sc.skipped[:EXAMPLES]))
    n = sum(len(a[1]) for a in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "skipped": len(sc.skipped),
              "skipped_examples": sc.skipped[:EXAMPLES], "ignored_folders": sc.ignored[:EXAMPLES],
              "splits": {s: len(a[1]) for s, a in arrays.items()}}
    marker = root / MARKER
    source = {"format": fmt, "num_classes": len(sc.classes), "channels": ds.channels, "classes": sc.classes,
              "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "test/ folder" if "test" in arrays else "split of the class folders"}
    log.info("data: loaded %s from %s", ", ".join(f"{len(a[1])} {s}" for s, a in arrays.items()), root)
    return Loaded(arrays["train"], arrays.get("test"), report, source, arrays.get("val"), sources, group_by)




def write_class_tree(dest: Path, marker: dict, names: list[str], syn, write: Callable) -> dict:
    """A synthetic ``<dest>/{train,test}/<class>/`` tree: ``write(folder, k, name, i, rng)``
    writes sample ``i`` of class ``k``; ``syn.per_class`` / ``test_per_class`` samples per class,
    train and test each from their own seeded stream per class (deterministic bytes)."""

    def fill(tmp: Path) -> int:
        count = 0
        for split, n, stream in (("train", syn.per_class, 1), ("test", syn.test_per_class, 2)):
            for k, name in enumerate(names):
                d = tmp / split / name
                d.mkdir(parents=True)
                rng = np.random.default_rng([syn.seed, stream, k])
                for i in range(n):
                    write(d, k, name, i, rng)
                    count += 1
        return count

    return write_tree(dest, marker, fill)
