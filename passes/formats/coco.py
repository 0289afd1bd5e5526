"""Dataset format ``coco``: a COCO instances file (``images``: id, file_name; ``annotations``:
image_id, category_id, ``bbox`` [x, y, width, height] in pixels; ``categories``: id, name) and
a folder of the images, as COCO, CVAT, Label Studio and Roboflow export them.

The JSON is ``dataset.annotations`` (relative to ``dataset.path``), else the one ``*.json`` in
``dataset.path`` or ``dataset.path/annotations/``. The images are ``dataset.images``, else
``images/``, else the JSON's folder, else ``dataset.path``: the first that holds the first image
listed. The classes are the categories' names in id order, or ``dataset.classes`` (then
annotations of the other categories are left out and counted: COCO declares its categories, so
such a name is a real category, not a typo). An annotation naming no listed category or image,
a malformed bbox or one off the image is a PassError naming the file and the annotation
(``annotations[i] (id N)``: JSON has no line a reader can rely on). Crowd regions
(``iscrowd: 1``) are left out, counted. An image without annotations holds no object.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiln.artifacts import read_json
from kiln.errors import ManifestError, PassError
from passes.formats import MARKER, Loaded, synthetic_or_refuse, write_tree
from passes.formats.support import boxes, detection_synth
from passes.formats.support.boxes import Obj, Scene, fail, number


def _candidates(ds, root: Path) -> list[Path]:
    if ds.annotations:
        p = root / ds.annotations
        return [p] if p.is_file() else []
    return sorted(p for d in (root, root / "annotations") if d.is_dir() for p in d.glob("*.json")
                  if not p.name.startswith("."))


def locate(ds, layout) -> tuple[Path, bool]:
    path = boxes.folders.resolve(ds.path)
    if ds.annotations and path.is_dir() and not (path / ds.annotations).is_file():
        raise ManifestError(f"field 'dataset.annotations': no file {path / ds.annotations}")
    return boxes.locate(ds, layout, "coco", lambda p: bool(_candidates(ds, p)))


def annotations_file(ds, root: Path) -> Path:
    found = _candidates(ds, Path(root))
    if len(found) != 1:
        raise ManifestError(f"field 'dataset.annotations': {root} holds {len(found)} JSON files "
                            f"({', '.join(p.relative_to(root).as_posix() for p in found[:4])}); name the instances "
                            "file in dataset.annotations")
    return found[0]


def read_coco(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PassError(f"data: {path}: cannot read it as JSON: {e}") from e
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
            raise PassError(f"data: {path}: not a COCO instances file: no {key!r} list (expected images, "
                            "annotations and categories)")
    return doc


def _categories(path: Path, doc: dict) -> dict[int, str]:
    out = {}
    for i, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise fail(f"{path}: categories[{i}]", "expected an object with id and name")
        out[int(number(f"{path}: categories[{i}]", "id", c["id"], integer=True))] = str(c["name"])
    return dict(sorted(out.items()))


def infer(ds, root: Path) -> dict:
    root = Path(root)
    if not _candidates(ds, root):
        synthetic_or_refuse(ds, root, None, "holds no COCO instances file to read the classes from")
        return {"classes": detection_synth.names_and_ids(ds)[0]}
    path = annotations_file(ds, root)
    names = list(_categories(path, read_coco(path)).values())
    if not names:
        raise ManifestError(f"field 'dataset.classes': {path} lists no categories; list dataset.classes")
    return {"classes": names}


def _images_dir(ds, root: Path, path: Path, first: str | None) -> Path:
    if ds.images:
        return root / ds.images
    dirs = [root / "images", path.parent, root]
    if first is None:
        return dirs[0]
    for d in dirs:
        if (d / first).is_file():
            return d
    raise PassError(f"data: {path}: its first image {first!r} is in none of {', '.join(map(str, dirs))}; "
                    "set dataset.images to the images' folder")


def load(ds, root: Path) -> Loaded:
    root = Path(root)
    path = annotations_file(ds, root)
    doc = read_coco(path)
    categories = _categories(path, doc)
    names = list(ds.class_names)
    missing = [n for n in names if n not in categories.values()]
    if missing:
        raise ManifestError(f"field 'dataset.classes': {missing[0]!r} is not a category of {path} "
                            f"({', '.join(list(categories.values())[:10])}{', ...' if len(categories) > 10 else ''})")
    images: dict[int, Scene] = {}
    for i, im in enumerate(doc["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise fail(where, "expected an object with id and file_name")
        images[im["id"]] = Scene(Path(im["file_name"]), [], where)
    folder = _images_dir(ds, root, path, next((s.image.as_posix() for s in images.values()), None))
    for s in images.values():
        s.image = folder / s.image
    crowd = left_out = 0
    for i, a in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{i}]" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            raise fail(where, "expected an object")
        if not isinstance(a.get("image_id"), (int, str)) or a["image_id"] not in images:
            raise fail(where, f"image_id {a.get('image_id')!r} is not an image of the file")
        if not isinstance(a.get("category_id"), int) or a["category_id"] not in categories:
            raise fail(where, f"unknown class: category_id {a.get('category_id')!r} is not in categories "
                       f"({', '.join(map(str, list(categories)[:10]))})")
        if a.get("iscrowd"):
            crowd += 1
            continue
        name = categories[a["category_id"]]
        if name not in names:
            left_out += 1
            continue
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise fail(where, f"bbox {bbox!r}: expected [x, y, width, height] in pixels")
        x, y, w, h = (number(where, f"bbox[{j}]", v) for j, v in enumerate(bbox))
        if w <= 0 or h <= 0:
            raise fail(where, f"bbox {bbox}: width and height must be above 0")
        images[a["image_id"]].objects.append(Obj(names.index(name), (x, y, x + w, y + h), where))
    if not images:
        raise PassError(f"data: {path} lists no images")
    if left_out:
        boxes.log.info("data: %d annotation(s) of categories not in dataset.classes left out", left_out)
    marker = root / MARKER
    source = {"format": "coco", "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "split of the scenes", "annotations": str(path)}
    scenes = sorted(images.values(), key=lambda s: str(s.image))
    return boxes.load_scenes(ds, root, {"train": scenes}, source, {"crowd_left_out": crowd, "left_out_objects": left_out})


def synthesize(ds, dest: Path) -> dict:
    syn = ds.synthetic
    names, ids = detection_synth.names_and_ids(ds)

    def fill(tmp: Path) -> int:
        (tmp / "images").mkdir()
        (tmp / "annotations").mkdir()
        h, w = syn.scene_size
        images, annotations = [], []
        for i, (x, objs) in enumerate(detection_synth.scenes(syn, ids)):
            name = f"{i:05d}.jpg"
            (tmp / "images" / name).write_bytes(detection_synth.encode(x))
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            for k, x1, y1, x2, y2 in objs:
                bw, bh = x2 - x1 + 1, y2 - y1 + 1
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": k + 1,
                                    "bbox": [x1, y1, bw, bh], "area": bw * bh, "iscrowd": 0})
        doc = {"images": images, "annotations": annotations,
               "categories": [{"id": k + 1, "name": n, "supercategory": "sign"} for k, n in enumerate(names)]}
        (tmp / "annotations" / "instances.json").write_text(json.dumps(doc, indent=1))
        return syn.scenes + 1

    return write_tree(dest, detection_synth.marker("coco", syn, names, ids), fill)
