"""Compressed uploads over a slow link (issue #14, item 8): a real emulated serial board (a pty,
socat and the board's own shell) gets each file compressed (xz, else gzip, else raw), unpacks it
into its cache name, and deploy's sha256 check passes on what it unpacked."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import serial

from hil.deploy import deploy
from hil.emulator.pty_board import start_serial_board, stop_serial_board
from hil.transport.serial import SerialTransport
from hil.upload_codec import board_codecs, slow_link
from kiln.schema import SerialTransport as Spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("socat") is None or shutil.which("xz") is None,
                       reason="socat and xz are needed"),
]

RUNNER = ('#!/bin/sh\nset -e\nn=$(wc -c < inputs.bin)\n'
          'printf \'{"count": 1, "predictions": [0], "latencies_us": [1], "bytes": %s}\\n\' "$n"\n')


@pytest.fixture
def boards(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "build"))  # the host's compressed copies go here
    started = []

    def start(name: str, hide: tuple[str, ...] = ()):
        b = start_serial_board(name, tmp_path / "boards")
        started.append(b)
        if hide:
            _hide_programs(b, tmp_path / f"bin-{name}", hide)
        return b

    yield start
    for b in started:
        stop_serial_board(b)


def _hide_programs(board, bin_dir: Path, hide: tuple[str, ...]) -> None:
    """Give the board's console shell a PATH of every program but ``hide`` (a board built
    without xz, or without gzip), typed at its prompt as a person would."""
    bin_dir.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        for p in Path(d).iterdir() if Path(d).is_dir() else ():
            if p.name not in hide and not (bin_dir / p.name).exists():
                (bin_dir / p.name).symlink_to(p)
    with serial.Serial(board.tty, 115200, timeout=0) as s:
        s.write(f"PATH={bin_dir}; export PATH\n".encode())
        time.sleep(0.3)


def _transport(board) -> SerialTransport:
    return SerialTransport(board.name, Spec.model_validate(board.transport_spec(timeout_s=3)), Path("."))


def _compressible(path: Path, size: int = 300_000) -> Path:
    """Rows of a smooth image with a little noise: what uint8 test inputs look like."""
    rng = np.random.default_rng(0)
    x = np.linspace(0, 200, size // 96 * 96) % 256 + rng.integers(0, 2, size // 96 * 96)
    path.write_bytes(x.astype(np.uint8).tobytes())
    return path


def _deploy(board, files: dict, caplog) -> tuple[dict, dict, SerialTransport]:
    tr = _transport(board)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=f"kiln.board.{board.name}"):
        out = deploy(tr, files, ["./kiln-runner"], 30, board.name)
    ups = {r.kiln_upload["file"]: r.kiln_upload for r in caplog.records if hasattr(r, "kiln_upload")}
    return out, ups, tr


def _board_cache(tr: SerialTransport) -> dict[str, str]:
    """name -> sha256 of every file in the board's cache."""
    with tr:
        r = tr.run(["sh", "-c", "cd cache && sha256sum -- *"], timeout=30)
    return {line.split()[1]: line.split()[0] for line in r.stdout.splitlines()}


def test_compressed_upload_unpacks_to_the_same_sha256(boards, tmp_path, caplog):
    b = boards("xzboard")
    inputs = _compressible(tmp_path / "inputs.bin")
    (tmp_path / "kiln-runner").write_text(RUNNER)
    files = {"kiln-runner": tmp_path / "kiln-runner", "inputs.bin": inputs}
    want = hashlib.sha256(inputs.read_bytes()).hexdigest()
    out, ups, tr = _deploy(b, files, caplog)
    assert out["runner"]["bytes"] == inputs.stat().st_size  # the runner read the unpacked file
    assert slow_link(tr)
    up = ups["inputs.bin"]
    assert up["codec"] == "xz" and up["raw_bytes"] == inputs.stat().st_size
    assert up["compressed_bytes"] < up["raw_bytes"] / 4, up
    # what went over the line is the compressed copy (base64 frames: about 4/3 of it), not the file
    assert up["wire_bytes"] < up["raw_bytes"] / 2
    runner = hashlib.sha256((tmp_path / "kiln-runner").read_bytes()).hexdigest()
    assert _board_cache(tr) == {want: want, runner: runner}  # each file unpacked; no .xz or .unpack left
    host_copies = sorted(p.name for p in (tmp_path / "build" / "cache" / "compressed").iterdir())
    assert f"{want}.xz" in host_copies

    # a second board: the host's compressed copy is reused, not made again
    b2 = boards("xzboard2")
    _, ups2, tr2 = _deploy(b2, files, caplog)
    assert ups2["inputs.bin"]["codec"] == "xz" and ups2["inputs.bin"]["compress_s"] == 0.0
    assert _board_cache(tr2)[want] == want
    # a warm deploy to the first board sends nothing
    _, ups3, _ = _deploy(b, files, caplog)
    assert {u["codec"] for u in ups3.values()} == {"cached"}


@pytest.mark.parametrize("hide, codec", [(("xz", "unxz", "xzcat"), "gzip"),
                                         (("xz", "unxz", "xzcat", "gzip", "gunzip", "zcat"), "raw")],
                         ids=["no-xz", "no-xz-no-gzip"])
def test_falls_back_when_the_board_lacks_xz(boards, tmp_path, caplog, hide, codec):
    b = boards(f"bare-{codec}", hide=hide)
    with _transport(b) as tr:
        codecs = board_codecs(tr, logging.getLogger("test"))
    assert codecs["xz"] is None and codecs["gzip"] == (codec == "gzip")
    inputs = _compressible(tmp_path / "inputs.bin", 100_000)
    (tmp_path / "kiln-runner").write_text(RUNNER)
    out, ups, tr = _deploy(b, {"kiln-runner": tmp_path / "kiln-runner", "inputs.bin": inputs}, caplog)
    assert out["runner"]["bytes"] == 100_000 // 96 * 96
    assert ups["inputs.bin"]["codec"] == codec
    if codec == "gzip":
        assert ups["inputs.bin"]["compressed_bytes"] < ups["inputs.bin"]["raw_bytes"] / 2
    want = hashlib.sha256(inputs.read_bytes()).hexdigest()
    assert _board_cache(tr)[want] == want


def test_incompressible_file_goes_as_it_is(boards, tmp_path, caplog):
    b = boards("noiseboard")
    noise = tmp_path / "inputs.bin"
    noise.write_bytes(os.urandom(50_000))
    (tmp_path / "kiln-runner").write_text(RUNNER)
    out, ups, tr = _deploy(b, {"kiln-runner": tmp_path / "kiln-runner", "inputs.bin": noise}, caplog)
    assert ups["inputs.bin"]["codec"] == "raw" and ups["inputs.bin"]["sent_bytes"] == 50_000
    assert out["runner"]["bytes"] == 50_000


def test_rows_longer_than_xz_delta_allows_still_pack(tmp_path):
    """float32 images 128 pixels wide (512-byte rows, a detector's 96x128 input): the row stride
    the codec picks stays within xz's delta distances (1..256), and the file packs."""
    from hil.upload_codec import XZ_MAX_DELTA, _best_xz_chain, _byte_strides

    host_xz = shutil.which("xz")
    if host_xz is None:
        pytest.skip("no xz on this host")
    y, x = np.mgrid[0:96, 0:128]
    img = (np.sin(x / 9.0) * np.cos(y / 7.0) + 1) / 2
    frames = np.stack([img * (0.5 + 0.1 * k) for k in range(8)]).astype(np.float32)
    path = tmp_path / "inputs.bin"
    path.write_bytes(frames.tobytes())
    c, row = _byte_strides(path.read_bytes()[: 1 << 16])
    assert row <= XZ_MAX_DELTA
    chain = _best_xz_chain(host_xz, path)  # raised "dist must be in the range [1, 256]" before
    assert all(int(f.split("=")[-1]) <= XZ_MAX_DELTA for f in chain)
