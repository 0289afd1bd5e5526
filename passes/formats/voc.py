"""Dataset format ``voc``: Pascal VOC as it ships and as labelImg and CVAT export it:
``JPEGImages/`` and ``Annotations/<name>.xml``, one XML per image (``<filename>``, then per
object ``<name>`` and ``<bndbox>`` with ``xmin ymin xmax ymax``: 1-based inclusive pixel corners).

The classes are ``dataset.classes``, else every object name in the annotations, sorted. An object
whose name is not a class, a box that is empty or leaves the image, a missing or non-numeric
corner, or XML that does not parse is a PassError naming the file and line; an image that cannot
be read is reported and skipped. An XML without objects is a scene without objects. Objects
marked ``difficult`` are kept (counted in the report). With VOC's split lists
(``ImageSets/Main/train.txt`` + ``val.txt``, or ``trainval.txt``; ``test.txt``: an image id a
line) the splits are as listed, else the data stage splits val and test off the scenes, whole.

The XML is read with the standard library's expat parser (for the line of every element, which
ElementTree drops); expat refuses entity expansion beyond its limits (billion laughs).
"""

from __future__ import annotations

import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path

from kiln.artifacts import read_json
from kiln.errors import PassError
from passes.formats import MARKER, Loaded, synthetic_or_refuse, write_tree
from passes.formats.support import boxes, detection_synth
from passes.formats.support.boxes import Obj, Scene, class_index, fail, number


@dataclass
class Node:
    tag: str
    line: int
    text: str = ""
    children: list["Node"] = field(default_factory=list)

    def find(self, tag: str) -> "Node | None":
        return next((c for c in self.children if c.tag == tag), None)

    def findall(self, tag: str) -> list["Node"]:
        return [c for c in self.children if c.tag == tag]


def parse_xml(path: Path) -> Node:
    """The XML tree with each element's line; a file that does not parse is a PassError naming
    the line."""
    root = Node("", 0)
    stack = [root]
    p = xml.parsers.expat.ParserCreate()

    def start(tag, _attrs):
        node = Node(tag, p.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag):
        stack.pop()

    def text(data):
        stack[-1].text += data

    p.StartElementHandler, p.EndElementHandler, p.CharacterDataHandler = start, end, text
    try:
        p.Parse(path.read_bytes(), True)
    except OSError as e:
        raise fail(str(path), f"cannot read it: {e}") from e
    except xml.parsers.expat.ExpatError as e:
        raise fail(f"{path}:{e.lineno}", f"not well-formed XML: {xml.parsers.expat.ErrorString(e.code)}") from e
    if not root.children or root.children[0].tag != "annotation":
        raise fail(f"{path}:1", "expected a Pascal VOC <annotation> element")
    return root.children[0]


def _annotations(root: Path) -> list[Path]:
    return sorted(p for p in (Path(root) / "Annotations").glob("*.xml") if not p.name.startswith("."))


def _holds(path: Path) -> bool:
    return (path / "JPEGImages").is_dir() and (path / "Annotations").is_dir()


def locate(ds, layout) -> tuple[Path, bool]:
    return boxes.locate(ds, layout, "voc", _holds)


def infer(ds, root: Path) -> dict:
    root = Path(root)
    if not _holds(root):
        synthetic_or_refuse(ds, root, None, "holds no VOC tree to read the classes from")
        return {"classes": sorted(detection_synth.names_and_ids(ds)[0])}  # sorted, as read once it is written
    names = set()
    for path in _annotations(root):
        for obj in parse_xml(path).findall("object"):
            name = obj.find("name")
            if name is not None and name.text.strip():
                names.add(name.text.strip())
    if not names:
        raise PassError(f"data: {root / 'Annotations'} names no object; list dataset.classes")
    return {"classes": sorted(names)}


_CORNERS = ("xmin", "ymin", "xmax", "ymax")


def read_annotation(path: Path, root: Path, names: list[str]) -> tuple[Scene, int]:
    """One XML -> (its scene, how many of its objects are marked difficult)."""
    ann = parse_xml(path)
    fname = ann.find("filename")
    image = root / "JPEGImages" / (fname.text.strip() if fname is not None and fname.text.strip()
                                   else f"{path.stem}.jpg")
    scene, difficult = Scene(image, [], str(path)), 0
    for obj in ann.findall("object"):
        name = obj.find("name")
        if name is None or not name.text.strip():
            raise fail(f"{path}:{obj.line}", "<object> without a <name>")
        k = class_index(f"{path}:{name.line}", name.text.strip(), names, by_name=True)
        box = obj.find("bndbox")
        if box is None:
            raise fail(f"{path}:{obj.line}", f"<object> {name.text.strip()!r} without a <bndbox>")
        v = {}
        for c in _CORNERS:
            node = box.find(c)
            if node is None:
                raise fail(f"{path}:{box.line}", f"<bndbox> without <{c}>")
            v[c] = number(f"{path}:{node.line}", c, node.text.strip())
        where = f"{path}:{box.line}"
        if v["xmax"] <= v["xmin"] or v["ymax"] <= v["ymin"]:
            raise fail(where, f"box xmin={v['xmin']:g} ymin={v['ymin']:g} xmax={v['xmax']:g} ymax={v['ymax']:g} is "
                       "empty: expected xmin < xmax and ymin < ymax")
        d = obj.find("difficult")
        difficult += d is not None and d.text.strip() == "1"
        # 1-based inclusive corners: the object covers pixels xmin-1 .. xmax-1, the box xmin-1 .. xmax
        scene.objects.append(Obj(k, (v["xmin"] - 1, v["ymin"] - 1, v["xmax"], v["ymax"]), where))
    return scene, difficult


SETS = Path("ImageSets") / "Main"


def split_lists(root: Path) -> dict[str, Path] | None:
    """VOC's own split lists (ImageSets/Main/{train,val,test}.txt, or trainval.txt + test.txt):
    {split: list file}, or None when the tree has none."""
    have = {n: Path(root) / SETS / f"{n}.txt" for n in ("train", "val", "trainval", "test")}
    have = {n: p for n, p in have.items() if p.is_file()}
    train = have.get("train") or have.get("trainval")
    if train is None:
        return None
    val = {"val": have["val"]} if "train" in have and "val" in have else {}
    return {"train": train, **val, **({"test": have["test"]} if "test" in have else {})}


def _listed(path: Path, root: Path) -> list[Path]:
    """The annotation files a split list names (an image id a line); an id without its
    Annotations/<id>.xml is a PassError naming the line."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(str(path), f"cannot read it: {e}") from e
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        ident = line.split()[0] if line.split() else None
        if ident is None:
            continue
        xml_path = root / "Annotations" / f"{ident}.xml"
        if not xml_path.is_file():
            raise fail(f"{path}:{n}", f"image id {ident!r} has no annotation {xml_path}")
        out.append(xml_path)
    return out


def load(ds, root: Path) -> Loaded:
    """Every annotation, one split the data stage cuts; or, with ImageSets/Main's lists, the
    splits as they list them (train + val, or trainval; test)."""
    root = Path(root)
    names = list(ds.class_names)
    lists = split_lists(root)
    paths = {s: _listed(p, root) for s, p in lists.items()} if lists else {"train": _annotations(root)}
    if not paths["train"]:
        raise PassError(f"data: {lists['train'] if lists else root / 'Annotations'} lists no annotation; "
                        f"expected {boxes.LAYOUTS['voc']}")
    scenes: dict[str, list[Scene]] = {}
    difficult = 0
    for split, files in paths.items():
        scenes[split] = []
        for path in files:
            scene, d = read_annotation(path, root, names)
            scenes[split].append(scene)
            difficult += d
    marker = root / MARKER
    source = {"format": "voc", "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": f"{SETS / 'test.txt'} as shipped" if "test" in scenes else "split of the scenes"}
    return boxes.load_scenes(ds, root, scenes, source, {"difficult_objects": difficult,
                                                        "split_lists": {s: str(p) for s, p in (lists or {}).items()}})


def _xml(name: str, w: int, h: int, objs, names) -> str:
    out = [f"<annotation>\n\t<folder>JPEGImages</folder>\n\t<filename>{name}</filename>\n"
           f"\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
           "\t<segmented>0</segmented>\n"]
    for k, x1, y1, x2, y2 in objs:
        out.append(f"\t<object>\n\t\t<name>{names[k]}</name>\n\t\t<pose>Unspecified</pose>\n"
                   "\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
                   f"\t\t<bndbox>\n\t\t\t<xmin>{x1 + 1}</xmin>\n\t\t\t<ymin>{y1 + 1}</ymin>\n"
                   f"\t\t\t<xmax>{x2 + 1}</xmax>\n\t\t\t<ymax>{y2 + 1}</ymax>\n\t\t</bndbox>\n\t</object>\n")
    return "".join(out) + "</annotation>\n"


def synthesize(ds, dest: Path) -> dict:
    from xml.sax.saxutils import escape

    syn = ds.synthetic
    names, ids = detection_synth.names_and_ids(ds)

    def fill(tmp: Path) -> int:
        (tmp / "JPEGImages").mkdir()
        (tmp / "Annotations").mkdir()
        h, w = syn.scene_size
        for i, (x, objs) in enumerate(detection_synth.scenes(syn, ids)):
            name = f"{i:05d}.jpg"
            (tmp / "JPEGImages" / name).write_bytes(detection_synth.encode(x))
            (tmp / "Annotations" / f"{i:05d}.xml").write_text(_xml(name, w, h, objs, [escape(n) for n in names]))
        return 2 * syn.scenes

    return write_tree(dest, detection_synth.marker("voc", syn, names, ids), fill)
