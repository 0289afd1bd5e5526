"""Tuning on the board over TVM RPC, and what it buys on that board: the emulated lab's x86-host
board (a real sshd in its own network namespace) serves ``kiln-runner --rpc-serve``; MetaSchedule
tunes traffic_signs (by default the float network of its deployed widths, exported here: the int8
library, model.onnx, has no kernel left that is tuned) with N trials measured
there through the SSH port forward, into a fresh database; then the untuned and the tuned
library are each run ON THE BOARD by the runner (uploaded over SSH like a deploy), in
interleaved rounds, and the table gives both medians, their ratio and the spread of the rounds.

The lab is a private one (its own build dir and board name), so it never meets the default lab.
Run after `doit deploy:traffic_signs` (it needs model.onnx and the test inputs):
    .venv/bin/python bench/rpc_tune.py [--trials 128] [--rounds 5] [--samples 200]
``--smoke``: the same real lab, RPC tuning and on-board runs for a tiny app it builds first
(bench/_smoke.py), 2 trials, 2 rounds x 8 samples: about a minute, numbers meaningless.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--app", default="traffic_signs")
    ap.add_argument("--model", choices=("fp32", "deployed"), default="fp32",
                    help="fp32: the float network of the deployed widths (a quantized app's int8 library has "
                         "only kernels that are never tuned: packed convs, tiny ones); deployed: model.onnx")
    ap.add_argument("--trials", type=int, default=128, help="MetaSchedule trials, all measured over RPC")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of untuned/tuned runs on the board")
    ap.add_argument("--samples", type=int, default=200, help="test samples per run (each timed on its own)")
    ap.add_argument("--smoke", action="store_true", help="a tiny app built first, 2 trials, 2 rounds x 8 samples")
    args = ap.parse_args()
    if args.smoke:
        args.trials, args.rounds, args.samples = 2, 2, 8
    return args


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("kiln.tune").setLevel(logging.INFO)
    import yaml

    from kiln.artifacts import Layout, read_json
    from kiln.errors import KilnError

    if args.smoke:
        from bench._smoke import tiny_app

        args.app = tiny_app()
    lay = Layout(args.app)  # the app's artifacts in the main build dir, read before KILN_BUILD moves
    onnx, data = lay.onnx, lay.data
    if not onnx.is_file():
        print(f"no {onnx}: run `doit deploy:{args.app}` first", file=sys.stderr)
        return 1
    shape = read_json(lay.export_json)["input_shape"]
    info = read_json(data / "data.json")["test_inputs"]
    work = Path(tempfile.mkdtemp(prefix="kiln-rpc-bench-"))
    os.environ["KILN_BUILD"] = str(work / "build")  # the private lab's state, a fresh runner bundle
    tag = uuid.uuid4().hex[:6]
    name = f"rtb{tag}"
    lab = work / "lab.yaml"
    lab.write_text(yaml.safe_dump({"backend": "emulated", "name": name, "boards": [
        {"name": name, "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    from hil.lab import close_opened

    try:
        if args.model == "fp32":
            from passes.support.onnx_export import export_float_of

            onnx = work / "fp32.onnx"
            shape = export_float_of(lay.compressed_pt, data, onnx, work / "fp32-export.json")["input_shape"]
        return run(args, onnx, shape, data, info, work, lab, name)
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    finally:
        close_opened()
        shutil.rmtree(work, ignore_errors=True)


def run(args, onnx, shape, data, info, work, lab, name) -> int:
    from hil.deploy import deploy
    from hil.lab import open_lab
    from hil.rpc import RpcLab
    from hil.transport import open_transport
    from kiln.artifacts import build_root, runner_dir
    from kiln.config import load_board, load_inventory
    from passes import tune
    from passes.support import tvm_build

    board = load_board("x86-host")
    t0 = time.perf_counter()
    report = tune.tune_onnx(board, onnx, shape, work / "tune", args.trials, work / "tune.json", measure="rpc",
                            lab=RpcLab(lab))
    tune_s = time.perf_counter() - t0
    if report["measured"] != "rpc":
        print(f"not tuned over RPC: {report['why']}", file=sys.stderr)
        return 1
    records = len((Path(report["database"]) / "database_tuning_record.json").read_text().splitlines())
    libs = {}
    for kind, tuning in (("untuned", None), ("tuned", report)):
        libs[kind] = work / f"{kind}.so"
        tvm_build.compile_onnx(board, onnx, shape, libs[kind], work / f"{kind}.json", tuning=tuning)

    inv = open_lab(lab)
    live = next(b for b in load_inventory(inv).boards if b.name == name)
    per = 1
    for s in info["shape"][1:]:
        per *= s
    per *= {"float32": 4, "int16": 2, "uint8": 1, "int8": 1}[info.get("dtype", "float32")]
    inputs = work / "inputs.bin"
    with open(data / info["file"], "rb") as f:
        inputs.write_bytes(f.read(args.samples * per))
    rdir = runner_dir(board.arch)
    argv = ["./kiln-runner", "--model", "model.so", "--input", "inputs.bin", "--shape",
            ",".join(map(str, info["shape"][1:])), "--dtype", info.get("dtype", "float32"),
            "--threads", str(board.cores), "--warmup", "20"]
    medians: dict[str, list[float]] = {"untuned": [], "tuned": []}
    for r in range(args.rounds):
        order = ("untuned", "tuned") if r % 2 == 0 else ("tuned", "untuned")
        for kind in order:
            files = {n: rdir / n for n in ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")}
            files["model.so"], files["inputs.bin"] = libs[kind], inputs
            t = open_transport(live, inv.parent, build_root() / "lab" / "local")
            out = deploy(t, files, argv, 300, name)
            medians[kind].append(statistics.median(out["runner"]["latencies_us"]))

    def spread(v):
        return (max(v) - min(v)) / statistics.median(v) * 100

    u, tu = statistics.median(medians["untuned"]), statistics.median(medians["tuned"])
    print(f"\n# {args.app} ({'fp32 of the deployed widths' if args.model == 'fp32' else 'deployed'}) on the emulated lab's x86-host board ({name}, sshd in its own netns); "
          f"MetaSchedule measured over TVM RPC through an SSH port forward; on-board runner timings, "
          f"{args.rounds} interleaved rounds x {args.samples} samples, {board.cores} threads")
    print("| trials | tuning s | records | untuned median µs | tuned median µs | untuned/tuned | spread untuned / tuned |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {report['trials_run']} | {tune_s:.1f} | {records} | {u:.1f} | {tu:.1f} | {u / tu:.2f}x | "
          f"{spread(medians['untuned']):.1f}% / {spread(medians['tuned']):.1f}% |")
    print(f"(spread: (max - min) / median of the per-round medians; boards used: {', '.join(report['boards'])})")
    for kind, v in medians.items():
        print(f"{kind} per-round medians µs: {', '.join(f'{x:.1f}' for x in v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
