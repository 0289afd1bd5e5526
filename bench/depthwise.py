"""int8 latency of the depthwise-separable MLPerf Tiny presets (mlperf_kws: DS-CNN, mlperf_vww:
MobileNetV1 0.25) on this machine (x86-host): TVM int8 with the packed depthwise kernel
(passes/support/int8_depthwise.py), TVM int8 as before it (depthwise convs as relax's grouped
conv2d, tuned by MetaSchedule), TVM fp32, ONNX Runtime int8 and fp32, at batch 1 and the same
thread count, in interleaved rounds (the spread is the range of the per-round medians over
their median).

Each preset is built with random weights (BatchNorm statistics far from the identity), int8
post-training quantized on random uint8 samples of its input shape (minmax), and exported
fp32 and int8 (QDQ) as the pipeline does; nothing is trained, so no accuracy is reported.
Every TVM variant is tuned with --trials MetaSchedule trials (a database per variant under
--work, reused by a later run). No app build is needed (bench/latency.py needs one).

    .venv/bin/python bench/depthwise.py [--presets mlperf_kws mlperf_vww] [--trials 128]
``--smoke``: a tiny ds_cnn, 0 trials, 2 rounds x 3 calls: seconds, numbers meaningless.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"mlperf_kws": (1, (49, 10), 12), "mlperf_vww": (3, (96, 96), 2), "smoke": (1, (12, 8), 3)}
SMOKE_ARCH = {"family": "ds_cnn", "filters": 16, "kernel": [3, 3], "stride": [2, 2], "widths": [16, 16]}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="+", default=["mlperf_kws", "mlperf_vww"], choices=["mlperf_kws", "mlperf_vww"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--trials", type=int, default=128, help="MetaSchedule trials per TVM variant (0: untuned)")
    ap.add_argument("--work", type=Path, default=None, help="models and tuning databases (default: a temporary folder)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.presets, args.trials, args.rounds, args.calls = ["smoke"], 0, 2, 3
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when they start
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402


def export(preset: str, root: Path) -> list[int]:
    """fp32 (f.onnx) and int8 QDQ (q.onnx) exports of ``preset`` under ``root``; its input shape."""
    import torch

    from kiln.nets import presets
    from kiln.registry import implementation
    from kiln.schema import QuantizeSettings, parse_architecture
    from passes import compress, quantize
    from passes.support.onnx_export import export_float, export_model
    from tests.passes.conftest import randomize_bn, small_project

    ch, size, classes = SHAPES[preset]
    torch.manual_seed(0)
    if preset == "smoke":
        model = implementation(parse_architecture(SMOKE_ARCH)).build(parse_architecture(SMOKE_ARCH), ch, classes, size)
    else:
        model = presets.build(parse_architecture({"family": preset}), ch, classes, size)
    model = model.eval()
    randomize_bn(model)
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("val", 16)):
        np.savez(root / f"{split}.npz", x=rng.integers(0, 256, (n, *size, ch)).astype(np.uint8),
                 y=rng.integers(0, classes, n))
    ckpt = {"architecture": {"family": "module"}, "channels": ch, "num_classes": classes, "image_size": list(size)}
    export_float(copy.deepcopy(model), (1, ch, *size), root / "f.onnx")
    ctx = compress.PassContext(small_project(), root, 0, 0, "quantize")
    _, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    export_model(model, ckpt, root, root / "q.onnx", root / "q.json")
    return [1, ch, *size]


def onnx_dtype(path: Path) -> str:
    import onnx

    inp = onnx.load(str(path), load_external_data=False).graph.input[0]
    return onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name


def sample(shape: list[int], dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, 256, size=shape).astype(dtype)
    return rng.random(shape, dtype=np.float32)


def tvm_engine(path: Path, shape: list[int], db_root: Path, trials: int, packed_depthwise: bool = True):
    """TVM's call on ``path``, tuned with ``trials`` trials into ``db_root``; with
    ``packed_depthwise`` False, depthwise convs are lowered as before the packed kernel."""
    import tvm
    from tvm import relax

    from kiln.config import load_board
    from passes import tune
    from passes.support import int8_depthwise, tvm_build

    board = load_board("x86-host")
    target = tvm.target.Target(tvm_build.resolve_target(board))
    is_depthwise = int8_depthwise.is_depthwise
    if not packed_depthwise:  # the bench's own switch, not a setting: the before of this change
        int8_depthwise.is_depthwise = lambda *a: False
    try:
        if trials:
            info = tune.tune_onnx(board, path, shape, db_root, trials, db_root / "tune.json")
            mod, _ = tvm_build.apply(tvm_build.import_onnx(path, shape), target, Path(info["database"]))
        else:
            mod = tvm_build.prepare(tvm_build.import_onnx(path, shape), target)
        f = relax.VirtualMachine(relax.build(mod, target=target), tvm.cpu())["main"]
    finally:
        int8_depthwise.is_depthwise = is_depthwise
    x = tvm.runtime.tensor(sample(shape, onnx_dtype(path)))
    return lambda: f(x)


def ort_engine(path: Path, shape: list[int], threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {s.get_inputs()[0].name: sample(shape, onnx_dtype(path))}
    return lambda: s.run(None, feed)


def bench(preset: str, root: Path, args) -> None:
    t0 = time.perf_counter()
    shape = export(preset, root)
    q, f = root / "q.onnx", root / "f.onnx"
    engines = {
        "TVM int8, packed depthwise": tvm_engine(q, shape, root / "db_int8", args.trials),
        "TVM int8, before (grouped conv2d)": tvm_engine(q, shape, root / "db_int8_before", args.trials, False),
        "TVM fp32": tvm_engine(f, shape, root / "db_fp32", args.trials),
        "ONNX Runtime int8": ort_engine(q, shape, args.threads),
        "ONNX Runtime fp32": ort_engine(f, shape, args.threads),
    }
    print(f"# {preset}: exported, tuned ({args.trials} trials per TVM variant) and built in "
          f"{time.perf_counter() - t0:.0f} s; {args.threads} thread(s), {args.rounds} rounds x {args.calls} calls")
    rounds: dict[str, list[float]] = {k: [] for k in engines}
    for fn in engines.values():
        for _ in range(3):
            fn()
    for _ in range(args.rounds):
        for k, fn in engines.items():
            ts = []
            for _ in range(args.calls):
                t1 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t1)
            rounds[k].append(float(np.median(ts)) * 1e6)
    med = {k: float(np.median(v)) for k, v in rounds.items()}
    ort = min(med["ONNX Runtime int8"], med["ONNX Runtime fp32"])
    print(f"\n| {preset} | median µs | spread | / TVM fp32 | / best ONNX Runtime |")
    print("|---|---|---|---|---|")
    for k, v in rounds.items():
        print(f"| {k} | {med[k]:.1f} | {100 * (max(v) - min(v)) / med[k]:.0f}% | "
              f"{med[k] / med['TVM fp32']:.2f}x | {med[k] / ort:.2f}x |")
    print()


def main(args) -> None:
    with tempfile.TemporaryDirectory(prefix="kiln-depthwise-") as tmp:
        work = args.work or Path(tmp)
        for preset in args.presets:
            (work / preset).mkdir(parents=True, exist_ok=True)
            bench(preset, work / preset, args)


if __name__ == "__main__":
    main(ARGS)
