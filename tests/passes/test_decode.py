"""Decoding a team's own files as they are on disk (Kiln issue 30): 16-bit images scaled, not
clipped to white; EXIF orientation applied; a class folder that is a symlink seen alike by the
loader and by the data set fingerprint (no hang on a link loop); WAVE_FORMAT_EXTENSIBLE PCM read."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import artifacts
from kiln.schema import AudioFoldersDataset, ImageFoldersDataset
from passes.formats import audio_folders, gtsrb, image_folders
from passes.formats.support import folders
from passes.formats.support.folders import Unreadable

RATE = 8000


def _img_ds(root: Path, **kw) -> ImageFoldersDataset:
    return ImageFoldersDataset.model_validate({"format": "image_folders", "path": str(root), "image_size": [2, 4],
                                               **kw})


def _png_bytes(width: int, height: int, colour_type: int, pixels: np.ndarray) -> bytes:
    """A 16-bit PNG written byte for byte (Pillow cannot write 16-bit RGB): ``pixels`` big-endian u2."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# 16-bit values and the 8-bit ones expected (the high byte): all but 0 were 255 (white) before
WIDE = np.array([[0x0000, 0x1234, 0x8000, 0xFFFF], [0x00FF, 0x0100, 0x7FFF, 0x4000]], np.uint16)
NARROW = (WIDE >> 8).astype(np.uint8)


def _two_classes(root: Path, write) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        write(root / c)
    return root


@pytest.mark.parametrize("color", ["grayscale", "rgb"])
def test_16bit_grayscale_png_is_scaled_to_8_bits_not_white(tmp_path, color):
    def write(d: Path) -> None:
        Image.fromarray(WIDE).save(d / "x.png")  # Pillow writes uint16 as a 16-bit grayscale PNG

    assert Image.open(_two_classes(tmp_path, write) / "a" / "x.png").mode == "I;16"
    x, _ = image_folders.load(_img_ds(tmp_path, color=color), tmp_path).train
    assert x.shape[:3] == (2, 2, 4)
    for channel in range(x.shape[-1]):
        assert x[0, ..., channel].tolist() == NARROW.tolist()


def test_16bit_pgm_and_its_32bit_mode_i_is_scaled(tmp_path):
    # a 16-bit PGM (P5, maxval 65535) saved as .ppm: Pillow opens it as mode I (32-bit ints)
    def write(d: Path) -> None:
        (d / "x.ppm").write_bytes(b"P5\n4 2\n65535\n" + WIDE.astype(">u2").tobytes())

    assert Image.open(_two_classes(tmp_path, write) / "a" / "x.ppm").mode == "I"
    x, _ = image_folders.load(_img_ds(tmp_path, color="grayscale"), tmp_path).train
    assert x[0, ..., 0].tolist() == NARROW.tolist()


def test_16bit_rgb_and_gray_alpha_pngs_keep_their_high_byte(tmp_path):
    # Pillow reads 16-bit RGB and gray+alpha PNGs by their high byte itself: the same mapping as
    # the grayscale ones above (this guards it; it passed before the fix too)
    rgb = np.stack([WIDE, WIDE[::-1], 0xFFFF - WIDE], axis=-1)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "rgb.png").write_bytes(_png_bytes(4, 2, 2, rgb.reshape(2, 12)))
    (tmp_path / "a" / "la.png").write_bytes(_png_bytes(4, 2, 4, np.stack([WIDE, WIDE], -1).reshape(2, 8)))
    got = image_folders.read_image(tmp_path / "a" / "rgb.png", "RGB", (2, 4))
    assert got.tolist() == (rgb >> 8).astype(np.uint8).tolist()
    got = image_folders.read_image(tmp_path / "a" / "la.png", "L", (2, 4))
    assert got[..., 0].tolist() == NARROW.tolist()


def test_gtsrb_reads_a_16bit_image_through_the_same_decoder(tmp_path):
    p = tmp_path / "00000_00000.ppm"
    p.write_bytes(b"P5\n4 2\n65535\n" + WIDE.astype(">u2").tobytes())
    x = gtsrb._load_image(p, (0, 0, 3, 1), (2, 4))
    assert x.shape == (2, 4, 3) and x[..., 0].tolist() == NARROW.tolist()
    with pytest.raises(Unreadable):  # a missing file still reads as "missing" in gtsrb's report
        gtsrb._load_image(tmp_path / "gone.ppm", (0, 0, 3, 1), (2, 4))


def _jpeg_with_orientation(path: Path, orientation: int) -> None:
    """A 32 wide x 16 high JPEG, left half red and right half blue, with an EXIF Orientation."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, "JPEG", quality=95, exif=exif.tobytes())


# 6: rotate 90 degrees clockwise to display (the stored left edge goes to the top); 8: counter-clockwise
@pytest.mark.parametrize("orientation, top, bottom", [(6, (255, 0, 0), (0, 0, 255)), (8, (0, 0, 255), (255, 0, 0))])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    def write(d: Path) -> None:
        _jpeg_with_orientation(d / "phone.jpg", orientation)

    _two_classes(tmp_path, write)
    ds = ImageFoldersDataset.model_validate({"format": "image_folders", "path": str(tmp_path), "image_size": [32, 16]})
    x, _ = image_folders.load(ds, tmp_path).train
    assert x.shape == (2, 32, 16, 3)  # displayed: 16 wide, 32 high
    img = x[0].astype(int)
    assert np.abs(img[4, 8] - top).max() < 30 and np.abs(img[-4, 8] - bottom).max() < 30
    # the left and right halves of the displayed image are alike (the colours split top/bottom)
    assert np.abs(img[4, 2] - img[4, -3]).max() < 30


# --- a symlinked class folder: the loader and the fingerprint see the same files ------------------------


def _tree_with_linked_class(tmp_path: Path) -> tuple[Path, Path]:
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere" / "dog"
    for d in (root / "cat", elsewhere):
        d.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (4, 2), (10 * i, 0, 0)).save(root / "cat" / f"{i}.png")
        Image.new("RGB", (4, 2), (0, 10 * i, 0)).save(elsewhere / f"{i}.png")
    (root / "dog").symlink_to(elsewhere, target_is_directory=True)
    return root, elsewhere


def _loaded_files(root: Path) -> list[str]:
    sc = folders.scan(root, None, image_folders.EXTS)
    return sorted(os.path.relpath(p, root) for files in sc.splits.values() for p, _ in files)


def test_file_added_in_a_symlinked_class_folder_changes_the_fingerprint(tmp_path):
    root, elsewhere = _tree_with_linked_class(tmp_path)
    before = artifacts.tree_fingerprint(root)
    assert before == artifacts.tree_fingerprint(root)
    Image.new("RGB", (4, 2), (0, 99, 0)).save(elsewhere / "2.png")  # added through the link's target
    after = artifacts.tree_fingerprint(root)
    assert after != before  # dodo's dataset_unchanged compares this: the data task reruns
    assert _loaded_files(root) == sorted(artifacts.tree_files(root)) == [
        "cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert len(image_folders.load(_img_ds(root), root).train[1]) == 5
    # repointing the link at another folder with the same file names changes it too
    other = tmp_path / "other"
    other.mkdir()
    for p in elsewhere.iterdir():
        os.link(p, other / p.name)  # same names, sizes and mtimes
    (root / "dog").unlink()
    (root / "dog").symlink_to(other, target_is_directory=True)
    assert artifacts.tree_fingerprint(root) != after


def test_symlink_loops_do_not_hang_the_fingerprint_or_the_loader(tmp_path):
    root, _ = _tree_with_linked_class(tmp_path)
    (root / "cat" / "up").symlink_to(root, target_is_directory=True)  # a link to an ancestor
    (root / "cat" / "self").symlink_to(root / "cat", target_is_directory=True)
    (root / "cat" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    (root / ".seen").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a second way to dog/
    fp = artifacts.tree_fingerprint(root)
    assert fp and fp == artifacts.tree_fingerprint(root)
    files = artifacts.tree_files(root)
    assert len(files) == len(set(files)) and "cat/up/cat/0.png" not in files  # loops not walked
    assert {"dog/0.png", ".seen/dog/0.png"} <= set(files)  # a second way to a folder: walked under both names
    assert set(_loaded_files(root)) <= set(files)
    loaded = image_folders.load(_img_ds(root), root)
    assert len(loaded.train[1]) == 4 and loaded.report["skipped"] == 3  # up/, self/, the dangling link
    (root / "cat" / "dangling.png").unlink()
    assert artifacts.tree_fingerprint(root) != fp


# --- WAVE_FORMAT_EXTENSIBLE ------------------------------------------------------------------------------

PCM_GUID = bytes.fromhex("0100000000001000800000aa00389b71")
FLOAT_GUID = bytes.fromhex("0300000000001000800000aa00389b71")


def _extensible_wav(samples: bytes, guid: bytes = PCM_GUID, rate: int = RATE, channels: int = 1,
                    bits: int = 16) -> bytes:
    """A WAVE_FORMAT_EXTENSIBLE file byte for byte: a 40-byte fmt chunk (tag 0xFFFE, cbSize 22,
    valid bits, channel mask, SubFormat GUID), a LIST chunk of odd size (padded), the data."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, channels, rate, rate * block, block, bits, 22, bits, 0x4) + guid
    assert len(fmt) == 40
    info = b"INFOISFT\x05\x00\x00\x00kiln\x00"  # 17 bytes: an odd chunk, padded by one byte
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", len(info)) + info
            + b"\x00" + b"data" + struct.pack("<I", len(samples)) + samples)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wave_format_extensible_pcm16_mono_is_read(tmp_path):
    samples = (np.arange(-400, 400, dtype=np.int16) * 81).astype("<i2")
    p = tmp_path / "ext.wav"
    p.write_bytes(_extensible_wav(samples.tobytes()))
    assert p.read_bytes()[20:22] == b"\xfe\xff"  # the fmt tag is 65534
    assert audio_folders.read_wav(p, RATE).tolist() == samples.tolist()
    # and through the format: both classes' extensible clips are samples, none skipped
    for c in ("yes", "no"):
        (tmp_path / "tree" / c).mkdir(parents=True)
        (tmp_path / "tree" / c / "0.wav").write_bytes(_extensible_wav(samples.tobytes()))
    ds = AudioFoldersDataset.model_validate({"format": "audio_folders", "path": str(tmp_path / "tree"),
                                             "sample_rate": RATE, "clip_seconds": 0.1})
    loaded = audio_folders.load(ds, tmp_path / "tree")
    assert loaded.report["skipped"] == 0 and loaded.train[0][0].tolist() == samples.tolist()


def test_wave_format_extensible_other_subformats_say_which(tmp_path):
    p = tmp_path / "float.wav"
    p.write_bytes(_extensible_wav(np.zeros(8, "<f4").tobytes(), FLOAT_GUID, bits=32))
    with pytest.raises(Unreadable, match=r"WAVE_FORMAT_EXTENSIBLE \(65534\) with SubFormat IEEE float"):
        audio_folders.read_wav(p, RATE)
    skipped: list[str] = []
    folders.load_files([(p, 0)], lambda f: audio_folders.read_wav(f, RATE), (8,), np.int16, skipped)
    assert skipped and skipped[0].startswith(f"{p}: ") and "IEEE float" in skipped[0]
    # PCM but not 16-bit mono: the usual reasons
    p.write_bytes(_extensible_wav(np.zeros(16, "<i2").tobytes(), channels=2))
    with pytest.raises(Unreadable, match="2 channels, expected mono"):
        audio_folders.read_wav(p, RATE)
    p.write_bytes(_extensible_wav(np.zeros(8, "<i4").tobytes()[:24], bits=24))
    with pytest.raises(Unreadable, match="24-bit samples"):
        audio_folders.read_wav(p, RATE)
    p.write_bytes(_extensible_wav(b"")[:44])  # cut inside the fmt chunk
    with pytest.raises(Unreadable, match="fmt chunk of"):
        audio_folders.read_wav(p, RATE)
