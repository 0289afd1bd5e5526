"""format: speech_commands: the Speech Commands v2 tree as it ships, set up as MLPerf Tiny's
keyword spotting (_silence_, _unknown_, the words), on the synthetic tree written in the same
layout and on hand-made trees."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from kiln.errors import ManifestError, PassError
from kiln.schema import SpeechCommandsDataset
from passes import data
from passes.formats import audio_folders, speech_commands as sc

WORDS = ["yes", "no", "up"]


def ds_of(path, **kw) -> SpeechCommandsDataset:
    base = {"format": "speech_commands", "path": str(path), "words": WORDS, "clip_seconds": 0.5,
            "synthetic": {"speakers": 20, "clips": 2, "other_words": 3, "seed": 1}}
    return SpeechCommandsDataset.model_validate({**base, **kw})


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sc") / "tree"
    sc.synthesize(ds_of(root), root)
    return root


def test_the_synthetic_tree_is_laid_out_as_speech_commands_ships(tree):
    words = sorted(d.name for d in tree.iterdir() if d.is_dir() and not d.name.startswith("_"))
    assert words == sorted(WORDS + ["bed", "bird", "cat"])
    names = [p.name for p in (tree / "yes").glob("*.wav")]
    assert len(names) == 40 and all(re.fullmatch(r"[0-9a-f]{8}_nohash_[01]\.wav", n) for n in names)
    assert len(list((tree / sc.NOISE).glob("*.wav"))) == 3
    listed = {s: (tree / f).read_text().split() for s, f in sc.LISTS.items()}
    assert listed["val"] and listed["test"] and all((tree / f).is_file() for v in listed.values() for f in v)
    speakers = {s: {sc.speaker(f) for f in v} for s, v in listed.items()}
    assert not speakers["val"] & speakers["test"]


def test_load_builds_silence_and_unknown_as_mlperf_does_and_keeps_the_lists(tree):
    ds = ds_of(tree)
    loaded = sc.load(ds, tree)
    assert loaded.source["classes"] == ["_silence_", "_unknown_", *WORDS]
    listed = {s: set((tree / f).read_text().split()) for s, f in sc.LISTS.items()}
    for split, (x, y) in (("train", loaded.train), ("val", loaded.val), ("test", loaded.test)):
        c = loaded.report["counts"][split]
        assert c["unknown"] == math.ceil(c["words"] * 0.1) and c["silence"] == math.ceil(c["words"] * 0.1)
        assert x.dtype == np.int16 and x.shape[1:] == (8000,) and len(x) == len(y) == sum(c.values())
        srcs = loaded.sources[split]
        words = [s for s, label in zip(srcs, y) if label >= 1]
        assert all(s.split("/")[0] in WORDS for s, label in zip(srcs, y) if label >= 2)
        assert all(s.split("/")[0] not in WORDS for s, label in zip(srcs, y) if label == 1)  # _unknown_: other words
        assert all(s.startswith("_background_noise_/") and s.endswith(f"#{split}") for s, label in zip(srcs, y)
                   if label == 0)
        if split != "train":
            assert set(words) <= listed[split]
        else:
            assert not set(words) & (listed["val"] | listed["test"])


def test_no_speaker_and_no_stretch_of_noise_is_in_two_splits(tree, tmp_path):
    ds = ds_of(tree)
    info = data.prepare(sc.load(ds, tree), tmp_path / "out", ds.image_size, ds.split.val, ds.split.test,
                        ds.split.seed, front_end=data.front_end_of(ds))
    g = info["groups"]
    assert g["by"] == "speaker" and g["shared"] == {}
    names = {s: set(g[s]["names"]) for s in ("train", "val", "test")}
    assert not names["train"] & names["test"] and not names["train"] & names["val"]
    assert info["class_counts"]["test"][0] > 0 and info["class_counts"]["test"][1] > 0


def test_without_list_files_the_split_is_the_speaker_hash(tmp_path):
    root = tmp_path / "t"
    for n, who in enumerate(f"{i:08x}" for i in range(0, 60000, 1000)):
        for word in ("yes", "no", "up", "cat"):
            (root / word).mkdir(parents=True, exist_ok=True)
            x = np.random.default_rng(n).normal(0, 300, 8000).astype("<i2")
            (root / word / f"{who}_nohash_0.wav").write_bytes(audio_folders.wav_bytes(x, 16000))
    ds = ds_of(root, silence_percentage=0, split={"val": 0.2, "test": 0.2})
    loaded = sc.load(ds, root)
    assert loaded.report["split_by"] == "the hash of each speaker (no list files)"
    for split in ("train", "val", "test"):
        assert loaded.sources[split]
        assert {sc.which_set(f, 20, 20) for f in loaded.sources[split]} == {split}
    (root / "testing_list.txt").write_text("yes/00000000_nohash_0.wav\n")
    with pytest.raises(PassError, match="has testing_list.txt but not validation_list.txt"):
        sc.load(ds, root)


def test_which_set_is_the_hash_of_the_speaker():
    a, b = sc.which_set("yes/0a7c2a8d_nohash_0.wav", 10, 10), sc.which_set("no/0a7c2a8d_nohash_4.wav", 10, 10)
    assert a == b  # one speaker, every word, one split
    spread = [sc.which_set(f"x/{i:08x}_nohash_0.wav", 10, 10) for i in range(2000)]
    assert 0.07 < spread.count("val") / 2000 < 0.13 and 0.07 < spread.count("test") / 2000 < 0.13


def test_manifest_errors_name_the_field(tree, tmp_path):
    with pytest.raises(ValueError, match="speech_commands' classes are _silence_, _unknown_ and dataset.words"):
        ds_of(tree, classes=["a", "b"])
    with pytest.raises(ValueError, match="listed twice"):
        ds_of(tree, words=["yes", "yes"])
    with pytest.raises(ValueError, match="not a word folder"):
        ds_of(tree, words=["_silence_"])
    with pytest.raises(ManifestError, match=r"field 'dataset.words': 'stop' has no folder"):
        sc.infer(ds_of(tree, words=["yes", "stop"]), tree)
    with pytest.raises(ManifestError, match="holds no Speech Commands tree"):
        sc.locate(ds_of(tmp_path / "none", synthetic=None), None)


def test_silence_needs_noise_long_enough(tmp_path):
    root = tmp_path / "t"
    for word in ("yes", "no"):
        (root / word).mkdir(parents=True)
        for i in range(0, 30000, 1000):
            x = np.random.default_rng(i).normal(0, 300, 8000).astype("<i2")
            (root / word / f"{i:08x}_nohash_0.wav").write_bytes(audio_folders.wav_bytes(x, 16000))
    (root / sc.NOISE).mkdir()
    (root / sc.NOISE / "short.wav").write_bytes(audio_folders.wav_bytes(np.zeros(9000, "<i2"), 16000))
    with pytest.raises(PassError, match="no noise recording long enough"):
        sc.load(ds_of(root, words=["yes", "no"], split={"val": 0.3, "test": 0.3}), root)
