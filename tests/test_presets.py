"""MLPerf Tiny's four reference models as Kiln presets, end to end on tiny synthetic data: one
epoch of training, int8 post-training quantization, fp32 and int8 ONNX, kernel libraries for
x86-host (native) and rpi4 (cross-compiled, run under qemu-aarch64) run by the C++ runner.

The int8 libraries must compute exactly what the fake-quant twin computes: the runner's
checksum (a float64 sum of every output in order) equals the twin's, and so do its
predictions. fp32 libraries agree with torch to float tolerance.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from kiln.artifacts import Layout, runtime_cache
from kiln.config import load_board
from kiln.schema import Project, QuantizeSettings

pytestmark = pytest.mark.slow

SAMPLES = 4  # per board and mode: qemu runs the 7.5 M-MAC VWW net slowly
BOARDS = ("x86-host", "rpi4")
PRESETS = {  # preset: (channels, (H, W), classes)
    "mlperf_kws": (1, (49, 10), 12),
    "mlperf_vww": (3, (96, 96), 2),
    "mlperf_ic": (3, (32, 32), 10),
    "mlperf_ad": (1, (1, 640), 2),
}


def manifest(preset: str) -> dict:
    ch, size, classes = PRESETS[preset]
    detector = preset == "mlperf_ad"  # anomaly detection: trained on class 0, scored by its error
    return {
        "name": preset, "requirements": {} if detector else {"accuracy": {"min": 0.0}},
        **({"anomaly": {"normal": ["0"]}} if detector else {}),
        "dataset": {"format": "synthetic", "channels": ch, "classes": classes, "image_size": list(size),
                    "per_class": 6, "test_per_class": 2, "seed": 0, "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "architecture": {"family": preset},
        "training": {"epochs": 1, "batch": 16, "lr": 0.005, "seed": 0, "threads": 1},
        "targets": list(BOARDS),
    }


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    """The runner bundle per board architecture (the aarch64 runtime from the shared cache)."""
    from hil.runner.build import build_runner

    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (make setup installs it)")
    root = tmp_path_factory.mktemp("runners")
    return {arch: build_runner(arch, root / arch, runtime_cache()) for arch in ("x86_64", "aarch64")}


def run_board(board, runner, model_so, inputs, shape) -> dict:
    prefix = [] if board.emulation is None else [board.emulation.binary, "-L", board.emulation.sysroot,
                                                 *(["-cpu", board.emulation.cpu] if board.emulation.cpu else [])]
    argv = [*prefix, str(runner), "--model", str(model_so), "--input", str(inputs),
            "--shape", ",".join(map(str, shape)), "--warmup", "0", "--threads", "1", "--outputs", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{board.name}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def checksum(outputs: np.ndarray) -> float:
    """The runner's checksum: float64 sum of every float32 output, sample by sample, in order."""
    total = 0.0
    for v in outputs.astype(np.float32).reshape(-1):
        total += float(v)
    return total


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_trains_quantizes_compiles_and_runs_on_both_boards(preset, kiln_env, runners, tmp_path):
    import torch

    from kiln.nets import estimate
    from passes import data, train
    from passes.compress import PassContext
    from passes.quantize import run as quantize
    from passes.support.common import load_checkpoint, save_checkpoint
    from passes.support.int8 import fake_quant
    from passes.support.onnx_export import export_checkpoint
    from passes.support.tvm_build import compile_onnx

    project = Project.model_validate(manifest(preset))
    lay = Layout(preset)
    data.run(project, lay)
    metrics = train.run(project, lay)
    ch, size, _ = PRESETS[preset]
    shape = (ch, *size)
    cx = estimate(project.architecture, size, ch, project.dataset.num_classes)
    assert metrics["params"] == cx.params and metrics["macs"] == cx.macs

    model, ckpt = load_checkpoint(lay.model_pt)
    ctx = PassContext(project=project, data_dir=lay.data, seed=0, index=0, name="quantize")
    settings = QuantizeSettings(mode="int8", calibration_samples=32)
    twin, qckpt = quantize(model, {k: v for k, v in ckpt.items() if k != "state_dict"}, settings, ctx)
    q_pt = tmp_path / "int8.pt"
    save_checkpoint(q_pt, qckpt)

    x = np.fromfile(lay.data / "test_inputs.bin", dtype="<f4").reshape(-1, *shape)[:SAMPLES]
    inputs = tmp_path / "inputs.bin"
    x.astype("<f4").tofile(inputs)
    float_model, _ = load_checkpoint(lay.model_pt)
    rebuilt, qk = load_checkpoint(q_pt)
    twin = fake_quant(rebuilt, qk["quantization"])  # the twin as the export stage rebuilds it
    detector = project.anomaly is not None

    def deployed(net, xs):  # a detector's library ends in its score: the mean squared error
        out = net(xs)
        return ((out - xs.flatten(1)) ** 2).mean(1, keepdim=True) if detector else out

    with torch.no_grad():
        xt = torch.from_numpy(x)
        ref = {"fp32": deployed(float_model, xt).numpy(), "int8": deployed(twin, xt).numpy()}
    for mode, pt in (("fp32", lay.model_pt), ("int8", q_pt)):
        onnx_path = tmp_path / f"{mode}.onnx"
        export_checkpoint(pt, lay.data, onnx_path, tmp_path / f"{mode}.export.json", samples=8)
        for name in BOARDS:
            board = load_board(name)
            so = tmp_path / f"{mode}-{name}.so"
            compile_onnx(board, onnx_path, [1, *shape], so, tmp_path / f"{mode}-{name}.json")
            got = run_board(board, runners[board.arch], so, inputs, shape)
            assert got["count"] == SAMPLES and got["output_dim"] == ref[mode].shape[1]
            want = ref[mode].argmax(1).tolist()
            if mode == "int8" and detector:  # int8 up to the score, whose float mean may round apart
                assert np.allclose(np.asarray(got["outputs"])[:, 0], ref[mode][:, 0], rtol=1e-5), (name, got, ref[mode])
            elif mode == "int8":  # bit for bit: the same outputs give the same float64 sum
                assert got["predictions"] == want, (name, got["predictions"], want)
                assert got["checksum"] == checksum(ref[mode]), (name, got["checksum"], checksum(ref[mode]))
            else:
                assert np.isclose(got["checksum"], checksum(ref[mode]), rtol=1e-4, atol=1e-3 * np.abs(ref[mode]).max())
