"""Kiln on real data, beside a plain PyTorch script on the same split.

    .venv/bin/python bench/real_data.py [--only wine,basic_motions] [--smoke] [--augment]

For each real data set a package ships (tests/realdata.py says which, and that the speech is
espeak-ng's synthesis, not recordings), the bench writes it in a team's on-disk layout, declares
an app for it and runs Kiln's data and train stages (`doit train:<app>`). The baseline is what a
plain script gets on the *same* split: the data stage's train/val/test arrays (the features Kiln's
front end made), a small MLP written in plain PyTorch (Adam, cross-entropy, best val epoch),
and scikit-learn's logistic regression. With ``--augment`` each set with augmentation settings
also trains with them on and off (same seed) and prints both validation accuracies.
Figures are test top-1 (float model, host); the per-class report of each Kiln run is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import realdata  # noqa: E402
from kiln.tasks.classification import report_lines  # noqa: E402

REQ = {"accuracy": {"min": 0.0}}


def _manifest(name: str, dataset: dict, architecture: dict, training: dict) -> dict:
    return {"name": name, "requirements": REQ, "dataset": dataset, "architecture": architecture,
            "training": {"batch": 32, "seed": 0, **training}, "targets": ["x86-host"]}


def sets(data: Path, smoke: bool) -> dict[str, tuple[str, dict, str]]:
    """name -> (what the data is, manifest, modality). Data written under ``data``."""
    epochs = 3 if smoke else None
    out = {}
    out["digits_images"] = ("scikit-learn digits (real handwriting), PNG class folders", _manifest(
        "digits_images",
        {"format": "image_folders", "path": str(realdata.digits_folders(data / "digits")), "image_size": [8, 8],
         "color": "grayscale", "front_end": {"kind": "normalize"}, "split": {"val": 0.1, "test": 0.2, "seed": 0}},
        {"family": "cnn", "widths": [16, 32], "max_macs": 10_000_000}, {"epochs": epochs or 30, "lr": 0.01}), "image")
    for table, widths in (("wine", [32, 16]), ("breast_cancer", [32, 16])):
        out[table] = (f"scikit-learn {table} (real measurements), one CSV", _manifest(
            table, {"format": "csv_table", "path": str(realdata.sklearn_table(data / f"{table}.csv", table)),
                    "label": "label", "split": {"val": 0.15, "test": 0.25, "seed": 0}},
            {"family": "mlp", "widths": widths}, {"epochs": epochs or 60, "lr": 0.01}), "table")
    out["basic_motions"] = ("sktime BasicMotions (real smartwatch accelerometer + gyroscope), CSV per recording",
                            _manifest("basic_motions", {
                                "format": "csv_windows", "path": str(realdata.basic_motions(data / "bm")),
                                "columns": realdata.BASIC_MOTIONS_CHANNELS, "timestamp": "timestamp", "label": None,
                                "sample_rate": realdata.BASIC_MOTIONS_RATE, "window": 50, "stride": 25,
                                "split": {"val": 0.2, "test": 0.2, "seed": 0}},
                                {"family": "conv1d", "widths": [16, 32], "kernel": 5},
                                {"epochs": epochs or 40, "lr": 0.01}), "sequence")
    words = ["yes", "no", "up", "down", "left", "right"]
    out["tts_words"] = ("espeak-ng speech (synthesized, NOT recorded), Speech Commands layout, speakers kept whole",
                        _manifest("tts_words", {
                            "format": "audio_folders",
                            "path": str(realdata.tts_words(data / "words", words, speakers=8 if smoke else 30)),
                            "sample_rate": 16000, "clip_seconds": 1.0, "front_end": {"kind": "mfcc"},
                            "split": {"val": 0.15, "test": 0.2, "seed": 0}},
                            {"family": "ds_cnn", "filters": 32, "kernel": [10, 4], "stride": [2, 2],
                             "widths": [32, 32]}, {"epochs": epochs or 25, "lr": 0.005}), "audio")
    return out


def kiln_train(name: str, manifest: dict, projects: Path, build: Path) -> dict:
    """doit train:<app> in a scratch build; returns metrics.json and data.json."""
    import yaml

    (projects / name).mkdir(parents=True, exist_ok=True)
    (projects / name / "project.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    env = {**os.environ, "KILN_PROJECTS": str(projects), "KILN_BUILD": str(build), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT), f"train:{name}"],
                       env=env, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{name}: doit train failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return {"metrics": json.loads((build / name / "metrics.json").read_text()),
            "data": json.loads((build / name / "data" / "data.json").read_text()),
            "seconds": time.perf_counter() - t0}


def _split(build: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from passes.support.splits import open_split  # a large training split is sharded (passes/support/splits.py)

    x, y = open_split(build / name / "data", split)
    x = np.asarray(x)
    scale = 255.0 if x.dtype == np.uint8 else 1.0  # pixels when the format has no front end
    return (x.astype(np.float32) / scale).reshape(len(x), -1), y


def plain_torch(build: Path, name: str, epochs: int, seed: int = 0) -> float:
    """A plain PyTorch script: an MLP (two hidden layers of 64), Adam 1e-3, cross-entropy,
    batch 32, the epoch with the best val accuracy scored on test."""
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    (xtr, ytr), (xva, yva), (xte, yte) = (_split(build, name, s) for s in ("train", "val", "test"))
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva, xte = ((a - mean) / std for a in (xtr, xva, xte))
    k = int(max(ytr.max(), yva.max(), yte.max())) + 1
    net = nn.Sequential(nn.Linear(xtr.shape[1], 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, k))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    best = (-1.0, 0.0)
    for _ in range(epochs):
        net.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 32):
            j = perm[i:i + 32]
            loss = nn.functional.cross_entropy(net(xt[j]), yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            va = float((net(torch.from_numpy(xva)).argmax(1).numpy() == yva).mean())
            te = float((net(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
        if va > best[0]:
            best = (va, te)
    return best[1]


def logistic(build: Path, name: str) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    (xtr, ytr), (xte, yte) = _split(build, name, "train"), _split(build, name, "test")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(xtr, ytr)
    return float(clf.score(xte, yte))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma list of sets (default: all)")
    ap.add_argument("--smoke", action="store_true", help="a few epochs and the smallest sets: a check that it runs")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-real-") as tmp:
        tmp = Path(tmp)
        chosen = sets(tmp / "data", args.smoke)
        if args.only:
            chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
        rows, per_class = [], {}
        for name, (what, manifest, modality) in chosen.items():
            run = kiln_train(name, manifest, tmp / "projects", tmp / "build")
            m, d = run["metrics"], run["data"]
            per_class[name] = m["test_per_class"]
            epochs = 3 if args.smoke else 100
            rows.append((name, modality, d["counts"], d["groups"]["by"], m["test_accuracy"],
                         plain_torch(tmp / "build", name, epochs), logistic(tmp / "build", name), run["seconds"], what))
            print(f"{name}: {what}: groups by {d['groups']['by']}, counts {d['counts']}", flush=True)
        head = f"{'set':<15} {'modality':<9} {'train/val/test':<16} {'Kiln test':>9} {'plain MLP':>9} {'logreg':>7} {'Kiln/MLP':>8} {'s':>6}"
        print("\nTest top-1 on real data (same split for all three)\n" + head + "\n" + "-" * len(head))
        for name, modality, counts, _, kiln, mlp, lr, secs, _ in rows:
            split = f"{counts['train']}/{counts['val']}/{counts['test']}"
            print(f"{name:<15} {modality:<9} {split:<16} {kiln:>9.4f} {mlp:>9.4f} {lr:>7.4f} {kiln / max(mlp, 1e-9):>8.2f} {secs:>6.0f}")
        for name, report in per_class.items():  # metrics.json's test_per_class: the float model on the test split
            print(f"\nPer-class test report of Kiln's {name} (float model, host; metrics.json test_per_class)")
            print("\n".join(report_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
