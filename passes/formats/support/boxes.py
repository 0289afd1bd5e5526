"""What the detection formats (gtsdb, yolo, coco, voc) share: their annotations parsed into
``Scene`` s (an image and its objects, each object remembering the file and line it was read
from), then checked against the image and turned into the data stage's arrays by ``load_scenes``:

* x: uint8 (N, H, W, 3), each scene decoded as image_folders decodes (EXIF orientation applied,
  16-bit scaled to 8 bits, RGB) and resized bilinear to ``dataset.image_size``, through the data
  stage's decode cache (a changed scene is decoded again, the others are read from the cache);
* y: float32 (N, max_objects, 5), rows [class, cx, cy, w, h] with the centre and size as
  fractions of the image (so the resize moves no box), padding rows all -1 (``PAD``); a scene
  with no object is all padding.

Boxes are checked against the image's own size (read from its header, without decoding it): a
box that leaves the image by more than ``TOLERANCE`` pixels, an empty box (x2 <= x1 or y2 <=
y1), a class the data set does not have and a malformed line are PassErrors naming the label
file and line, never guessed at; within the tolerance a box is clipped to the image. An image
that cannot be read is reported and skipped, as the other formats do. A data set laid out as
another format (``sniff``) is one error naming dataset.path and the layout expected.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from kiln.errors import ManifestError, PassError
from passes.formats import Loaded, synthetic_or_refuse
from passes.formats.support import folders
from passes.formats.support.folders import Unreadable
from passes.support import decode_cache

log = logging.getLogger("kiln.data")

PAD = -1.0  # every value of a padding row
TOLERANCE = 1.0  # pixels a box may leave the image by (annotators are off by one); it is then clipped
EXTS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp")
DECODER_VERSION = 1  # bump whenever the scene decoding changes, so the decode cache is not used
_ORIENTATION = 0x0112  # the EXIF tag; values 5..8 swap width and height


@dataclass
class Obj:
    """One object as its label file gives it: ``cls`` the output index; ``box`` either pixel
    corners (x1, y1, x2, y2), continuous (a box from x1 up to x2), or, with ``normalized``,
    (cx, cy, w, h) as fractions of the image; ``where`` is "file:line" for errors."""

    cls: int
    box: tuple[float, float, float, float]
    where: str
    normalized: bool = False


@dataclass
class Scene:
    image: Path
    objects: list[Obj] = field(default_factory=list)
    where: str = ""  # the label file (and line) the scene is listed in, for a scene-level error


def fail(where: str, message: str) -> PassError:
    return PassError(f"data: {where}: {message}")


def number(where: str, what: str, value: str, integer: bool = False) -> float:
    """``value`` as a number (an int with ``integer``); else a PassError naming file:line and ``what``."""
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError) as e:
        raise fail(where, f"{what}: {value!r} is not {'an integer' if integer else 'a number'}") from e
    if not np.isfinite(v):
        raise fail(where, f"{what}: {value!r} is not a finite number")
    return v


def class_index(where: str, value, names: list[str], by_name: bool) -> int:
    """The output index of a class given by name (``by_name``) or by index; an unknown one is a
    PassError naming file:line and the classes there are."""
    if by_name:
        if value in names:
            return names.index(value)
        raise fail(where, f"unknown class {value!r}; the data set's classes: {', '.join(names[:12])}"
                   f"{', ...' if len(names) > 12 else ''} (dataset.classes, or read from the data)")
    i = int(number(where, "class", value, integer=True)) if isinstance(value, str) else int(value)
    if not 0 <= i < len(names):
        raise fail(where, f"class {i} is outside 0..{len(names) - 1} ({len(names)} class(es): "
                   f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    return i


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as displayed (EXIF orientation applied), from its header
    only. Raises Unreadable."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_ORIENTATION)
            except Exception:  # a malformed EXIF block: open_image decides what it makes of it
                orientation = None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise Unreadable(f"{type(e).__name__}: {e}") from e
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def normalize(obj: Obj, width: int, height: int) -> tuple[float, float, float, float]:
    """(cx, cy, w, h) in [0, 1] of an object in a ``width`` x ``height`` image; a box beyond the
    tolerance or an empty one is a PassError naming where it was read."""
    if obj.normalized:
        cx, cy, bw, bh = obj.box
        if bw <= 0 or bh <= 0:
            raise fail(obj.where, f"box width {bw:g} and height {bh:g}: both must be above 0")
        x1, y1, x2, y2 = (cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height
        said = f"box (cx, cy, w, h) = ({cx:g}, {cy:g}, {bw:g}, {bh:g}) of the image"
    else:
        x1, y1, x2, y2 = obj.box
        if x2 <= x1 or y2 <= y1:
            raise fail(obj.where, f"box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} is empty: expected x1 < x2 and y1 < y2")
        said = f"box x1={x1:g} y1={y1:g} x2={x2:g} y2={y2:g} px"
    if x1 < -TOLERANCE or y1 < -TOLERANCE or x2 > width + TOLERANCE or y2 > height + TOLERANCE:
        raise fail(obj.where, f"{said} lies outside the {width}x{height} image (beyond {TOLERANCE:g} pixel)")
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    return ((x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height)


def rows(scene: Scene, size: tuple[int, int], max_objects: int) -> np.ndarray:
    """The scene's (max_objects, 5) float32 label rows, checked against the image's ``size``."""
    if len(scene.objects) > max_objects:
        raise fail(scene.where or str(scene.image), f"{scene.image.name} holds {len(scene.objects)} objects, over "
                   f"dataset.max_objects ({max_objects}); raise dataset.max_objects")
    out = np.full((max_objects, 5), PAD, np.float32)
    for i, obj in enumerate(scene.objects):
        out[i] = (obj.cls, *normalize(obj, *size))
    return out


def _size(path) -> np.ndarray:
    return np.asarray(image_size(Path(path)), np.int32)


def _read(path, hw: tuple[int, int]) -> np.ndarray:
    from passes.formats.image_folders import read_image

    return read_image(Path(path), "RGB", hw)


def load_scenes(ds, root: Path, scenes: dict[str, list[Scene]], source: dict, report: dict | None = None) -> Loaded:
    """The scenes of each split (``train`` always; ``val``/``test`` when the data set ships
    them) -> Loaded, in the contract above; ``source`` holds the format's own record (format,
    test_source, synthetic)."""
    root = Path(root)
    h, w = (int(v) for v in ds.image_size)
    names = list(ds.class_names)
    skipped: list[str] = []
    arrays: dict[str, tuple] = {}
    sources: dict[str, list[str]] = {}
    objects = np.zeros(len(names), np.int64)
    top = root.resolve()
    for split, items in scenes.items():
        # every label is checked against its image's size before any pixel is decoded; the sizes
        # go through the decode cache too, so a rerun opens only the files added or changed
        sizes, found, errors = decode_cache.decode([s.image for s in items], _size, (2,), np.int32,
                                                   {"format": "image size", "version": DECODER_VERSION},
                                                   catch=(Unreadable,))
        skipped += [f"{items[i].image}: {e}" for i, e in sorted(errors.items())]
        sizes = np.asarray(sizes[:]) if len(sizes) else np.zeros((0, 2), np.int32)
        present = [s for s, k in zip(items, found) if k]
        ys = [rows(scene, (int(size[0]), int(size[1])), ds.max_objects) for scene, size in zip(present, sizes)]
        good = [s.image for s in present]
        x, ok, errors = decode_cache.decode(good, lambda p: _read(p, (h, w)), (h, w, 3), np.uint8,
                                            {"format": "detection scenes", "size": [h, w], "decoder": DECODER_VERSION},
                                            catch=(Unreadable,))
        skipped += [f"{good[i]}: {e}" for i, e in sorted(errors.items())]
        y = np.stack(ys)[ok] if ys else np.full((0, ds.max_objects, 5), PAD, np.float32)
        arrays[split] = (x, y.astype(np.float32))
        sources[split] = [_rel(p, top) for p, k in zip(good, ok) if k]
        cls = y[..., 0][y[..., 0] >= 0].astype(np.int64)
        objects += np.bincount(cls, minlength=len(names))
    if skipped:
        log.warning("data: skipped %d unreadable scene(s), first: %s", len(skipped),
                    "; ".join(skipped[:folders.EXAMPLES]))
    if not len(arrays["train"][1]):
        raise PassError(f"data: no readable scene under {root}")
    n = sum(len(a[1]) for a in arrays.values())
    report = {"source": str(root), "samples": n, "images": n, "objects": int(objects.sum()),
              "objects_per_class": dict(zip(names, objects.tolist())), "skipped": len(skipped),
              "skipped_examples": skipped[:folders.EXAMPLES], **(report or {})}
    source = {"num_classes": len(names), "channels": 3, "classes": names, "labels": "boxes",
              "max_objects": ds.max_objects, **source}
    return Loaded(arrays["train"], arrays.get("test"), report, source, val=arrays.get("val"), sources=sources,
                  group_by="file")


def _rel(p: Path, top: Path) -> str:
    try:
        return Path(p).resolve().relative_to(top).as_posix()
    except ValueError:
        return Path(p).as_posix()


# --- layouts ----------------------------------------------------------------------------------

LAYOUTS = {
    "gtsdb": "*.ppm scenes and gt.txt (lines file;x1;y1;x2;y2;class) in one folder",
    "yolo": "images/ and labels/ (one .txt per image: class cx cy w h, normalized), optionally with train/ val/ "
            "test/ below both; class names in classes.txt or data.yaml",
    "coco": "a COCO instances JSON (images, annotations, categories) in the folder or its annotations/, and the "
            "images in images/ (or beside the JSON)",
    "voc": "JPEGImages/ and Annotations/*.xml (Pascal VOC)",
}


def sniff(path: Path) -> str | None:
    """Which detection layout ``path`` holds, by its top-level names (cheap), or None."""
    try:
        names = {p.name for p in Path(path).iterdir() if not p.name.startswith(".")}  # not Kiln's marker
    except OSError:
        return None
    if {"Annotations", "JPEGImages"} <= names:
        return "voc"
    split = next((Path(path) / d for d in ("train", "valid", "val", "test") if d in names), None)  # Roboflow's
    if {"images", "labels"} <= names or (split and (split / "images").is_dir() and (split / "labels").is_dir()):
        return "yolo"
    if "gt.txt" in names:
        return "gtsdb"
    if (any(n.endswith(".json") for n in names) or (Path(path) / "annotations").is_dir()
            or (split and any(split.glob("*.json")))):
        return "coco"
    return None


def locate(ds, layout, fmt: str, holds) -> tuple[Path, bool]:
    """(dataset.path, False) when ``holds(path)`` (the format's layout is there); an absent or
    empty path: the synthetic tree when dataset.synthetic is set (opt-in); a path holding
    something else: ONE ManifestError naming dataset.path, the layout expected, and the layout
    it looks like."""
    path = folders.resolve(ds.path)
    if holds(path):
        return path, False
    if path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()):
        other = sniff(path)
        hint = (f"; it looks like the {other} layout ({LAYOUTS[other]}): set dataset.format: {other}"
                if other and other != fmt else "")
        raise ManifestError(f"field 'dataset.path': {path} is not a {fmt} data set: expected {LAYOUTS[fmt]}{hint}")
    if path.is_file():
        raise ManifestError(f"field 'dataset.path': {path} is a file; expected a folder with {LAYOUTS[fmt]}")
    return synthetic_or_refuse(ds, path, layout, f"holds no {fmt} data set (expected {LAYOUTS[fmt]})")
