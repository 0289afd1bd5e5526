"""Training at size: Kiln's loop against a plain PyTorch script, DDP over 2 processes against 1,
and a warm start against a full retrain after +20 samples.

    .venv/bin/python bench/scale_training.py [--rounds 3] [--parts loop,ddp,warm] [--smoke]

The net and data are traffic_signs' (cnn [16, 32, 64] with a GAP head, 43 classes, 32x32x3 uint8
pixels, batch 128, lr 0.003, one-cycle Adam); the samples are drawn by the bench (a class-coloured
blob in noise: learnable, GTSRB-sized), written as the data stage writes its splits (an
uncompressed .npz, read memory-mapped: passes/support/splits.py open_split). No augmentation in
any row: the rows time the loop, not the augmentation.

* samples/s, Kiln's loop: ``passes.support.training.fit`` over the memory-mapped split (its
  DataLoader, training.loader_workers auto), no validation;
* samples/s, plain loop: what a hand-written script does on the same arrays, held in memory as
  one float tensor: TensorDataset + DataLoader(shuffle=True), the same net, optimizer, schedule;
* DDP 1 and 2 processes: the train stage (passes/train.py) under torchrun (training.distributed,
  nproc_per_node 1 then 2, gloo; one intra-op thread per process), samples/s over its epochs
  (each epoch's seconds, its validation included) and the wall time with torchrun's start;
* warm start vs full retrain: the train stage after 20 samples were added to the training split,
  from the last model.pt for training.warm_start epochs, against training.epochs from scratch.

Rounds are interleaved (every measurement once per round); each figure is the median of the
rounds with its spread (min..max). ``run(smoke)`` returns the rows (bench/scale.py prints them);
``--smoke``: a few hundred samples, one round, one epoch, no DDP rows (two torchrun starts;
tests/test_distributed.py runs that path): seconds, and figures that mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CLASSES, SIZE = 43, 32
MANIFEST = {
    "name": "scale_training",
    "requirements": {"accuracy": {"min": 0.0}},
    "dataset": {"format": "gtsrb", "path": "no/such/dir", "image_size": [SIZE, SIZE],
                "split": {"val": 0.1, "test": 0.1, "seed": 0}},
    "architecture": {"family": "cnn", "widths": [16, 32, 64], "head": "gap", "max_macs": 5_000_000},
    "training": {"epochs": 8, "batch": 128, "lr": 0.003, "seed": 0, "threads": 2},
    "targets": ["x86-host"],
}


def samples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32x3 uint8 images of 43 classes: a disc of the class's colour at a random place
    in noise."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(1).uniform(40, 255, size=(CLASSES, 3))
    y = rng.integers(0, CLASSES, size=n)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.uniform(10, 22, size=(2, n))
    disc = ((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) < 64
    x = rng.normal(90, 30, size=(n, SIZE, SIZE, 3))
    x = np.where(disc[..., None], colours[y][:, None, None, :] + rng.normal(0, 20, size=x.shape), x)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def write_data(data: Path, n_train: int, extra: int = 0) -> None:
    """train/val/test.npz (uncompressed: the data stage's format); ``extra`` samples appended
    to the training split (the +20 files)."""
    data.mkdir(parents=True, exist_ok=True)
    x, y = samples(n_train + extra, 0)
    if extra:  # the old samples first, as they were
        x0, y0 = samples(n_train, 0)
        x, y = np.concatenate([x0, samples(extra, 99)[0]]), np.concatenate([y0, samples(extra, 99)[1]])
    np.savez(data / "train.npz", x=x, y=y)
    for split, seed in (("val", 1), ("test", 2)):
        xs, ys = samples(max(64, n_train // 10), seed)
        np.savez(data / f"{split}.npz", x=xs, y=ys)


def project(**training):
    from kiln.schema import Project

    m = copy.deepcopy(MANIFEST)
    m["training"].update(training)
    return Project.model_validate(m)


def kiln_loop(data: Path, epochs: int) -> float:
    """samples/s of passes.support.training.fit over the memory-mapped training split."""
    import torch

    from kiln.nets import build
    from passes.support.splits import open_split
    from passes.support.training import fit

    p = project(epochs=epochs)
    x, y = open_split(data, "train")
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build(p.architecture, 3, CLASSES, (SIZE, SIZE))
    t0 = time.perf_counter()
    fit(model, x, y, epochs=epochs, batch=p.training.batch, lr=p.training.lr, aug=p.dataset.augment,
        gen=torch.Generator().manual_seed(0), recipe=p.training)
    return len(y) * epochs / (time.perf_counter() - t0)


def plain_loop(data: Path, epochs: int) -> float:
    """samples/s of a hand-written PyTorch script on the same arrays (in memory)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from kiln.nets import build

    p = project(epochs=epochs)
    with np.load(data / "train.npz") as z:
        x = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(z["y"])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = build(p.architecture, 3, CLASSES, (SIZE, SIZE))
    loader = DataLoader(TensorDataset(x, y), batch_size=p.training.batch, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=p.training.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.training.lr, total_steps=epochs * len(loader))
    loss_fn = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return len(y) * epochs / (time.perf_counter() - t0)


def train_stage(build: Path, **training) -> tuple[float, dict]:
    """(wall seconds, metrics) of the train stage on the bench's app under ``build``."""
    from kiln.artifacts import Layout
    from passes import train

    os.environ["KILN_BUILD"] = str(build)  # the ranks' Layout (torchrun's children inherit it)
    t0 = time.perf_counter()
    metrics = train.run(project(**training), Layout(MANIFEST["name"]))
    return time.perf_counter() - t0, metrics


def ddp(build: Path, nproc: int, epochs: int, n_train: int) -> tuple[float, float]:
    """(samples/s over the epochs, wall seconds with torchrun's start) of the train stage under
    torchrun with ``nproc`` processes."""
    # one intra-op thread per process in both rows (training.threads is split between the
    # ranks): 2 processes x 1 thread against 1 x 1 measures DDP, not OpenMP under contention
    wall, m = train_stage(build, epochs=epochs, threads=nproc, distributed={"nproc_per_node": nproc})
    assert m["processes"] == nproc, m
    return n_train * len(m["history"]) / sum(r["seconds"] for r in m["history"]), wall


def warm_vs_full(build: Path, epochs: int, warm: int, n_train: int, base: Path) -> tuple[float, float, dict]:
    """(warm seconds, full seconds, warm metrics) after +20 samples: the last model.pt (trained
    on the old data, kept in ``base``) fine-tuned for ``warm`` epochs, and a retrain from scratch."""
    root = build / MANIFEST["name"]
    for f in ("model.pt", "metrics.json"):
        shutil.copy(base / f, root / f)
    write_data(root / "data", n_train, extra=20)
    t_warm, m = train_stage(build, epochs=epochs, warm_start=warm)
    assert m["start"].startswith("warm start from"), m["start"]
    t_full, full = train_stage(build, epochs=epochs)
    assert full["start"] == "trained from scratch"
    return t_warm, t_full, {"warm_val": m["val_accuracy"], "full_val": full["val_accuracy"]}


def _fig(values: list[float]) -> tuple[float, str]:
    return statistics.median(values), f"{min(values):.3g}..{max(values):.3g}"


PARTS = ("loop", "ddp", "warm")


def run(smoke: bool, rounds: int | None = None, parts: tuple[str, ...] = PARTS) -> list[dict]:
    """The bench's rows: {measure, value, unit, ratio, goal, spread, rounds}; ``parts``: which
    measurements (loop, ddp, warm; --smoke has no ddp)."""
    rounds = rounds or (1 if smoke else 3)
    n_train = 256 if smoke else 1500
    epochs, loop_epochs, ddp_epochs, warm = (2, 1, 1, 1) if smoke else (8, 2, 2, 1)
    work = Path(tempfile.mkdtemp(prefix="kiln-scale-training-"))
    old_build = os.environ.get("KILN_BUILD")
    try:
        build = work / "build"
        data = build / MANIFEST["name"] / "data"
        write_data(data, n_train)
        base = work / "base"  # the model trained on the old data (what a warm start starts from)
        train_stage(build, epochs=epochs if "warm" in parts else 1)
        base.mkdir()
        for f in ("model.pt", "metrics.json"):
            shutil.copy(build / MANIFEST["name"] / f, base / f)
        r = {k: [] for k in ("kiln", "plain", "ratio", "ddp1", "ddp2", "wall1", "wall2", "scaling", "warm", "full",
                             "warm_ratio")}
        for _ in range(rounds):
            write_data(data, n_train)
            if "loop" in parts:
                k, p = kiln_loop(data, loop_epochs), plain_loop(data, loop_epochs)
                r["kiln"].append(k), r["plain"].append(p), r["ratio"].append(k / p)
            if not smoke and "ddp" in parts:  # (two torchrun starts: tens of seconds; tests/test_distributed.py runs the path)
                (s1, w1), (s2, w2) = ddp(build, 1, ddp_epochs, n_train), ddp(build, 2, ddp_epochs, n_train)
                r["ddp1"].append(s1), r["ddp2"].append(s2), r["wall1"].append(w1), r["wall2"].append(w2)
                r["scaling"].append(s2 / s1)
            if "warm" in parts:
                tw, tf, _ = warm_vs_full(build, epochs, warm, n_train, base)
                r["warm"].append(tw), r["full"].append(tf), r["warm_ratio"].append(tw / tf)
    finally:
        if old_build is None:
            os.environ.pop("KILN_BUILD", None)
        else:
            os.environ["KILN_BUILD"] = old_build
        shutil.rmtree(work, ignore_errors=True)

    def row(measure, key, unit, ratio_key=None, goal=""):
        if not r[key]:
            return {"measure": measure, "value": float("nan"), "unit": unit, "spread": "not run",
                    "rounds": 0, "goal": goal}
        value, spread = _fig(r[key])
        out = {"measure": measure, "value": round(value, 3), "unit": unit, "spread": spread, "rounds": rounds}
        if ratio_key:
            out["ratio"] = round(statistics.median(r[ratio_key]), 3)
            out["ratio_spread"] = _fig(r[ratio_key])[1]
        out["goal"] = goal
        return out

    size = f"{n_train} x 32x32x3"
    return [
        row(f"Kiln loop ({size}, memmap)", "kiln", "samples/s", "ratio", "ratio >= 0.9 (vs plain)"),
        row("plain PyTorch DataLoader loop", "plain", "samples/s"),
        row("DDP 1 process x 1 thread (torchrun, gloo)", "ddp1", "samples/s"),
        row("DDP 2 processes x 1 thread (torchrun, gloo)", "ddp2", "samples/s", "scaling", "ratio: 2 procs / 1"),
        row("DDP 1 process, wall with start", "wall1", "s"),
        row("DDP 2 processes, wall with start", "wall2", "s"),
        row(f"warm start ({warm} epoch) after +20", "warm", "s", "warm_ratio", "ratio <= 0.25 (vs full)"),
        row(f"full retrain ({epochs} epochs) after +20", "full", "s"),
    ]


def table(rows: list[dict]) -> str:
    lines = ["| measure | value | unit | spread | ratio | ratio spread | goal |", "|---|---|---|---|---|---|---|"]
    for x in rows:
        lines.append(f"| {x['measure']} | {x['value']:.4g} | {x['unit']} | {x['spread']} | {x.get('ratio', '')} | "
                     f"{x.get('ratio_spread', '')} | {x['goal']} |")
    return "\n".join(lines)


def main() -> None:
    import logging

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a few hundred samples, one round")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --smoke: 1)")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated: loop, ddp, warm (default all)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = run(a.smoke, a.rounds, tuple(a.parts.split(",")))
    print(f"training at size on {os.cpu_count()} cores, torch CPU ({'smoke' if a.smoke else 'full'}; "
          f"{rows[0]['rounds']} interleaved round(s), median and min..max)")
    print(table(rows))
    if a.smoke:
        print("--smoke: tiny sizes; the figures mean nothing")


if __name__ == "__main__":
    main()
