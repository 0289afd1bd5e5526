"""Deep compression, pass by pass, measured in one run: for an app's trained fp32 model and the
model after each of its manifest's compression passes, the weight size (as stored, and
entropy-coded where weight coding ran) and its ratio to fp32, the kernel library size, top-1 on
the held-out test set as computed by the compiled library, and x86-host latency measured by
the on-board runner (build/runner/x86_64/kiln-runner, run locally) for the untuned and the
tuned library. Runner runs are interleaved over the rows, so machine noise lands on every row.

Run after a build (``make deploy``): .venv/bin/python bench/compression.py [--app traffic_signs]
[--trials N] [--rounds 3]. Tuning reuses build/tune/ (kernels already tuned run no trials).
``--smoke``: the same table for a tiny app it builds first (bench/_smoke.py), no tuning trials,
one round; seconds, numbers meaningless (tests/test_benches.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from kiln.artifacts import Layout, read_json, runner_dir, tuning_root  # noqa: E402
from kiln.config import load_board, load_project  # noqa: E402


def runner(lib: Path, inputs: Path, shape: list[int], dtype: str, threads: int) -> dict:
    """Run the on-board runner on this machine, fed as a board is (the data stage's test inputs
    in their dtype: uint8 pixels or int16 audio where the library has a front end, else float32);
    its JSON (predictions, latencies_us)."""
    rdir = runner_dir("x86_64")
    env = dict(os.environ, LD_LIBRARY_PATH=str(rdir))
    out = subprocess.run([str(rdir / "kiln-runner"), "--model", str(lib.resolve()), "--input", str(inputs), "--shape",
                          ",".join(map(str, shape)), "--dtype", dtype, "--warmup", "20", "--threads", str(threads)],
                         env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"kiln-runner failed on {lib}: {out.stderr.strip()}")
    return json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="traffic_signs")
    ap.add_argument("--trials", type=int, default=None, help="MetaSchedule trials per row (default: x86-host's tune_trials)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runner rounds per library")
    ap.add_argument("--smoke", action="store_true", help="a tiny app built first, 0 trials, 1 round: seconds")
    args = ap.parse_args()
    if args.smoke:
        from bench._smoke import tiny_app

        args.app, args.rounds = tiny_app(), 1
        args.trials = 0 if args.trials is None else args.trials

    from passes import compress, tune
    from passes.support.common import save_checkpoint
    from passes.support.onnx_export import export_checkpoint
    from passes.support.tvm_build import compile_onnx

    project, lay, board = load_project(args.app), Layout(args.app), load_board("x86-host")
    needed = [lay.model_pt, lay.data / "val.npz", lay.data / "test_inputs.bin", runner_dir("x86_64") / "kiln-runner"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"error: missing {', '.join(missing)}; build first: .venv/bin/doit deploy:{args.app}", file=sys.stderr)
        return 2
    trials = board.tune_trials if args.trials is None else args.trials
    test_inputs = read_json(lay.data / "data.json")["test_inputs"]
    shape, dtype = test_inputs["shape"][1:], test_inputs.get("dtype", "float32")
    y_test = np.asarray(read_json(lay.data / "test_labels.json"))

    t0 = time.perf_counter()
    steps = compress.steps(project, lay)
    steps[0].row["pass"] = "fp32 baseline"
    print(f"# {args.app}: {len(steps) - 1} passes run in {time.perf_counter() - t0:.0f} s; "
          f"tuning budget {trials} trials per row on x86-host")

    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        for i, step in enumerate(steps):
            d = Path(tmp) / str(i)
            d.mkdir()
            save_checkpoint(d / "model.pt", step.snapshot)
            info = export_checkpoint(d / "model.pt", lay.data, d / "model.onnx", d / "export.json")
            tinfo = tune.tune_onnx(board, d / "model.onnx", info["input_shape"], tuning_root(), trials, d / "tune.json")
            libs = {"untuned": compile_onnx(board, d / "model.onnx", info["input_shape"], d / "untuned.so", d / "u.json")}
            if tinfo["measured"] and tinfo.get("trial_budget", 1):
                libs["tuned"] = compile_onnx(board, d / "model.onnx", info["input_shape"], d / "tuned.so", d / "t.json",
                                             tuning=tinfo)
            else:  # nothing tuned (a budget of 0, or no way to measure): compile_onnx would build the same library
                shutil.copyfile(d / "untuned.so", d / "tuned.so")
                libs["tuned"] = libs["untuned"]
            rows.append({"step": step, "dir": d, "tune": tinfo, "lib_bytes": libs["tuned"]["library_bytes"],
                         "lat": {"untuned": [], "tuned": []}})
        for _ in range(args.rounds):
            for r in rows:
                for kind in ("untuned", "tuned"):
                    out = runner(r["dir"] / f"{kind}.so", lay.data / "test_inputs.bin", shape, dtype, board.cores)
                    r["lat"][kind].append(float(np.median(out["latencies_us"])))
                    r.setdefault("p99", {})[kind] = float(np.percentile(out["latencies_us"], 99))
                    preds = np.asarray(out["predictions"])
                    r.setdefault("acc", {})[kind] = float((preds == y_test[: len(preds)]).mean())

    base = rows[0]
    print("\n| step | widths | params | MACs | weight bytes | coded bytes | size ratio | library bytes | "
          "test top-1 (library) | Δ top-1 | untuned p50 µs | tuned p50 µs | tuned p99 µs | tuned vs fp32 baseline |")
    print("|" + "---|" * 14)
    for r in rows:
        row = r["step"].row
        size = row["coded_bytes"] if row["coded_bytes"] is not None else row["weight_bytes"]
        un, tu = np.median(r["lat"]["untuned"]), np.median(r["lat"]["tuned"])
        print(f"| {row['pass']} | {row['widths']} | {row['params']:,} | {row['macs']:,} | {row['weight_bytes']:,} | "
              f"{row['coded_bytes'] if row['coded_bytes'] is not None else '-'} | "
              f"{base['step'].row['weight_bytes'] / size:.1f}x | {r['lib_bytes']:,} | {100 * r['acc']['tuned']:.2f}% | "
              f"{100 * (r['acc']['tuned'] - base['acc']['tuned']):+.2f} | {un:.1f} | {tu:.1f} | {r['p99']['tuned']:.1f} | "
              f"{tu / np.median(base['lat']['tuned']):.2f}x |")
    print("\n# tuning per row: " + "; ".join(
        f"{r['step'].row['pass']}: {r['tune']['trials_run']} trials, {r['tune']['seconds']:.0f} s" for r in rows))
    print(f"# runner: --threads {board.cores}, median over {args.rounds} interleaved rounds of "
          f"{len(y_test)} test images each (p99 from the last round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
