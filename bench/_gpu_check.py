"""The GPU check behind bench/gpu_check.sh (#28 item 5, #27 item 5): two halves, because the
machine with the GPU has PyTorch with CUDA but no TVM compiler and nothing to fetch.

``prepare`` (here, where TVM is): builds the folder .gpu/ that travels to the GPU machine
(``carry: [".gpu"]``): the x86_64 runner bundle with TVM's CUDA runtime (libtvm_runtime_cuda.so,
libcudart.so.13), the app's kernel library compiled for x86-cuda (CUDA sm_90 + x86-64-v3 host)
and for x86-avx2 (the CPU library, portable to any AVX2 host), its first test samples, its data
stage output (to train from) and the pydantic wheels (Kiln's manifests load with pydantic, which
that image lacks). About 10-20 MB.

``run`` (on the GPU machine, minutes): the two libraries through kiln-runner on the same samples
(--device cuda, then the CPU one on all the machine's cores up to 16), latency side by side and
whether their outputs agree; then Kiln's own train stage on the app, a few epochs on CPU and on
CUDA (mixed precision), speed-up and accuracies; then 2 processes of torchrun with NCCL when the
machine has 2 GPUs (NCCL puts one rank per GPU: on one GPU that row says so and is not run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GPU = ROOT / ".gpu"
SAMPLES = 64
WHEELS = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection")


def prepare(app: str, samples: int) -> None:
    import importlib.metadata

    from hil.runner.build import build_runner
    from kiln.artifacts import Layout, read_json, runtime_cache
    from kiln.config import load_board
    from passes.support.tvm_build import compile_onnx

    lay = Layout(app)
    if not lay.onnx.is_file():
        sys.exit(f"prepare: {lay.onnx} missing: build the app first (.venv/bin/doit export:{app})")
    if lay.front_end_onnx.is_file():
        sys.exit(f"prepare: {app} has a front end (its test inputs are raw samples): pick an app without one")
    if GPU.exists():
        shutil.rmtree(GPU)
    (GPU / "lib").mkdir(parents=True)
    build_runner("x86_64", GPU / "runner", runtime_cache())
    if not (GPU / "runner" / "libtvm_runtime_cuda.so").is_file():
        sys.exit("prepare: this TVM has no libtvm_runtime_cuda.so: the runner cannot run CUDA libraries")
    info = read_json(lay.data_json)["test_inputs"]
    shape, dtype = info["shape"][1:], info.get("dtype", "float32")
    per = {"float32": 4, "int16": 2, "uint8": 1, "int8": 1}[dtype]
    for s in shape:
        per *= s
    n = min(samples, lay.test_inputs.stat().st_size // per)
    with open(lay.test_inputs, "rb") as f:
        (GPU / "inputs.bin").write_bytes(f.read(n * per))
    libs = {}
    for board in ("x86-cuda", "x86-avx2"):
        out = GPU / "lib" / f"{board}.so"
        t0 = time.perf_counter()
        compile_onnx(load_board(board), lay.onnx, [1, *shape], out, GPU / "lib" / f"{board}.json")
        libs[board] = {"bytes": out.stat().st_size, "compile_s": round(time.perf_counter() - t0, 1)}
    shutil.copytree(lay.data, GPU / "build" / app / "data")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(GPU / "whl"),
                    *(f"{w}=={importlib.metadata.version(w)}" for w in WHEELS)], check=True)
    meta = {"app": app, "shape": shape, "dtype": dtype, "samples": n, "libraries": libs}
    (GPU / "meta.json").write_text(json.dumps(meta, indent=1))
    size = sum(p.stat().st_size for p in GPU.rglob("*") if p.is_file())
    print(f"prepared {GPU} ({size / 2**20:.1f} MiB): {json.dumps(meta)}")


def _runner(lib: str, meta: dict, device: str, threads: int, warmup: int = 20) -> dict:
    cmd = [str(GPU / "runner" / "kiln-runner"), "--model", str(GPU / "lib" / lib), "--input", str(GPU / "inputs.bin"),
           "--shape", ",".join(map(str, meta["shape"])), "--dtype", meta["dtype"], "--threads", str(threads),
           "--warmup", str(warmup), "--outputs", "1", "--windows", "5", "--device", device]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip()[-600:]}
    return json.loads(p.stdout)


def run_libraries(meta: dict) -> None:
    import numpy as np

    threads = min(16, os.cpu_count() or 1)
    gpu, cpu = _runner("x86-cuda.so", meta, "cuda", 1), _runner("x86-avx2.so", meta, "cpu", threads)
    print(f"## kiln-runner, {meta['app']}, {meta['samples']} test samples, batch 1\n")
    print("| library | device | p50 µs | min µs | windows µs (median) | error |")
    print("|---|---|---|---|---|---|")
    for name, dev, r in (("x86-cuda", "cuda:0", gpu), ("x86-avx2", f"cpu x{threads}", cpu)):
        if "error" in r:
            print(f"| {name} | {dev} | - | - | - | {r['error'].splitlines()[-1]} |")
            continue
        lat = np.array(r["latencies_us"])
        print(f"| {name} | {dev} | {np.median(lat):.1f} | {lat.min():.1f} | {np.median(r['windows_us']):.1f} | |")
    if "error" in gpu or "error" in cpu:
        print("\noutputs: not compared (a library did not run)")
        return
    a, b = np.array(gpu["outputs"]), np.array(cpu["outputs"])
    same = float((a.argmax(1) == b.argmax(1)).mean())
    print(f"\noutputs: max |cuda - cpu| {np.abs(a - b).max():.3g} (scale {np.abs(b).max():.3g}); "
          f"top-1 agreement {same:.1%}; speed-up cpu/cuda p50 "
          f"{np.median(cpu['latencies_us']) / np.median(gpu['latencies_us']):.2f}x")


def _project(app: str):
    """The app's manifest as kiln.config.load_project reads it, less its board checks: those load
    the board files, which check their targets against TVM's LLVM, and the GPU machine has no TVM."""
    from kiln import config
    from kiln.schema import Project

    path = config.project_path(app)
    project = config.load_model(path, Project)
    config._resolve_arch_files(path, project)
    config._infer_data(path, project)
    return project


def _train(app: str, device: str, epochs: int, nproc: int = 0) -> dict:
    """Kiln's train stage (passes.train.run) on the carried data, on ``device``; wall seconds and metrics."""
    import passes.train as train
    from kiln.artifacts import Layout

    project = _project(app)
    tr = project.training.model_copy(update={"device": device, "epochs": epochs, "early_stopping": None})
    if nproc:
        tr = type(tr).model_validate({**tr.model_dump(), "distributed": {"nproc_per_node": nproc, "backend": "nccl"}})
    project = project.model_copy(update={"training": tr})
    lay = Layout(app)
    lay.model_pt.unlink(missing_ok=True)  # no warm start from the other device's run
    t0 = time.perf_counter()
    metrics = train.run(project, lay)
    return {"seconds": time.perf_counter() - t0, "metrics": metrics}


def run_training(app: str, epochs: int) -> None:
    import torch

    os.environ["KILN_BUILD"] = str(GPU / "build")
    print(f"\n## training {app}, {epochs} epochs (Kiln's train stage; CUDA: mixed precision)\n")
    print("| run | seconds | s/epoch | speed-up vs cpu | accuracy |")
    print("|---|---|---|---|---|")
    rows = {}
    for name, device, nproc in (("cpu", "cpu", 0), ("cuda", "cuda", 0), ("cuda DDP x2 (NCCL)", "cuda", 2)):
        if nproc and torch.cuda.device_count() < nproc:
            print(f"| {name} | - | - | - | not run: {torch.cuda.device_count()} GPU(s), NCCL needs one per rank |")
            continue
        try:
            r = _train(app, device, epochs, nproc)
        except Exception as e:  # noqa: BLE001 -- a failed run is a row of the report, the next still runs
            print(f"| {name} | - | - | - | failed: {type(e).__name__}: {str(e)[:300]} |")
            continue
        rows[name] = r
        m = r["metrics"]
        acc = f"val {m.get('val_accuracy', float('nan')):.4f}, test {m.get('test_accuracy', float('nan')):.4f}"
        speed = rows["cpu"]["seconds"] / r["seconds"] if "cpu" in rows else float("nan")
        print(f"| {name} | {r['seconds']:.1f} | {r['seconds'] / epochs:.2f} | {speed:.2f}x | {acc} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("prepare", "run"))
    ap.add_argument("--app", default="traffic_signs")
    ap.add_argument("--samples", type=int, default=SAMPLES)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.app, args.samples)
        return 0
    meta = json.loads((GPU / "meta.json").read_text())
    run_libraries(meta)
    run_training(meta["app"], args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
