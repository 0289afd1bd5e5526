"""Every net family and MLPerf Tiny preset on x86-host, int8: parameters, MACs, the sizing
estimate made before training against the runner's measurement (latency p50, peak memory),
accuracy after int8 and the kernel library's bytes.

    .venv/bin/python bench/vocabulary.py [--epochs 10] [--samples 200] [--rounds 3] [--only mlp,rnn_lstm]

Each model trains on Kiln's synthetic format (learnable class patterns of its input shape), is
quantized to int8 (calibrated on its training split), exported, compiled untuned for x86-host
and run by the C++ runner natively. Rounds are interleaved (every model once per round), and
the table gives the median p50 over rounds with its spread (min-max). Accuracy is the int8
library's top-1 on the synthetic test split as the runner predicts it; for the autoencoders
(reconstruction) it is left out. Run it with nothing else at work.

``--smoke``: a classifier and an autoencoder (cnn, autoencoder), 1 epoch, 8 samples, 1 round: the
same table in about a minute, numbers meaningless (tests/test_benches.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPECS = {  # name: (architecture, channels, (H, W), classes)
    "cnn": ({"family": "cnn", "widths": [8, 16], "max_macs": 10**8}, 3, (16, 16), 4),
    "ds_cnn": ({"family": "ds_cnn", "filters": 16, "widths": [16, 16]}, 1, (16, 16), 4),
    "resnet": ({"family": "resnet", "stem": 8, "widths": [8, 16]}, 3, (16, 16), 4),
    "mobilenet_v1": ({"family": "mobilenet_v1", "alpha": 0.25, "blocks": 5}, 3, (32, 32), 4),
    "mlp": ({"family": "mlp", "widths": [64, 32]}, 1, (1, 64), 4),
    "conv1d": ({"family": "conv1d", "widths": [8, 16]}, 3, (1, 32), 4),
    "rnn_lstm": ({"family": "rnn", "cell": "lstm", "hidden": 16}, 3, (1, 16), 4),
    "rnn_gru": ({"family": "rnn", "cell": "gru", "hidden": 16}, 3, (1, 16), 4),
    "autoencoder": ({"family": "autoencoder", "widths": [32], "bottleneck": 8}, 1, (1, 64), 2),
    "mlperf_kws": ({"family": "mlperf_kws"}, 1, (49, 10), 12),
    "mlperf_vww": ({"family": "mlperf_vww"}, 3, (96, 96), 2),
    "mlperf_ic": ({"family": "mlperf_ic"}, 3, (32, 32), 10),
    "mlperf_ad": ({"family": "mlperf_ad"}, 1, (1, 640), 2),
}


def manifest(name: str, epochs: int) -> dict:
    arch, ch, size, classes = SPECS[name]
    return {
        "name": name, "requirements": {},
        "dataset": {"format": "synthetic", "channels": ch, "classes": classes, "image_size": list(size),
                    "per_class": 100, "test_per_class": 50, "seed": 0},
        "architecture": arch,
        "training": {"epochs": epochs, "batch": 32, "lr": 0.005, "seed": 0, "threads": 2},
        "compression": {"passes": [{"quantize": {"mode": "int8", "calibration_samples": 128}}]},
        "tuning": {"trials": 0},
        "targets": ["x86-host"],
        # the autoencoders detect anomalies: trained on class 0, the rest anomalous
        **({"anomaly": {"normal": ["0"]}} if name in ("autoencoder", "mlperf_ad") else {}),
    }


def prepare(name: str, work: Path, epochs: int, samples: int) -> dict:
    """Train, quantize, export and compile one model; its inputs for the runner."""
    from kiln.artifacts import Layout
    from kiln.config import load_board
    from kiln.schema import Project
    from kiln.sizing import estimate
    from passes import data, train
    from passes.compress import PassContext
    from passes.quantize import run as quantize
    from passes.support.common import load_checkpoint, save_checkpoint
    from passes.support.onnx_export import export_checkpoint
    from passes.support.tvm_build import compile_onnx

    project = Project.model_validate(manifest(name, epochs))
    lay = Layout(name)
    data.run(project, lay)
    metrics = train.run(project, lay)
    # quantize.run directly, as tests/test_presets.py: the compress stage's accuracy budget
    # means nothing for the autoencoders (reconstruction), which this table includes
    model, ckpt = load_checkpoint(lay.model_pt)
    ctx = PassContext(project=project, data_dir=lay.data, seed=0, index=0, name="quantize")
    _, qckpt = quantize(model, {k: v for k, v in ckpt.items() if k != "state_dict"},
                        project.compression.passes[0].settings, ctx)
    save_checkpoint(lay.compressed_pt, qckpt)
    export_checkpoint(lay.compressed_pt, lay.data, lay.onnx, lay.export_json)
    board = load_board("x86-host")
    _, ch, size, _ = SPECS[name]
    so = work / f"{name}.so"
    compile_onnx(board, lay.onnx, [1, ch, *size], so, work / f"{name}.compile.json")
    x = np.fromfile(lay.data / "test_inputs.bin", dtype="<f4").reshape(-1, ch, *size)[:samples]
    inputs = work / f"{name}.inputs.bin"
    x.tofile(inputs)
    labels = json.loads((lay.data / "test_labels.json").read_text())
    return {"name": name, "so": so, "inputs": inputs, "shape": (ch, *size), "labels": labels[: len(x)],
            "params": metrics["params"], "macs": metrics["macs"], "estimate": estimate(project, board),
            "objective": project.architecture.objective, "fp32_top1": metrics.get("test_accuracy"), "library_bytes": so.stat().st_size}


def run_runner(runner: Path, m: dict) -> dict:
    argv = [str(runner), "--model", str(m["so"]), "--input", str(m["inputs"]), "--shape",
            ",".join(map(str, m["shape"])), "--warmup", "10", "--threads", "2"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{m['name']}: runner failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated names of SPECS")
    ap.add_argument("--smoke", action="store_true", help="cnn and autoencoder, 1 epoch, 8 samples, 1 round")
    args = ap.parse_args(argv)
    if args.smoke:
        args.epochs, args.samples, args.rounds = 1, 8, 1
        args.only = args.only or "cnn,autoencoder"
    names = [n for n in (args.only.split(",") if args.only else SPECS) if n]
    work = Path(tempfile.mkdtemp(prefix="kiln-vocab-"))
    if args.smoke:  # nothing of a smoke run is worth keeping
        import atexit
        import shutil

        atexit.register(shutil.rmtree, work, True)
    os.environ["KILN_BUILD"] = str(work / "build")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from hil.runner.build import build_runner
    from kiln.artifacts import runtime_cache

    runner = build_runner("x86_64", work / "runner", runtime_cache())
    models = [prepare(n, work, args.epochs, args.samples) for n in names]
    p50s: dict[str, list[float]] = {m["name"]: [] for m in models}
    rss: dict[str, list[int]] = {m["name"]: [] for m in models}
    preds: dict[str, list[int]] = {}
    for _ in range(args.rounds):  # interleaved: every model once per round
        for m in models:
            out = run_runner(runner, m)
            p50s[m["name"]].append(statistics.median(out["latencies_us"]) / 1000)
            rss[m["name"]].append(out["peak_rss_kb"])
            preds[m["name"]] = out["predictions"]
    head = ("model", "params", "MACs", "est ms", "p50 ms (min-max)", "meas/est", "est KiB", "peak KiB", "meas/est",
            "fp32 top-1", "int8 top-1", "library B")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for m in models:
        n, est = m["name"], m["estimate"] or {}
        p50 = statistics.median(p50s[n])
        kb = statistics.median(rss[n])
        acc = ("-" if m["objective"] != "classification" else
               f"{float(np.mean(np.asarray(preds[n]) == np.asarray(m['labels']))):.3f}")
        e_ms, e_kb = est.get("latency_ms"), est.get("peak_memory_kb")
        print(" | ".join([
            n, f"{m['params']:,}", f"{m['macs']:,}", f"{e_ms:.3f}" if e_ms else "-",
            f"{p50:.3f} ({min(p50s[n]):.3f}-{max(p50s[n]):.3f})", f"{p50 / e_ms:.2f}" if e_ms else "-",
            f"{e_kb:,.0f}" if e_kb else "-", f"{kb:,.0f}", f"{kb / e_kb:.2f}" if e_kb else "-",
            f"{m['fp32_top1']:.3f}" if m["fp32_top1"] is not None else "-", acc,
            f"{m['library_bytes']:,}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
