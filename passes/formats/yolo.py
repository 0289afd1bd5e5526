"""Dataset format ``yolo``: YOLO txt labels as Ultralytics, Roboflow and labelImg write them.

Layouts (``dataset.path``):

* ``images/`` + ``labels/``: the label of ``images/<sub>/<name>.<ext>`` is
  ``labels/<sub>/<name>.txt``; with ``train/``, ``val/`` (or ``valid/``) and ``test/`` folders
  below both, those are the splits as shipped;
* ``{train,valid,val,test}/images/`` + ``.../labels/`` (Roboflow's export).

A label file holds a line per object, ``class cx cy w h``: the class index and the box's centre
and size as fractions of the image. An image without a label file, or with an empty one, holds
no object (Ultralytics' convention; the count is reported). Class names: ``dataset.classes``,
else ``classes.txt`` (a name per line, in the root or in labels/, as labelImg writes it), else
``names`` in ``data.yaml`` (a list, or index -> name). A line that is not five numbers (a
segmentation polygon), a class index outside the names, or a box off the image is a PassError
naming the file and line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from kiln.artifacts import read_json
from kiln.errors import ManifestError, PassError
from passes.formats import MARKER, Loaded, synthetic_or_refuse, write_tree
from passes.formats.support import boxes, detection_synth
from passes.formats.support.boxes import EXTS, Obj, Scene, class_index, fail, number

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "test": "test"}
NAME_FILES = ("classes.txt", "labels/classes.txt", "data.yaml", "dataset.yaml")


def split_dirs(root: Path) -> dict[str, tuple[Path, Path]] | None:
    """{split: (images folder, labels folder)} of the layouts above, or None when ``root``
    holds neither."""
    root = Path(root)
    if (root / "images").is_dir() and (root / "labels").is_dir():
        subs = {SPLIT_NAMES[d.name]: d.name for d in (root / "images").iterdir() if d.is_dir() and d.name in SPLIT_NAMES}
        if "train" in subs:
            return {s: (root / "images" / d, root / "labels" / d) for s, d in subs.items()}
        return {"train": (root / "images", root / "labels")}
    out = {SPLIT_NAMES[d]: (root / d / "images", root / d / "labels") for d in SPLIT_NAMES
           if (root / d / "images").is_dir() and (root / d / "labels").is_dir()}
    return out if "train" in out else None


def locate(ds, layout) -> tuple[Path, bool]:
    return boxes.locate(ds, layout, "yolo", lambda p: split_dirs(p) is not None)


def read_names(root: Path) -> tuple[list[str], Path] | None:
    """(class names, the file they were read from), or None when the tree names none."""
    for rel in NAME_FILES:
        path = Path(root) / rel
        if not path.is_file():
            continue
        try:
            if path.suffix == ".txt":
                return [s.strip() for s in path.read_text(encoding="utf-8-sig").splitlines() if s.strip()], path
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise PassError(f"data: {path}: cannot read the class names: {e}") from e
        names = doc.get("names") if isinstance(doc, dict) else None
        if isinstance(names, dict):  # index -> name
            try:
                names = [str(names[k]) for k in sorted(names, key=int)]
            except (TypeError, ValueError) as e:
                raise PassError(f"data: {path}: names: the keys must be class indices 0, 1, ...") from e
        if isinstance(names, list) and names:
            return [str(n) for n in names], path
        raise PassError(f"data: {path}: no 'names' list (the class names, in index order)")
    return None


def infer(ds, root: Path) -> dict:
    root = Path(root)
    if split_dirs(root) is None:  # the synthetic tree is not there yet: its own names
        synthetic_or_refuse(ds, root, None, "holds no yolo data set to read the classes from")
        return {"classes": detection_synth.names_and_ids(ds)[0]}
    found = read_names(root)
    if found is None:
        raise ManifestError(f"field 'dataset.classes': {root} names no classes (no {', '.join(NAME_FILES)}); "
                            "list them in dataset.classes, in class index order")
    return {"classes": found[0]}


def read_label(path: Path, names: list[str]) -> list[Obj]:
    """One label file's objects; a bad line is a PassError naming it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(str(path), f"cannot read the label file: {e}") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        cells = line.split()
        if not cells:
            continue
        where = f"{path}:{n}"
        if len(cells) != 5:
            raise fail(where, f"{line.strip()!r}: expected 'class cx cy w h' (5 fields, got {len(cells)}"
                       + ("; a segmentation polygon? Kiln reads boxes" if len(cells) > 5 and len(cells) % 2 else "")
                       + ")")
        k = class_index(where, cells[0], names, by_name=False)
        box = tuple(number(where, what, v) for what, v in zip(("cx", "cy", "w", "h"), cells[1:]))
        out.append(Obj(k, box, where, normalized=True))
    return out


def load(ds, root: Path) -> Loaded:
    root = Path(root)
    names = list(ds.class_names)
    scenes: dict[str, list[Scene]] = {}
    unlabelled = 0
    for split, (images, labels) in sorted(split_dirs(root).items(), key=lambda kv: ("train", "val", "test").index(kv[0])):
        items = []
        for img in sorted(p for p in images.rglob("*") if p.suffix.lower() in EXTS and p.is_file()):
            label = labels / img.relative_to(images).with_suffix(".txt")
            if not label.is_file():
                unlabelled += 1
                items.append(Scene(img, [], str(label)))
                continue
            items.append(Scene(img, read_label(label, names), str(label)))
        if not items:
            raise PassError(f"data: {images} holds no images ({', '.join(EXTS)}); expected {boxes.LAYOUTS['yolo']}")
        if split == "train" and unlabelled == len(items):
            raise PassError(f"data: no image under {images} has a label file in {labels} (labels/<name>.txt beside "
                            f"images/<name>.jpg); expected {boxes.LAYOUTS['yolo']}")
        scenes[split] = items
    if unlabelled:
        boxes.log.warning("data: %d image(s) have no label file: read as scenes without objects", unlabelled)
    marker = root / MARKER
    source = {"format": "yolo", "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "test/ as shipped" if "test" in scenes else "split of the scenes"}
    return boxes.load_scenes(ds, root, scenes, source, {"unlabelled_images": unlabelled})


def synthesize(ds, dest: Path) -> dict:
    syn = ds.synthetic
    names, ids = detection_synth.names_and_ids(ds)

    def fill(tmp: Path) -> int:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        h, w = syn.scene_size
        for i, (x, objs) in enumerate(detection_synth.scenes(syn, ids)):
            (tmp / "images" / f"{i:05d}.jpg").write_bytes(detection_synth.encode(x))
            (tmp / "labels" / f"{i:05d}.txt").write_text("".join(
                f"{k} {(x1 + x2 + 1) / 2 / w:.6f} {(y1 + y2 + 1) / 2 / h:.6f} {(x2 - x1 + 1) / w:.6f} "
                f"{(y2 - y1 + 1) / h:.6f}\n" for k, x1, y1, x2, y2 in objs))
        (tmp / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images", "val": "images",
                                                       "names": dict(enumerate(names))}, sort_keys=False))
        return 2 * syn.scenes + 1

    return write_tree(dest, detection_synth.marker("yolo", syn, names, ids), fill)
