"""The data stage at real size: a full GTSRB-layout tree, cold, after +20 images, and a no-op.

    .venv/bin/python bench/scale.py [--rounds 3] [--smoke] [--no-audio] [--no-training] [--keep DIR]

The bench draws its own tree in GTSRB's real layout (what passes/formats/gtsrb.py reads):
``Final_Training/Images/000NN/<track>_<frame>.ppm`` with ``GT-000NN.csv`` per class (43 classes,
39,209 images in tracks of 30 frames, class sizes uneven as GTSRB's), ``Final_Test/Images/`` with
``GT-final_test.csv`` (12,630 images); each image 15..250 px a side (most near 30..60, as GTSRB's),
a coloured sign-like blob in a noisy frame, with a ROI. Then traffic_signs' data stage (its
manifest, the dataset path pointed at the tree: the normalize front end, raw_train.npz kept for
augmentation) runs in a child process per measurement (the seconds are ``data.run``'s, timed after
the child imported torch and Kiln: that import, the same in every phase, is its own column):

* cold: a fresh build folder (no decode cache);
* +20: 20 images added as a new track of the largest class (the data stage reruns, as doit's
  tree check asks it to); every old track (a group: its frames) must keep its split (asserted);
  the round's line names the training split's shard files that are new (the others were kept);
* no-op: the same tree again (what ``doit forget data:<app>`` would cost; doit itself skips the
  task: its up-to-date check, the tree fingerprint, is timed too).

Each in its own child, in interleaved rounds (cold, +20, no-op; the 20 images removed again at
the end of a round), with the child's peak RSS (``ru_maxrss``; its decode workers' too). A
100,000-clip audio_folders set (0.1 s clips at 8 kHz, speakers as groups, MFCC front end) is
measured cold and no-op with its peak RSS (``--no-audio``: skip it). When bench/scale_training.py
exists its ``run(smoke)`` rows (training figures) are printed too (``--no-training``: not). ``--smoke``:
about 500 images (tracks of 5) and 300 clips, one round, every phase in the bench's own process:
seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
CLASSES = 43
TRAIN, TEST, TRACK = 39_209, 12_630, 30


def _ppm(path: Path, k: int, rng: np.random.Generator) -> tuple[int, int, tuple[int, int, int, int]]:
    """One image of class ``k``: noise, a class-coloured square inside a ROI; -> (w, h, roi)."""
    side = int(np.clip(rng.lognormal(np.log(42), 0.45), 15, 250))
    w, h = side, int(np.clip(side * rng.uniform(0.9, 1.1), 15, 250))
    img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
    m = max(1, min(w, h) // 10)
    roi = (m, m, w - 1 - m, h - 1 - m)
    img[m:h - m, m:w - m] = ((k * 53) % 256, (k * 97) % 256, (k * 151) % 256)
    path.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + img.tobytes())
    return w, h, roi


def class_sizes(total: int, track: int, rng) -> list[int]:
    """Images per class, uneven like GTSRB's (210..2250), in whole tracks (at least two)."""
    weight = rng.lognormal(0, 0.8, CLASSES)
    sizes = np.maximum(2 * track, np.floor(total * weight / weight.sum() / track) * track).astype(int)
    sizes[int(np.argmax(sizes))] += max(0, total - int(sizes.sum()))
    return sizes.tolist()


def build_tree(root: Path, train: int, test: int, track: int = TRACK, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    images = root / "Final_Training" / "Images"
    for k, n in enumerate(class_sizes(train, track, rng)):
        d = images / f"{k:05d}"
        d.mkdir(parents=True)
        rows = [HEADER]
        for i in range(n):
            name = f"{i // track:05d}_{i % track:05d}.ppm"
            w, h, roi = _ppm(d / name, k, rng)
            rows.append(f"{name};{w};{h};{';'.join(map(str, roi))};{k}")
        (d / f"GT-{k:05d}.csv").write_text("\n".join(rows) + "\n")
    d = root / "Final_Test" / "Images"
    d.mkdir(parents=True)
    rows = [HEADER]
    for i in range(test):
        k = i if i < CLASSES else int(rng.integers(CLASSES))  # every class at least once
        name = f"{i:05d}.ppm"
        w, h, roi = _ppm(d / name, k, rng)
        rows.append(f"{name};{w};{h};{';'.join(map(str, roi))};{k}")
    (d / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def largest_class(root: Path) -> Path:
    return max((root / "Final_Training" / "Images").iterdir(), key=lambda d: len(list(d.glob("*.ppm"))))


def add_track(root: Path, n: int = 20) -> list[Path]:
    """``n`` new frames, a new track of the largest class; -> the files written."""
    d = largest_class(root)
    k = int(d.name)
    csv = d / f"GT-{k:05d}.csv"
    track = 1 + max(int(p.name[:5]) for p in d.glob("*.ppm"))
    rng = np.random.default_rng(1234)
    rows, files = [], []
    for i in range(n):
        name = f"{track:05d}_{i:05d}.ppm"
        w, h, roi = _ppm(d / name, k, rng)
        rows.append(f"{name};{w};{h};{';'.join(map(str, roi))};{k}")
        files.append(d / name)
    csv.with_suffix(".bak").write_bytes(csv.read_bytes())
    csv.write_text(csv.read_text() + "\n".join(rows) + "\n")
    return files


def remove_track(root: Path, files: list[Path]) -> None:
    for f in files:
        f.unlink()
    d = files[0].parent
    os.replace(d / f"GT-{d.name}.bak", d / f"GT-{d.name}.csv")


def build_audio(root: Path, clips: int, classes: int = 10, speakers: int = 2000) -> None:
    """``clips`` 0.1 s 8 kHz WAV clips in class folders, named ``<speaker>_nohash_<n>.wav``."""
    from passes.formats.audio_folders import clip, wav_bytes

    rng = np.random.default_rng(0)
    base = [clip(k, 8000, 800, rng) for k in range(classes)]  # one clip a class, varied per file by noise
    for k in range(classes):
        (root / f"w{k}").mkdir(parents=True)
    for i in range(clips):
        k = i % classes
        x = (base[k] + rng.integers(-300, 300, 800)).astype("<i2")
        (root / f"w{k}" / f"{i % speakers:08x}_nohash_{i}.wav").write_bytes(wav_bytes(x, 8000))


# --- the child: one data stage run ----------------------------------------------------------------


def manifest(kind: str, path: Path) -> dict:
    import yaml

    if kind == "gtsrb":
        d = yaml.safe_load((ROOT / "projects" / "traffic_signs" / "project.yaml").read_text())
        d["dataset"]["path"] = str(path)
        d["dataset"].pop("synthetic", None)
        d["targets"] = ["x86-host"]
        return d
    return {"name": "kws_scale", "requirements": {"accuracy": {"min": 0.0}},
            "dataset": {"format": "audio_folders", "path": str(path), "sample_rate": 8000, "clip_seconds": 0.1,
                        "split": {"val": 0.1, "test": 0.1, "seed": 0}},
            "architecture": {"family": "cnn", "widths": [4], "max_macs": 1_000_000},
            "training": {"epochs": 1, "batch": 8, "lr": 0.01, "seed": 0}, "targets": ["x86-host"]}


def child(kind: str, path: str, build: str) -> None:
    print("RESULT " + json.dumps(measure(kind, path, build)))


def measure(kind: str, path: str, build: str) -> dict:
    """One data stage run on the tree at ``path`` into the build folder ``build``."""
    import resource

    os.environ["KILN_BUILD"] = build
    t0 = time.perf_counter()
    import torch  # noqa: F401  (the front ends' module: imported before the clock, timed apart)

    from kiln.artifacts import Layout
    from kiln.schema import Project
    from passes import data, frontends  # noqa: F401
    imports = time.perf_counter() - t0

    project = Project.model_validate(manifest(kind, Path(path)))
    t0 = time.perf_counter()
    info = data.run(project, Layout(project.name))
    seconds = time.perf_counter() - t0
    groups = {g: s for s in ("train", "val", "test") for g in info["groups"][s]["names"] or []}
    out = {"seconds": seconds, "imports": imports, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "workers_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "decode": info["load"]["decode"], "counts": info["counts"], "groups": groups,
           "shards": sorted(f for f in info["files"] if "/" in f)}  # the training split's shard files
    return out


IN_PROCESS = False  # --smoke: every phase in this process (one import of torch; the figures mean nothing)


def run_child(kind: str, path: Path, build: Path) -> dict:
    if IN_PROCESS:
        return measure(kind, str(path), str(build))
    p = subprocess.run([sys.executable, __file__, "--child", kind, str(path), str(build)], cwd=ROOT,
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"the data stage failed ({kind}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])


# --- the bench ----------------------------------------------------------------------------------


COLUMNS = (f"{'phase':<26} {'median s':>8} {'spread':>15} {'vs cold':>8} {'peak MB':>9} {'workers MB':>10} "
           f"{'decoded':>8} {'imports s':>9}")


def _row(name: str, runs: list[dict], cold: float | None) -> str:
    s = [r["seconds"] for r in runs]
    med = statistics.median(s)
    rss = max(r["rss_mb"] for r in runs)
    wrss = max(r.get("workers_rss_mb", 0) for r in runs)
    dec = runs[-1].get("decode", {}).get("decoded", "")
    ratio = f"{med / cold:.3f}x" if cold else ""
    imp = statistics.median(r["imports"] for r in runs)
    return f"{name:<26} {med:>8.2f} {min(s):>7.2f}-{max(s):<7.2f} {ratio:>8} {rss:>9.0f} {wrss:>10.0f} {dec:>8} {imp:>9.2f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="about 500 images, 300 clips, one round: seconds")
    ap.add_argument("--no-audio", action="store_true")
    ap.add_argument("--no-training", action="store_true", help="skip bench/scale_training.py's rows")
    ap.add_argument("--keep", type=Path, help="build the trees in DIR and keep them (reused when there)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(*a.child)
        return
    from kiln.artifacts import tree_fingerprint

    global IN_PROCESS
    IN_PROCESS = a.smoke

    rounds = 1 if a.smoke else a.rounds
    train, test, clips = (430, 86, 300) if a.smoke else (TRAIN, TEST, 100_000)
    work = a.keep or Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    tree = work / ("gtsrb-smoke" if a.smoke else "gtsrb")
    if not (tree / "Final_Test").is_dir():
        t0 = time.perf_counter()
        shutil.rmtree(tree, ignore_errors=True)
        build_tree(tree, train, test, track=5 if a.smoke else TRACK)
        print(f"drew a GTSRB tree of {train} + {test} images in {time.perf_counter() - t0:.1f} s at {tree}", flush=True)
    n = sum(1 for _ in tree.rglob("*.ppm"))
    print(f"GTSRB layout: {n} images, traffic_signs' data stage (32x32, normalize front end, raw_train.npz), "
          f"{os.cpu_count()} cores", flush=True)
    runs: dict[str, list[dict]] = {"cold": [], "+20 images": [], "no-op (data stage rerun)": []}
    checks: list[float] = []
    try:
        for r in range(rounds):
            build = work / f"build-{r}"
            shutil.rmtree(build, ignore_errors=True)
            cold = run_child("gtsrb", tree, build)
            runs["cold"].append(cold)
            added = add_track(tree)
            try:
                inc = run_child("gtsrb", tree, build)
                runs["+20 images"].append(inc)
                moved = {g: (s, inc["groups"].get(g)) for g, s in cold["groups"].items() if inc["groups"].get(g) != s}
                assert not moved, f"old tracks changed split after +20 images: {list(moved.items())[:5]}"
                assert inc["decode"]["decoded"] == len(added), inc["decode"]
                new = set(inc["groups"]) - set(cold["groups"])
                assert len(new) == 1, new
                t0 = time.perf_counter()
                tree_fingerprint(tree)
                checks.append(time.perf_counter() - t0)
                runs["no-op (data stage rerun)"].append(run_child("gtsrb", tree, build))
            finally:
                remove_track(tree, added)
            shutil.rmtree(build, ignore_errors=True)
            fresh = sorted(set(inc["shards"]) - set(cold["shards"]))
            print(f"round {r + 1}/{rounds}: cold {cold['seconds']:.2f} s, +20 {inc['seconds']:.2f} s "
                  f"({inc['decode']['decoded']} decoded, {len(cold['groups'])} old tracks: none moved; "
                  f"{len(fresh)} of {len(inc['shards'])} shard files new: {', '.join(fresh)})", flush=True)
        c = statistics.median(x["seconds"] for x in runs["cold"])
        print("\n" + COLUMNS)
        for name, rs in runs.items():
            print(_row(name, rs, None if name == "cold" else c))
        print(f"{'doit up-to-date check':<26} {statistics.median(checks):>8.2f} {min(checks):>7.2f}-{max(checks):<7.2f} "
              f"{statistics.median(checks) / c:>7.3f}x  (tree fingerprint: doit skips the task)")
        inc = statistics.median(x["seconds"] for x in runs["+20 images"])
        print(f"\n+20 images / cold = {inc / c:.3f} (goal <= 0.1); every old track kept its split in every round; "
              f"counts {runs['cold'][-1]['counts']}")
        if not a.no_audio:
            audio = work / ("audio-smoke" if a.smoke else "audio")
            if not (audio / "w0").is_dir():
                t0 = time.perf_counter()
                shutil.rmtree(audio, ignore_errors=True)
                build_audio(audio, clips)
                print(f"\nwrote {clips} clips in {time.perf_counter() - t0:.1f} s", flush=True)
            build = work / "build-audio"
            shutil.rmtree(build, ignore_errors=True)
            ac = run_child("audio", audio, build)
            an = None if a.smoke else run_child("audio", audio, build)
            shutil.rmtree(build, ignore_errors=True)
            print(f"\naudio_folders, {clips} clips of 0.1 s (MFCC front end): counts {ac['counts']}")
            print(COLUMNS)
            print(_row("cold", [ac], None))
            if an is not None:
                print(_row("no-op (data stage rerun)", [an], ac["seconds"]))
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    training = ROOT / "bench" / "scale_training.py"
    if training.is_file() and not a.no_training:
        import importlib

        rows = importlib.import_module("bench.scale_training").run(a.smoke)
        print("\ntraining (bench/scale_training.py):")
        keys = list(dict.fromkeys(k for row in rows for k in row))
        print("  ".join(f"{k:>14}" for k in keys))
        for row in rows:
            print("  ".join(f"{row.get(k, ''):>14}" if not isinstance(row.get(k), float) else f"{row[k]:>14.3f}"
                            for k in keys))
    if a.smoke:
        print("--smoke: tiny trees; the figures mean nothing")


if __name__ == "__main__":
    main()
