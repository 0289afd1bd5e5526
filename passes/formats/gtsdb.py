"""Dataset format ``gtsdb``: the German Traffic Sign Detection Benchmark as it ships
(FullIJCNN2013): ``*.ppm`` scenes and ``gt.txt`` in one folder, a line per sign
``file;x1;y1;x2;y2;class`` (inclusive pixel corners, GTSRB's class ids 0..42). A scene that
gt.txt does not name holds no sign. ``dataset.classes`` picks the class ids detected (output
order); signs of other ids are left out and counted. The data stage splits val and test off,
whole scenes. ``synthesize`` writes the same layout (support/detection_synth.py)."""

from __future__ import annotations

from pathlib import Path

from kiln.artifacts import read_json
from kiln.schema.datasets import GTSDB_CLASSES
from passes.formats import MARKER, Loaded, write_tree
from passes.formats.support import boxes, detection_synth
from passes.formats.support.boxes import Obj, Scene, fail, number

GT = "gt.txt"


def _holds(path: Path) -> bool:
    return (path / GT).is_file()


def locate(ds, layout) -> tuple[Path, bool]:
    return boxes.locate(ds, layout, "gtsdb", _holds)


def infer(ds, root: Path) -> dict:
    return {}  # the classes are GTSRB's ids (dataset.classes or all 43)


def read_gt(path: Path, ids: list[int]) -> tuple[dict[str, list[Obj]], dict[str, int], int]:
    """gt.txt -> ({file: its objects}, {file: the line first naming it}, signs of ids not in
    ``ids`` left out); a malformed line is a PassError naming it."""
    out: dict[str, list[Obj]] = {}
    first: dict[str, int] = {}
    index = {c: i for i, c in enumerate(ids)}
    left_out = 0
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise fail(str(path), f"cannot read it: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        cells = [c.strip() for c in line.split(";")]
        if len(cells) != 6 or not cells[0]:
            raise fail(where, f"{line.strip()!r}: expected file;x1;y1;x2;y2;class (6 fields, got {len(cells)})")
        x1, y1, x2, y2 = (number(where, col, v, integer=True) for col, v in zip(("x1", "y1", "x2", "y2"), cells[1:5]))
        cid = int(number(where, "class", cells[5], integer=True))
        if not 0 <= cid < GTSDB_CLASSES:
            raise fail(where, f"class {cid} is outside GTSRB's ids 0..{GTSDB_CLASSES - 1}")
        if x2 <= x1 or y2 <= y1:
            raise fail(where, f"box x1={x1} y1={y1} x2={x2} y2={y2} is empty: expected x1 < x2 and y1 < y2")
        first.setdefault(cells[0], n)
        objs = out.setdefault(cells[0], [])
        if cid not in index:
            left_out += 1
            continue
        # inclusive corners: the sign covers columns x1..x2, the continuous box x1 .. x2 + 1
        objs.append(Obj(index[cid], (x1, y1, x2 + 1, y2 + 1), where))
    return out, first, left_out


def load(ds, root: Path) -> Loaded:
    root = Path(root)
    gt = root / GT
    objects, first, left_out = read_gt(gt, ds.class_ids)
    files = sorted({p.name for p in root.glob("*.ppm")} | set(objects))
    scenes = [Scene(root / f, objects.get(f, []), f"{gt}:{first[f]}" if f in first else str(gt)) for f in files]
    marker = root / MARKER
    source = {"format": "gtsdb", "synthetic": read_json(marker) if marker.is_file() else None,
              "test_source": "split of the scenes"}
    return boxes.load_scenes(ds, root, {"train": scenes}, source,
                             {"left_out_objects": left_out, "left_out_why": "class ids not in dataset.classes"})


def synthesize(ds, dest: Path) -> dict:
    syn = ds.synthetic
    ids = list(ds.classes) if ds.classes else detection_synth.default_ids(syn)

    def fill(tmp: Path) -> int:
        lines = []
        for i, (x, objs) in enumerate(detection_synth.scenes(syn, ids)):
            name = f"{i:05d}.ppm"
            (tmp / name).write_bytes(detection_synth.encode(x, "PPM"))
            lines += [f"{name};{x1};{y1};{x2};{y2};{ids[k]}" for k, x1, y1, x2, y2 in objs]
        (tmp / GT).write_text("".join(f"{s}\n" for s in lines))
        return syn.scenes + 1

    return write_tree(dest, detection_synth.marker("gtsdb", syn, [str(i) for i in ids], ids), fill)
