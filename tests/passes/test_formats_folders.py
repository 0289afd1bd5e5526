"""Dataset formats ``image_folders`` and ``audio_folders`` (passes/formats/support/folders.py and the two
format modules): layouts with and without train/ val/ test/, the class list, every bad input
the formats report or refuse, the deterministic synthetic generators, and the data stage."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln.artifacts import Layout
from kiln.errors import ManifestError, PassError
from kiln.schema import AudioFoldersDataset, ImageFoldersDataset
from passes.formats import audio_folders, image_folders
from passes.formats.support import folders

RATE = 8000  # Hz; 0.1 s clips of 800 samples keep the tests fast
LENGTH = 800


def _img_ds(root: Path, **kw) -> ImageFoldersDataset:
    return ImageFoldersDataset.model_validate({"format": "image_folders", "path": str(root), "image_size": [8, 8],
                                               **kw})


def _wav_ds(root: Path, **kw) -> AudioFoldersDataset:
    return AudioFoldersDataset.model_validate({"format": "audio_folders", "path": str(root), "sample_rate": RATE,
                                               "clip_seconds": LENGTH / RATE, **kw})


def _png(path: Path, value: int, size=(8, 8), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, value // 2, 255 - value)
    Image.new(mode, size, colour).save(path)
    return path


def _wav(path: Path, samples, rate=RATE, channels=1, width=2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = {1: np.uint8, 2: "<i2"}[width]
    path.write_bytes(audio_folders.wav_bytes(np.asarray(samples).astype(dtype), rate, channels, width))
    return path


def _images(root: Path, classes=("cat", "dog"), n=3) -> Path:
    for k, c in enumerate(classes):
        for i in range(n):
            _png(root / c / f"{i}.png", 40 * k + i)
    return root


# --- layouts and the class list -------------------------------------------------------------------


def test_image_folders_flat_layout_sorted_classes_uint8_nhwc(tmp_path):
    _images(tmp_path, classes=("zebra", "ant"), n=3)
    _png(tmp_path / "ant" / "big.JPG", 7, size=(20, 10))  # upper-case extension, another size: resized
    loaded = image_folders.load(_img_ds(tmp_path), tmp_path)
    x, y = loaded.train
    assert x.shape == (7, 8, 8, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert loaded.source["classes"] == ["ant", "zebra"] and loaded.source["num_classes"] == 2
    assert np.bincount(y).tolist() == [4, 3]
    assert loaded.test is None and loaded.val is None
    assert loaded.report["samples"] == 7 and loaded.report["skipped"] == 0
    # written as zebra 0.. and ant 40..; read back in sorted order: ant (label 0) first
    assert x[0, 0, 0].tolist() == [40, 20, 215] and x[y == 1][0, 0, 0].tolist() == [0, 0, 255]
    assert image_folders.infer(_img_ds(tmp_path), tmp_path) == {"classes": ["ant", "zebra"]}


def test_image_folders_train_val_test_subfolders(tmp_path):
    _images(tmp_path / "train", n=4)
    _images(tmp_path / "test", n=2)
    _images(tmp_path / "val", classes=("dog",), n=1)  # a split may lack a class
    loaded = image_folders.load(_img_ds(tmp_path), tmp_path)
    assert len(loaded.train[1]) == 8 and len(loaded.test[1]) == 4 and loaded.val[1].tolist() == [1]
    assert loaded.source["test_source"] == "test/ folder"
    assert loaded.report["splits"] == {"train": 8, "val": 1, "test": 4}
    assert image_folders.infer(_img_ds(tmp_path), tmp_path) == {"classes": ["cat", "dog"]}


def test_listed_classes_fix_the_order(tmp_path):
    _images(tmp_path, classes=("cat", "dog", "owl"), n=2)
    loaded = image_folders.load(_img_ds(tmp_path, classes=["owl", "cat"]), tmp_path)
    x, y = loaded.train
    assert loaded.source["classes"] == ["owl", "cat"]
    assert y.tolist() == [0, 0, 1, 1]
    assert x[0, 0, 0, 0] == 80 and x[2, 0, 0, 0] == 0  # owl (value 80) first, then cat
    assert loaded.report["ignored_folders"] == [str(tmp_path / "dog")]  # the unlisted class is left out


def test_grayscale_is_converted_and_resized(tmp_path):
    _png(tmp_path / "a" / "0.png", 100, size=(30, 12))
    _png(tmp_path / "b" / "0.bmp", 200, size=(5, 5), mode="L")
    x, y = image_folders.load(_img_ds(tmp_path, color="grayscale", image_size=[6, 4]), tmp_path).train
    assert x.shape == (2, 6, 4, 1) and y.tolist() == [0, 1]
    assert x[1, 0, 0, 0] == 200
    assert x[0, 0, 0, 0] == round(0.299 * 100 + 0.587 * 50 + 0.114 * 155)  # PIL's L conversion


# --- bad inputs: reported and skipped, or refused -------------------------------------------------


def test_corrupt_image_and_stray_files_are_reported_and_skipped(tmp_path, caplog):
    _images(tmp_path, n=2)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "dog" / "notes.txt").write_text("label me")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "README.md").write_text("our data")
    with caplog.at_level("WARNING", logger="kiln.data"):
        loaded = image_folders.load(_img_ds(tmp_path), tmp_path)
    assert len(loaded.train[1]) == 4
    rep = loaded.report
    assert rep["skipped"] == 4 and len(rep["skipped_examples"]) == 4
    text = "\n".join(rep["skipped_examples"])
    for name in ("broken.png", "notes.txt", ".DS_Store", "README.md"):
        assert name in text
    assert f"{tmp_path / 'cat' / 'broken.png'}: OSError" in text  # PIL's reason, after the path
    assert "skipped 4 file(s)" in caplog.text and "broken.png" in caplog.text


def test_a_class_whose_every_file_is_unreadable_is_an_error(tmp_path):
    _images(tmp_path, classes=("cat",), n=2)
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "a.png").write_bytes(b"garbage")
    with pytest.raises(PassError, match="class 'dog'.*could be read"):
        image_folders.load(_img_ds(tmp_path), tmp_path)


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    _images(tmp_path, n=1)
    (tmp_path / "owl").mkdir()
    (tmp_path / "owl" / "notes.txt").write_text("todo")  # no image: still empty
    with pytest.raises(PassError) as e:
        image_folders.load(_img_ds(tmp_path), tmp_path)
    assert f"class folder {tmp_path / 'owl'} holds no" in str(e.value) and "empty class" in str(e.value)


def test_one_class_is_an_error(tmp_path):
    _images(tmp_path, classes=("cat",), n=2)
    with pytest.raises(PassError, match=r"1 class folder\(s\) \(cat\); a classifier needs at least two"):
        image_folders.load(_img_ds(tmp_path), tmp_path)
    with pytest.raises(ManifestError, match="field 'dataset.classes'.*1 class folder"):
        image_folders.infer(_img_ds(tmp_path), tmp_path)


def test_listed_class_without_a_folder_is_an_error(tmp_path):
    _images(tmp_path, n=1)
    with pytest.raises(PassError) as e:
        image_folders.load(_img_ds(tmp_path, classes=["cat", "bird"]), tmp_path)
    msg = str(e.value)
    assert "field 'dataset.classes'" in msg and "'bird'" in msg and str(tmp_path / "bird") in msg


def test_split_folders_mixed_with_class_folders_or_an_unknown_test_class_are_errors(tmp_path):
    _images(tmp_path / "train", n=1)
    _images(tmp_path / "test", classes=("cat", "emu"), n=1)
    with pytest.raises(PassError, match=r"class 'emu' is in test/ but not in train/"):
        image_folders.load(_img_ds(tmp_path), tmp_path)
    _images(tmp_path / "horse", classes=("x",), n=1)
    with pytest.raises(PassError, match=r"mixes split folders \(test, train\) with other folders \(horse\)"):
        image_folders.load(_img_ds(tmp_path), tmp_path)


def test_split_folders_need_train_but_a_class_may_be_named_test(tmp_path):
    _images(tmp_path / "a", classes=("test", "train_x"), n=1)  # "test" among class folders is a class
    assert folders.split_dirs(tmp_path / "a") is None
    assert image_folders.load(_img_ds(tmp_path / "a"), tmp_path / "a").source["classes"] == ["test", "train_x"]
    _images(tmp_path / "b" / "test", n=1)
    with pytest.raises(PassError, match="holds test/ but no train/ folder"):
        image_folders.load(_img_ds(tmp_path / "b"), tmp_path / "b")


# --- audio ----------------------------------------------------------------------------------------


def test_wav_clips_padded_or_cut_int16(tmp_path):
    ramp = np.arange(LENGTH + 300) - 500
    _wav(tmp_path / "no" / "long.wav", ramp)
    _wav(tmp_path / "yes" / "short.WAV", np.full(100, -7))
    loaded = audio_folders.load(_wav_ds(tmp_path), tmp_path)
    x, y = loaded.train
    assert x.shape == (2, LENGTH) and x.dtype == np.int16 and y.tolist() == [0, 1]
    assert np.array_equal(x[0], ramp[:LENGTH])  # cut at the end
    assert (x[1, :100] == -7).all() and (x[1, 100:] == 0).all()  # zero-padded at the end
    assert loaded.source["classes"] == ["no", "yes"] and loaded.source["format"] == "audio_folders"
    assert loaded.source["channels"] == 1


def test_wav_at_another_rate_stereo_8bit_or_corrupt_is_reported_and_skipped(tmp_path, caplog):
    for c in ("down", "up"):
        _wav(tmp_path / c / "ok.wav", np.ones(LENGTH))
    _wav(tmp_path / "up" / "r16k.wav", np.ones(LENGTH), rate=16000)
    _wav(tmp_path / "up" / "stereo.wav", np.ones(2 * LENGTH), channels=2)
    _wav(tmp_path / "down" / "u8.wav", np.full(LENGTH, 128), width=1)
    (tmp_path / "down" / "corrupt.wav").write_bytes(b"RIFF\x10\0\0\0WAVEjunk")
    (tmp_path / "down" / "take.mp3").write_bytes(b"ID3")
    with caplog.at_level("WARNING", logger="kiln.data"):
        loaded = audio_folders.load(_wav_ds(tmp_path), tmp_path)
    assert loaded.train[1].tolist() == [0, 1]
    rep = loaded.report
    assert rep["skipped"] == 5 and "skipped 5 file(s)" in caplog.text
    reasons = {Path(s.split(": ", 1)[0]).name: s.split(": ", 1)[1] for s in rep["skipped_examples"]}
    assert "sample rate 16000 Hz, expected dataset.sample_rate 8000 Hz" in reasons["r16k.wav"]
    assert "2 channels, expected mono" in reasons["stereo.wav"]
    assert "8-bit samples, expected 16-bit PCM" in reasons["u8.wav"]
    assert "not a readable WAV" in reasons["corrupt.wav"]
    assert "not a .wav file" in reasons["take.mp3"]


def test_wav_read_matches_what_wave_wrote(tmp_path):
    samples = (np.sin(np.arange(LENGTH) / 5) * 20000).astype("<i2")
    path = tmp_path / "a.wav"
    with wave.open(str(path), "wb") as w:  # written with wave directly, not our helper
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE), w.writeframes(samples.tobytes())
    assert np.array_equal(audio_folders.read_wav(path, RATE), samples)


# --- locate, infer, the synthetic generators --------------------------------------------------------


@pytest.fixture
def layout(kiln_env) -> Layout:
    return Layout("app")


def test_locate_finds_data_or_the_synthetic_tree_or_names_dataset_path(tmp_path, layout):
    _images(tmp_path / "data", n=1)
    assert image_folders.locate(_img_ds(tmp_path / "data"), layout) == (tmp_path / "data", False)
    assert image_folders.locate(_img_ds(tmp_path / "none", synthetic={}), layout) == (layout.synthetic, True)
    (tmp_path / "empty" / "cat").mkdir(parents=True)  # folders but no images: not data yet
    assert audio_folders.locate(_wav_ds(tmp_path / "empty", synthetic={}), layout) == (layout.synthetic, True)
    with pytest.raises(ManifestError, match=f"field 'dataset.path': {tmp_path / 'none'} holds no WAV clips"):
        audio_folders.locate(_wav_ds(tmp_path / "none", synthetic=None), layout)


def test_synthetic_data_is_opt_in_and_a_mistyped_path_is_named(tmp_path, layout):
    """A mistyped dataset.path (data/imgz for data/imgs) trained on 520 synthetic files and the
    report said PASSED: the fallback now needs ``synthetic`` written in the manifest, and a path
    one typo away from an existing folder is refused naming it, synthetic or not."""
    _images(tmp_path / "data" / "imgs", n=1)
    with pytest.raises(ManifestError, match=r"field 'dataset.path': .*/data/imgz does not exist; did you mean "
                                            rf"{tmp_path / 'data' / 'imgs'}\?"):
        image_folders.locate(_img_ds(tmp_path / "data" / "imgz", synthetic={}), layout)
    with pytest.raises(ManifestError, match=r"holds no images in class folders .*add 'synthetic: \{\}' to dataset"):
        image_folders.locate(_img_ds(tmp_path / "data" / "photos"), layout)
    with pytest.raises(ManifestError, match=r"add 'synthetic: \{\}'"):
        image_folders.infer(_img_ds(tmp_path / "data" / "photos"), tmp_path / "data" / "photos")
    assert image_folders.locate(_img_ds(tmp_path / "data" / "photos", synthetic={}), layout) == (layout.synthetic, True)


def _tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt, make", [(image_folders, _img_ds), (audio_folders, _wav_ds)])
def test_synthetic_trees_are_deterministic_and_load_as_the_inferred_classes(tmp_path, layout, fmt, make):
    ds = make(tmp_path / "none", synthetic={"classes": 3, "per_class": 4, "test_per_class": 2, "seed": 5})
    root, synth = fmt.locate(ds, layout)
    assert synth
    inferred = fmt.infer(ds, root)  # before the tree exists: the generator's names
    fmt.synthesize(ds, tmp_path / "a")
    fmt.synthesize(ds, tmp_path / "b")
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b and len(a) == 3 * 6 + 1  # + the marker
    fmt.synthesize(ds, tmp_path / "a")  # regenerating over a synthetic tree is allowed
    assert _tree_bytes(tmp_path / "a") == b
    other = make(tmp_path / "none", synthetic={"classes": 3, "per_class": 4, "test_per_class": 2, "seed": 6})
    fmt.synthesize(other, tmp_path / "c")
    assert _tree_bytes(tmp_path / "c").keys() == a.keys() and _tree_bytes(tmp_path / "c") != a
    assert fmt.infer(ds, tmp_path / "a") == inferred  # the same classes before and after synthesis
    loaded = fmt.load(ds, tmp_path / "a")
    assert loaded.source["classes"] == inferred["classes"] and loaded.source["synthetic"]["seed"] == 5
    assert np.bincount(loaded.train[1]).tolist() == [4] * 3 and np.bincount(loaded.test[1]).tolist() == [2] * 3
    assert loaded.report["skipped"] == 0


def test_synthesize_never_overwrites_a_teams_data(tmp_path):
    _images(tmp_path, n=1)
    with pytest.raises(PassError, match="not a Kiln synthetic set"):
        image_folders.synthesize(_img_ds(tmp_path / "x"), tmp_path)
    assert (tmp_path / "cat" / "0.png").is_file()


def test_synthetic_names_are_meaningful_then_numbered():
    assert audio_folders.synthetic_names(3) == ["yes", "no", "up"]
    assert audio_folders.synthetic_names(12)[-2:] == ["word10", "word11"]
    assert image_folders.synthetic_names(3) == ["circle", "square", "triangle"]
    names = image_folders.synthetic_names(100)
    assert len(set(names)) == 100 and names[0] == "red_circle"


def test_synthetic_keywords_differ_in_frequency_band():
    """Nearest class mean of the clips' log energies in 24 log-spaced bands (the level taken
    out) classifies held-out clips: the keywords differ strongly in band, before the DS-CNN on
    MFCC even sees their timing."""
    rate, length = 16000, 16000
    edges = np.geomspace(200, 4000, 25).astype(int)  # 1 Hz bins: one second of audio

    def bands(stream):
        xs, ys = [], []
        for k in range(10):
            rng = np.random.default_rng([0, stream, k])
            for _ in range(6):
                p = np.abs(np.fft.rfft(audio_folders.clip(k, rate, length, rng).astype(np.float64))) ** 2
                b = np.log(np.add.reduceat(p, edges)[:-1] + 1)
                xs.append(b - b.mean())
                ys.append(k)
        return np.array(xs), np.array(ys)

    (x, y), (xt, yt) = bands(1), bands(2)
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    pred = ((xt[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == yt).mean() >= 0.95


# --- through the data stage -----------------------------------------------------------------------


def test_image_folders_through_the_data_stage(tmp_path, kiln_env):
    from kiln.schema import Project
    from passes import data

    _images(tmp_path / "imgs" / "train", classes=("cat", "dog", "owl"), n=6)
    _images(tmp_path / "imgs" / "test", classes=("cat", "dog", "owl"), n=2)
    project = Project.model_validate({
        "name": "folders", "requirements": {"accuracy": {"min": 0.0}},
        "dataset": {"format": "image_folders", "path": str(tmp_path / "imgs"), "image_size": [8, 8],
                    "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "architecture": {"family": "cnn", "widths": [4], "max_macs": 1_000_000},
        "training": {"epochs": 1, "batch": 8, "lr": 0.01, "seed": 0}, "targets": ["x86-host"]})
    lay = Layout("folders")
    info = data.run(project, lay)
    assert info["counts"]["test"] == 6 and info["counts"]["train"] + info["counts"]["val"] == 18
    assert info["classes"] == ["cat", "dog", "owl"] and info["format"] == "image_folders"
    with np.load(lay.data / "test.npz") as z:
        assert z["x"].shape == (6, 8, 8, 3) and z["x"].dtype == np.uint8


def test_synthetic_keyword_clips_through_the_synth_and_data_stages(kiln_env):
    """The synth stage writes the WAV tree, the data stage loads it: the boards' test inputs are
    the raw int16 clips, the splits hold the MFCC features."""
    from kiln.schema import Project
    from passes import data

    project = Project.model_validate({
        "name": "kws", "requirements": {"accuracy": {"min": 0.0}},
        "dataset": {"format": "audio_folders", "path": "no/such/clips", "sample_rate": RATE,
                    "clip_seconds": LENGTH / RATE, "synthetic": {"classes": 3, "per_class": 5, "test_per_class": 2},
                    "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "architecture": {"family": "cnn", "widths": [4], "max_macs": 1_000_000},
        "training": {"epochs": 1, "batch": 8, "lr": 0.01, "seed": 0}, "targets": ["x86-host"]})
    lay = Layout("kws")
    data.synthesize(project, lay)
    assert len(list((lay.synthetic / "test").rglob("*.wav"))) == 6
    info = data.run(project, lay)
    assert info["classes"] == ["no", "up", "yes"] and info["counts"]["test"] == 6
    assert info["test_inputs"]["dtype"] == "int16" and info["test_inputs"]["shape"] == [6, LENGTH]
    raw = np.fromfile(lay.data / "test_inputs.bin", "<i2").reshape(6, LENGTH)
    loaded = audio_folders.load(project.dataset, lay.synthetic)
    assert np.array_equal(raw, loaded.test[0])  # the clips themselves, in the test folder's order
    with np.load(lay.data / "train.npz") as z:
        # 49x10 per second at 16 kHz; here 30 ms windows of 240 samples every 160: 4 frames of 10
        # coefficients (the data stage decides whether it stores them N x C x H x W or N x H x W x C)
        assert sorted(z["x"].shape[1:]) == sorted((1, 1 + (LENGTH - 240) // 160, 10))
        assert z["x"].dtype == np.float32 and len(z["y"]) == info["counts"]["train"]
