"""Real data in the on-disk layouts a team brings, from what packages on the registries ship.

No data set can be downloaded on these machines, so the real-data checks (tests/test_real_data.py,
bench/real_data.py) write trees from data that installed packages carry:

* images: scikit-learn's digits (1,797 real handwritten 8x8 digits) as PNG class folders
  (``image_folders``);
* tables: scikit-learn's wine (178 wines, 13 chemical measurements, 3 cultivars) and breast
  cancer (569 biopsies, 30 features, 2 classes) as one CSV (``csv_table``);
* sensors: sktime's BasicMotions (a smartwatch's 3-axis accelerometer and gyroscope at 10 Hz,
  four students each doing four activities five times: 80 recordings of 100 samples, the UEA
  archive's own train/test split) as one CSV per recording (``csv_windows``);
* speech: no package on the registries ships recorded speech that we could find (checked:
  scikit-learn, sktime, pocketsphinx, SpeechRecognition, pyroomacoustics). The audio check uses
  espeak-ng (Debian's speech synthesizer) speaking each word in many voices, pitches and rates
  (a "speaker" each), resampled to 16 kHz: real speech *synthesis*, not recorded speech, said
  so wherever its figure appears.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

BASIC_MOTIONS_CHANNELS = ["acc_x", "acc_y", "acc_z", "gyr_x", "gyr_y", "gyr_z"]
BASIC_MOTIONS_RATE = 10  # Hz


def _ts_cases(path: Path) -> list[tuple[np.ndarray, str]]:
    """The cases of a .ts file (the UEA/UCR archive's text format): after ``@data``, one case a
    line, dimensions separated by ':', values by ',', the class label last. -> [(C x L, label)]."""
    cases, data = [], False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not data:
            data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        cases.append((np.array([[float(v) for v in d.split(",")] for d in dims]), label.strip()))
    return cases


def sktime_data(name: str) -> Path:
    """The folder of a data set sktime ships in its wheel (``pip install sktime``)."""
    import importlib.util

    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sktime is not installed: `pip install -e '.[test]'` installs it (its wheel carries the data)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name


def basic_motions(dest: Path) -> Path:
    """``dest/{train,test}/<activity>/case<NN>.csv``: timestamp + 6 channels at 10 Hz, one file a
    recording, the archive's own split. Returns ``dest``."""
    src = sktime_data("BasicMotions")
    for split in ("train", "test"):
        for i, (x, label) in enumerate(_ts_cases(src / f"BasicMotions_{split.upper()}.ts")):
            folder = dest / split / label.lower()
            folder.mkdir(parents=True, exist_ok=True)
            rows = ["timestamp," + ",".join(BASIC_MOTIONS_CHANNELS)]
            rows += [f"{t / BASIC_MOTIONS_RATE:.1f}," + ",".join(f"{v:.6f}" for v in x[:, t]) for t in range(x.shape[1])]
            (folder / f"case{i:02d}.csv").write_text("\n".join(rows) + "\n")
    return dest


def digits_folders(dest: Path) -> Path:
    """scikit-learn's digits as ``dest/<digit>/<n>.png`` (8x8 grayscale, 0..16 scaled to 0..255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for n, (img, label) in enumerate(zip(d.images, d.target)):
        folder = dest / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.rint(img * 255 / 16).astype(np.uint8), "L").save(folder / f"{n:04d}.png")
    return dest


def sklearn_table(dest: Path, name: str) -> Path:
    """scikit-learn's ``wine`` or ``breast_cancer`` as one CSV: its feature names, then ``label``
    (the class name). Returns the file."""
    from sklearn import datasets

    d = getattr(datasets, f"load_{name}")()
    names = [f.replace(" ", "_").replace("/", "_") for f in d.feature_names]
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = [",".join(names + ["label"])]
    rows += [",".join(f"{v:.6g}" for v in x) + f",{d.target_names[t]}" for x, t in zip(d.data, d.target)]
    dest.write_text("\n".join(rows) + "\n")
    return dest


# --- speech from espeak-ng -----------------------------------------------------------------------

VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5", "croak", "whisper", "klatt", "klatt2"]
ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp"]


def _speak(text: str, voice: str, rate: int, pitch: int, out: Path) -> np.ndarray:
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", str(out), text],
                   check=True, capture_output=True, timeout=30)
    with wave.open(str(out), "rb") as w:
        rate_hz, frames = w.getframerate(), w.readframes(w.getnframes())
    x = np.frombuffer(frames, "<i2").astype(np.float64)
    n = int(round(len(x) * 16000 / rate_hz))
    return np.interp(np.arange(n) * rate_hz / 16000, np.arange(len(x)), x)  # to 16 kHz


def tts_words(dest: Path, words: list[str], speakers: int = 24, clips: int = 2, seed: int = 0) -> Path:
    """Speech Commands' layout, ``dest/<word>/<speaker>_nohash_<n>.wav`` (16 kHz 16-bit mono,
    1 s, the word at a random onset), spoken by espeak-ng: a speaker is an accent, a voice
    variant, a pitch and a rate; its ``clips`` takes of a word differ in rate and onset."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (Debian package espeak-ng; `make setup` installs it)")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        for s in range(speakers):
            voice = f"{ACCENTS[s % len(ACCENTS)]}+{VARIANTS[(s * 7) % len(VARIANTS)]}"
            pitch, rate = int(rng.integers(20, 80)), int(rng.integers(120, 200))
            speaker = hashlib.sha1(f"{voice}{pitch}{rate}{s}".encode()).hexdigest()[:8]
            for word in words:
                for n in range(clips):
                    x = _speak(word, voice, rate + int(rng.integers(-15, 16)), pitch, Path(tmp) / "w.wav")
                    clip = np.zeros(16000)
                    x = x[:16000]
                    start = int(rng.integers(0, 16000 - len(x) + 1))
                    clip[start:start + len(x)] = x * rng.uniform(0.5, 1.0)
                    clip += rng.normal(0, 30, 16000)  # a quiet room
                    folder = dest / word
                    folder.mkdir(parents=True, exist_ok=True)
                    with wave.open(str(folder / f"{speaker}_nohash_{n}.wav"), "wb") as w:
                        w.setnchannels(1)
                        w.setsampwidth(2)
                        w.setframerate(16000)
                        w.writeframes(np.clip(np.rint(clip), -32768, 32767).astype("<i2").tobytes())
    return dest
