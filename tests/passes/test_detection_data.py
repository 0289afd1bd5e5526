"""Detection data (issue #31 item 2): the gtsdb, yolo, coco and voc formats read their own
synthetic trees into the contract's arrays (boxes within a pixel of what the generator drew),
refuse bad labels naming file:line, refuse a wrong layout in one error, and the data stage
writes y (N, K, 5), test_labels.json and the objects per class."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter

from kiln.errors import ManifestError, PassError
from kiln.schema.datasets import Dataset
from passes.formats.support import detection_synth

FORMATS = ("gtsdb", "yolo", "coco", "voc")
SYN = {"scenes": 10, "scene_size": [120, 160], "sign_px": [14, 40], "max_per_scene": 3, "empty": 0.2, "seed": 3}


def dataset(fmt: str, path, **kw):
    return TypeAdapter(Dataset).validate_python({"format": fmt, "path": str(path), "synthetic": SYN,
                                                 "image_size": [60, 80], **kw})


def fmt_module(fmt: str):
    import importlib

    return importlib.import_module(f"passes.formats.{fmt}")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    """Each format's synthetic tree, written once."""
    base = tmp_path_factory.mktemp("detection")
    out = {}
    for fmt in FORMATS:
        ds = dataset(fmt, base / "absent")
        fmt_module(fmt).synthesize(ds, base / fmt)
        out[fmt] = base / fmt
    return out


def copy_tree(trees, fmt: str, tmp_path: Path) -> Path:
    dest = tmp_path / fmt
    shutil.copytree(trees[fmt], dest)
    return dest


def expected_rows(syn, ids) -> list[np.ndarray]:
    """What the generator drew, per scene: [class, cx, cy, w, h] normalized."""
    h, w = syn.scene_size
    out = []
    for _, objs in detection_synth.scenes(syn, ids):
        out.append(np.asarray([[k, (x1 + x2 + 1) / 2 / w, (y1 + y2 + 1) / 2 / h, (x2 - x1 + 1) / w,
                                (y2 - y1 + 1) / h] for k, x1, y1, x2, y2 in objs], np.float64).reshape(-1, 5))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_reads_its_synthetic_tree_into_the_contract_arrays(trees, fmt):
    ds = dataset(fmt, trees[fmt])
    mod = fmt_module(fmt)
    root, synthetic = mod.locate(ds, None)
    assert root == trees[fmt] and not synthetic
    ds._inferred.update(mod.infer(ds, root))
    # the classes the manifest gets before the tree is generated are those read from it after
    absent = trees[fmt].parent / "absent"
    assert mod.infer(dataset(fmt, absent), absent) == mod.infer(ds, root)
    loaded = mod.load(ds, root)
    x, y = loaded.train
    assert x.dtype == np.uint8 and x.shape == (SYN["scenes"], 60, 80, 3)
    assert y.dtype == np.float32 and y.shape == (SYN["scenes"], 16, 5)
    assert loaded.source["labels"] == "boxes" and loaded.group_by == "file"
    assert len(loaded.sources["train"]) == SYN["scenes"]
    if fmt == "gtsdb":
        ids = detection_synth.default_ids(ds.synthetic)
        drawn = [str(i) for i in ids]
    else:
        drawn, ids = detection_synth.names_and_ids(ds)
    want = expected_rows(ds.synthetic, ids)
    assert any(len(r) == 0 for r in want) and any(len(r) >= 2 for r in want)  # empty scenes and crowded ones
    h, w = ds.synthetic.scene_size
    names = ds.class_names
    for i, rows in enumerate(want):
        real = y[i][y[i][:, 0] >= 0]
        assert (y[i][len(real):] == -1).all()  # padding rows are all -1
        assert len(real) == len(rows), i
        for got, exp in zip(real, rows):
            # the class by name (gtsdb: the GTSRB id; voc sorts its names), the box within a pixel of the drawing
            assert names[int(got[0])] == drawn[int(exp[0])]
            assert np.abs((got[1:] - exp[1:]) * [w, h, w, h]).max() <= 1.0


def write_gtsdb(root: Path, gt: str, images=("a.ppm",), size=(50, 40)) -> Path:
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    for name in images:
        Image.new("RGB", size, (90, 90, 90)).save(root / name)
    (root / "gt.txt").write_text(gt)
    return root


@pytest.mark.parametrize("gt, said", [
    ("a.ppm;1;2;20;30;14\na.ppm;40;2;51;30;14\n", r"gt.txt:2: box x1=40 y1=2 x2=52 y2=31 px lies outside the 50x40"),
    ("a.ppm;1;2;20;30;14\n\na.ppm;20;2;20;30;14\n", r"gt.txt:3: box x1=20 y1=2 x2=20 y2=30 is empty"),
    ("a.ppm;1;2;20;30;43\n", r"gt.txt:1: class 43 is outside GTSRB's ids 0..42"),
    ("a.ppm;1;2;20;30\n", r"gt.txt:1: 'a.ppm;1;2;20;30': expected file;x1;y1;x2;y2;class"),
    ("a.ppm;1;2;2x;30;14\n", r"gt.txt:1: x2: '2x' is not an integer"),
])
def test_gtsdb_refuses_a_bad_line_naming_it(tmp_path, gt, said):
    from passes.formats import gtsdb

    root = write_gtsdb(tmp_path / "g", gt)
    with pytest.raises(PassError, match=said):
        gtsdb.load(dataset("gtsdb", root), root)


def test_gtsdb_keeps_the_listed_ids_a_scene_without_signs_and_refuses_too_many(tmp_path):
    from passes.formats import gtsdb

    root = write_gtsdb(tmp_path / "g", "a.ppm;0;0;9;9;14\na.ppm;20;20;29;29;17\na.ppm;30;0;39;9;1\n",
                       images=("a.ppm", "b.ppm"))
    loaded = gtsdb.load(dataset("gtsdb", root, classes=[17, 14]), root)
    y = loaded.train[1]
    assert loaded.sources["train"] == ["a.ppm", "b.ppm"]
    np.testing.assert_allclose(y[0, :3], [[1, 0.1, 0.125, 0.2, 0.25], [0, 0.5, 0.625, 0.2, 0.25], [-1] * 5],
                               atol=1e-6)  # id 14 -> output 1, 17 -> 0; id 1 left out
    assert loaded.report["left_out_objects"] == 1 and (y[1] == -1).all()
    with pytest.raises(PassError, match=r"gt.txt:1: a.ppm holds 3 objects, over dataset.max_objects \(2\)"):
        gtsdb.load(dataset("gtsdb", root, max_objects=2, synthetic={**SYN, "max_per_scene": 2}), root)


def test_an_unreadable_scene_is_skipped_and_reported(tmp_path):
    from passes.formats import gtsdb

    root = write_gtsdb(tmp_path / "g", "a.ppm;0;0;9;9;14\nc.ppm;0;0;9;9;14\n", images=("a.ppm", "b.ppm"))
    (root / "c.ppm").write_bytes(b"P6\n50 40\n255\n" + b"\0" * 10)  # truncated
    loaded = gtsdb.load(dataset("gtsdb", root), root)
    assert loaded.sources["train"] == ["a.ppm", "b.ppm"]
    assert loaded.report["skipped"] == 1 and "c.ppm" in loaded.report["skipped_examples"][0]


def test_the_data_stage_writes_boxes_test_labels_and_objects_per_class(trees, tmp_path):
    from passes import data
    from passes.formats import gtsdb

    ds = dataset("gtsdb", trees["gtsdb"], classes=[14, 17, 13, 12])
    loaded = gtsdb.load(ds, trees["gtsdb"])
    info = data.prepare(loaded, tmp_path / "out", ds.image_size, 0.2, 0.3, 0)
    n = {s: np.load(tmp_path / "out" / f"{s}.npz")["y"] for s in ("train", "val", "test")}
    assert all(v.dtype == np.float32 and v.shape[1:] == (16, 5) for v in n.values())
    assert sum(len(v) for v in n.values()) == SYN["scenes"] and info["labels"] == "boxes"
    for s, v in n.items():
        assert info["class_counts"][s] == np.bincount(v[..., 0][v[..., 0] >= 0].astype(int), minlength=4).tolist()
        assert info["objects"][s] == int((v[..., 0] >= 0).sum())
    test = json.loads((tmp_path / "out" / "test_labels.json").read_text())
    assert len(test) == len(n["test"])
    for scene, v in zip(test, n["test"]):
        np.testing.assert_allclose(np.asarray(scene, np.float64).reshape(-1, 5), v[v[:, 0] >= 0], atol=1e-6)
    raw = np.fromfile(tmp_path / "out" / "test_inputs.bin", "<f4").reshape(len(test), 3, 60, 80)
    assert raw.max() <= 1.0 and info["test_inputs"]["layout"] == "NCHW"


def test_a_box_within_a_pixel_of_the_edge_is_clipped(tmp_path):
    from passes.formats import gtsdb

    root = write_gtsdb(tmp_path / "g", "a.ppm;0;0;50;39;14\n")  # x2 = 50: one pixel past the 50-wide image
    y = gtsdb.load(dataset("gtsdb", root), root).train[1]
    np.testing.assert_allclose(y[0, 0], [14, 0.5, 0.5, 1.0, 1.0], atol=1e-6)


def write_yolo(root: Path, label: str, names=("a", "b"), how="classes.txt") -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.new("RGB", (50, 40)).save(root / "images" / "a.png")
    (root / "labels" / "a.txt").write_text(label)
    if how == "classes.txt":
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    elif how == "data.yaml":
        (root / "data.yaml").write_text("names:\n" + "".join(f"  {i}: {n}\n" for i, n in enumerate(names)))
    return root


@pytest.mark.parametrize("label, said", [
    ("0 0.5 0.5 0.2\n", r"a.txt:1: '0 0.5 0.5 0.2': expected 'class cx cy w h' \(5 fields, got 4\)"),
    ("0 0.5 0.5 0.2 0.2\n\n2 0.5 0.5 0.2 0.2\n", r"a.txt:3: class 2 is outside 0..1 \(2 class\(es\): a, b\)"),
    ("0 0.98 0.5 0.2 0.2\n", r"a.txt:1: box \(cx, cy, w, h\) = \(0.98, 0.5, 0.2, 0.2\) of the image lies outside "
                             r"the 50x40 image"),
    ("1 0.5 0.5 0 0.2\n", r"a.txt:1: box width 0 and height 0.2: both must be above 0"),
    ("1 0.5 abc 0.2 0.2\n", r"a.txt:1: cy: 'abc' is not a number"),
])
def test_yolo_refuses_a_bad_line_naming_it(tmp_path, label, said):
    from passes.formats import yolo

    root = write_yolo(tmp_path / "y", label)
    ds = dataset("yolo", root)
    ds._inferred.update(yolo.infer(ds, root))
    with pytest.raises(PassError, match=said):
        yolo.load(ds, root)


def test_yolo_reads_names_from_data_yaml_or_classes_txt_and_asks_for_them_otherwise(tmp_path):
    from passes.formats import yolo

    for how in ("classes.txt", "data.yaml"):
        root = write_yolo(tmp_path / how, "1 0.5 0.5 0.2 0.2\n", names=("car", "sign"), how=how)
        assert yolo.infer(dataset("yolo", root), root) == {"classes": ["car", "sign"]}
    root = write_yolo(tmp_path / "none", "", how=None)
    with pytest.raises(ManifestError, match="dataset.classes.*names no classes"):
        yolo.infer(dataset("yolo", root), root)
    ds = dataset("yolo", root, classes=["person"])  # a detector of one class, the names from the manifest
    loaded = yolo.load(ds, root)
    assert loaded.source["classes"] == ["person"] and (loaded.train[1] == -1).all()  # an empty label file


def coco_doc(**change) -> dict:
    doc = {"images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
           "annotations": [{"id": 7, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "iscrowd": 0}],
           "categories": [{"id": 3, "name": "sign"}, {"id": 5, "name": "car"}]}
    doc["annotations"][0].update(change)
    return doc


@pytest.mark.parametrize("change, said", [
    ({"category_id": 4}, r"annotations\[0\] \(id 7\): unknown class: category_id 4 is not in categories \(3, 5\)"),
    ({"bbox": [40, 10, 20, 20]}, r"annotations\[0\] \(id 7\): box x1=40 y1=10 x2=60 y2=30 px lies outside the 50x40"),
    ({"bbox": [10, 10, 20]}, r"annotations\[0\] \(id 7\): bbox \[10, 10, 20\]: expected \[x, y, width, height\]"),
    ({"bbox": [10, 10, 0, 5]}, r"annotations\[0\] \(id 7\): bbox \[10, 10, 0, 5\]: width and height must be above 0"),
    ({"image_id": 2}, r"annotations\[0\] \(id 7\): image_id 2 is not an image of the file"),
])
def test_coco_refuses_a_bad_annotation_naming_it(tmp_path, change, said):
    from PIL import Image

    from passes.formats import coco

    root = tmp_path / "c"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (50, 40)).save(root / "images" / "a.png")
    (root / "instances.json").write_text(json.dumps(coco_doc(**change)))
    ds = dataset("coco", root)
    ds._inferred.update(coco.infer(ds, root))
    assert ds.class_names == ["sign", "car"]  # in category id order
    with pytest.raises(PassError, match=said):
        coco.load(ds, root)


def write_voc(root: Path, objects: str) -> Path:
    from PIL import Image

    (root / "JPEGImages").mkdir(parents=True)
    (root / "Annotations").mkdir()
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "a.jpg")
    (root / "Annotations" / "a.xml").write_text(f"<annotation>\n<filename>a.jpg</filename>\n{objects}</annotation>\n")
    return root


def voc_object(name="sign", box=(11, 11, 30, 30)) -> str:
    return (f"<object>\n<name>{name}</name>\n<bndbox>\n<xmin>{box[0]}</xmin>\n<ymin>{box[1]}</ymin>\n"
            f"<xmax>{box[2]}</xmax>\n<ymax>{box[3]}</ymax>\n</bndbox>\n</object>\n")


@pytest.mark.parametrize("objects, said", [
    (voc_object() + voc_object("sing"), r"a.xml:13: unknown class 'sing'; the data set's classes: car, sign"),
    (voc_object(box=(30, 11, 30, 30)), r"a.xml:5: box xmin=30 ymin=11 xmax=30 ymax=30 is empty"),
    (voc_object(box=(11, 11, 52, 30)), r"a.xml:5: box x1=10 y1=10 x2=52 y2=30 px lies outside the 50x40 image"),
    (voc_object(box=(11, "x", 30, 30)), r"a.xml:7: ymin: 'x' is not a number"),
    ("<object>\n<name>sign</name>\n</objec>\n", r"a.xml:5: not well-formed XML"),
])
def test_voc_refuses_a_bad_object_naming_its_line(tmp_path, objects, said):
    from passes.formats import voc

    root = write_voc(tmp_path / "v", objects)
    with pytest.raises(PassError, match=said):
        voc.load(dataset("voc", root, classes=["car", "sign"]), root)


@pytest.mark.parametrize("fmt, tree, said", [
    ("yolo", "voc", r"is not a yolo data set: expected images/ and labels/.*it looks like the voc layout "
                    r"\(JPEGImages/ and Annotations/\*.xml \(Pascal VOC\)\): set dataset.format: voc"),
    ("voc", "coco", r"is not a voc data set: expected JPEGImages/.*it looks like the coco layout"),
    ("coco", "yolo", r"is not a coco data set: expected a COCO instances JSON.*set dataset.format: yolo"),
    ("gtsdb", "gtsdb-no-gt", r"is not a gtsdb data set: expected \*.ppm scenes and gt.txt"),
])
def test_a_wrong_layout_is_one_error_naming_dataset_path(trees, tmp_path, fmt, tree, said):
    from passes.formats.support import boxes

    root = copy_tree(trees, tree.split("-")[0], tmp_path)
    if tree == "gtsdb-no-gt":
        (root / "gt.txt").unlink()
    with pytest.raises(ManifestError, match=r"field 'dataset.path': .*" + said):
        fmt_module(fmt).locate(dataset(fmt, root), None)
    assert boxes.sniff(root) == (None if tree == "gtsdb-no-gt" else tree)


def test_the_synthetic_fallback_is_opt_in(tmp_path):
    from passes.formats import voc

    ds = TypeAdapter(Dataset).validate_python({"format": "voc", "path": str(tmp_path / "nothing")})
    with pytest.raises(ManifestError, match=r"field 'dataset.path': .* holds no voc data set.*add 'synthetic: \{\}'"):
        voc.locate(ds, None)


def test_a_changed_scene_is_decoded_again_alone(trees, tmp_path):
    from PIL import Image

    from passes.formats import gtsdb
    from passes.support import decode_cache

    root = copy_tree(trees, "gtsdb", tmp_path)
    ds = dataset("gtsdb", root)
    with decode_cache.active(tmp_path / "cache", 1) as first:
        x0 = gtsdb.load(ds, root).train[0][:]
    Image.new("RGB", (160, 120), (255, 0, 0)).save(root / "00004.ppm")
    with decode_cache.active(tmp_path / "cache", 1) as second:
        x1 = gtsdb.load(ds, root).train[0][:]
    # each scene twice: its size (header) and its pixels; the rerun opens the changed scene alone
    n = SYN["scenes"]
    assert first.decoded == 2 * n and second.decoded == 2 and second.cached == 2 * (n - 1)
    assert (x1[4] == (255, 0, 0)).all() and np.array_equal(np.delete(x0, 4, 0), np.delete(x1, 4, 0))


@pytest.mark.parametrize("layout", ["images/<split>", "<split>/images"])
def test_yolo_split_folders_are_the_splits_as_shipped(tmp_path, layout):
    from PIL import Image

    from passes.formats import yolo

    root = tmp_path / "y"
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        images, labels = ((root / "images" / folder, root / "labels" / folder) if layout == "images/<split>" else
                          (root / folder / "images", root / folder / "labels"))
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40)).save(images / f"{split}{i}.jpg")
            (labels / f"{split}{i}.txt").write_text("0 0.5 0.5 0.25 0.25\n" if i else "")
    ds = dataset("yolo", root, classes=["sign"])
    assert yolo.locate(ds, None) == (root, False)
    loaded = yolo.load(ds, root)
    assert [len(loaded.train[1]), len(loaded.val[1]), len(loaded.test[1])] == [2, 2, 2]
    assert [Path(s).name for s in loaded.sources["test"]] == ["test0.jpg", "test1.jpg"]
    assert loaded.test[1][1, 0].tolist() == [0, 0.5, 0.5, 0.25, 0.25] and (loaded.test[1][0] == -1).all()


def test_a_detection_manifest_infers_its_classes_and_runs_the_data_stage(kiln_env):
    from kiln.artifacts import Layout
    from kiln.config import load_project
    from passes import data
    from tests.conftest import write_project

    write_project(kiln_env["projects"], {
        "name": "det", "requirements": {}, "detection": {},
        "dataset": {"format": "voc", "path": str(kiln_env["root"] / "no_data_yet"), "image_size": [48, 64],
                    "synthetic": {**SYN, "classes": 3}},
        "architecture": {"family": "fomo", "max_macs": 100_000_000},
        "training": {"epochs": 1, "lr": 0.01, "batch": 8}, "targets": ["x86-host"]})
    project = load_project("det")  # before the tree exists: the generator's names, sorted as voc reads them
    assert project.dataset.class_names == ["no_entry", "stop", "yield"] and project.dataset.labels == "boxes"
    layout = Layout("det")
    data.synthesize(project, layout)
    info = data.run(project, layout)
    assert load_project("det").dataset.class_names == info["classes"] == ["no_entry", "stop", "yield"]
    assert info["labels"] == "boxes" and sum(info["counts"].values()) == SYN["scenes"]
    assert info["load"]["decode"]["decoded"] == 2 * SYN["scenes"]
    assert data.run(project, layout)["load"]["decode"]["decoded"] == 0  # a rerun reads every scene from the cache


@pytest.mark.parametrize("fields, said", [
    ({"augment": {"rotate_deg": 5}}, r"augment\n.*rotate_deg: a rotation would move the boxes"),
    ({"max_objects": 2, "synthetic": {"max_per_scene": 3}}, r"synthetic.max_per_scene: 3 signs a scene do not fit "
                                                             r"max_objects \(2\)"),
    ({"classes": [14, 43]}, r"classes\n.*43 is not a GTSRB class id \(0..42\)"),
])
def test_settings_a_detection_data_set_cannot_honour_are_refused_at_load(fields, said):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=said):
        TypeAdapter(Dataset).validate_python({"format": "gtsdb", "path": "x", **fields})
    assert dataset("gtsdb", "x", augment={"brightness": 0.2}).augment.brightness == 0.2  # photometric: allowed


def test_the_synth_stage_reruns_when_the_listed_classes_change():
    # the generator draws dataset.classes' signs under their names: they are part of the tree's recipe
    from types import SimpleNamespace

    from passes.pipeline import PIPELINE

    synth = next(s for s in PIPELINE if s.name == "synth")
    recipe = [synth.config(SimpleNamespace(p=SimpleNamespace(dataset=dataset(fmt, "x", classes=c))))
              for fmt, c in (("yolo", ["stop", "yield"]), ("yolo", ["stop"]), ("gtsdb", [14]), ("gtsdb", [17]))]
    assert recipe[0] != recipe[1] and recipe[2] != recipe[3]
    assert recipe[0]["classes"] == 4  # synthetic.classes is kept beside them


def test_voc_split_lists_are_the_splits_as_shipped(trees, tmp_path):
    from passes.formats import voc

    root = copy_tree(trees, "voc", tmp_path)
    sets = root / "ImageSets" / "Main"
    sets.mkdir(parents=True)
    (sets / "trainval.txt").write_text("".join(f"{i:05d}\n" for i in range(7)))
    (sets / "test.txt").write_text("00007\n00008\n00009\n")
    ds = dataset("voc", root)
    ds._inferred.update(voc.infer(ds, root))
    loaded = voc.load(ds, root)
    assert loaded.val is None and loaded.sources["test"] == ["JPEGImages/00007.jpg", "JPEGImages/00008.jpg",
                                                              "JPEGImages/00009.jpg"]
    assert len(loaded.train[1]) == 7 and loaded.source["test_source"].endswith("test.txt as shipped")
    (sets / "test.txt").write_text("00007\n\n00042\n")
    with pytest.raises(PassError, match=r"test.txt:3: image id '00042' has no annotation .*00042.xml"):
        voc.load(ds, root)


def test_coco_split_files_are_the_splits_as_shipped_and_other_json_pairs_are_asked_about(tmp_path):
    from PIL import Image

    from passes.formats import coco

    root = tmp_path / "coco2017"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        Image.new("RGB", (50, 40)).save(root / f"{split}2017" / "a.png")
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco_doc()))
    ds = dataset("coco", root)
    ds._inferred.update(coco.infer(ds, root))
    loaded = coco.load(ds, root)
    assert loaded.test is None and loaded.sources["val"] == ["val2017/a.png"] and loaded.sources["train"] == [
        "train2017/a.png"]
    np.testing.assert_allclose(loaded.val[1][0, 0], [0, 0.4, 0.5, 0.4, 0.5], atol=1e-6)  # bbox [10, 10, 20, 20]
    (root / "annotations" / "instances_val2017.json").rename(root / "annotations" / "more.json")
    with pytest.raises(ManifestError, match=r"field 'dataset.annotations': .* holds 2 JSON files .*name the instances"):
        coco.load(ds, root)


def test_roboflow_exports_are_recognized_in_a_wrong_layout_error(tmp_path):
    from passes.formats import voc

    (tmp_path / "r" / "train" / "images").mkdir(parents=True)
    (tmp_path / "r" / "train" / "labels").mkdir()
    with pytest.raises(ManifestError, match=r"is not a voc data set.*looks like the yolo layout"):
        voc.locate(dataset("voc", tmp_path / "r"), None)
    (tmp_path / "c" / "valid").mkdir(parents=True)
    (tmp_path / "c" / "valid" / "_annotations.coco.json").write_text("{}")
    with pytest.raises(ManifestError, match=r"is not a voc data set.*looks like the coco layout"):
        voc.locate(dataset("voc", tmp_path / "c"), None)
