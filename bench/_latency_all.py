"""bench/latency.py --all (#28 item 7): every shipped app (projects/*) and every MLPerf Tiny preset
(kiln/nets/presets.py), each net built at its deployed widths (kiln.sizing.deployed_architecture)
and input shape, trained briefly on synthetic data of that shape (Adam steps on random inputs and
targets: weights and BatchNorm statistics that are not the initial ones; accuracy means nothing
here), then exported fp32 and int8 (Kiln's quantize: BN folded, calibrated on synthetic samples,
the QDQ model the boards' libraries come from) and timed at batch 1 in interleaved rounds:

- TVM fp32 and TVM int8, tuned where this build's tuning database (kiln.artifacts.tuning_root)
  already holds the net's kernels, else untuned: the table says which per row;
- ONNX Runtime fp32 and ONNX Runtime int8 (its own: onnxruntime.quantization.quantize_static of
  the fp32 model, QDQ, per-channel, calibrated on the same synthetic samples); the best of the two
  is the bar;
- PyTorch eager fp32.

An app with a front end is timed at its net's input (the features), not the raw samples: the
front end is bench/latency.py's own rows (the default mode, on built apps). The share of the
machine's int8 peak: MACs / time over (int8 dot products per cycle x cores x clock), the per-cycle
figure from /proc/cpuinfo's flags (avx512_vnni: 64 per vpdpbusd x 2 pipes; avx_vnni or avx2:
32 per 256-bit instruction x 2 pipes; else 16 x 2), an upper bound no kernel reaches.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np


def int8_peak(cores: int) -> tuple[float, str]:
    """The machine's int8 MAC/s peak and how it was made."""
    flags, mhz = set(), 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":", 1)[1])
    if "avx512_vnni" in flags:
        per, how = 128, "avx512_vnni: 64 int8 MACs per vpdpbusd x 2 pipes"
    elif "avx_vnni" in flags or "avx2" in flags:
        per, how = 64, f"{'avx_vnni' if 'avx_vnni' in flags else 'avx2'}: 32 per 256-bit instruction x 2 pipes"
    else:
        per, how = 32, "sse: 16 x 2 pipes"
    return cores * mhz * 1e6 * per, f"{cores} cores x {mhz / 1000:.2f} GHz x {per}/cycle ({how})"


def nets(apps: list[str] | None, presets: list[str] | None):
    """(name, arch, channels, (H, W), classes, objective) of every app and preset asked for."""
    from kiln import sizing
    from kiln.config import load_project, project_names
    from kiln.nets.presets import REFERENCE
    from kiln.schema import parse_architecture

    for app in project_names() if apps is None else apps:
        p = load_project(app)
        ds = p.dataset
        yield app, sizing.deployed_architecture(p), ds.channels, tuple(ds.image_size), ds.num_classes, p
    for name in REFERENCE if presets is None else presets:
        ref = REFERENCE[name]
        c, *hw = ref["input"]
        yield name, parse_architecture({"family": name}), c, tuple(hw), ref["classes"], None


def brief_training(model, shape, steps: int, seed: int = 0):
    """A few Adam steps on random inputs towards random targets of the output's shape."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn((16, *shape[1:]), generator=g)
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def int8_onnx(model, shape, path: Path, samples: np.ndarray) -> None:
    """Kiln's int8 model (passes/quantize.py's steps on synthetic calibration samples) as QDQ ONNX."""
    import copy

    import onnx
    import torch

    from kiln.schema.compression import QuantizeSettings
    from passes import quantize
    from passes.support.int8 import graph_plan
    from passes.support.onnx_export import qdq_model

    m = copy.deepcopy(model).eval()
    plan = graph_plan(m, tuple(shape))
    quantize.fold_batchnorm(m, plan)
    params = QuantizeSettings()
    ranges = quantize.calibrate(m, plan, samples, params)
    q = quantize.describe(m, plan, ranges, params, len(samples))
    quantize.quantize_weights_inplace(m, q)
    with torch.no_grad():
        onnx.save(qdq_model(m, q, tuple(shape)), str(path))


def ort_int8_onnx(fp32: Path, path: Path, samples: np.ndarray) -> None:
    """ONNX Runtime's own int8 of the fp32 model (static, QDQ, per-channel weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            import onnx

            name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
            self.it = iter([{name: s[None].astype(np.float32)} for s in samples])

        def get_next(self):
            return next(self.it, None)

    import logging

    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR  # its per-tensor warnings for biases and its pre-processing hint
    try:
        quantize_static(str(fp32), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def tvm_call(onnx_path: Path, board, shape, trials_db: Path):
    """(call, 'tuned' | 'untuned'): the library as the compile stage builds it; tuned where the
    build's database holds every tunable kernel of it (none are tuned here)."""
    import tvm
    from tvm import relax

    from passes.support import tvm_build

    target = tvm.target.Target(tvm_build.resolve_target(board))
    mod = tvm_build.import_onnx(onnx_path, list(shape))
    how = "untuned"
    db = trials_db
    if (db / "database_tuning_record.json").exists():
        mod, tuned = tvm_build.apply(mod, target, db)
        how = f"tuned ({tuned} kernels)" if tuned else "untuned (not in database)"
    else:
        mod = tvm_build.prepare(mod, target)
    mod = tvm_build.share_constants(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).random(shape, dtype=np.float32))
    f = vm["main"]
    return (lambda: f(x)), how


def run(args, board, timed, spread, ort_engine, torch_engine) -> None:
    import tempfile

    import torch

    from kiln.artifacts import tuning_root
    from kiln.nets import build, measure
    from passes.support import tvm_build
    from passes.support.onnx_export import export_float

    peak, peak_how = int8_peak(args.threads)
    db = tuning_root() / tvm_build.target_key(board, tvm_build.resolve_target(board))
    print(f"\n# --all: every app and MLPerf Tiny preset, synthetic weights ({args.train_steps} Adam steps); "
          f"int8 peak {peak / 1e9:.0f} G MAC/s ({peak_how}); TVM database {db}"
          f"{'' if (db / 'database_tuning_record.json').exists() else ' (none: every TVM row untuned)'}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch, c, size, classes, _ in nets(args.apps, args.presets):
            shape = (1, c, *size)
            try:
                torch.manual_seed(0)
                model = brief_training(build(arch, c, classes, size), shape, args.train_steps)
                macs = measure(model, shape[1:]).macs
                samples = np.random.default_rng(1).standard_normal((32, *shape[1:])).astype(np.float32)
                fp32, int8, ort8 = (Path(tmp) / f"{name}-{k}.onnx" for k in ("fp32", "int8", "ort-int8"))
                with contextlib.redirect_stdout(io.StringIO()):
                    export_float(model, shape, fp32)
                    int8_onnx(model, shape, int8, samples.transpose(0, 2, 3, 1))  # calibrate takes NHWC
                    ort_int8_onnx(fp32, ort8, samples)
                tvm32, how32 = tvm_call(fp32, board, shape, db)
                tvm8, how8 = tvm_call(int8, board, shape, db)
                ort32, lab32 = ort_engine(fp32, args.threads)
                ort8_fn, lab8 = ort_engine(ort8, args.threads)
                engines = {"TVM fp32": tvm32, "TVM int8": tvm8, "ORT fp32": ort32, "ORT int8": ort8_fn,
                           "PyTorch eager": torch_engine(model, list(shape), args.threads)}
            except Exception as e:  # noqa: BLE001 -- one net that does not build is a row, the rest still run
                print(f"# {name}: not benchmarked: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            times = {k: [] for k in engines}
            for fn in engines.values():
                timed(fn, min(20, args.calls))
            for _ in range(args.rounds):
                for k, fn in engines.items():
                    times[k] += timed(fn, args.calls)
            med = {k: float(np.median(v)) for k, v in times.items()}
            worst = max(spread(v, args.rounds) for v in times.values())
            best_ort = min(med["ORT fp32"], med["ORT int8"])
            rows.append((name, macs, med, med["TVM int8"] / med["TVM fp32"], med["TVM int8"] / best_ort,
                         macs / med["TVM int8"] / peak, worst, f"{how32} / {how8}"))
            print(f"# {name}: done ({lab32}, {lab8})", flush=True)
    print("\n| net | MACs | TVM fp32 µs | TVM int8 µs | ORT fp32 µs | ORT int8 µs | PyTorch µs | int8/fp32 | "
          "int8/best-ORT | int8 peak share | spread | TVM (fp32 / int8) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, macs, med, r8, rort, share, worst, how in rows:
        us = [f"{med[k] * 1e6:.1f}" for k in ("TVM fp32", "TVM int8", "ORT fp32", "ORT int8", "PyTorch eager")]
        print(f"| {name} | {macs:,} | {' | '.join(us)} | {r8:.2f}x | {rort:.2f}x | {share:.1%} | {worst:.0%} | {how} |")
    if rows:
        print(f"\ngoals: int8/best-ORT <= 0.5x met by {sum(r[4] <= 0.5 for r in rows)}/{len(rows)}; "
              f"int8/fp32 <= 0.6x met by {sum(r[3] <= 0.6 for r in rows)}/{len(rows)}")
