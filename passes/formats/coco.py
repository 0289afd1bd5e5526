"""Dataset format ``coco``: a COCO instances file (``images``: id, file_name; ``annotations``:
image_id, category_id, ``bbox`` [x, y, width, height] in pixels; ``categories``: id, name) and
a folder of the images, as COCO, CVAT, Label Studio and Roboflow export them.

The JSON is ``dataset.annotations`` (relative to ``dataset.path``), else the one ``*.json`` in
``dataset.path``, ``dataset.path/annotations/`` or Roboflow's ``<split>/`` folders, else one per
split named by its path (``instances_train2017.json``, ``instances_val2017.json``;
``train/_annotations.coco.json``, ``valid/...``, ``test/...``): the splits as shipped. A split's
images are ``dataset.images``, else ``images/``, else the JSON's folder, else ``dataset.path``,
else COCO's ``<split>2017/`` beside ``annotations/``: the first that holds its first image. The classes are the categories' names in id order, or ``dataset.classes`` (then
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
    folders = (root, root / "annotations", *(root / d for d in ("train", "valid", "val", "test")))
    return sorted(p for d in folders if d.is_dir() for p in d.glob("*.json") if not p.name.startswith("."))


def locate(ds, layout) -> tuple[Path, bool]:
    path = boxes.folders.resolve(ds.path)
    if ds.annotations and path.is_dir() and not (path / ds.annotations).is_file():
        raise ManifestError(f"field 'dataset.annotations': no file {path / ds.annotations}")
    return boxes.locate(ds, layout, "coco", lambda p: bool(_candidates(ds, p)))


def _split_of(rel: str) -> str | None:
    """The split a JSON file's path names (instances_val2017.json, valid/_annotations.coco.json)."""
    low = rel.lower()
    for word, split in (("test", "test"), ("val", "val"), ("train", "train")):
        if word in low:
            return split
    return None


def annotation_files(ds, root: Path) -> dict[str, Path]:
    """{split: instances JSON}: dataset.annotations, or the one JSON, or several whose paths
    name their splits (train, val/valid, test: COCO's instances_<split>2017.json, Roboflow's
    <split>/_annotations.coco.json); anything else is a ManifestError asking for
    dataset.annotations."""
    root = Path(root)
    found = _candidates(ds, root)
    if len(found) == 1:
        return {"train": found[0]}
    rels = [p.relative_to(root).as_posix() for p in found]
    by_split: dict[str, Path] = {}
    for p, rel in zip(found, rels):
        split = _split_of(rel)
        if split is None or split in by_split:
            by_split = {}
            break
        by_split[split] = p
    if "train" not in by_split:
        raise ManifestError(f"field 'dataset.annotations': {root} holds {len(found)} JSON files "
                            f"({', '.join(rels[:4])}{', ...' if len(rels) > 4 else ''}) that are not one per split "
                            "(train, val, test in their names); name the instances file in dataset.annotations")
    return by_split


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
    path = annotation_files(ds, root)["train"]
    names = list(_categories(path, read_coco(path)).values())
    if not names:
        raise ManifestError(f"field 'dataset.classes': {path} lists no categories; list dataset.classes")
    return {"classes": names}


def _images_dir(ds, root: Path, path: Path, first: str | None) -> Path:
    if ds.images:
        return root / ds.images
    stem = path.stem.removeprefix("instances_")  # COCO's instances_train2017.json: images in train2017/
    dirs = [root / "images", path.parent, root, *([root / stem] if stem != path.stem else [])]
    if first is None:
        return dirs[0]
    for d in dirs:
        if (d / first).is_file():
            return d
    raise PassError(f"data: {path}: its first image {first!r} is in none of {', '.join(map(str, dirs))}; "
                    "set dataset.images to the images' folder")


def load(ds, root: Path) -> Loaded:
    root = Path(root)
    files = annotation_files(ds, root)
    scenes, counts = {}, {"crowd_left_out": 0, "left_out_objects": 0}
    for split in ("train", "val", "test"):
        if split in files:
            scenes[split] = _scenes(ds, root, files[split], counts)
    marker = root / MARKER
    source = {"format": "coco", "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": f"{files['test']} as shipped" if "test" in files else "split of the scenes",
              "annotations": {s: str(p) for s, p in files.items()}}
    return boxes.load_scenes(ds, root, scenes, source, counts)


def _scenes(ds, root: Path, path: Path, counts: dict) -> list[Scene]:
    """The scenes of one instances file, each object checked; ``counts`` gets the crowd
    regions and the objects of categories not in dataset.classes that were left out."""
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
        boxes.log.info("data: %s: %d annotation(s) of categories not in dataset.classes left out", path, left_out)
    counts["crowd_left_out"] += crowd
    counts["left_out_objects"] += left_out
    return sorted(images.values(), key=lambda s: str(s.image))


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
