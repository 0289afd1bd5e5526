"""Splits that never leak: whole groups (a recording, a speaker, a GTSRB track) go to one split.

The leakage tests build data sets whose class is random per recording (per speaker) and whose
only learnable trait is a per-recording (per-speaker) fingerprint. A 1-nearest-neighbour
classifier on the data stage's own train/test files then scores about 1.0 when a recording's
windows sit in both splits (the leak: it recognises the recording, not the class) and chance
when the split keeps every recording whole.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import PassError
from kiln.schema import AudioFoldersDataset, CsvWindowsDataset, GtsrbDataset
from passes import data
from passes.formats import audio_folders, csv_windows, gtsrb

CLASSES = ["a", "b", "c", "d"]  # chance: 0.25


def nn_test_accuracy(out: Path) -> float:
    """Test accuracy of a 1-nearest-neighbour classifier fitted on the train split."""
    from sklearn.neighbors import KNeighborsClassifier

    with np.load(out / "train.npz") as tr, np.load(out / "test.npz") as te:
        xtr, ytr, xte, yte = tr["x"], tr["y"], te["x"], te["y"]
    knn = KNeighborsClassifier(1).fit(xtr.reshape(len(xtr), -1), ytr)
    return float((knn.predict(xte.reshape(len(xte), -1)) == yte).mean())


def assert_groups_disjoint(info: dict) -> None:
    g = info["groups"]
    names = {s: set(g[s]["names"]) for s in ("train", "val", "test")}
    assert names["train"] and names["test"]
    assert not names["train"] & names["test"] and not names["train"] & names["val"] and not names["val"] & names["test"]
    assert g["shared"] == {}


def fingerprint_recordings(root: Path, n: int = 40, rows: int = 200, seed: int = 0, labels=None) -> None:
    """``n`` recordings, each of one class (in turn); the channels are a random per-recording
    constant pattern plus noise: nothing but the recording tells the class."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for r in range(n):
        label = labels[r] if labels else CLASSES[r % len(CLASSES)]
        pattern = rng.normal(0, 3, 3)
        lines = ["timestamp,ax,ay,az,label"]
        for i in range(rows):
            v = pattern + rng.normal(0, 0.05, 3)
            lines.append(f"{i / 50:.3f},{v[0]:.4f},{v[1]:.4f},{v[2]:.4f},{label}")
        (root / f"rec{r:02d}.csv").write_text("\n".join(lines) + "\n")


def windows_ds(root: Path, **split) -> CsvWindowsDataset:
    return CsvWindowsDataset.model_validate({
        "format": "csv_windows", "path": str(root), "columns": ["ax", "ay", "az"], "sample_rate": 50,
        "window": 16, "stride": 4, "split": {"val": 0.15, "test": 0.25, "seed": 0, **split}})


def prepare(ds, loaded, out: Path) -> dict:
    sp = ds.split
    return data.prepare(loaded, out, ds.image_size, sp.val, sp.test, sp.seed, group_by=sp.group_by,
                        front_end=data.front_end_of(ds))


def test_overlapping_windows_of_a_recording_never_straddle_splits(tmp_path):
    root = tmp_path / "rec"
    fingerprint_recordings(root)
    ds = windows_ds(root)
    loaded = csv_windows.load(ds, root)
    info = prepare(ds, loaded, tmp_path / "out")
    assert info["groups"]["by"] == "recording" and info["params"]["group_by"] == "recording"
    assert_groups_disjoint(info)
    assert info["groups"]["test"]["count"] >= 5
    assert nn_test_accuracy(tmp_path / "out") < 0.5  # chance is 0.25

    # the leak as it was: windows split one by one score the recording, not the class
    leaky = prepare(windows_ds(root, group_by="none"), loaded, tmp_path / "leaky")
    assert leaky["groups"]["by"] == "sample"
    assert nn_test_accuracy(tmp_path / "leaky") > 0.95


def test_group_by_none_is_warned_when_samples_share_a_file(tmp_path, caplog):
    root = tmp_path / "rec"
    fingerprint_recordings(root, n=8)
    ds = windows_ds(root, group_by="none")
    with caplog.at_level(logging.WARNING, "kiln.data"):
        prepare(ds, csv_windows.load(ds, root), tmp_path / "out")
    assert "group_by is none" in caplog.text


def speaker_clips(root: Path, speakers: int = 24, clips: int = 6, seed: int = 0) -> None:
    """Speech Commands' layout, ``<word>/<speaker>_nohash_<n>.wav``: each speaker says one
    random word, always the same way (a speaker-specific tone); the words carry no sound of
    their own, so only the speaker tells the word."""
    rng = np.random.default_rng(seed)
    t = np.arange(800) / 8000
    for s in range(speakers):
        word = CLASSES[s % len(CLASSES)] if s < len(CLASSES) else CLASSES[int(rng.integers(len(CLASSES)))]
        f = 300 + 130 * s  # one tone per speaker, apart by more than a mel band
        speaker = f"{rng.integers(16 ** 8):08x}"
        (root / word).mkdir(parents=True, exist_ok=True)
        for n in range(clips):
            x = 8000 * np.sin(2 * np.pi * f * t) + rng.normal(0, 200, len(t))
            (root / word / f"{speaker}_nohash_{n}.wav").write_bytes(audio_folders.wav_bytes(x.astype("<i2"), 8000))


def audio_ds(root: Path, **split) -> AudioFoldersDataset:
    return AudioFoldersDataset.model_validate({
        "format": "audio_folders", "path": str(root), "sample_rate": 8000, "clip_seconds": 0.1,
        "split": {"val": 0.15, "test": 0.25, "seed": 0, **split}})


def test_clips_of_a_speaker_never_straddle_splits(tmp_path):
    root = tmp_path / "words"
    speaker_clips(root)
    ds = audio_ds(root)
    loaded = audio_folders.load(ds, root)
    info = prepare(ds, loaded, tmp_path / "out")
    assert info["groups"]["by"] == "speaker"
    assert_groups_disjoint(info)
    assert all(len(name) == 8 for name in info["groups"]["train"]["names"])  # the speaker hash, not the file
    # the raw int16 clips: a speaker's tone is the whole signal
    assert nn_test_accuracy(tmp_path / "out") < 0.6
    prepare(audio_ds(root, group_by="file"), loaded, tmp_path / "leaky")
    assert nn_test_accuracy(tmp_path / "leaky") > 0.95


def test_gtsrb_tracks_are_groups(tmp_path):
    root = tmp_path / "gtsrb"
    gtsrb.synthesize_gtsrb(root, per_class=120, test_per_class=0, seed=0)  # four tracks of 30 per class
    ds = GtsrbDataset(format="gtsrb", path=str(root), image_size=(8, 8))
    loaded = gtsrb.load(ds, root)
    assert loaded.group_by == "file"  # Kiln's synthetic frames are drawn one by one: not a track's
    info = data.prepare(loaded, tmp_path / "out", (8, 8), 0.1, 0.2, 0, group_by=gtsrb.TRACK)  # as for the real one
    assert info["groups"]["by"] == gtsrb.TRACK
    assert_groups_disjoint(info)
    assert all(re.fullmatch(r"000\d\d/0000[0-3]", n) for n in info["groups"]["train"]["names"])
    assert sum(info["counts"].values()) == 43 * 120 and all(c % 30 == 0 for c in info["counts"].values())
    assert all(n > 0 for split in ("train", "val", "test") for n in info["class_counts"][split])


def test_a_regex_names_the_group(tmp_path):
    root = tmp_path / "rec"
    fingerprint_recordings(root, n=12)
    ds = windows_ds(root, group_by=r"rec0(\d)")  # rec00..rec09 are ten groups; rec10, rec11 their own
    info = prepare(ds, csv_windows.load(ds, root), tmp_path / "out")
    names = set().union(*(set(info["groups"][s]["names"]) for s in ("train", "val", "test")))
    assert names == {str(d) for d in range(10)} | {"rec10.csv", "rec11.csv"}
    assert_groups_disjoint(info)


@pytest.mark.parametrize("bad", ["rec(\\d", "(a)(b)"])
def test_a_bad_group_rule_is_refused_at_load(tmp_path, bad):
    with pytest.raises(ValueError, match="group_by"):
        windows_ds(tmp_path, group_by=bad)


def test_shipped_split_folders_that_share_a_speaker_are_named(tmp_path, caplog):
    speaker_clips(tmp_path / "train", speakers=12)
    for split in ("train", "test"):
        for word in CLASSES:
            (tmp_path / split / word).mkdir(parents=True, exist_ok=True)
            for n in range(2):
                x = np.random.default_rng(n).normal(0, 100, 800).astype("<i2")
                (tmp_path / split / word / f"cafe{word}00_nohash_{split}{n}.wav").write_bytes(audio_folders.wav_bytes(x, 8000))
    ds = audio_ds(tmp_path)
    with caplog.at_level(logging.WARNING, "kiln.data"):
        info = prepare(ds, audio_folders.load(ds, tmp_path), tmp_path / "out")
    shared = info["groups"]["shared"]
    assert set(shared) <= {"train+test", "val+test"}
    assert sorted(sum(shared.values(), [])) == [f"cafe{w}00" for w in CLASSES]
    assert "split as the data set ships them" in caplog.text


def test_recordings_of_one_class_each_cannot_be_split(tmp_path):
    fingerprint_recordings(tmp_path / "rec", n=3, labels=["a", "b", "c"])
    ds = windows_ds(tmp_path / "rec")
    with pytest.raises(PassError, match="no class has samples in two groups"):
        prepare(ds, csv_windows.load(ds, tmp_path / "rec"), tmp_path / "out")


# --- issue: a class missing from a split, silently -------------------------------------------------


def test_a_one_file_class_is_refused_naming_the_class_and_split(tmp_path):
    root = tmp_path / "words"
    speaker_clips(root, speakers=16)
    lone = root / "e"
    lone.mkdir()
    (lone / "feed0000_nohash_0.wav").write_bytes(audio_folders.wav_bytes(np.zeros(800, "<i2"), 8000))
    ds = audio_ds(root)
    with pytest.raises(PassError, match=r"the test split has no sample of class\(es\) 'e' \(1 sample"):
        prepare(ds, audio_folders.load(ds, root), tmp_path / "out")


def test_a_test_folder_missing_a_class_is_refused(tmp_path):
    for split, words in (("train", "abc"), ("test", "ab")):
        for word in words:
            (tmp_path / split / word).mkdir(parents=True)
            for n in range(3):
                x = np.random.default_rng(n).normal(0, 100, 800).astype("<i2")
                (tmp_path / split / word / f"{split}{word}{n}_nohash_0.wav").write_bytes(audio_folders.wav_bytes(x, 8000))
    ds = audio_ds(tmp_path)
    with pytest.raises(PassError, match=r"test split has no sample of class\(es\) 'c'"):
        prepare(ds, audio_folders.load(ds, tmp_path), tmp_path / "out")


def test_data_json_records_the_groups(tmp_path):
    root = tmp_path / "rec"
    fingerprint_recordings(root, n=12)
    ds = windows_ds(root)
    prepare(ds, csv_windows.load(ds, root), tmp_path / "out")
    info = json.loads((tmp_path / "out" / "data.json").read_text())
    every = sorted(sum((info["groups"][s]["names"] for s in ("train", "val", "test")), []))
    assert every == [f"rec{r:02d}.csv" for r in range(12)]
    assert info["params"]["split_version"] == data.SPLIT_VERSION
