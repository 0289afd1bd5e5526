"""The data pass: synthetic GTSRB generation, the GTSRB loader and the split files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from kiln.artifacts import sha256_file
from kiln.errors import PassError
from kiln.schema import GtsrbDataset
from passes import data
from passes.formats import gtsrb


def prepare(root: Path, out: Path, size, val: float, test: float, seed: int, group_by: str | None = None) -> dict:
    """The data stage on a GTSRB tree: the format loads it, the stage splits and writes it
    (a synthetic tree's frames are drawn one by one: each file is its own group)."""
    ds = GtsrbDataset(format="gtsrb", path=str(root), image_size=size)
    return data.prepare(gtsrb.load(ds, root), out, size, val=val, test=test, seed=seed, group_by=group_by)

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def ppm(path: Path, img: np.ndarray) -> None:
    h, w, _ = img.shape
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + img.astype(np.uint8).tobytes())


def framed(w: int, h: int, roi: tuple[int, int, int, int], inside=(255, 0, 0), margin=(0, 0, 255)) -> np.ndarray:
    """An image of colour ``margin`` whose inclusive ROI box is colour ``inside``."""
    img = np.empty((h, w, 3), np.uint8)
    img[:] = margin
    x1, y1, x2, y2 = roi
    img[y1 : y2 + 1, x1 : x2 + 1] = inside
    return img


def hand_tree(root: Path, rows: list[str], cls: str = "00000") -> Path:
    d = root / "Final_Training" / "Images" / cls
    d.mkdir(parents=True, exist_ok=True)
    (d / f"GT-{cls}.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    return d


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "gtsrb"
    gtsrb.synthesize_gtsrb(root, per_class=10, test_per_class=2, seed=0)
    return root


# --- synthetic generation ---------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed(tmp_path):
    a = gtsrb.synthesize_gtsrb(tmp_path / "a", per_class=2, test_per_class=1, seed=3)
    gtsrb.synthesize_gtsrb(tmp_path / "b", per_class=2, test_per_class=1, seed=3)
    gtsrb.synthesize_gtsrb(tmp_path / "c", per_class=2, test_per_class=1, seed=4)
    ta, tb, tc = (tree_bytes(tmp_path / n) for n in "abc")
    assert ta == tb
    assert ta.keys() == tc.keys() and ta != tc
    assert a["train_images"] == 2 * 43 and a["test_images"] == 43
    assert json.loads(ta[gtsrb.MARKER])["seed"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp dirs left behind"


def test_synthetic_tree_has_the_gtsrb_layout(synth):
    assert gtsrb.is_gtsrb(synth) and not gtsrb.is_gtsrb(synth / "Final_Training")
    classes = sorted(p.name for p in (synth / "Final_Training" / "Images").iterdir())
    assert classes == [f"{c:05d}" for c in range(43)]
    csv_lines = (synth / "Final_Training" / "Images" / "00014" / "GT-00014.csv").read_text().splitlines()
    assert csv_lines[0] == HEADER and len(csv_lines) == 11
    name, w, h, x1, y1, x2, y2, cid = csv_lines[1].split(";")
    img = synth / "Final_Training" / "Images" / "00014" / name
    assert name == "00000_00000.ppm" and cid == "14"
    assert img.read_bytes().startswith(b"P6\n%s %s\n255\n" % (w.encode(), h.encode()))
    assert 0 <= int(x1) < int(x2) < int(w) and 0 <= int(y1) < int(y2) < int(h)
    assert 26 <= int(w) <= 68
    test_csv = (synth / "Final_Test" / "Images" / "GT-final_test.csv").read_text().splitlines()
    assert test_csv[0] == HEADER and len(test_csv) == 1 + 86
    assert sorted(int(line.split(";")[-1]) for line in test_csv[1:]) == sorted(list(range(43)) * 2)


def test_synthetic_round_trips_through_the_loader(synth):
    tx, ty, vx, vy, report = gtsrb.load_gtsrb(synth, (16, 20))
    assert tx.shape == (430, 16, 20, 3) and tx.dtype == np.uint8
    assert ty.dtype == np.int64 and np.bincount(ty).tolist() == [10] * 43
    assert vx.shape == (86, 16, 20, 3) and np.bincount(vy).tolist() == [2] * 43
    assert report["skipped"] == 0 and report["skipped_examples"] == []
    assert tx.std() > 20, "images are not blank"


def test_synthesize_replaces_only_its_own_trees(tmp_path):
    dest = tmp_path / "gtsrb"
    gtsrb.synthesize_gtsrb(dest, per_class=1, test_per_class=0, seed=0)
    assert not (dest / "Final_Test").exists()
    gtsrb.synthesize_gtsrb(dest, per_class=2, test_per_class=0, seed=0)
    assert len(list((dest / "Final_Training" / "Images" / "00000").glob("*.ppm"))) == 2
    foreign = tmp_path / "real"
    (foreign / "Final_Training").mkdir(parents=True)
    with pytest.raises(PassError, match="not a Kiln synthetic set"):
        gtsrb.synthesize_gtsrb(foreign, per_class=1, test_per_class=0, seed=0)
    assert (foreign / "Final_Training").is_dir()


# --- the loader ---------------------------------------------------------------------------------


def test_roi_crop_is_honoured(tmp_path):
    d = hand_tree(tmp_path, ["a.ppm;20;16;5;3;14;12;0", "b.ppm;20;16;0;0;19;15;0"])
    ppm(d / "a.ppm", framed(20, 16, (5, 3, 14, 12)))
    ppm(d / "b.ppm", framed(20, 16, (5, 3, 14, 12)))
    x, y, tx, ty, report = gtsrb.load_gtsrb(tmp_path, (8, 8))
    assert (x[0] == [255, 0, 0]).all(), "the margin leaked into the ROI crop"
    assert (x[1] == [0, 0, 255]).all(axis=-1).any(), "a full-image ROI keeps the margin"
    assert y.tolist() == [0, 0] and tx is None and ty is None


def test_unreadable_images_are_skipped_and_reported(tmp_path, caplog):
    d = hand_tree(tmp_path, ["good.ppm;8;8;0;0;7;7;0", "garbage.ppm;8;8;0;0;7;7;0",
                             "short.ppm;8;8;0;0;7;7;0", "gone.ppm;8;8;0;0;7;7;0"])
    ppm(d / "good.ppm", framed(8, 8, (0, 0, 7, 7)))
    (d / "garbage.ppm").write_bytes(b"this is not an image")
    (d / "short.ppm").write_bytes(b"P6\n8 8\n255\n" + bytes(20))  # truncated pixel data
    with caplog.at_level(logging.WARNING, logger="passes.data"):
        x, y, _, _, report = gtsrb.load_gtsrb(tmp_path, (4, 4))
    assert len(x) == 1 and y.tolist() == [0]
    assert report["skipped"] == 3
    by_path = {s["path"]: s["reason"] for s in report["skipped_examples"]}
    prefix = "Final_Training/Images/00000/"
    assert set(by_path) == {prefix + "garbage.ppm", prefix + "short.ppm", prefix + "gone.ppm"}
    assert by_path[prefix + "gone.ppm"] == "missing"
    assert "3 unreadable" in caplog.text and "garbage.ppm" in caplog.text


def test_no_readable_training_image_is_a_pass_error(tmp_path):
    d = hand_tree(tmp_path, ["garbage.ppm;8;8;0;0;7;7;0"])
    (d / "garbage.ppm").write_bytes(b"junk")
    with pytest.raises(PassError, match="none of the 1 training images"):
        gtsrb.load_gtsrb(tmp_path, (4, 4))


def test_missing_column_names_the_csv(tmp_path):
    d = tmp_path / "Final_Training" / "Images" / "00003"
    d.mkdir(parents=True)
    (d / "GT-00003.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;ClassId\na.ppm;8;8;0;0;7;3\n")
    with pytest.raises(PassError, match=r"GT-00003\.csv:1: missing column 'Roi\.Y2'"):
        gtsrb.load_gtsrb(tmp_path, (4, 4))


@pytest.mark.parametrize("row, message", [
    ("b.ppm;8;8;x;0;7;7;0", r"GT-00000\.csv:3: column 'Roi\.X1': 'x' is not an integer"),
    ("b.ppm;8;8;0;0;7", r"GT-00000\.csv:3: column 'Roi\.Y2' is missing"),
    ("b.ppm;8;8;0;0;7;7;43", r"GT-00000\.csv:3: column 'ClassId': 43 is outside 0\.\.42"),
])
def test_malformed_row_names_file_line_and_column(tmp_path, row, message):
    hand_tree(tmp_path, ["a.ppm;8;8;0;0;7;7;0", row])
    with pytest.raises(PassError, match=message):
        gtsrb.load_gtsrb(tmp_path, (4, 4))


def test_undecodable_csv_is_a_pass_error(tmp_path):
    d = hand_tree(tmp_path, [])
    (d / "GT-00000.csv").write_bytes(HEADER.encode() + b"\na\xff.ppm;8;8;0;0;7;7;0\n")
    with pytest.raises(PassError, match=r"GT-00000\.csv: cannot read"):
        gtsrb.load_gtsrb(tmp_path, (4, 4))


def test_missing_final_training_says_what_layout_was_expected(tmp_path):
    with pytest.raises(PassError, match=r"Final_Training/Images not found.*GT-000NN\.csv"):
        gtsrb.load_gtsrb(tmp_path / "nowhere", (4, 4))


# --- prepare --------------------------------------------------------------------------------------


def test_prepare_uses_final_test_and_a_stratified_val(synth, tmp_path):
    out = tmp_path / "out"
    info = prepare(synth, out, (12, 10), val=0.2, test=0.3, seed=0)
    # val: each file by a seeded hash of its name (stable as files come and go, passes/data.py
    # _assign), about 0.2 of each class and never a class without a sample in train or val
    assert info["counts"]["test"] == 86 and info["counts"]["train"] + info["counts"]["val"] == 430
    assert 0.15 < info["counts"]["val"] / 430 < 0.25
    assert min(info["class_counts"]["val"]) >= 1 and min(info["class_counts"]["train"]) >= 1
    assert info["test_source"] == "Final_Test" and info["synthetic"]["per_class"] == 10
    assert json.loads((out / "data.json").read_text()) == info
    for name, digest in info["files"].items():
        assert sha256_file(out / name) == digest

    with np.load(out / "test.npz") as z:
        x, y = z["x"], z["y"]
    assert x.shape == (86, 12, 10, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    raw = (out / "test_inputs.bin").read_bytes()
    assert len(raw) == 86 * 3 * 12 * 10 * 4
    runner_x = np.frombuffer(raw, "<f4").reshape(86, 3, 12, 10)
    np.testing.assert_allclose(runner_x, x.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    assert json.loads((out / "test_labels.json").read_text()) == y.tolist()
    with np.load(out / "train.npz") as tr, np.load(out / "val.npz") as va:
        assert not {a.tobytes() for a in tr["x"]} & {a.tobytes() for a in va["x"]}


def test_prepare_is_reproducible(synth, tmp_path):
    a = prepare(synth, tmp_path / "a", (8, 8), val=0.1, test=0.1, seed=5)
    b = prepare(synth, tmp_path / "b", (8, 8), val=0.1, test=0.1, seed=5)
    c = prepare(synth, tmp_path / "c", (8, 8), val=0.1, test=0.1, seed=6)
    assert a["files"] == b["files"]
    assert a["files"]["val.npz"] != c["files"]["val.npz"]


def test_prepare_splits_test_off_training_without_final_test(tmp_path):
    root = tmp_path / "gtsrb"
    gtsrb.synthesize_gtsrb(root, per_class=10, test_per_class=0, seed=1)
    info = prepare(root, tmp_path / "out", (8, 8), val=0.1, test=0.2, seed=0)
    assert info["test_source"] == "split of Final_Training"
    assert sum(info["counts"].values()) == 430 and 0.15 < info["counts"]["test"] / 430 < 0.25
    assert min(info["class_counts"]["test"]) >= 1 and min(info["class_counts"]["val"]) >= 1
    n = info["counts"]["test"]
    assert (tmp_path / "out" / "test_inputs.bin").stat().st_size == n * 3 * 8 * 8 * 4


def test_prepare_rejects_bad_fractions(synth, tmp_path):
    with pytest.raises(PassError, match="val=0.6 test=0.5"):
        prepare(synth, tmp_path / "out", (8, 8), val=0.6, test=0.5, seed=0)
