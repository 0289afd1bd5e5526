"""Dataset format ``speech_commands``: the Speech Commands v2 tree as it ships, read in place.

Layout (``<root>`` is ``dataset.path``)::

    <root>/<word>/<speaker>_nohash_<n>.wav   16 kHz 16-bit mono clips, one folder a word
    <root>/_background_noise_/*.wav          long noise recordings
    <root>/validation_list.txt               <word>/<file> per line: the validation split
    <root>/testing_list.txt                  the test split

The classes are MLPerf Tiny's keyword-spotting setup: ``_silence_``, ``_unknown_``, then
``dataset.words`` (default the ten MLPerf words). Each split holds its word clips; ``_unknown_``
clips are picked from that split's clips of every other word (those with the lowest seeded hash
of their name: a clip added or removed moves at most one other pick), and ``_silence_`` clips are
one-second slices of ``_background_noise_`` at a random gain (each recording's first 80 % for
train, the next 10 % for val, the last for test: no noise heard in two splits), each as many as
``unknown_percentage`` / ``silence_percentage`` of the split's word clips (10 % each, as MLPerf
and TensorFlow's speech_commands ``input_data`` do). Without the two list files a clip's split
is the data set's own hash of its speaker (``which_set``: sha1 of the name before
``_nohash_``), so a speaker is never in two splits. Groups for data.json are speakers (the
silence clips: their noise file).

The clips go through the data stage's decode cache (passes/support/decode_cache.py: per file by
its bytes, decoded on every core), so a rerun decodes only the clips added or changed; the
silence clips are cut here on every run from the noise recordings (read whole, a handful of
files) and joined to the cached rows with keys of their own (``decode_cache.join``), so the
training split is sharded as audio_folders' is.

``synthesize`` writes the same layout (speaker-hashed names, a noise folder, both list files)
from audio_folders' keyword-like tones, so the stage runs without the 2.3 GB download.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from pathlib import Path

import numpy as np

from kiln.errors import ManifestError, PassError
from kiln.artifacts import read_json
from passes.formats import MARKER, Loaded, synthetic_or_refuse, write_tree
from passes.formats.audio_folders import DECODER_VERSION, clip, fit_length, read_wav, wav_bytes
from passes.formats.support.folders import Unreadable, resolve
from passes.support import decode_cache

log = logging.getLogger("kiln.data")

SILENCE, UNKNOWN = "_silence_", "_unknown_"
NOISE = "_background_noise_"
LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
MAX_NUM_WAVS_PER_CLASS = 2 ** 27 - 1  # the data set's own split hash: ~134M
GENERATOR_VERSION = 1


def speaker(name: str) -> str:
    """The speaker of ``<speaker>_nohash_<n>.wav``."""
    return re.sub(r"_nohash_.*$", "", Path(name).name)


def which_set(name: str, val_pct: float, test_pct: float) -> str:
    """The data set's own split of a clip by the hash of its speaker (its README's rule)."""
    h = int(hashlib.sha1(speaker(name).encode()).hexdigest(), 16)
    pct = (h % (MAX_NUM_WAVS_PER_CLASS + 1)) * (100.0 / MAX_NUM_WAVS_PER_CLASS)
    return "val" if pct < val_pct else "test" if pct < val_pct + test_pct else "train"


def is_tree(root: Path) -> bool:
    """A Speech Commands tree: word folders holding ``*_nohash_*.wav`` (cheap: first hit)."""
    if not root.is_dir():
        return False
    for d in root.iterdir():
        if d.is_dir() and not d.name.startswith((".", "_")) and next(d.glob("*_nohash_*.wav"), None) is not None:
            return True
    return False


def locate(ds, layout) -> tuple[Path, bool]:
    path = resolve(ds.path)
    if is_tree(path):
        return path, False
    return synthetic_or_refuse(ds, path, layout, "holds no Speech Commands tree (<word>/<speaker>_nohash_<n>.wav)")


def infer(ds, root: Path) -> dict:
    """The classes are fixed by ``dataset.words``; each word must have a folder in a real tree."""
    root = Path(root)
    if is_tree(root):
        missing = [w for w in ds.words if not (root / w).is_dir()]
        if missing:
            have = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "_")))
            raise ManifestError(f"field 'dataset.words': {missing[0]!r} has no folder {root / missing[0]} "
                                f"(words there: {', '.join(have[:40])})")
    else:
        synthetic_or_refuse(ds, root, None, "holds no Speech Commands tree (<word>/<speaker>_nohash_<n>.wav)")
    return {"classes": ds.class_names}


def _read_list(root: Path, name: str) -> set[str] | None:
    path = root / name
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def _split_files(ds, root: Path) -> tuple[dict[str, list[str]], str]:
    """split -> clips (``<word>/<file>``, sorted) of every word folder; and how they were split."""
    lists = {s: _read_list(root, f) for s, f in LISTS.items()}
    files = sorted(p.relative_to(root).as_posix() for d in sorted(root.iterdir())
                   if d.is_dir() and not d.name.startswith((".", "_")) for p in d.glob("*.wav"))
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    if all(v is not None for v in lists.values()):
        for f in files:
            out["val" if f in lists["val"] else "test" if f in lists["test"] else "train"].append(f)
        listed = lists["val"] | lists["test"]
        absent = sorted(listed - set(files))
        if absent:
            log.warning("data: %d clip(s) named in %s/%s are not in %s, first: %s", len(absent), *LISTS.values(),
                        root, ", ".join(absent[:3]))
        return out, "the shipped validation_list.txt and testing_list.txt"
    if any(v is not None for v in lists.values()):
        have, lack = (next(f for s, f in LISTS.items() if (lists[s] is None) == missing) for missing in (False, True))
        raise PassError(f"data: {root} has {have} but not {lack}; ship both list files or neither")
    for f in files:
        out[which_set(f, ds.split.val * 100, ds.split.test * 100)].append(f)
    return out, "the hash of each speaker (no list files)"


def _noise(root: Path, sample_rate: int, skipped: list[str]) -> list[tuple[str, np.ndarray, str]]:
    """(name, samples, sha256 of the file's bytes) of each readable noise recording. Read here on
    every run, not through the decode cache: a handful of files of any length (the cache keeps
    samples of one shape)."""
    out = []
    for p in sorted((root / NOISE).glob("*.wav")) if (root / NOISE).is_dir() else []:
        try:
            out.append((p.relative_to(root).as_posix(), read_wav(p, sample_rate),
                        hashlib.sha256(p.read_bytes()).hexdigest()))
        except Unreadable as e:
            skipped.append(f"{p}: {e}")
    return out


# each noise recording is cut into regions, one per split (train the first 80 %, then val, then
# test), so that no stretch of noise is heard in two splits (TensorFlow's loader draws every split's
# silence from the whole recordings)
NOISE_REGIONS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


def _silence(noise, split: str, n: int, length: int, rng) -> tuple[np.ndarray, list[str], list[str]]:
    """``n`` one-second slices of the split's region of the background noise at a random gain
    (0..1); each named by its recording and region (its group); each one's key (what decides
    it: its recording's bytes, where it starts, its gain), for the decode cache's ``join``.
    Drawn one after another from ``rng``: one more clip leaves the others as they were."""
    lo, hi = NOISE_REGIONS[split]
    regions = [(name, x[int(lo * len(x)):int(hi * len(x))], sha, int(lo * len(x))) for name, x, sha in noise]
    usable = [r for r in regions if len(r[1]) >= length]
    if n and not usable:
        raise PassError(f"data: {NOISE}/ holds no noise recording long enough to cut one-second {SILENCE} clips "
                        f"from its {split} region ({100 * (hi - lo):.0f} % of it; set dataset.silence_percentage: 0 "
                        "to go without)")
    clips, names, keys = np.empty((n, length), np.int16), [], []
    for i in range(n):
        name, x, sha, offset = usable[int(rng.integers(len(usable)))]
        start = int(rng.integers(0, len(x) - length + 1))
        gain = float(rng.uniform(0, 1))
        clips[i] = np.clip(np.rint(x[start:start + length] * gain), -32768, 32767)
        names.append(f"{name}#{split}")
        keys.append("silence:" + hashlib.sha256(f"{sha}\0{offset + start}\0{length}\0{gain!r}".encode()).hexdigest())
    return clips, names, keys


def _pick_unknown(unknown: list[str], n: int, seed: int) -> list[int]:
    """The ``n`` clips of ``unknown`` whose seeded hash of their name is lowest, in file order. A
    clip's pick depends on its own name and on ``n`` alone, so a clip added or removed changes at
    most one other pick (and the decode cache decodes only it); a draw from the whole list (as
    before the decode cache) picked anew whenever the list changed."""
    if not n:
        return []
    rank = [hashlib.blake2b(f"{seed}\0{f}".encode(), digest_size=8).digest() for f in unknown]
    return sorted(sorted(range(len(unknown)), key=rank.__getitem__)[:n])


def load(ds, root: Path) -> Loaded:
    """The three splits of the tree; the clips through the data stage's decode cache (keyed by
    each file's bytes, decoded on every core) when it has one open, the silence clips cut here."""
    root = Path(root)
    length = int(ds.raw_shape()[0])
    names = ds.class_names
    index = {w: i for i, w in enumerate(names)}
    split_files, how = _split_files(ds, root)
    skipped: list[str] = []
    noise = _noise(root, ds.sample_rate, skipped)
    settings = {"format": "speech_commands", "sample_rate": ds.sample_rate, "length": length,
                "decoder": DECODER_VERSION}

    def read(path: Path) -> np.ndarray:
        return fit_length(read_wav(path, ds.sample_rate), length)

    arrays, sources, counts = {}, {}, {}
    for split, files in split_files.items():
        rng = np.random.default_rng([ds.split.seed, ("train", "val", "test").index(split)])
        words = [f for f in files if f.split("/")[0] in index]
        unknown = [f for f in files if f.split("/")[0] not in index]
        n_unknown = min(len(unknown), math.ceil(len(words) * ds.unknown_percentage / 100))
        picked = _pick_unknown(unknown, n_unknown, ds.split.seed)
        chosen = [(f, index[f.split("/")[0]]) for f in words] + [(unknown[i], index[UNKNOWN]) for i in picked]
        x, ok, errors = decode_cache.decode([root / f for f, _ in chosen], read, (length,), np.int16, settings,
                                            catch=(Unreadable,))
        skipped += [f"{root / chosen[i][0]}: {e}" for i, e in sorted(errors.items())]
        ys = [label for (_, label), good in zip(chosen, ok) if good]
        srcs = [f for (f, _), good in zip(chosen, ok) if good]
        n_silence = math.ceil(len(words) * ds.silence_percentage / 100)
        sil, sil_src, sil_keys = _silence(noise, split, n_silence, length, rng)
        ys += [index[SILENCE]] * len(sil)
        srcs += sil_src
        if not ys:
            raise PassError(f"data: the {split} split of {root} holds no readable clip of {', '.join(ds.words)}")
        arrays[split] = (decode_cache.join([(x, None), (sil, sil_keys)]), np.asarray(ys, np.int64))
        sources[split] = srcs
        counts[split] = {"words": len(words), "unknown": len(picked), "silence": len(sil)}
    if skipped:
        log.warning("data: skipped %d file(s) under %s, first: %s", len(skipped), root, "; ".join(skipped[:5]))
    report = {"source": str(root), "samples": sum(len(a[1]) for a in arrays.values()), "split_by": how,
              "counts": counts, "skipped": len(skipped), "skipped_examples": skipped[:5],
              "noise_files": [n for n, _, _ in noise]}
    log.info("data: Speech Commands at %s split by %s: %s", root, how,
             ", ".join(f"{s} {c['words']} words + {c['unknown']} unknown + {c['silence']} silence" for s, c in counts.items()))
    source = {"format": "speech_commands", "num_classes": len(names), "channels": ds.channels, "classes": names,
              "synthetic": read_json(root / MARKER) if (root / MARKER).is_file() else None, "test_source": how}
    return Loaded(arrays["train"], arrays["test"], report, source, arrays["val"], sources, "speaker")


# --- the synthetic tree --------------------------------------------------------------------------

OTHER_WORDS = ("bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow")


def synthesize(ds, dest: Path) -> dict:
    """A Speech Commands v2 tree in its own layout: ``synthetic.speakers`` speakers (8-hex
    names) each saying every word ``synthetic.clips`` times (the words of ``dataset.words`` and
    ``synthetic.other_words`` more for ``_unknown_``), three noise recordings, and both list
    files (every tenth speaker in the test list, the next in the validation list, so that both
    splits have speakers however few there are). Deterministic; the tones are audio_folders'
    keyword-like clips."""
    syn = ds.synthetic
    sr, length = ds.sample_rate, int(ds.raw_shape()[0])
    words = list(ds.words) + list(OTHER_WORDS[:syn.other_words])
    marker = {"generator": "kiln synthetic speech_commands", "version": GENERATOR_VERSION, "words": words,
              "speakers": syn.speakers, "clips": syn.clips, "seed": syn.seed, "sample_rate": sr}

    def fill(tmp: Path) -> int:
        rng = np.random.default_rng([syn.seed, 0])
        count, lists = 0, {"val": [], "test": []}
        for s in range(syn.speakers):
            who = f"{int(rng.integers(16 ** 8)):08x}"
            for k, word in enumerate(words):
                (tmp / word).mkdir(exist_ok=True)
                for n in range(syn.clips):
                    name = f"{word}/{who}_nohash_{n}.wav"
                    (tmp / name).write_bytes(wav_bytes(clip(k, sr, length, rng), sr))
                    split = {1: "test", 2: "val"}.get(s % 10, "train")
                    if split != "train":
                        lists[split].append(name)
                    count += 1
        (tmp / NOISE).mkdir()
        t = np.arange(sr * 12)  # its last tenth (the test region) still holds one second
        for kind in ("white_noise", "pink_noise", "running_tap"):
            x = rng.normal(0, 1, len(t))
            if kind == "pink_noise":
                x = np.cumsum(x) - np.convolve(np.cumsum(x), np.ones(64) / 64, "same")
            elif kind == "running_tap":
                x = x * (1 + 0.5 * np.sin(2 * np.pi * 3 * t / sr))
            x = x / (np.abs(x).max() + 1e-9) * 8000
            (tmp / NOISE / f"{kind}.wav").write_bytes(wav_bytes(x.astype("<i2"), sr))
        for split, f in LISTS.items():
            (tmp / f).write_text("".join(f"{name}\n" for name in sorted(lists[split])))
        return count + 3

    return write_tree(dest, marker, fill)
