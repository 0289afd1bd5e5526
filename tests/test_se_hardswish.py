"""A team's own module with squeeze-and-excitation gates and hard-swish (MobileNetV3's block:
hard-swish activations, a global-average-pool -> 1x1 conv -> ReLU -> 1x1 conv -> hard-sigmoid
gate multiplied channel-wise over H x W; then the same gate in the nn.Linear form,
``s = x.mean((2, 3)); x * sigmoid(fc2(relu6(fc1(s))))[:, :, None, None]``; ReLU6 in both gates,
fused into the conv and the linear before it) through ``doit
deploy`` (structured pruning, then int8) on a lab of x86-host (native) and rpi4 (qemu), on
scikit-learn's digits: it passes, and every board's outputs are its fake-quant twin's bit for
bit (the same predictions and the same float64 checksum)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import local_lab, run_doit, write_project

pytestmark = pytest.mark.slow

MODEL_PY = '''
import torch
import torch.nn as nn


class SeNet(nn.Module):
    """conv-BN-hardswish, depthwise conv-BN-hardswish, a squeeze-and-excitation gate, GAP, head."""

    def __init__(self, in_channels, num_classes, input_size, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width))
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(width, width // 4, 1), nn.Conv2d(width // 4, width, 1)
        self.gate = nn.Hardsigmoid()
        self.lin1, self.lin2 = nn.Linear(width, width // 4), nn.Linear(width // 4, width)
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)

    def forward(self, x):
        y = nn.functional.hardswish(self.dw(self.stem(x)))
        y = y * self.gate(self.fc2(torch.clamp(self.fc1(self.squeeze(y)), 0, 6)))
        s = torch.sigmoid(self.lin2(nn.functional.relu6(self.lin1(y.mean((2, 3))))))
        y = y * s[:, :, None, None]
        return self.head(self.flat(self.pool(y)))
'''


def checksum(outputs: np.ndarray) -> float:
    """The runner's checksum: float64 sum of every float32 output, sample by sample, in order."""
    total = 0.0
    for v in outputs.astype(np.float32).reshape(-1):
        total += float(v)
    return total


def test_se_gate_and_hardswish_deploy_int8_bit_for_bit_with_the_twin(tmp_path):
    import torch

    from passes.support.common import load_checkpoint
    from passes.support.int8 import fake_quant

    lab = local_lab(tmp_path, "se")
    write_project(lab["projects"], {
        "name": "se",
        "requirements": {"accuracy": {"min": 0.6}, "agreement": {"min": 1.0}},
        "dataset": {"format": "digits", "path": "sklearn", "image_size": [8, 8],
                    "split": {"val": 0.15, "test": 0.15, "seed": 0}},
        "architecture": {"family": "module", "class_name": "SeNet"},
        "training": {"epochs": 4, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
        "compression": {"max_accuracy_drop": 0.1, "library_bytes": False,
                        "passes": [{"prune": {"method": "structured", "amount": 0.25, "finetune_epochs": 1}},
                                   {"quantize": {"mode": "int8", "calibration_samples": 128}}]},
        "validation": {"samples": 40, "warmup": 1, "timeout_s": 600},
        "tuning": {"trials": 0},  # untuned kernels: the int8 lowering is what this checks, not the search
        "targets": ["x86-host", "rpi4"],
    })
    (lab["projects"] / "se" / "model.py").write_text(MODEL_PY)
    p = run_doit(lab["env"], "deploy:se", timeout=1800)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    app = lab["build"] / "se"
    report = json.loads((app / "report.json").read_text())
    assert report["passed"] and sorted(report["validated"]) == ["rpi4", "x86-host"], report

    # the quantized graph holds the gate, both activations as tables and the broadcast product
    model, ckpt = load_checkpoint(app / "compressed.pt")
    layers = ckpt["quantization"]["layers"]
    kinds = [s["kind"] for s in layers.values()]
    assert {"hardswish", "hardsigmoid", "sigmoid", "mul", "reshape"} <= set(kinds), kinds
    assert [s.get("keepdim", True) for s in layers.values() if s["kind"] == "avgpool"] == [True, False, True]
    assert [n for n, s in layers.items() if s.get("relu6")] == ["fc1", "lin1"]
    muls = [s for s in layers.values() if s["kind"] == "mul"]
    c = muls[0]["shape"][1]
    assert c < 16  # pruned
    assert [[layers[i]["shape"] for i in mul["inputs"]] for mul in muls] == [[[1, c, 8, 8], [1, c, 1, 1]]] * 2

    twin = fake_quant(model, ckpt["quantization"])
    x = np.fromfile(app / "data" / "test_inputs.bin", dtype="<f4").reshape(-1, 1, 8, 8)
    for inst in ("x86-host", "rpi4"):
        run = json.loads((app / "runs" / report["run_id"] / inst / "run.json").read_text())["runner"]
        n = run["count"]
        with torch.no_grad():
            want = twin(torch.from_numpy(x[:n].copy())).numpy()
        assert run["predictions"] == want.argmax(1).tolist(), inst
        assert run["checksum"] == checksum(want), (inst, run["checksum"], checksum(want))
