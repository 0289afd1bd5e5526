"""The data stage at scale: decoded samples cached per file by content (a rerun decodes only
what was added or changed, and no old sample changes split), decoding on several processes,
and split files read back memory-mapped."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from kiln.artifacts import Layout
from kiln.schema import GtsrbDataset, Project
from passes import data, tasks
from passes.formats import gtsrb, image_folders
from passes.support import decode_cache, splits
from passes.support.splits import open_split

CLASSES = ("cat", "dog", "owl")


def _image(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def _tree(root, n: int = 12) -> None:
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(n):
            _image(root / c / f"{c}_{i:03d}.png", 100 * k + i)
    (root / "owl" / "owl_999.png").write_bytes(b"\x89PNG not really")  # unreadable: reported, cached


def _project(root, workers: int | None = 1, name: str = "cached") -> Project:
    return Project.model_validate({
        "name": name, "requirements": {"accuracy": {"min": 0.0}},
        "dataset": {"format": "image_folders", "path": str(root), "image_size": [8, 8], "workers": workers,
                    "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "architecture": {"family": "cnn", "widths": [4], "max_macs": 1_000_000},
        "training": {"epochs": 1, "batch": 8, "lr": 0.01, "seed": 0}, "targets": ["x86-host"]})


def _membership(info: dict) -> dict[str, str]:
    """Each source file's split (group_by file: a group is a file)."""
    return {f: s for s in ("train", "val", "test") for f in info["groups"][s]["names"]}


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The files image_folders decodes (workers=1: in this process)."""
    seen: list[str] = []
    real = image_folders.read_image

    def read_image(path, mode, size_hw):
        seen.append(path.name)
        return real(path, mode, size_hw)

    monkeypatch.setattr(image_folders, "read_image", read_image)
    return seen


def test_a_rerun_decodes_only_the_file_added_changed_or_removed(tmp_path, kiln_env, counted):
    root = tmp_path / "imgs"
    # 30 files a class: each class has files whose hash draws val and test, so no group is
    # moved to fill a class's held-out split (only such a move can depend on the other files)
    _tree(root, n=30)
    project, lay = _project(root), Layout("cached")

    def rerun(expect_decoded: list[str]) -> dict:
        counted.clear()
        info = data.run(project, lay)
        assert sorted(counted) == sorted(expect_decoded)
        assert info["load"]["decode"]["decoded"] == len(expect_decoded)
        assert info["load"]["skipped"] == 1  # the broken file: its reason comes from the cache
        return info

    first = rerun([p.name for p in root.rglob("*.png")])
    before = _membership(first)
    assert len(before) == 90 and {"train", "val", "test"} == set(before.values())

    same = rerun([])
    assert same["files"] == first["files"]  # byte-identical outputs from the cache

    (root / "cat" / "cat_000.png").touch()  # a new mtime, the same bytes: hashed, not decoded
    assert rerun([])["load"]["decode"]["hashed"] == 1

    _image(root / "dog" / "dog_new.png", 999)  # added
    after = _membership(rerun(["dog_new.png"]))
    assert {f: after[f] for f in before} == before and "dog/dog_new.png" in after

    _image(root / "cat" / "cat_003.png", 12345)  # changed
    changed = rerun(["cat_003.png"])
    assert {f: s for f, s in _membership(changed).items() if f != "dog/dog_new.png"} == before
    x, _ = open_split(lay.data, before["cat/cat_003.png"])
    want = np.asarray(Image.open(root / "cat" / "cat_003.png").convert("RGB"))
    assert any(np.array_equal(row, want) for row in x)  # the new pixels, not the cached old ones

    (root / "owl" / "owl_005.png").unlink()  # removed
    gone = _membership(rerun([]))
    assert "owl/owl_005.png" not in gone and all(gone[f] == s for f, s in before.items() if f != "owl/owl_005.png")


def test_workers_give_the_same_arrays_as_one(tmp_path, kiln_env):
    root = tmp_path / "imgs"
    _tree(root)
    one = data.run(_project(root, 1, "one"), Layout("one"))
    two = data.run(_project(root, 2, "two"), Layout("two"))
    assert two["load"]["decode"]["workers"] == 2 and two["load"]["decode"]["decoded"] == 37
    assert one["files"] == two["files"]


def test_memmapped_splits_read_back_what_np_load_gives(tmp_path, kiln_env):
    root = tmp_path / "imgs"
    _tree(root, n=5)
    project, lay = _project(root), Layout("cached")
    data.run(project, lay)
    for split in ("train", "val", "test"):
        x, y = open_split(lay.data, split)
        assert isinstance(x, np.memmap) and not x.flags.writeable
        with np.load(Layout.split_file(lay.data, split)) as z:
            assert np.array_equal(x, z["x"]) and np.array_equal(y, z["y"]) and x.dtype == z["x"].dtype
    fx, fy = tasks.fit_split(project, lay.data, "train")  # what the stages fit on: mapped too
    assert isinstance(fx, np.memmap) and np.array_equal(fx, open_split(lay.data, "train")[0])


def test_a_gtsrb_roi_is_part_of_the_key(tmp_path):
    root = tmp_path / "gtsrb"
    gtsrb.synthesize_gtsrb(root, per_class=2, test_per_class=0, seed=0)
    ds = GtsrbDataset(format="gtsrb", path=str(root), image_size=(8, 8))
    with decode_cache.active(tmp_path / "cache", 1) as first:
        x0 = gtsrb.load(ds, root).train[0][:]
    csv = root / "Final_Training" / "Images" / "00000" / "GT-00000.csv"
    lines = csv.read_text().splitlines()
    f = lines[1].split(";")
    f[3:7] = ["0", "0", str(int(f[1]) - 1), str(int(f[2]) - 1)]  # the whole image as the ROI
    csv.write_text("\n".join([lines[0], ";".join(f), *lines[2:]]) + "\n")
    with decode_cache.active(tmp_path / "cache", 1) as second:
        x1 = gtsrb.load(ds, root).train[0][:]
    assert first.decoded == 86 and second.decoded == 1 and second.cached == 85
    assert not np.array_equal(x0[0], x1[0]) and np.array_equal(x0[1:], x1[1:])


def test_workers_below_one_are_refused_at_load():
    with pytest.raises(ValidationError, match="workers"):
        GtsrbDataset(format="gtsrb", path="x", workers=0)


def test_a_rerun_after_a_change_writes_what_a_cold_run_writes(tmp_path, kiln_env, caplog):
    """With a front end (its features copied from the last run's file where the transform is the
    same) and the raw training split kept: the rerun's files equal a fresh build's, byte for byte."""
    root = tmp_path / "imgs"
    _tree(root, n=30)  # no class small enough for a group to be moved (see the first test)

    def project(name: str) -> Project:
        d = _project(root, 1, name).model_dump(mode="json", exclude_unset=True)
        d["dataset"]["front_end"] = {"kind": "normalize", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
        d["dataset"]["augment"] = {"brightness": 0.1}
        return Project.model_validate(d)

    warm = Layout("warm")
    data.run(project("warm"), warm)
    _image(root / "dog" / "dog_new.png", 999)
    _image(root / "cat" / "cat_001.png", 4242)
    with caplog.at_level(logging.INFO, "kiln.data"):
        again = data.run(project("warm"), warm)
    copied = [(int(a), int(b)) for a, b in re.findall(r"(\d+) of (\d+) samples' features copied", caplog.text)]
    # the splits written again computed the two new files' features only, the rest were copied
    assert copied and sum(b - a for a, b in copied) == 2, copied
    fresh = data.run(project("fresh"), Layout("fresh"))
    assert again["load"]["decode"]["decoded"] == 2 and fresh["load"]["decode"]["decoded"] == 92
    assert "raw_train.npz" in again["files"] and again["files"] == fresh["files"]
    same = data.run(project("warm"), warm)  # nothing changed: every file kept
    assert same["files"] == again["files"]


def _shard_files(data_dir) -> dict[str, tuple[int, int]]:
    """Each shard file of the training split: (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (data_dir / "train.shards").glob("*.npz")}


def test_one_added_file_rewrites_only_the_shard_it_lands_in(tmp_path, kiln_env, monkeypatch):
    """A training split over two shards' worth is sharded by content-defined cuts: a file added
    rewrites the shard its row falls in (and, should its row be a cut, the one it splits off);
    every other shard file is the same file (inode and mtime), every old sample keeps its split,
    and the split reads back as one array through open_split."""
    monkeypatch.setattr(splits, "SHARD_BYTES", 8 * 8 * 3 * 5)  # about 5 rows a shard
    root = tmp_path / "imgs"
    _tree(root, n=30)
    project, lay = _project(root), Layout("sharded")
    first = data.run(project, lay)
    before, old = _membership(first), _shard_files(lay.data)
    assert len(old) >= 5 and all(f"train.shards/{n}" in first["files"] for n in old)
    _image(root / "dog" / "dog_102.png", 999)  # a name whose hash draws the training split
    again = data.run(project, lay)
    after, new = _membership(again), _shard_files(lay.data)
    assert {f: after[f] for f in before} == before and after["dog/dog_102.png"] == "train"
    kept = set(old) & set(new)
    assert 1 <= len(set(old) - kept) <= 2 and 1 <= len(set(new) - kept) <= 2, (len(old), len(new), len(kept))
    assert all(new[n] == old[n] for n in kept)  # not written again
    x, y = open_split(lay.data, "train")
    assert isinstance(x, splits.Shards) and len(x) == len(y) == again["counts"]["train"]
    want = np.asarray(Image.open(root / "dog" / "dog_102.png").convert("RGB"))
    hit = [i for i in range(len(x)) if np.array_equal(x[i], want)]
    assert len(hit) == 1 and np.array_equal(np.asarray(x)[hit[0]], want)
    with np.load(lay.data / "train.npz") as z:  # the index: the shards in order, their row counts
        names, rows = z["shards"].tolist(), z["shard_rows"]
    assert sorted(n.split("/")[1] for n in names) == sorted(new) and rows.sum() == len(y)
    lo = int(np.searchsorted(np.cumsum(rows), hit[0], "right"))  # the shard holding the new row was written
    assert names[lo].split("/")[1] in set(new) - kept
    assert again["files"] == data.run(project, Layout("sharded")).get("files")  # a no-op keeps every file


def test_training_on_shards_equals_training_on_one_file(tmp_path, kiln_env, monkeypatch):
    """The same rows sharded or in one file, and the same seed: the same weights, bit for bit,
    read in the loop or by a background worker (Shards is the DataLoader's array-like)."""
    import torch

    from kiln.nets import build
    from passes.support.training import fit

    root = tmp_path / "imgs"
    _tree(root, n=30)
    project = _project(root)
    data.run(project, Layout("one"))
    monkeypatch.setattr(splits, "SHARD_BYTES", 8 * 8 * 3 * 5)
    data.run(project, Layout("many"))
    one, many = open_split(Layout("one").data, "train"), open_split(Layout("many").data, "train")
    assert isinstance(one[0], np.memmap) and isinstance(many[0], splits.Shards) and len(many[0].parts) >= 5
    assert np.array_equal(one[0], np.asarray(many[0])) and np.array_equal(one[1], many[1])
    xva, yva = open_split(Layout("one").data, "val", mode="c")

    def trained(x, y, workers):
        torch.manual_seed(0)
        model = build(project.architecture, 3, 3, (8, 8))
        history = fit(model, x, y, epochs=2, batch=8, lr=0.01, aug=project.dataset.augment,
                      gen=torch.Generator().manual_seed(0), xva=xva, yva=yva, keep_best=True, recipe=project.training,
                      workers=workers)
        return model.state_dict(), [r["loss"] for r in history]

    ref, ref_loss = trained(*one, 0)
    for workers in (0, 1):
        weights, loss = trained(*many, workers)
        assert loss == ref_loss and all(torch.equal(v, weights[k]) for k, v in ref.items()), workers


def test_the_listing_snapshot_follows_what_compaction_drops_and_moves(tmp_path, kiln_env, counted):
    """A rerun reads the files' stat and the decode cache's listing snapshot (no file is read
    again); compaction drops files removed (the snapshot rewritten without them) or moves the
    rows left into a new pack (the snapshot removed: the next run reads the index): the outputs
    stay those of a fresh build."""
    root = tmp_path / "imgs"
    _tree(root, n=30)
    project, lay = _project(root), Layout("snap")
    data.run(project, lay)
    (snapshot,) = (lay.data / "cache").glob(f"*/{decode_cache.LISTING}")
    for gone in ("cat_004", "dog_007", "owl_011"):  # dropped: the snapshot is written again without them
        (root / gone[:3] / f"{gone}.png").unlink()
    counted.clear()
    after = data.run(project, lay)
    assert not counted and snapshot.is_file() and after["load"]["decode"]["hashed"] == 0
    assert after["files"] == data.run(project, Layout("fresh1")).get("files")
    for c in CLASSES:  # two thirds gone: the rows left move into one new pack, the snapshot is removed
        for p in sorted((root / c).glob("*.png"))[:20]:
            p.unlink()
    counted.clear()
    moved = data.run(project, lay)
    assert not counted and not snapshot.is_file()
    counted.clear()
    again = data.run(project, lay)  # from the index, which writes the snapshot again
    assert not counted and snapshot.is_file() and again["files"] == moved["files"]
    assert moved["files"] == data.run(project, Layout("fresh2")).get("files")
