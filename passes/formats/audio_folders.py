"""Dataset format ``audio_folders``: ``<root>/<class>/*.wav`` (or with train/ val/ test/ above
the classes), 16-bit PCM mono, the layout of the Speech Commands keyword set and of Edge
Impulse's and ST's audio uploads.

Clips are read with Python's ``wave`` module at ``dataset.sample_rate`` (a WAVE_FORMAT_EXTENSIBLE
file, which it refuses before Python 3.12, by our own RIFF reader when its SubFormat is PCM): a
clip at another rate, with several channels or not 16-bit PCM is reported and skipped (never
resampled or mixed down behind the team's back), as is a file that is not a readable WAV. Shorter clips are
zero-padded at the end, longer ones cut to ``clip_seconds``: int16 N x L. The folder rules are
passes/formats/support/folders.py's. ``synthesize`` writes keyword-like clips in the same layout.
"""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np

from passes.formats import Loaded
from passes.formats.support import folders
from passes.formats.support.folders import Unreadable

EXTS = (".wav",)
WHAT = "WAV clips"
GENERATOR_VERSION = 1  # bump whenever the synthesis changes, so cached trees are regenerated
DECODER_VERSION = 1  # bump whenever decoding changes, so the data stage's decode cache is not used

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# ten tone frequencies, evenly spaced in mel from 300 to 3500 Hz: a keyword is a sequence of them
_MEL = np.linspace(2595 * np.log10(1 + 300 / 700), 2595 * np.log10(1 + 3500 / 700), len(KEYWORDS))
TONES = 700 * (10 ** (_MEL / 2595) - 1)


def locate(ds, layout) -> tuple[Path, bool]:
    return folders.locate(ds, layout, EXTS, WHAT)


def infer(ds, root: Path) -> dict:
    return folders.infer(ds, root, EXTS, WHAT, synthetic_names)


def load(ds, root: Path) -> Loaded:
    length = int(ds.raw_shape()[0])

    def read(path: Path) -> np.ndarray:
        return fit_length(read_wav(path, ds.sample_rate), length)

    return folders.load_tree(ds, root, EXTS, read, np.int16, "audio_folders", group_by="speaker",
                             settings={"sample_rate": ds.sample_rate, "length": length, "decoder": DECODER_VERSION})


def read_wav(path: Path, sample_rate: int) -> np.ndarray:
    """The int16 samples of a 16-bit PCM mono WAV at ``sample_rate``. Raises Unreadable saying
    what differs (rate, channels, sample width) or why it cannot be read. A
    WAVE_FORMAT_EXTENSIBLE file is read when its SubFormat is PCM (``_read_extensible``)."""
    rate, channels, width, frames = _decode_wav(path)
    if channels != 1:
        raise Unreadable(f"{channels} channels, expected mono (not mixed down)")
    if width != 2:
        raise Unreadable(f"{8 * width}-bit samples, expected 16-bit PCM")
    if rate != sample_rate:
        raise Unreadable(f"sample rate {rate} Hz, expected dataset.sample_rate {sample_rate} Hz "
                         "(not resampled)")
    if len(frames) < 2:
        raise Unreadable("no samples")
    # a truncated data chunk can end mid-sample: drop the odd byte
    return np.frombuffer(frames[: len(frames) // 2 * 2], "<i2").astype(np.int16)


def _decode_wav(path: Path) -> tuple[int, int, int, bytes]:
    """(rate, channels, bytes per sample, the data chunk's bytes): the ``wave`` module's reading,
    or ours where it refuses WAVE_FORMAT_EXTENSIBLE (Python before 3.12: "unknown format: 65534")."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.readframes(w.getnframes())
    except wave.Error as e:  # not RIFF/WAVE, a float or compressed WAV, or an extensible one
        try:
            ext = _read_extensible(path)
        except OSError as e2:
            raise Unreadable(f"not a readable WAV ({type(e2).__name__}: {e2})") from e2
        if ext is None:
            raise Unreadable(f"not a readable WAV ({type(e).__name__}: {e})") from e
        return ext
    except (EOFError, OSError) as e:  # truncated header
        raise Unreadable(f"not a readable WAV ({type(e).__name__}: {e})") from e


WAVE_FORMAT_EXTENSIBLE = 0xFFFE
# a SubFormat GUID is a format tag (2 bytes, little-endian) followed by these 14 bytes
_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
_FORMAT_NAMES = {1: "PCM", 2: "MS ADPCM", 3: "IEEE float", 6: "A-law", 7: "mu-law", 0x11: "IMA ADPCM"}


def _read_extensible(path: Path) -> tuple[int, int, int, bytes] | None:
    """(rate, channels, bytes per sample, data) of a WAVE_FORMAT_EXTENSIBLE file whose SubFormat
    is integer PCM; None when the file is not one (its fmt tag is another); Unreadable naming
    the SubFormat when it is not PCM, or saying what is malformed. Raises OSError."""
    data = Path(path).read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fmt = body = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        chunk = data[pos + 8:pos + 8 + size]  # a truncated data chunk: what is there
        if cid == b"fmt " and fmt is None:
            fmt = chunk
        elif cid == b"data" and body is None:
            body = chunk
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    if fmt is None or len(fmt) < 2 or int.from_bytes(fmt[:2], "little") != WAVE_FORMAT_EXTENSIBLE:
        return None
    if len(fmt) < 40:
        raise Unreadable(f"WAVE_FORMAT_EXTENSIBLE fmt chunk of {len(fmt)} bytes, expected 40 "
                         "(with its SubFormat)")
    channels, rate = int.from_bytes(fmt[2:4], "little"), int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    guid = fmt[24:40]
    tag = int.from_bytes(guid[:2], "little")
    if guid[2:] != _GUID_TAIL or tag != 1:
        name = _FORMAT_NAMES.get(tag, f"format {tag}") if guid[2:] == _GUID_TAIL else "an unknown GUID"
        raise Unreadable(f"WAVE_FORMAT_EXTENSIBLE (65534) with SubFormat {name} ({guid.hex()}), "
                         "expected 16-bit PCM")
    if body is None:
        raise Unreadable("WAVE_FORMAT_EXTENSIBLE file without a data chunk")
    return rate, channels, (bits + 7) // 8, body


def fit_length(x: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end or cut to ``length`` samples."""
    if len(x) >= length:
        return x[:length]
    return np.concatenate([x, np.zeros(length - len(x), np.int16)])


def wav_bytes(samples: np.ndarray, sample_rate: int, channels: int = 1, width: int = 2) -> bytes:
    """A WAV file's bytes (the ``wave`` module's header; deterministic)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(sample_rate)
        w.writeframes(np.ascontiguousarray(samples).tobytes())
    return buf.getvalue()


# --- the synthetic generator: keyword-like clips ------------------------------------------------


def synthetic_names(classes: int) -> list[str]:
    """"yes", "no", "up", ... (Speech Commands' ten keywords), then "word10", "word11", ..."""
    return [KEYWORDS[k] if k < len(KEYWORDS) else f"word{k}" for k in range(classes)]


def pattern(k: int) -> list[tuple[float, float]]:
    """Class ``k``'s keyword: [(tone Hz, seconds)], two or three tones. The first tone is
    unique among the first ten classes and the pair of the first two is unique for all 100;
    the ten keywords' tone sets all differ (none is another's reversal), so a net that pools
    over time still tells them apart; durations differ too."""
    n = len(TONES)
    a, b = k % n, (k % n + 3 + k // n) % n
    tones = [(TONES[a], 0.10 + 0.04 * (k % 3)), (TONES[b], 0.12 + 0.04 * ((k // 3) % 3))]
    if k % 2 == 0:  # a third, short tone for half the classes: another timing cue
        tones.append((TONES[(a + 6) % n], 0.08))
    return tones


def clip(k: int, sample_rate: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """One int16 clip of class ``k``: its tones (each a fundamental and a weaker second
    partial, like a formant pair, with pitch jitter, a slow vibrato and smooth onset and
    offset) at a random onset and loudness, over background noise."""
    scale = rng.uniform(0.85, 1.15)  # speaking rate
    jitter = rng.uniform(0.96, 1.04)  # speaker's pitch
    seg_len = [max(8, int(d * scale * sample_rate)) for _, d in pattern(k)]
    total = sum(seg_len)
    x = np.zeros(length)
    start = int(rng.integers(0, max(1, length - total)))
    for (f, _), n in zip(pattern(k), seg_len):
        end = min(length, start + n)
        if end <= start:
            break
        t = np.arange(end - start) / sample_rate
        freq = f * jitter * rng.uniform(0.98, 1.02) * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(4, 7) * t))
        phase = 2 * np.pi * np.cumsum(freq) / sample_rate
        tone = np.sin(phase) + 0.35 * np.sin(2 * phase + rng.uniform(0, 2 * np.pi)) * (2 * f < sample_rate / 2)
        x[start:end] += tone * np.hanning(end - start + 2)[1:-1] ** 0.5 * rng.uniform(0.6, 1.0)
        start = end
    x *= rng.uniform(0.15, 0.6) * 32767 / 1.35
    x += rng.normal(0, rng.uniform(100, 600), length)  # background noise, about 15 to 35 dB below
    return np.clip(np.rint(x), -32768, 32767).astype("<i2")


def synthesize(ds, dest: Path) -> dict:
    """Write ``<dest>/train/<class>/*.wav`` and ``<dest>/test/<class>/*.wav``: per class
    ``synthetic.per_class`` / ``test_per_class`` keyword-like clips of ``clip_seconds`` at
    ``sample_rate``, 16-bit PCM mono. Deterministic: the same settings give byte-identical
    files; train and test draw from their own streams."""
    syn = ds.synthetic
    names = synthetic_names(syn.classes)
    length = int(ds.raw_shape()[0])
    marker = {"generator": "kiln synthetic audio_folders", "version": GENERATOR_VERSION, "classes": names,
              "per_class": syn.per_class, "test_per_class": syn.test_per_class, "seed": syn.seed,
              "sample_rate": ds.sample_rate, "samples": length}

    def write(d: Path, k: int, name: str, i: int, rng) -> None:
        (d / f"{name}_{i:04d}.wav").write_bytes(wav_bytes(clip(k, ds.sample_rate, length, rng), ds.sample_rate))

    return folders.write_class_tree(dest, marker, names, syn, write)
