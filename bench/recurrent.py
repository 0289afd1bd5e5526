"""Recurrent nets (family ``rnn``: an LSTM or GRU cell unrolled over L steps) compiled for this
machine (x86-host), fp32 and int8 of the same weights: the kernel library's bytes at L and at
2L (a library that stores the cell's weights once does not grow with L), and the per-inference
latency of each library, timed in interleaved rounds (fp32, int8, fp32, ...) so that machine
noise lands on both alike; the spread is the range of the per-round medians over their median.

The nets are activity's shape (3 features per step, hidden 32, 4 classes, 32 steps) with
random (seeded) weights, quantized on random class-structured sequences (min/max calibration):
what is measured is the compiled code, not accuracy. Libraries are compiled untuned (the
compile stage's default schedules, no MetaSchedule database).

    .venv/bin/python bench/recurrent.py [--cells gru lstm] [--hidden 32] [--steps 32] [--threads 1]
``--smoke``: a GRU of hidden 4 over 3 steps, no 2L build, 2 rounds x 5 calls: seconds, numbers
meaningless.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"])
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--features", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.cells, args.hidden, args.steps, args.rounds, args.calls = ["gru"], 4, 3, 2, 5
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when they start
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

CLASSES = 4


def _data(root: Path, features: int, steps: int, seed: int = 0) -> Path:
    """train/val splits of uint8 (N, 1, L, C) sequences with a template per class."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(CLASSES, 1, steps, features))
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        y = rng.integers(0, CLASSES, size=n)
        x = np.clip(0.7 * templates[y] + rng.normal(0, 30, size=(n, 1, steps, features)), 0, 255).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.int64))
    return root


def _project():
    """activity's manifest: a classifier (what calibration reads of it: the task's split)."""
    from kiln.config import load_project

    return load_project("activity")


def build(cell: str, features: int, hidden: int, steps: int, root: Path) -> dict[str, Path]:
    """fp32 and int8 libraries (x86-host) of one seeded cell: {"fp32": .so, "int8": .so}."""
    import torch

    from kiln.config import load_board
    from kiln.nets.layers import UnrolledRNN
    from kiln.schema import QuantizeSettings
    from passes import compress, quantize
    from passes.support.onnx_export import export_float, export_model
    from passes.support.tvm_build import compile_onnx

    root.mkdir(parents=True, exist_ok=True)
    data = _data(root, features, steps)
    torch.manual_seed(0)
    model = UnrolledRNN(cell, features, hidden, steps, CLASSES).eval()
    shape = (1, features, 1, steps)
    export_float(model, shape, root / "fp32.onnx")
    ckpt = {"architecture": {"family": "module"}, "channels": features, "num_classes": CLASSES,
            "image_size": [1, steps]}
    ctx = compress.PassContext(_project(), data, 0, 0, "quantize")
    model, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    export_model(model, ckpt, data, root / "int8.onnx", root / "int8.json", samples=8, atol=1.0)
    board = load_board("x86-host")
    out = {}
    for kind in ("fp32", "int8"):
        out[kind] = root / f"{kind}.so"
        compile_onnx(board, root / f"{kind}.onnx", list(shape), out[kind], root / f"{kind}.compile.json")
    return out


def latency(libs: dict[str, Path], shape: tuple[int, ...], rounds: int, calls: int) -> dict[str, list[float]]:
    """Per-round median seconds per call of each library, interleaved."""
    import tvm
    from tvm import relax

    x = tvm.runtime.tensor(np.random.default_rng(0).uniform(0, 255, size=shape).astype("float32"))
    fns = {k: relax.VirtualMachine(tvm.runtime.load_module(str(p)), tvm.cpu())["main"] for k, p in libs.items()}
    for f in fns.values():
        f(x)
    meds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            ts = []
            for _ in range(calls):
                t0 = time.perf_counter()
                f(x)
                ts.append(time.perf_counter() - t0)
            meds[k].append(float(np.median(ts)))
    return meds


def main(args) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.cells:
            libs = build(cell, args.features, args.hidden, args.steps, Path(tmp) / cell / "L")
            libs2 = libs if args.smoke else build(cell, args.features, args.hidden, 2 * args.steps, Path(tmp) / cell / "2L")
            meds = latency(libs, (1, args.features, 1, args.steps), args.rounds, args.calls)
            med = {k: float(np.median(v)) for k, v in meds.items()}
            spread = {k: (max(v) - min(v)) / med[k] for k, v in meds.items()}
            ratios = [i / f for f, i in zip(meds["fp32"], meds["int8"])]
            rows.append((cell, {k: libs[k].stat().st_size for k in libs}, {k: libs2[k].stat().st_size for k in libs2},
                         med, spread, float(np.median(ratios)), min(ratios), max(ratios)))
    print(f"cell, hidden {args.hidden}, {args.features} features, L = {args.steps}; x86-host untuned, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.calls} calls")
    print(f"{'cell':5} {'fp32 B (L)':>11} {'fp32 B (2L)':>11} {'int8 B (L)':>11} {'int8 B (2L)':>11} "
          f"{'fp32 us':>8} {'spread':>7} {'int8 us':>8} {'spread':>7} {'int8/fp32':>10} {'range':>12}")
    for cell, b, b2, med, spread, r, lo, hi in rows:
        print(f"{cell:5} {b['fp32']:>11} {b2['fp32']:>11} {b['int8']:>11} {b2['int8']:>11} "
              f"{med['fp32'] * 1e6:>8.1f} {spread['fp32']:>6.0%} {med['int8'] * 1e6:>8.1f} {spread['int8']:>6.0%} "
              f"{r:>10.2f} {lo:>5.2f}-{hi:<5.2f}")


if __name__ == "__main__":
    main(ARGS)
