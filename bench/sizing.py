"""Sizing against measurement on this machine (x86-host): kiln/sizing.py's latency estimate next
to the measured latency of each family's kernel library, with and without the per-kernel cost
term, and (``--calibrate``) that per-kernel cost itself.

``--calibrate``: a library of 1 and of 101 trivial kernels (a 256-element add each, with a
parallel loop as a tuned kernel has, and with a serial one as an untuned kernel has), timed in
interleaved rounds; the slope is ``compute.per_kernel_us`` / ``untuned_per_kernel_us`` for the
board file (targets/x86-host.yaml).

The table: one representative design per family (cnn, ds_cnn, mobilenet_v1, resnet, conv1d, rnn
gru and lstm, mlp, autoencoder) and MLPerf Tiny's four presets, fp32 at batch 1, exported, built
for x86-host (tuned with ``--trials`` per net into a private database, or untuned with 0: then
the estimate is the untuned one), timed by the same Python loop as bench/latency.py in
interleaved rounds. measured / estimated should lie in 0.5-2x.

    .venv/bin/python bench/sizing.py --calibrate
    .venv/bin/python bench/sizing.py [--trials 16] [--families rnn-gru cnn]
``--smoke``: the mlp untuned and the calibration with 21 kernels, 2 rounds x 5 calls (numbers
meaningless).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, architecture, channels, (H, W), classes): one design per family at deployed-app sizes,
# then MLPerf Tiny's presets at their reference inputs
NETS = [
    ("cnn", {"family": "cnn", "widths": [16, 32, 64], "max_macs": 10**9}, 3, (32, 32), 43),
    ("ds_cnn", {"family": "ds_cnn", "filters": 32, "kernel": [10, 4], "stride": [2, 2], "widths": [32, 32]}, 1, (49, 10), 12),
    ("mobilenet_v1", {"family": "mobilenet_v1", "alpha": 0.25, "blocks": 6}, 3, (64, 64), 10),
    ("resnet", {"family": "resnet", "stem": 16, "widths": [16, 32], "blocks": 1}, 3, (32, 32), 10),
    ("conv1d", {"family": "conv1d", "widths": [16, 32], "kernel": 5}, 6, (1, 128), 6),
    ("rnn-gru", {"family": "rnn", "cell": "gru", "hidden": 32}, 6, (1, 50), 6),
    ("rnn-lstm", {"family": "rnn", "cell": "lstm", "hidden": 32}, 6, (1, 50), 6),
    ("mlp", {"family": "mlp", "widths": [64, 32]}, 1, (8, 8), 10),
    ("autoencoder", {"family": "autoencoder", "widths": [128, 64], "bottleneck": 8}, 1, (1, 128), 2),
    ("mlperf_kws", {"family": "mlperf_kws"}, 1, (49, 10), 12),
    ("mlperf_vww", {"family": "mlperf_vww"}, 3, (96, 96), 2),
    ("mlperf_ic", {"family": "mlperf_ic"}, 3, (32, 32), 10),
    ("mlperf_ad", {"family": "mlperf_ad"}, 1, (1, 640), 2),
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", action="store_true", help="measure the per-kernel cost, print the board file's figures")
    ap.add_argument("--families", nargs="+", default=None, help=f"names of NETS (default all: {', '.join(n for n, *_ in NETS)})")
    ap.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per net (0: untuned libraries)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.families, args.trials, args.rounds, args.calls, args.calibrate = ["mlp"], 0, 2, 5, True
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402


def interleaved(fns: dict, rounds: int, calls: int) -> dict:
    """Median seconds per call of each function, timed in interleaved rounds after a warm-up."""
    times: dict = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(min(50, calls)):
            fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in times.items()}


def trivial_library(n: int, parallel: bool):
    """A VM of ``n`` chained 256-element adds, each its own kernel."""
    import tvm
    from tvm import relax
    from tvm.script import tirx as T

    @T.prim_func
    def par(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
        for i in T.parallel(256):
            b[i] = a[i] + T.float32(1)

    @T.prim_func
    def ser(a: T.Buffer((256,), "float32"), b: T.Buffer((256,), "float32")):
        for i in range(256):
            b[i] = a[i] + T.float32(1)

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((256,), "float32"))
    with bb.function("main", [x]):
        gv = bb.add_func((par if parallel else ser).with_attr("global_symbol", "k"), "k")
        y = x
        for _ in range(n):
            y = bb.emit(relax.call_tir(gv, (y,), relax.TensorType((256,), "float32")))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    t = tvm.runtime.tensor(np.zeros(256, "float32"))
    f = vm["main"]
    return lambda: f(t)


def calibrate(args) -> tuple[float, float]:
    """(per_kernel_us, untuned_per_kernel_us) on this machine."""
    big = 21 if args.smoke else 101
    fns = {(n, p): trivial_library(n, p) for n in (1, big) for p in (True, False)}
    med = interleaved(fns, args.rounds, args.calls)
    out = tuple((med[(big, p)] - med[(1, p)]) / (big - 1) * 1e6 for p in (True, False))
    print(f"# per kernel: {out[0]:.2f} us with a parallel loop (tuned), {out[1]:.2f} us serial (untuned); "
          f"library of 1: {med[(1, True)] * 1e6:.1f} us, of {big}: {med[(big, True)] * 1e6:.1f} us")
    print(f"# targets/x86-host.yaml compute: per_kernel_us: {out[0]:.2g}, untuned_per_kernel_us: {out[1]:.2g}")
    return out


def stub_project(trials: int):
    """What kiln.sizing.estimate_from reads of a project: fp32, no front end, the trial budget."""
    return types.SimpleNamespace(name="bench", compression=types.SimpleNamespace(passes=[]),
                                 dataset=types.SimpleNamespace(front_end=None), tuning=types.SimpleNamespace(trials=trials))


def library(arch, c: int, size, classes: int, board, trials: int, tmp: Path, name: str):
    """(call, kernels of the built library): the net exported, tuned (trials > 0) and built."""
    import tvm
    from tvm import relax

    from kiln.nets import build
    from passes import tune
    from passes.support import tvm_build
    from passes.support.onnx_export import export_float

    path = tmp / f"{name}.onnx"
    export_float(build(arch, c, classes, size), (1, c, *size), path)
    target_d = tvm_build.resolve_target(board)
    target = tvm.target.Target(target_d)
    mod = tvm_build.import_onnx(path, [1, c, *size])
    if trials:
        info = tune.tune_onnx(board, path, [1, c, *size], tmp / f"db-{name}", trials, tmp / f"{name}-tune.json")
        mod, _ = tvm_build.apply(mod, target, Path(info["database"]))
    else:
        mod = tvm_build.prepare(mod, target)
    kernels = sum(str(f).count("R.call_tir(") for _, f in mod.functions.items() if isinstance(f, relax.Function))
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).random((1, c, *size), dtype=np.float32))
    f = vm["main"]
    return (lambda: f(x)), kernels


def main() -> int:
    from kiln import sizing
    from kiln.config import load_board
    from kiln.nets import estimate
    from kiln.schema import parse_architecture

    args = ARGS
    board = load_board("x86-host")
    print(f"# bench/sizing.py: x86-host, {args.threads} threads, batch 1, fp32; "
          f"{'tuned, ' + str(args.trials) + ' trials per net' if args.trials else 'untuned'}; "
          f"medians of {args.rounds} interleaved rounds x {args.calls} calls")
    if args.calibrate:
        calibrate(args)
    names = args.families or [n for n, *_ in NETS]
    unknown = set(names) - {n for n, *_ in NETS}
    if unknown:
        raise SystemExit(f"bench/sizing.py: unknown --families {sorted(unknown)}; known: {[n for n, *_ in NETS]}")
    without = board.model_copy(update={"compute": board.compute.model_copy(update={"per_kernel_us": 0.0,
                                                                                   "untuned_per_kernel_us": 0.0})})
    project = stub_project(args.trials)
    fns, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, d, c, size, classes in NETS:
            if name not in names:
                continue
            arch = parse_architecture(d)
            cx = estimate(arch, size, c, classes)
            fns[name], built = library(arch, c, size, classes, board, args.trials, Path(tmp), name)
            rows[name] = (cx, built, sizing.estimate_from(project, without, cx)["latency_ms"],
                          sizing.estimate_from(project, board, cx)["latency_ms"])
            print(f"# built {name}", flush=True)
        med = interleaved(fns, args.rounds, args.calls)
    print("| net | MACs | kernels (plan / built) | measured µs | estimate before µs | measured / before | "
          "estimate with per-kernel µs | measured / estimate |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (cx, built, before, after) in rows.items():
        m = med[name] * 1e3
        print(f"| {name} | {cx.macs:,} | {cx.kernels} ({cx.small_kernels} small) / {built} | {m * 1e3:.1f} | {before * 1e3:.1f} | {m / before:.2f}x | "
              f"{after * 1e3:.1f} | {m / after:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
