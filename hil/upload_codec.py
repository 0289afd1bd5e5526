"""What deploy compresses its uploads with over a slow link (a serial console): which codecs the
board can unpack, and the host's compressed copy of a file (xz with the filter chain that packs
it best, or gzip), cached under build/cache/compressed/. The upload and the unpacking on the
board are the deploy stage's (hil/deploy.py)."""

from __future__ import annotations

import time
from pathlib import Path

from kiln.errors import KilnError, TransportError

SLOW_LINK_BPS = 1_000_000  # a link under this (bytes/s) spends far longer sending than compressing
MIN_GAIN = 0.97            # send a file compressed only if that saves at least 3% of its bytes
_PROBE_BYTES = 1 << 20     # prefix on which the host picks the best xz filter chain
_ELF_BCJ = {0x3E: "--x86", 0x28: "--arm", 0xB7: "--arm64"}  # ELF e_machine -> xz branch filter


def slow_link(t) -> bool:
    rate = getattr(t, "line_rate", None)  # bytes/s, from transports that know their line (serial)
    return rate is not None and rate < SLOW_LINK_BPS


def board_codecs(t, log) -> dict:
    """What the board can unpack (asked once per deploy): {"xz": version int or 0 (an xz that
    does not say, e.g. busybox's), "gzip": bool}. Never fails the deploy: none found is raw."""
    script = ('if command -v xz >/dev/null 2>&1; then echo "xz $(xz --robot --version 2>/dev/null | '
              "sed -n 's/^XZ_VERSION=//p')\"; fi; if command -v gzip >/dev/null 2>&1; then echo gzip; fi")
    try:
        out = t.run(["sh", "-c", script], timeout=30).stdout.split("\n")
    except KilnError as e:
        log.warning("cannot ask the board for xz/gzip (%s): uploading uncompressed", e)
        return {"xz": None, "gzip": False}
    xz = next((w.split()[1:] for w in out if w.split()[:1] == ["xz"]), None)
    found = {"xz": None if xz is None else int(xz[0]) if xz and xz[0].isdigit() else 0, "gzip": "gzip" in out}
    log.info("slow link: the board unpacks %s", "xz" if found["xz"] is not None else
             "gzip" if found["gzip"] else "nothing (uploads go uncompressed)")
    return found


def compressed_cache() -> Path:
    from kiln.artifacts import build_root
    return build_root() / "cache" / "compressed"


def compress(path: Path, sha: str, codecs: dict, log) -> tuple[Path | None, str, float]:
    """(compressed copy, codec, seconds spent compressing) for a board with ``codecs``; the copy
    is kept in build/cache/compressed/<sha>.<ext>, so a later deploy does not compress again.
    (None, "raw", s) when the board unpacks nothing or no codec here exists."""
    import shutil

    host_xz = shutil.which("xz")
    if codecs["xz"] is not None and host_xz:
        with path.open("rb") as f:
            head = f.read(20)
        bcj = _ELF_BCJ.get(int.from_bytes(head[18:20], "little")) if head[:4] == b"\x7fELF" else None
        if bcj == "--arm64" and (codecs["xz"] < 50040000 or not _host_xz_has_arm64(host_xz)):
            bcj = None  # xz's ARM64 filter is 5.4's: an older xz on the board cannot undo it
        ext = f"{bcj[2:]}.xz" if bcj else "xz"
        codec = "xz"
    elif codecs["gzip"] or codecs["xz"] is not None:
        bcj, ext, codec = None, "gz", "gzip"
        if not codecs["gzip"]:
            return None, "raw", 0.0  # the board has xz but this host has no xz to make it
    else:
        return None, "raw", 0.0
    out = compressed_cache() / f"{sha}.{ext}"
    if out.is_file():
        return out, codec, 0.0
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    from kiln.artifacts import atomic_path

    with atomic_path(out) as tmp:
        if codec == "gzip":
            import gzip

            with path.open("rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            chain = [bcj] if bcj else _best_xz_chain(host_xz, path)
            _run_xz(host_xz, [*chain, _lzma2("preset=9e", path.stat().st_size, lc4=not bcj and bool(chain))],
                    path, tmp)
    return out, codec, time.perf_counter() - t0


def _lzma2(preset: str, size: int, lc4: bool = False) -> str:
    """LZMA2 options: the dictionary no larger than the file (rounded up to a power of two),
    so the board needs no more memory to unpack it than the file's size; lc=4 after a delta
    filter (its small residues predict the next byte well)."""
    d = 1 << max(16, min(26, (max(size, 1) - 1).bit_length()))
    return f"--lzma2={preset},dict={d}" + (",lc=4" if lc4 else "")


def _run_xz(host_xz: str, args: list[str], src: Path, dst: Path) -> None:
    import subprocess

    with src.open("rb") as fi, open(dst, "wb") as fo:
        r = subprocess.run([host_xz, "-T1", "-c", "-q", *args], stdin=fi, stdout=fo, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise TransportError(f"compressing {src} with xz {' '.join(args)} failed: {r.stderr.decode()[:300]}")


def _host_xz_has_arm64(host_xz: str) -> bool:
    import subprocess

    r = subprocess.run([host_xz, "--arm64", "--lzma2=preset=0", "-c", "-q"], input=b"", capture_output=True)
    return r.returncode == 0


XZ_MAX_DELTA = 256  # xz --delta=dist=N: N in 1..256


def _byte_strides(sample: bytes) -> tuple[int, int] | None:
    """For data laid out as rows of interleaved channels (uint8 pixels H x W x C, int16 audio):
    (channel stride, row stride), the distances at which bytes repeat best; None for data
    that does not (each byte as unlike its neighbours as a random one)."""
    import numpy as np

    a = np.frombuffer(sample, np.uint8).astype(np.int16)
    if len(a) < 8192:
        return None
    mad = lambda k: float(np.abs(a[k:] - a[:-k]).mean())  # noqa: E731
    near = {k: mad(k) for k in range(1, 17)}
    c = min(near, key=near.get)
    if near[c] > 0.8 * 85.0:  # 85: the mean |x - y| of two random bytes; nothing to predict
        return None
    # xz's delta filter takes distances 1..256 only: a longer row (a 128-wide float32 image's 512
    # bytes) is predicted from the largest multiple of the channel stride that xz allows
    rows = {r: mad(r) for r in range(2 * c, min(XZ_MAX_DELTA, len(a) // 4) + 1, c)}
    return c, min(rows, key=rows.get)


def _best_xz_chain(host_xz: str, path: Path) -> list[str]:
    """xz filters before LZMA2 for this file: none, a delta along the channel stride, along the
    row, or both (the gradient predictor x - left - up + up-left), whichever packs the file's
    first MiB smallest at a fast preset."""
    import tempfile

    with path.open("rb") as f:
        sample = f.read(_PROBE_BYTES)
    strides = _byte_strides(sample[:1 << 16])
    if strides is None:
        return []
    c, row = strides
    chains = [[], [f"--delta=dist={c}"], [f"--delta=dist={row}"], [f"--delta=dist={c}", f"--delta=dist={row}"]]
    sizes = []
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "probe", Path(d) / "probe.xz"
        src.write_bytes(sample)
        for chain in chains:
            _run_xz(host_xz, [*chain, _lzma2("preset=6", len(sample), lc4=bool(chain))], src, dst)
            sizes.append(dst.stat().st_size)
    return chains[sizes.index(min(sizes))]
