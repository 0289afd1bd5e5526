"""Dataset formats csv_windows and csv_table (passes/formats/csv_windows.py, csv_table.py,
csvio.py): windowing, layouts, the synthetic generators, and each bad input's error or report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import ManifestError, PassError
from kiln.schema import CsvTableDataset, CsvWindowsDataset
from passes.formats import csv_table, csv_windows


@pytest.fixture(autouse=True)
def _own_build(tmp_path_factory, monkeypatch):
    """infer caches what it read under the build dir: each test gets its own (outside tmp_path,
    which the tests use as a data root)."""
    monkeypatch.setenv("KILN_BUILD", str(tmp_path_factory.mktemp("build")))


def windows_ds(path="nowhere", **kw) -> CsvWindowsDataset:
    base = {"format": "csv_windows", "path": str(path), "columns": ["ax", "ay", "az"], "sample_rate": 50,
            "window": 4, "stride": 2}
    return CsvWindowsDataset.model_validate({**base, **kw})


def table_ds(path="nowhere", **kw) -> CsvTableDataset:
    return CsvTableDataset.model_validate({"format": "csv_table", "path": str(path), **kw})


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recording(path: Path, labels: list[str], rate: float = 50.0, start: int = 0, times=None) -> Path:
    """A recording whose ax column is the row's global number (start + i): windows show which
    rows they were cut from."""
    times = [i / rate for i in range(len(labels))] if times is None else times
    lines = ["timestamp,ax,ay,az,label"] + [f"{t:.6f},{start + i},{-i},0.5,{lab}"
                                             for i, (t, lab) in enumerate(zip(times, labels))]
    return write(path, "\n".join(lines) + "\n")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- csv_windows: windowing ----------------------------------------------------------------------


def test_windows_are_cut_within_segments_never_across_labels_or_files(tmp_path):
    # file 1: a x10, b x7, a x5; file 2: a x4, b x3 (shorter than a window: no window)
    recording(tmp_path / "r1.csv", ["a"] * 10 + ["b"] * 7 + ["a"] * 5)
    recording(tmp_path / "r2.csv", ["a"] * 4 + ["b"] * 3, start=100)
    loaded = csv_windows.load(windows_ds(tmp_path), tmp_path)
    x, y = loaded.train
    # (len - window) // stride + 1 per segment: a: 4 + 1 + 1, b: 2 (+ 0 for the 3-row segment)
    assert x.shape == (8, 4, 3) and x.dtype == np.float32 and y.dtype == np.int64
    assert loaded.source["classes"] == ["a", "b"] and np.bincount(y).tolist() == [6, 2]
    starts = x[:, 0, 0].astype(int).tolist()
    assert starts == [0, 2, 4, 6, 10, 12, 17, 100]
    for w in x[:, :, 0]:  # consecutive rows of one file, one label
        assert np.array_equal(np.diff(w), np.ones(3))
    assert loaded.test is None and loaded.val is None
    assert loaded.report["unused_rows"] == 3 and loaded.report["samples"] == 8
    assert loaded.source["channels"] == 3 and loaded.source["num_classes"] == 2


@pytest.mark.parametrize("window, stride, expected", [(4, 1, 7), (4, 3, 3), (10, 5, 1), (11, 1, 0), (2, 20, 1)])
def test_window_stride_arithmetic(tmp_path, window, stride, expected):
    recording(tmp_path / "r.csv", ["a"] * 10 + ["b"] * 10)
    if expected == 0:
        with pytest.raises(PassError, match="class 'a' has no samples"):
            csv_windows.load(windows_ds(tmp_path, window=window, stride=stride), tmp_path)
        return
    x, y = csv_windows.load(windows_ds(tmp_path, window=window, stride=stride), tmp_path).train
    assert np.bincount(y).tolist() == [expected, expected] and x.shape[1] == window


def test_a_gap_in_the_timestamps_is_reported_and_ends_the_segment(tmp_path, caplog):
    times = [i / 50 for i in range(6)] + [1.0 + i / 50 for i in range(6)]  # a 0.9 s hole after row 6
    path = recording(tmp_path / "r.csv", ["a"] * 12, times=times)
    recording(tmp_path / "s.csv", ["b"] * 4)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        loaded = csv_windows.load(windows_ds(tmp_path), tmp_path)
    # 6 + 6 rows: 2 windows each side, none across the gap
    assert loaded.train[0][loaded.train[1] == 0][:, 0, 0].tolist() == [0, 2, 6, 8]
    assert f"{path}:8: 1 timestamp gap(s)" in caplog.text  # line 8: the header is line 1
    assert loaded.report["notes"] >= 1 and str(path) in loaded.report["notes_examples"][0]


def test_timestamps_at_another_rate_are_reported(tmp_path, caplog):
    path = recording(tmp_path / "r.csv", ["a"] * 8 + ["b"] * 8, rate=100)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)
    assert f"{path}: the timestamps say 100 Hz, dataset.sample_rate is 50 Hz" in caplog.text


def test_timestamps_that_go_back_stop_with_file_and_line(tmp_path):
    times = [0.0, 0.02, 0.04, 0.03, 0.06, 0.08]
    path = recording(tmp_path / "r.csv", ["a"] * 3 + ["b"] * 3, times=times)
    with pytest.raises(PassError, match=rf"{path}:5: column 'timestamp': timestamp 0.03 is not after"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)


def test_no_timestamp_column_needs_timestamp_null(tmp_path):
    write(tmp_path / "r.csv", "ax,ay,az,label\n" + "".join(f"{i},0,0,{'ab'[i // 6]}\n" for i in range(12)))
    with pytest.raises(PassError, match=r"r.csv:1: missing column 'timestamp'.*set it to null"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)
    x, y = csv_windows.load(windows_ds(tmp_path, timestamp=None), tmp_path).train
    assert np.bincount(y).tolist() == [2, 2]


def test_a_rerun_cuts_only_the_recordings_added_or_changed(tmp_path, monkeypatch):
    """Through the decode cache (per recording by its bytes): the windows, labels, sources and
    notes of the direct load; a rerun reads no CSV; after a recording is added, one changed and
    one removed, only the added and the changed are read, and every other window keeps its key."""
    from passes.support import decode_cache

    root = tmp_path / "rec"
    for k in range(5):
        recording(root / f"r{k}.csv", ["a"] * (9 + k) + ["b"] * 8 + ["zz"] * 4, start=100 * k)
    write(root / "notes.csv", "\x00\x01 not text")  # unreadable: reported each run, from the cache
    ds = windows_ds(root, classes=["a", "b"])  # zz: a note naming its file
    seen: list[str] = []
    real = csv_windows.read_table
    monkeypatch.setattr(csv_windows, "read_table", lambda p: seen.append(Path(p).name) or real(p))

    def cached():
        seen.clear()
        with decode_cache.active(tmp_path / "cache", 1) as stats:
            loaded = csv_windows.load(ds, root)
        read = sorted(seen)
        direct = csv_windows.load(ds, root)  # outside the cache: the same windows, in order
        assert np.array_equal(np.asarray(loaded.train[0]), direct.train[0]) and len(loaded.train[0]) > 0
        assert np.array_equal(loaded.train[1], direct.train[1]) and loaded.sources == direct.sources
        assert loaded.report == direct.report and loaded.report["skipped"] == 1 and loaded.report["notes"] >= 3
        keys = dict(zip(loaded.train[0].keys.tolist(), loaded.sources["train"]))
        assert len(keys) == len(loaded.train[0])
        assert stats.decoded == len(read)
        return keys, read, stats

    first, read, stats = cached()
    assert read == ["notes.csv", "r0.csv", "r1.csv", "r2.csv", "r3.csv", "r4.csv"]
    again, read, stats = cached()
    assert again == first and read == [] and stats.cached == 6
    recording(root / "r5.csv", ["b"] * 12, start=500)  # added
    recording(root / "r1.csv", ["b"] * 12, start=700)  # changed
    (root / "r2.csv").unlink()  # removed
    after, read, stats = cached()
    assert read == ["r1.csv", "r5.csv"] and stats.cached == 4
    assert {k: f for k, f in after.items() if f not in ("r1.csv", "r5.csv")} == \
        {k: f for k, f in first.items() if f not in ("r1.csv", "r2.csv")}
    assert {f for f in after.values()} == {"r0.csv", "r1.csv", "r3.csv", "r4.csv", "r5.csv"}
    assert len(list((tmp_path / "cache").glob("each-*/pack-*.npy"))) == 5  # r1's old and r2's dropped
    with decode_cache.active(tmp_path / "cache2", 2) as two:  # forked workers: the same windows
        assert np.array_equal(np.asarray(csv_windows.load(ds, root).train[0]), csv_windows.load(ds, root).train[0])
    assert two.workers == 2 and two.decoded == 6
    recording(root / "r3.csv", ["a"] * 12, times=[0.0, 0.02, 0.01] + [0.1 + i / 50 for i in range(9)])
    with pytest.raises(PassError, match=r"r3\.csv:4: column 'timestamp'.*not after"), \
            decode_cache.active(tmp_path / "cache2", 2):  # a worker's error is the load's, naming file and line
        csv_windows.load(ds, root)


# --- csv_windows: bad inputs ---------------------------------------------------------------------


def test_ragged_row_names_file_and_line(tmp_path):
    path = write(tmp_path / "r.csv", "timestamp,ax,ay,az,label\n0,1,2,3,a\n0.02,1,2,a\n")
    with pytest.raises(PassError, match=rf"{path}:3: ragged row: 4 fields, the header has 5"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)


def test_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path / "r.csv", "timestamp,ax,ay,label\n0,1,2,a\n")
    with pytest.raises(PassError, match=rf"{path}:1: missing column 'az'"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)


@pytest.mark.parametrize("cell, what", [("abc", "'abc' is not a number"), ("", "missing value"),
                                        ("nan", "'nan' is not a finite number")])
def test_non_numeric_value_names_file_line_and_column(tmp_path, cell, what):
    rows = [f"{i / 50},{i},0,0,a" for i in range(6)]
    rows[3] = f"0.06,1,{cell},0,a"
    path = write(tmp_path / "r.csv", "timestamp,ax,ay,az,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(PassError, match=rf"{path}:5: column 'ay': {what}"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)


def test_one_class_stops(tmp_path):
    recording(tmp_path / "r.csv", ["a"] * 10)
    with pytest.raises(PassError, match="holds one class \\('a'\\); a classifier needs at least two"):
        csv_windows.load(windows_ds(tmp_path), tmp_path)


def test_empty_class_folder_stops_naming_it(tmp_path):
    recording(tmp_path / "idle" / "one.csv", ["x"] * 6)
    (tmp_path / "walk").mkdir()
    write(tmp_path / "walk" / "notes.txt", "no data yet")
    with pytest.raises(PassError, match=rf"class folder {tmp_path / 'walk'} holds no CSV files"):
        csv_windows.load(windows_ds(tmp_path, label=None), tmp_path)


def test_stray_text_and_binary_files_are_reported_and_skipped(tmp_path, caplog):
    recording(tmp_path / "r.csv", ["a"] * 6 + ["b"] * 6)
    write(tmp_path / "README.txt", "these are my recordings")
    (tmp_path / "broken.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    with caplog.at_level(logging.WARNING, "kiln.data"):
        loaded = csv_windows.load(windows_ds(tmp_path), tmp_path)
    assert loaded.report["skipped"] == 2 and loaded.report["files"] == {"train": 1}
    ex = loaded.report["skipped_examples"]
    assert any(str(tmp_path / "README.txt") in e and "not a .csv file" in e for e in ex)
    assert any(str(tmp_path / "broken.csv") in e and "UTF-8" in e for e in ex)
    assert "skipped 2 file(s)" in caplog.text and "README.txt" in caplog.text
    assert np.bincount(loaded.train[1]).tolist() == [2, 2]


def test_no_data_and_no_synthetic_names_dataset_path(tmp_path):
    from kiln.artifacts import Layout

    with pytest.raises(ManifestError, match=rf"field 'dataset.path': {tmp_path / 'none'} holds no CSV files"):
        csv_windows.locate(windows_ds(tmp_path / "none", synthetic=None), Layout("x"))


# --- csv_windows: classes, layouts, splits -------------------------------------------------------


def test_listed_classes_fix_the_order_and_must_have_data(tmp_path, caplog):
    recording(tmp_path / "r.csv", ["a"] * 6 + ["b"] * 6 + ["c"] * 6)
    loaded = csv_windows.load(windows_ds(tmp_path, classes=["c", "a"]), tmp_path)
    assert loaded.source["classes"] == ["c", "a"]
    x, y = loaded.train
    assert x[y == 0][:, 0, 0].tolist() == [12, 14] and x[y == 1][:, 0, 0].tolist() == [0, 2]  # c first
    assert loaded.report["unused_rows"] == 6  # b's rows: not listed
    with pytest.raises(PassError, match="class 'd' is listed in dataset.classes but has no samples"):
        csv_windows.load(windows_ds(tmp_path, classes=["a", "d"]), tmp_path)


def test_one_label_per_file_layouts_and_split_folders(tmp_path):
    recording(tmp_path / "train" / "walk" / "w1.csv", ["?"] * 6)
    recording(tmp_path / "train" / "walk" / "w2.csv", ["?"] * 4, start=50)
    recording(tmp_path / "train" / "idle.csv", ["?"] * 8, start=100)
    recording(tmp_path / "test" / "walk.csv", ["?"] * 4)
    recording(tmp_path / "test" / "idle" / "i.csv", ["?"] * 4)
    ds = windows_ds(tmp_path, label=None)
    assert csv_windows.infer(ds, tmp_path) == {"classes": ["idle", "walk"]}
    loaded = csv_windows.load(ds, tmp_path)
    (x, y), (xt, yt) = loaded.train, loaded.test
    assert np.bincount(y).tolist() == [3, 3] and np.bincount(yt).tolist() == [1, 1]
    assert x[y == 1][:, 0, 0].tolist() == [0, 2, 50]  # windows of one file each
    assert loaded.source["test_source"] == "test/ recordings" and loaded.report["files"] == {"train": 3, "test": 2}


def test_infer_reads_the_label_column(tmp_path):
    recording(tmp_path / "x" / "r.csv", ["walk"] * 3 + ["idle"] * 3)
    recording(tmp_path / "r2.csv", ["run"] * 3)
    assert csv_windows.infer(windows_ds(tmp_path), tmp_path) == {"classes": ["idle", "run", "walk"]}


# --- csv_windows: the synthetic accelerometer ----------------------------------------------------


def test_synthetic_recordings_are_deterministic_and_count_windows_per_class(tmp_path):
    ds = windows_ds(window=16, stride=8, synthetic={"classes": 4, "per_class": 30, "test_per_class": 9, "seed": 3})
    assert csv_windows.infer(ds, tmp_path / "a") == {"classes": ["idle", "jump", "run", "walk"]}
    csv_windows.synthesize(ds, tmp_path / "a")
    csv_windows.synthesize(ds, tmp_path / "b")
    a = tree_bytes(tmp_path / "a")
    assert a == tree_bytes(tmp_path / "b")
    assert {k.split("/")[0] for k in a} == {".kiln-synthetic.json", "train", "test"}
    assert len([k for k in a if k.startswith("train/")]) >= 3 and len([k for k in a if k.startswith("test/")]) >= 2
    assert a["train/recording00.csv"].startswith(b"timestamp,ax,ay,az,label\n0.000000,")
    csv_windows.synthesize(windows_ds(window=16, stride=8, synthetic={"classes": 4, "per_class": 30, "seed": 4}),
                           tmp_path / "c")
    assert tree_bytes(tmp_path / "c")["train/recording00.csv"] != a["train/recording00.csv"]
    assert csv_windows.infer(ds, tmp_path / "a") == {"classes": ["idle", "jump", "run", "walk"]}
    loaded = csv_windows.load(ds, tmp_path / "a")
    assert np.bincount(loaded.train[1]).tolist() == [30] * 4 and np.bincount(loaded.test[1]).tolist() == [9] * 4
    assert loaded.train[0].shape == (120, 16, 3) and loaded.report["notes"] == 0  # timestamps agree with the rate
    assert loaded.source["synthetic"]["seed"] == 3 and loaded.report["unused_rows"] == 0
    # gravity (9.81 m/s^2) is there: the idle windows' mean magnitude
    idle = loaded.train[0][loaded.train[1] == 0]
    assert 9.3 < np.linalg.norm(idle.mean(1), axis=1).mean() < 10.3


def test_synthetic_one_label_per_file_and_listed_activities(tmp_path):
    ds = windows_ds(label=None, classes=["run", "stairs", "idle"], timestamp=None,
                    synthetic={"per_class": 10, "test_per_class": 4})
    csv_windows.synthesize(ds, tmp_path)
    assert {p.parent.name for p in (tmp_path / "train").rglob("*.csv")} == {"idle", "run", "stairs"}
    loaded = csv_windows.load(ds, tmp_path)
    assert loaded.source["classes"] == ["run", "stairs", "idle"] and np.bincount(loaded.train[1]).tolist() == [10] * 3
    with pytest.raises(ManifestError, match="field 'dataset.classes'.*has no 'swim'"):
        csv_windows.synthesize(windows_ds(classes=["swim", "run"]), tmp_path / "x")
    with pytest.raises(ManifestError, match="field 'dataset.synthetic.classes'.*at most 6"):
        csv_windows.infer(windows_ds(synthetic={"classes": 7}), tmp_path / "y")


def test_synthesize_refuses_to_overwrite_a_real_folder(tmp_path):
    write(tmp_path / "mine.csv", "x\n")
    with pytest.raises(PassError, match="not a Kiln synthetic set"):
        csv_windows.synthesize(windows_ds(), tmp_path)


def test_synthetic_activity_is_learnable_by_a_small_gru(tmp_path):
    """A GRU of the rnn family (hidden 16), normalized windows, a few epochs: >= 0.95."""
    import torch

    from kiln import nets
    from kiln.schema import RnnArchitecture

    ds = windows_ds(window=32, stride=16, synthetic={"per_class": 40, "test_per_class": 20, "seed": 0})
    csv_windows.synthesize(ds, tmp_path)
    loaded = csv_windows.load(ds, tmp_path)
    (x, y), (xt, yt) = loaded.train, loaded.test
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)

    def prep(a):  # (N, L, C) -> the normalize front end's (N, C, 1, L)
        return torch.tensor(((a - mean) / std).transpose(0, 2, 1)[:, :, None, :], dtype=torch.float32)

    torch.manual_seed(0)
    net = nets.build(RnnArchitecture(family="rnn", cell="gru", hidden=16), 3, 4, (1, 32))
    opt = torch.optim.Adam(net.parameters(), 0.01)
    X, Y = prep(x), torch.tensor(y)
    for _ in range(20):
        for b in torch.randperm(len(Y)).split(16):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(X[b]), Y[b]).backward()
            opt.step()
    with torch.no_grad():
        acc = (net(prep(xt)).argmax(1).numpy() == yt).mean()
    assert acc >= 0.95


# --- csv_table -----------------------------------------------------------------------------------

TABLE = "f1,label,f2\n1,cat,2\n3,dog,4\n5,cat,6\n7,dog,8\n"


def test_table_single_file_features_in_file_order(tmp_path):
    path = write(tmp_path / "t.csv", TABLE)
    ds = table_ds(path)
    assert csv_table.infer(ds, path) == {"features": ["f1", "f2"], "classes": ["cat", "dog"]}
    loaded = csv_table.load(ds, path)
    x, y = loaded.train
    assert x.dtype == np.float32 and x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]] and y.tolist() == [0, 1, 0, 1]
    assert loaded.test is None and loaded.source["features"] == ["f1", "f2"] and loaded.report["samples"] == 4
    x, _ = csv_table.load(table_ds(path, features=["f2", "f1"]), path).train
    assert x[0].tolist() == [2, 1]


def test_infer_with_classes_listed_reads_only_the_header(tmp_path):
    path = write(tmp_path / "t.csv", TABLE + "oops,cat,1,2,3\n")  # a bad row: infer never sees it
    assert csv_table.infer(table_ds(path, classes=["dog", "cat"]), path) == {"features": ["f1", "f2"]}


def test_table_folder_with_splits_and_listed_class_order(tmp_path):
    write(tmp_path / "train.csv", TABLE)
    write(tmp_path / "test.csv", "f1,label,f2\n9,dog,9\n")
    write(tmp_path / "val.csv", "f1,label,f2\n0,cat,0\n")
    write(tmp_path / "other.csv", TABLE)
    loaded = csv_table.load(table_ds(tmp_path, classes=["dog", "cat"]), tmp_path)
    assert loaded.train[1].tolist() == [1, 0, 1, 0] and loaded.test[1].tolist() == [0] and loaded.val[1].tolist() == [1]
    assert loaded.source["classes"] == ["dog", "cat"] and loaded.source["test_source"] == "test.csv"
    assert loaded.report["skipped"] == 1 and "other.csv" in loaded.report["skipped_examples"][0]


def test_table_folder_of_csv_files_is_concatenated_and_stray_files_skipped(tmp_path):
    write(tmp_path / "a.csv", TABLE)
    write(tmp_path / "b.csv", "f1,label,f2\n9,bird,9\n")
    write(tmp_path / "notes.txt", "hi")
    loaded = csv_table.load(table_ds(tmp_path), tmp_path)
    assert loaded.source["classes"] == ["bird", "cat", "dog"] and loaded.train[1].tolist() == [1, 2, 1, 2, 0]
    assert loaded.report["skipped"] == 1 and str(tmp_path / "notes.txt") in loaded.report["skipped_examples"][0]


@pytest.mark.parametrize("text, match", [
    ("f1,label,f2\n1,cat,2\n3,dog\n", r"t.csv:3: ragged row: 2 fields, the header has 3"),
    ("f1,label,f2\n1,cat,2\n,dog,4\n", r"t.csv:3: column 'f1': missing value"),
    ("f1,label,f2\n1,cat,2\n3,dog,four\n", r"t.csv:3: column 'f2': 'four' is not a number"),
    ("f1,label,f2\n1,cat,2\n\n3,,4\n", r"t.csv:4: column 'label': missing value"),
    ("f1,kind,f2\n1,cat,2\n", r"t.csv:1: missing column 'label'"),
    ("f1,label,f2\n1,cat,2\n3,cat,4\n", r"holds one class \('cat'\)"),
])
def test_table_bad_inputs_name_file_line_and_column(tmp_path, text, match):
    path = write(tmp_path / "t.csv", text)
    with pytest.raises(PassError, match=match):
        csv_table.load(table_ds(path), path)


def test_table_listed_feature_missing_and_listed_class_without_rows(tmp_path):
    path = write(tmp_path / "t.csv", TABLE)
    with pytest.raises(PassError, match=rf"{path}:1: missing column 'f3'"):
        csv_table.load(table_ds(path, features=["f1", "f3"]), path)
    with pytest.raises(PassError, match="class 'fish' is listed in dataset.classes but has no samples"):
        csv_table.load(table_ds(path, classes=["cat", "fish"]), path)


def test_synthetic_table_is_deterministic_and_separable(tmp_path):
    ds = table_ds(synthetic={"classes": 3, "per_class": 60, "test_per_class": 20, "seed": 1})
    assert csv_table.infer(ds, tmp_path / "a") == {"classes": ["class0", "class1", "class2"],
                                                   "features": [f"f{i:02d}" for i in range(12)]}
    csv_table.synthesize(ds, tmp_path / "a")
    csv_table.synthesize(ds, tmp_path / "b")
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    csv_table.synthesize(table_ds(synthetic={"classes": 3, "per_class": 60, "seed": 2}), tmp_path / "c")
    assert (tmp_path / "c" / "train.csv").read_bytes() != (tmp_path / "a" / "train.csv").read_bytes()
    assert csv_table.infer(ds, tmp_path / "a")["features"] == [f"f{i:02d}" for i in range(12)]
    loaded = csv_table.load(ds, tmp_path / "a")
    (x, y), (xt, yt) = loaded.train, loaded.test
    assert x.shape == (180, 12) and xt.shape == (60, 12) and np.bincount(yt).tolist() == [20] * 3
    # nearest class mean on the informative features: the classes are apart
    means = np.stack([x[y == k, :6].mean(0) for k in range(3)])
    assert (((xt[:, None, :6] - means[None]) ** 2).sum(-1).argmin(1) == yt).mean() >= 0.9
    assert csv_table.synthetic_classes(table_ds(synthetic={"classes": 12}))[:3] == ["class00", "class01", "class02"]


# --- through the data stage ----------------------------------------------------------------------


def _manifest(dataset: dict, arch: dict) -> dict:
    return {"name": "tiny", "requirements": {}, "dataset": {**dataset, "split": {"val": 0.2, "test": 0.2}},
            "architecture": arch, "training": {"epochs": 1, "batch": 16, "lr": 0.01, "seed": 0, "threads": 1},
            "targets": ["x86-host"]}


@pytest.mark.parametrize("dataset, arch, raw", [
    ({"format": "csv_windows", "path": "no/such", "columns": ["ax", "ay", "az"], "sample_rate": 50, "window": 16,
      "stride": 8, "synthetic": {"per_class": 10, "test_per_class": 4}}, {"family": "rnn", "hidden": 8}, [16, 3]),
    ({"format": "csv_table", "path": "no/such", "synthetic": {"per_class": 20, "test_per_class": 5}},
     {"family": "mlp", "widths": [8]}, [12]),
], ids=["csv_windows", "csv_table"])
def test_through_the_data_stage(kiln_env, dataset, arch, raw):
    from kiln import config
    from kiln.artifacts import Layout
    from passes import data
    from tests.conftest import write_project

    write_project(kiln_env["projects"], _manifest(dataset, arch))
    project = config.load_project("tiny")
    layout = Layout("tiny")
    assert list(project.dataset.raw_shape()) == raw and project.dataset.num_classes >= 3
    data.synthesize(project, layout)
    info = data.run(project, layout)
    counts, k = info["counts"], project.dataset.num_classes
    # the synthetic test/ split (test.csv) is the test split; val is split off the training data
    assert counts["test"] == dataset["synthetic"]["test_per_class"] * k
    assert counts["train"] + counts["val"] == dataset["synthetic"]["per_class"] * k and counts["val"] > 0
    assert len(np.load(layout.data / "train.npz")["y"]) == counts["train"]


# --- csv_table: an index column (pandas' to_csv) is never a feature --------------------------------


def pandas_csv(path: Path, columns: dict[str, list], index: bool = True, index_start: int = 0) -> Path:
    """The bytes ``pd.DataFrame(columns).to_csv(path)`` writes (pandas is not in the venv): the
    index as an unnamed first column, floats as repr, ``\\n`` line ends."""
    import csv

    n = len(next(iter(columns.values())))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([""] * index + list(columns))
        for i in range(n):
            w.writerow([str(i + index_start)] * index + [repr(v) if isinstance(v, float) else v
                                                         for v in (col[i] for col in columns.values())])
    return path


def sorted_by_class(n: int = 40, seed: int = 0) -> dict[str, list]:
    """Noise features, rows sorted by class: only the row number tells the classes apart."""
    rng = np.random.default_rng(seed)
    return {"f1": rng.normal(size=n).tolist(), "f2": rng.normal(size=n).tolist(), "f3": rng.normal(size=n).tolist(),
            "label": ["a"] * (n // 2) + ["b"] * (n - n // 2)}


def test_pandas_index_column_is_left_out_with_a_warning(tmp_path, caplog):
    path = pandas_csv(tmp_path / "t.csv", sorted_by_class())
    assert path.read_text().startswith(",f1,f2,f3,label\n0,")
    ds = table_ds(path)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        assert csv_table.infer(ds, path) == {"features": ["f1", "f2", "f3"], "classes": ["a", "b"]}
    assert f"{path}: column 1 ('') has no name: left out of the features" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "kiln.data"):
        loaded = csv_table.load(ds, path)  # without infer's answer: the same choice, the same warning
    assert loaded.source["features"] == ["f1", "f2", "f3"] and loaded.train[0].shape == (40, 3)
    assert f"{path}: column 1 ('') has no name" in caplog.text
    # pandas' name for that column when the file is read and written again
    again = write(tmp_path / "u.csv", path.read_text().replace(",f1,", "Unnamed: 0,f1,", 1))
    assert csv_table.infer(table_ds(again), again)["features"] == ["f1", "f2", "f3"]


@pytest.mark.parametrize("start", [0, 1])
def test_a_named_running_index_is_left_out_and_a_listed_one_kept_with_a_warning(tmp_path, caplog, start):
    cols = {"id": [i + start for i in range(40)], **sorted_by_class()}
    path = pandas_csv(tmp_path / "t.csv", cols, index=False)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        assert csv_table.infer(table_ds(path, classes=["a", "b"]), path) == {"features": ["f1", "f2", "f3"]}
        assert csv_table.load(table_ds(path), path).source["features"] == ["f1", "f2", "f3"]
    assert caplog.text.count(f"{path}: column 'id' holds the row number (0..n-1 or 1..n): left out") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, "kiln.data"):  # listed: the user asked for it
        loaded = csv_table.load(table_ds(path, features=["id", "f1"]), path)
    assert loaded.train[0][:3, 0].tolist() == [start, start + 1, start + 2]
    assert f"{path}: column 'id' listed in dataset.features holds the row number" in caplog.text


def test_columns_like_an_index_but_not_one_stay_features(tmp_path, caplog):
    n = 12
    cols = {"count": [0, 1, 2, 4] + list(range(5, 13)),  # a gap: not the row number
            "hour": [i + 2 for i in range(n)],  # +1 per row but from 2
            "flag": [i % 2 for i in range(n)], "x": [float(i) + 0.5 for i in range(n)],
            "label": ["a", "b"] * (n // 2)}
    path = pandas_csv(tmp_path / "t.csv", cols, index=False)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        assert csv_table.infer(table_ds(path), path)["features"] == ["count", "hour", "flag", "x"]
    assert "left out" not in caplog.text
    short = pandas_csv(tmp_path / "s.csv", {"f": [0, 1], "label": ["a", "b"]}, index=False)  # two rows say nothing
    assert csv_table.infer(table_ds(short), short)["features"] == ["f"]


def test_manifest_load_infers_features_without_the_index(kiln_env, caplog):
    from kiln import config
    from tests.conftest import write_project

    train = pandas_csv(kiln_env["root"] / "data" / "train.csv", sorted_by_class())
    pandas_csv(kiln_env["root"] / "data" / "test.csv", sorted_by_class(10, seed=1))
    write_project(kiln_env["projects"], _manifest({"format": "csv_table", "path": str(train.parent), "synthetic": None},
                                                  {"family": "mlp", "widths": [8]}))
    with caplog.at_level(logging.WARNING, "kiln.data"):
        project = config.load_project("tiny")
    assert project.dataset.feature_names == ["f1", "f2", "f3"] and project.dataset.raw_shape() == (3,)
    assert f"{train}: column 1 ('') has no name: left out of the features" in caplog.text


# --- infer's cache: a second manifest load reads no CSV -------------------------------------------


def _no_csv_reads(monkeypatch):
    import csv

    def boom(*a, **kw):
        raise AssertionError("a CSV file was read")

    monkeypatch.setattr(csv, "reader", boom)


def test_infer_is_cached_by_size_and_mtime(tmp_path, monkeypatch, caplog):
    import os

    train = pandas_csv(tmp_path / "train.csv", sorted_by_class())
    pandas_csv(tmp_path / "test.csv", sorted_by_class(10, seed=1))
    ds = table_ds(tmp_path)
    first = csv_table.infer(ds, tmp_path)
    assert first == {"features": ["f1", "f2", "f3"], "classes": ["a", "b"]}
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, "kiln.data"):
        _no_csv_reads(m)
        assert csv_table.infer(ds, tmp_path) == first
    assert f"{train}: column 1 ('') has no name" in caplog.text  # the warning still shows, from the cache
    with monkeypatch.context() as m:  # another setting, another entry: it reads
        _no_csv_reads(m)
        with pytest.raises(AssertionError, match="a CSV file was read"):
            csv_table.infer(table_ds(tmp_path, features=["f1"]), tmp_path)
    # a new class in a rewritten file (its size changes)
    text = train.read_text()
    train.write_text(text + "40,0.1,0.2,0.3,c\n")
    assert csv_table.infer(ds, tmp_path)["classes"] == ["a", "b", "c"]
    # the same size, another mtime
    st = train.stat()
    train.write_text(text.replace(",b\n", ",d\n"))
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert csv_table.infer(ds, tmp_path)["classes"] == ["a", "b", "d"]  # b: test.csv
    with monkeypatch.context() as m:
        _no_csv_reads(m)
        assert csv_table.infer(ds, tmp_path)["classes"] == ["a", "b", "d"]


def test_windows_infer_is_cached_and_streams(tmp_path, monkeypatch):
    path = recording(tmp_path / "r1.csv", ["walk"] * 3 + ["idle"] * 3)
    recording(tmp_path / "r2.csv", ["run"] * 3)
    ds = windows_ds(tmp_path)
    with monkeypatch.context() as m:  # streamed: never the whole table
        m.setattr(csv_windows, "read_table", lambda *a: pytest.fail("infer read a whole table"))
        assert csv_windows.infer(ds, tmp_path) == {"classes": ["idle", "run", "walk"]}
    with monkeypatch.context() as m:
        _no_csv_reads(m)
        assert csv_windows.infer(ds, tmp_path) == {"classes": ["idle", "run", "walk"]}
    recording(tmp_path / "r3.csv", ["jump"] * 3)  # a new file
    assert csv_windows.infer(ds, tmp_path)["classes"] == ["idle", "jump", "run", "walk"]
    path.write_text(path.read_text().replace("walk", "swim"))
    assert csv_windows.infer(ds, tmp_path)["classes"] == ["idle", "jump", "run", "swim"]


def test_table_infer_streams_and_stops_once_no_column_can_be_an_index(tmp_path, monkeypatch):
    rows = "".join(f"{i * 2},{i},cat\n" for i in range(5))
    path = write(tmp_path / "t.csv", "a,b,label\n" + rows + "1,2\n")  # a ragged row after 'a' fails the test
    # classes listed: reading stops at row 2 ('a' 0, 2: not the row number); 'b' is one
    with pytest.raises(PassError, match="t.csv:7: ragged row"):
        csv_table.infer(table_ds(path, classes=["cat", "dog"]), path)
    path = write(tmp_path / "u.csv", "a,b,label\n" + "".join(f"{i * 2},{i + 7},cat\n" for i in range(5)) + "1,2\n")
    monkeypatch.setattr(csv_table, "read_table", lambda *a: pytest.fail("infer read a whole table"))
    assert csv_table.infer(table_ds(path, classes=["cat", "dog"]), path) == {"features": ["a", "b"]}
