"""format: speech_commands: the Speech Commands v2 tree as it ships, set up as MLPerf Tiny's
keyword spotting (_silence_, _unknown_, the words), on the synthetic tree written in the same
layout and on hand-made trees."""

from __future__ import annotations

import math
import shutil
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


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """The clips speech_commands decodes (the noise recordings are read on every run: not counted)."""
    seen: list[str] = []
    real = sc.read_wav

    def read_wav(path, sample_rate):
        if sc.NOISE not in Path(path).parts:
            seen.append(Path(path).relative_to(path.parents[1]).as_posix())
        return real(path, sample_rate)

    monkeypatch.setattr(sc, "read_wav", read_wav)
    return seen


def _files(loaded) -> dict[str, str]:
    """Each clip file's split (the silence clips left out)."""
    return {f: s for s in ("train", "val", "test") for f in loaded.sources[s] if "#" not in f}


def _assert_same(a, b) -> None:
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb) = getattr(a, split), getattr(b, split)
        assert np.array_equal(np.asarray(xa), np.asarray(xb)) and np.array_equal(ya, yb)
        assert a.sources[split] == b.sources[split]


def test_a_rerun_decodes_only_the_clips_added_or_changed_and_keeps_every_split(tree, tmp_path, counted):
    """Through the decode cache: the arrays the direct load gives, each split's rows keyed (the
    silence clips too); a rerun decodes nothing; after a clip is added, one changed and one
    removed, only the added and the changed are decoded and every other clip keeps its split."""
    from passes.support import decode_cache

    root = tmp_path / "tree"
    shutil.copytree(tree, root)
    ds = ds_of(root)

    def cached() -> tuple:
        counted.clear()
        with decode_cache.active(tmp_path / "cache", 1) as stats:
            loaded = sc.load(ds, root)
        assert stats.decoded == len(counted)
        return loaded, sorted(counted)

    first, decoded = cached()
    before = _files(first)
    assert decoded == sorted(before)  # every clip used, once
    x = first.train[0]
    assert isinstance(x, decode_cache.Joined) and len(set(x.keys.tolist())) == len(x) == len(first.train[1])
    assert sum(k.startswith(b"silence:") for k in x.keys.tolist()) == first.report["counts"]["train"]["silence"] > 0
    _assert_same(first, sc.load(ds, root))  # the load outside the cache: the same arrays
    with decode_cache.active(tmp_path / "cache2", 2) as two:  # forked workers: the same arrays
        _assert_same(first, sc.load(ds, root))
    assert two.workers == 2 and two.decoded == len(before)
    assert cached()[1] == []

    train = [f for f, s in before.items() if s == "train" and f.split("/")[0] in WORDS]
    removed, changed = next(f for f in train if f.startswith("no/")), next(f for f in train if f.startswith("up/"))
    added = "yes/fedcba98_nohash_0.wav"  # a speaker in neither list: train
    (root / removed).unlink()  # one word clip out, one in: as many _unknown_ and _silence_ clips as before
    rng = np.random.default_rng(7)
    (root / changed).write_bytes(audio_folders.wav_bytes(rng.normal(0, 900, 8000).astype("<i2"), 16000))
    (root / added).write_bytes(audio_folders.wav_bytes(rng.normal(0, 900, 8000).astype("<i2"), 16000))
    again, decoded = cached()
    assert decoded == sorted([added, changed])
    after = _files(again)
    assert after[added] == "train" and removed not in after
    assert {f: s for f, s in after.items() if f != added} == {f: s for f, s in before.items() if f != removed}
    x, _ = again.train
    row = again.sources["train"].index(changed)
    assert np.array_equal(x[[row]][0], audio_folders.read_wav(root / changed, 16000)[:8000])  # the new bytes
    silence = lambda loaded: [k for k in loaded.train[0].keys.tolist() if k.startswith(b"silence:")]  # noqa: E731
    assert silence(again) == silence(first)
    _assert_same(again, sc.load(ds, root))


def test_a_cached_training_split_is_sharded(tree, tmp_path, monkeypatch):
    """The clips' rows and the silence clips joined carry keys: the training split is sharded,
    and reads back as the direct load writes it in one file (features equal to rounding)."""
    from passes.support import decode_cache, splits

    ds = ds_of(tree)
    fe = data.front_end_of(ds)
    data.prepare(sc.load(ds, tree), tmp_path / "one", ds.image_size, ds.split.val, ds.split.test, ds.split.seed,
                 front_end=fe)
    monkeypatch.setattr(splits, "SHARD_BYTES", 24 * 10 * 4 * 8)  # about 8 rows of features a shard
    with decode_cache.active(tmp_path / "cache", 1):
        data.prepare(sc.load(ds, tree), tmp_path / "many", ds.image_size, ds.split.val, ds.split.test,
                     ds.split.seed, front_end=fe)
    (x1, y1), (xn, yn) = splits.open_split(tmp_path / "one", "train"), splits.open_split(tmp_path / "many", "train")
    assert isinstance(xn, splits.Shards) and len(xn.parts) >= 3
    # the features of a shard are computed in its own batches: equal to float32 rounding
    assert np.allclose(np.asarray(x1), np.asarray(xn), rtol=0, atol=1e-5) and np.array_equal(y1, yn)


def test_an_unknown_pick_moves_only_with_its_own_clip():
    names = [f"cat/{i:08x}_nohash_0.wav" for i in range(200)]
    picked = {names[i] for i in sc._pick_unknown(names, 20, 0)}
    grown = names + ["cat/ffffffff_nohash_9.wav"]
    assert len({grown[i] for i in sc._pick_unknown(grown, 20, 0)} - picked) <= 1
    gone = [n for n in names if n != sorted(picked)[0]]
    assert len({gone[i] for i in sc._pick_unknown(gone, 20, 0)} - picked) == 1
    assert {names[i] for i in sc._pick_unknown(names, 20, 1)} != picked  # seeded
