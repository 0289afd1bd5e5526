"""Per-inference latency on this machine (x86-host), side by side in one run: TVM untuned
(generic x86-64, then the board's mcpu), TVM tuned (the build's MetaSchedule database), ONNX
Runtime and PyTorch eager, at batch 1 with the same thread count.

For each app it benchmarks, as the board is fed (raw samples in, through the app's front end):
- **fp32, deployed widths**: the compressed network (compressed.pt) in float, exported here;
- **int8 deployed**: model.onnx, the library the boards run (when the app is quantized);
- with ``--trained``, also the trained fp32 network (model.pt) before compression.
Every engine is timed by the same Python loop (perf_counter around one call), in interleaved
rounds so that machine noise lands on all of them alike; the spread is the range of the
per-round medians over their median. The summary gives TVM tuned against ONNX Runtime and
int8 against the fp32 library of the same widths. Kernels the tuning database lacks are tuned
first with --trials trials (0: report them untuned).

Run after a build (``make deploy`` or ``doit deploy:<app>``), with nothing else at work:
    .venv/bin/python bench/latency.py [--apps traffic_signs keyword_spotting] [--threads 2]
``--smoke``: the same tables for a tiny app it builds first (bench/_smoke.py), no
tuning trials, 2 rounds x 5 calls: seconds, numbers meaningless (tests/test_benches.py runs it).
``--all`` (bench/_latency_all.py): every shipped app and every MLPerf Tiny preset, built from
synthetic weights at their deployed widths, fp32 and int8, TVM (tuned where the database holds
their kernels) against ONNX Runtime fp32 and int8 and PyTorch eager, with int8/fp32, int8/best-ORT
and the share of the machine's int8 peak; ``--all --smoke``: the mlperf_ad preset alone.
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
    ap.add_argument("--apps", nargs="+", default=None, help="default: every app in projects/ (those not built are listed as skipped)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds per engine")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per engine per round")
    ap.add_argument("--trained", action="store_true", help="also the trained fp32 network (model.pt)")
    ap.add_argument("--trials", type=int, default=None,
                    help="MetaSchedule trials for kernels the database lacks (default: the x86-host board's tune_trials)")
    ap.add_argument("--smoke", action="store_true", help="a tiny app built first, 0 trials, 2 rounds x 5 calls")
    ap.add_argument("--all", action="store_true",
                    help="every shipped app and MLPerf Tiny preset from synthetic weights, fp32 and int8 (bench/_latency_all.py)")
    ap.add_argument("--presets", nargs="+", default=None, help="with --all: these presets (default: every one)")
    ap.add_argument("--train-steps", type=int, default=30, help="with --all: Adam steps on synthetic data per net")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.calls = 2, 5
        args.trials = 0 if args.trials is None else args.trials
        if args.all:  # one preset, no app: the --all table in seconds
            args.apps, args.presets, args.train_steps = args.apps or [], args.presets or ["mlperf_ad"], 2
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread pools read these when they start
    os.environ["TVM_NUM_THREADS"] = str(ARGS.threads)
    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)

import numpy as np  # noqa: E402

from kiln.artifacts import Layout, tuning_root  # noqa: E402
from kiln.config import load_board  # noqa: E402


def peak_gflops(cores: int) -> tuple[float, str]:
    """Theoretical fp32 peak: cores x GHz x FLOP/cycle (2 FMA pipes x vector lanes x 2)."""
    flags, mhz = set(), 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        if line.startswith("cpu MHz") and not mhz:
            mhz = float(line.split(":", 1)[1])
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    per_cycle = 2 * lanes * (2 if "fma" in flags else 1)
    return cores * mhz / 1000 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle"


def timed(fn, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def onnx_input(onnx_path: Path) -> tuple[list[int], str]:
    """The model's input as the board feeds it: (shape at batch 1, numpy dtype)."""
    import onnx

    inp = onnx.load(str(onnx_path), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    return [1, *shape[1:]], onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type).name


def sample(shape: list[int], dtype: str) -> np.ndarray:
    """One random input: uniform [0, 1) for floats, the type's range for integers (raw pixels)."""
    rng = np.random.default_rng(0)
    if np.issubdtype(np.dtype(dtype), np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.random(shape, dtype=np.float32).astype(dtype)


def tvm_engine(onnx_path: Path, target_dict: dict, database: Path | None):
    import tvm
    from tvm import relax

    from passes.support import tvm_build

    shape, dtype = onnx_input(onnx_path)
    target = tvm.target.Target(target_dict)
    mod = tvm_build.import_onnx(onnx_path, shape)
    if database is not None:
        mod, _ = tvm_build.apply(mod, target, database)
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())
    x = tvm.runtime.tensor(sample(shape, dtype))
    f = vm["main"]
    return lambda: f(x)


def ort_engine(onnx_path: Path, threads: int):
    """(ONNX Runtime's call, its label): every graph optimization, as a user would run it; where
    ORT refuses the graph it fused (activity's int8 GRU: its QLinearAdd fusion wants scalar scales
    where the QDQ graph has per-tensor ones of shape [1]), the basic level, said in the label."""
    import onnxruntime as ort

    shape, dtype = onnx_input(onnx_path)
    for level, label in ((ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "ONNX Runtime"),
                         (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "ONNX Runtime (basic optimizations)")):
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = level
        try:
            s = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT's own error types; the basic level is tried next
            print(f"# {onnx_path.name}: ONNX Runtime with every optimization refused it ({str(e).splitlines()[0][:160]})")
            continue
        feed = {s.get_inputs()[0].name: sample(shape, dtype)}
        return (lambda: s.run(None, feed)), label
    raise SystemExit(f"bench/latency.py: ONNX Runtime cannot load {onnx_path} at any optimization level")


def torch_engine(model, shape: list[int], threads: int):
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
    model.eval()

    def call():
        with torch.no_grad():
            model(x)

    return call


def spread(samples: list[float], rounds: int) -> float:
    """Range of the per-round medians over their median (samples are in round order)."""
    per = [float(np.median(r)) for r in np.array_split(np.asarray(samples), rounds)]
    return (max(per) - min(per)) / float(np.median(per))


def bench_model(onnx_path: Path, feature_shape: list[int], torch_model, args, board, tune_json: Path):
    """Tune what the database lacks, then time every engine in interleaved rounds:
    (tune report, {engine: (median s, p99 s, spread)})."""
    from passes import tune
    from passes.support import tvm_build

    target = tvm_build.resolve_target(board)
    generic = {k: v for k, v in target.items() if k not in ("mcpu", "mattr")}
    trials = board.tune_trials if args.trials is None else args.trials
    shape, _ = onnx_input(onnx_path)
    tune_info = tune.tune_onnx(board, onnx_path, shape, tuning_root(), trials, tune_json)
    db = Path(tune_info["database"]) if tune_info["measured"] else None
    if db is not None and not (db / "database_tuning_record.json").exists():
        db = None  # --trials 0 and no database yet (a fresh build dir): no "TVM tuned" row
    ort_fn, ort_label = ort_engine(onnx_path, args.threads)
    engines = {
        "TVM untuned (generic x86-64)": tvm_engine(onnx_path, generic, None),
        f"TVM untuned (mcpu {target.get('mcpu')})": tvm_engine(onnx_path, target, None),
        "TVM tuned": tvm_engine(onnx_path, target, db) if db else None,
        ort_label: ort_fn,
        "PyTorch eager": torch_engine(torch_model, feature_shape, args.threads) if torch_model is not None else None,
    }
    engines = {k: v for k, v in engines.items() if v is not None}
    times: dict[str, list[float]] = {k: [] for k in engines}
    for fn in engines.values():  # warm up: thread pools, caches, lazy init
        timed(fn, min(50, args.calls))
    for _ in range(args.rounds):
        for name, fn in engines.items():
            times[name] += timed(fn, args.calls)
    return tune_info, {k: (float(np.median(v)), float(np.percentile(v, 99)), spread(v, args.rounds))
                       for k, v in times.items()}


def fp32_of_deployed(lay: Layout, out_dir: Path):
    """The compressed network in float with the app's front end, as the deployed model is
    exported: (onnx path, torch model)."""
    from passes.support.common import load_checkpoint
    from passes.support.onnx_export import export_float_of

    out = out_dir / f"{lay.app}-fp32-deployed-widths.onnx"
    export_float_of(lay.compressed_pt, lay.data, out, out_dir / f"{lay.app}-fp32-deployed-widths.json")
    return out, load_checkpoint(lay.compressed_pt)[0]


def front_end_macs(app: str) -> int:
    """The app's front end MACs as kiln counts them (kiln/frontends/); 0 where unknown."""
    from kiln import sizing
    from kiln.config import load_project

    try:
        return sizing.front_end_cost(load_project(app))[1]
    except Exception:  # noqa: BLE001 - the smoke app lives outside projects/: GOP/s left at 0
        return 0


def estimated_us(app: str, board, label: str) -> float | None:
    """kiln/sizing.py's latency estimate of the app on ``board`` in µs (int8 as the manifest
    quantizes it, fp32 rows as the same design without the quantize pass); None where it makes
    none (a family sized from torch, a smoke app outside projects/)."""
    from kiln import sizing
    from kiln.config import load_project

    try:
        project = load_project(app)
    except Exception:  # noqa: BLE001 - the smoke app lives outside projects/; no estimate is no row
        return None
    if label.startswith("fp32"):
        comp = project.compression.model_copy(update={"passes": [s for s in project.compression.passes
                                                                  if s.name != "quantize"]})
        project = project.model_copy(update={"compression": comp})
    est = sizing.estimate(project, board)
    return None if est is None or est["latency_ms"] is None else est["latency_ms"] * 1e3


def main() -> int:
    from kiln.nets import measure
    from passes.support.common import load_checkpoint
    from passes.support.onnx_export import export_float

    args = ARGS
    if args.all:
        from bench import _latency_all

        print(f"# bench/latency.py --all: batch 1, {args.threads} threads, x86-host; medians of {args.rounds} "
              f"interleaved rounds x {args.calls} calls; spread: range of the round medians / median (worst engine)")
        _latency_all.run(args, load_board("x86-host"), timed, spread, ort_engine, torch_engine)
        return 0
    if args.smoke:
        from bench._smoke import tiny_app

        args.apps = [tiny_app()]
    board = load_board("x86-host")
    peak, peak_how = peak_gflops(args.threads)
    print(f"# bench/latency.py: batch 1, {args.threads} threads, x86-host; peak {peak:.0f} GFLOP/s ({peak_how})")
    print("# same Python timing loop for every engine; medians over "
          f"{args.rounds} interleaved rounds x {args.calls} calls; spread: range of the round medians / median")
    print("# TVM and ONNX Runtime take the raw input through the app's front end; PyTorch eager the features")
    summary, tuned = [], {}
    if args.apps is None:
        from kiln.config import project_names

        args.apps = project_names()
    with tempfile.TemporaryDirectory() as tmp:
        for app in args.apps:
            lay = Layout(app)
            missing = [str(p) for p in (lay.model_pt, lay.compressed_pt, lay.onnx, lay.export_json) if not p.exists()]
            if missing:
                print(f"\n## {app}: skipped, {', '.join(missing)} missing; build it first: .venv/bin/doit deploy:{app}")
                continue
            deployed, dckpt = load_checkpoint(lay.compressed_pt)
            shape = [1, dckpt["channels"], *dckpt["image_size"]]
            quantized = bool(dckpt.get("quantization"))
            models = []
            if args.trained:
                fp32, _ = load_checkpoint(lay.model_pt)
                fp32_onnx = Path(tmp) / f"{app}-fp32.onnx"
                export_float(fp32, tuple(shape), fp32_onnx)
                models.append(("fp32 trained", fp32_onnx, fp32, measure(fp32, tuple(shape[1:])).macs))
            deployed_macs = measure(deployed, tuple(shape[1:])).macs
            if quantized:
                fp32_onnx, fp32_model = fp32_of_deployed(lay, Path(tmp))
                models.append(("fp32 deployed widths", fp32_onnx, fp32_model, deployed_macs))
                models.append(("int8 deployed", lay.onnx, None, deployed_macs))
            else:
                models.append(("fp32 deployed", lay.onnx, deployed, deployed_macs))
            if lay.front_end_onnx.exists():  # the front end alone: its share of the time
                models.append(("front end alone", lay.front_end_onnx, None, front_end_macs(app)))
            for label, onnx_path, tmodel, macs in models:
                tune_info, res = bench_model(onnx_path, shape, tmodel, args, board,
                                             Path(tmp) / f"{app}-{label.replace(' ', '-')}-tune.json")
                print(f"\n## {app}, {label}: {macs:,} MACs; tuning: {tune_info['trials_run']} trials run now, "
                      f"{tune_info.get('tasks_reused', 0)}/{len(tune_info['tasks'])} kernels from the database, "
                      f"{tune_info['seconds']:.0f} s ({tune_info['why']})")
                print("| engine | median µs | p99 µs | spread | GOP/s | % of fp32 peak | vs ONNX Runtime |")
                print("|---|---|---|---|---|---|---|")
                ort_med = next(v[0] for k, v in res.items() if k.startswith("ONNX Runtime"))
                for name, (med, p99, spr) in res.items():
                    gops = 2 * macs / med / 1e9
                    print(f"| {name} | {med * 1e6:.1f} | {p99 * 1e6:.1f} | {100 * spr:.0f}% | {gops:.1f} | "
                          f"{100 * gops / peak:.1f} | {med / ort_med:.2f}x |")
                if "TVM tuned" in res:
                    summary.append((app, label, res["TVM tuned"][0] / ort_med))
                    tuned[(app, label)] = res["TVM tuned"][0]
                est = estimated_us(app, board, label)
                if est and label != "front end alone" and "TVM tuned" in res:
                    best = res["TVM tuned"][0] * 1e6
                    print(f"# kiln/sizing.py estimate on x86-host: {est:.1f} µs; measured / estimated {best / est:.2f}x")
    fronts = [(app, t, tuned[(app, "int8 deployed" if (app, "int8 deployed") in tuned else "fp32 deployed")])
              for (app, label), t in tuned.items() if label == "front end alone"
              and ((app, "int8 deployed") in tuned or (app, "fp32 deployed") in tuned)]
    if fronts:
        print("# front end alone / the deployed library, TVM tuned, median:")
        for app, tf, tall in fronts:
            print(f"#   {app}: {tf * 1e6:.1f} / {tall * 1e6:.1f} µs = {tf / tall:.2f}")
    print("\n# TVM tuned / ONNX Runtime, median:")
    for app, label, ratio in summary:
        print(f"#   {app} {label}: {ratio:.2f}x")
    pairs = [(app, t8, tuned[(app, "fp32 deployed widths")]) for (app, label), t8 in tuned.items()
             if label == "int8 deployed" and (app, "fp32 deployed widths") in tuned]
    if pairs:
        print("# TVM tuned int8 / TVM tuned fp32 of the same widths, median:")
        for app, t8, t32 in pairs:
            print(f"#   {app}: {t8 * 1e6:.1f} / {t32 * 1e6:.1f} µs = {t8 / t32:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
