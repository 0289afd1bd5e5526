"""Bring your own model, through `doit deploy` on a lab of x86-host (native) and rpi4 (qemu):

* ``family: module``: a residual net the team wrote in projects/<app>/model.py, trained,
  structurally pruned and int8-quantized by Kiln;
* ``family: onnx``: an ONNX file the team already has, not trained by Kiln, int8-quantized
  after training only;
* a team's module with an nn.LSTM: refused before any training, naming the node and what to
  do instead.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import last_result, local_lab, run_doit, write_project

pytestmark = pytest.mark.slow

MODEL_PY = '''
import torch
import torch.nn as nn


class TinyRes(nn.Module):
    """conv-BN-ReLU, one residual block, global average pool, a linear head."""

    def __init__(self, in_channels, num_classes, input_size, width=8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                   nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width))
        self.relu = nn.ReLU()
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)

    def forward(self, x):
        y = self.stem(x)
        y = self.relu(y + self.block(y))
        return self.head(self.flat(self.pool(y)))


class WithLstm(nn.Module):
    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.rnn, self.head = nn.LSTM(input_size[1], 16, batch_first=True), nn.Linear(16, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x[:, 0])
        return self.head(out[:, -1])
'''


def app(name: str, architecture: dict, passes: list, epochs: int = 3) -> dict:
    return {
        "name": name,
        "requirements": {"accuracy": {"min": 0.5}, "agreement": {"min": 0.9}},
        "dataset": {"format": "digits", "path": "sklearn", "image_size": [8, 8],
                    "split": {"val": 0.15, "test": 0.15, "seed": 0}},
        "architecture": architecture,
        "training": {"epochs": epochs, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
        "compression": {"max_accuracy_drop": 0.1, "library_bytes": False, "passes": passes},
        "validation": {"samples": 40, "warmup": 1, "timeout_s": 600},
        "tuning": {"trials": 0},  # tuning is test_pipeline's; 128 trials here would cost minutes
        "targets": ["x86-host", "rpi4"],
    }


@pytest.fixture
def lab(tmp_path):
    """Projects and build in tmp; a lab of x86-host (native) and rpi4 (qemu), both local."""
    return local_lab(tmp_path, "byo")


def deployed(lab, name: str):
    p = run_doit(lab["env"], f"deploy:{name}", timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    report = json.loads((lab["build"] / name / "report.json").read_text())
    assert report["passed"] and sorted(report["validated"]) == ["rpi4", "x86-host"], report
    for inst in ("x86-host", "rpi4"):
        assert report["boards"][inst]["passed"] and last_result(lab["build"] / name, inst)["passed"]
    return p


def test_module_app_builds_compresses_and_passes(lab):
    write_project(lab["projects"], app("mine", {"family": "module", "class_name": "TinyRes", "kwargs": {"width": 8}},
                                       [{"prune": {"method": "structured", "amount": 0.25, "finetune_epochs": 1}},
                                        {"quantize": {"mode": "int8", "calibration_samples": 128}}]))
    (lab["projects"] / "mine" / "model.py").write_text(MODEL_PY)
    deployed(lab, "mine")
    comp = json.loads((lab["build"] / "mine" / "compress.json").read_text())
    rows = comp["passes"]
    assert rows[1]["params"] < rows[0]["params"]  # the residual graph lost channels


def _trained_onnx(path):
    """A small CNN trained on scikit-learn's digits (pixels as Kiln's digits format scales them)."""
    import torch
    import torch.nn as nn

    from passes.formats.digits import load_digits, shipped_path

    x, y, _ = load_digits(shipped_path(), (8, 8))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(30):
        for i in range(0, len(yt), 128):
            loss = nn.functional.cross_entropy(net(xt[i : i + 128]), yt[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)


def test_onnx_app_is_imported_not_trained_and_passes(lab):
    write_project(lab["projects"], app("theirs", {"family": "onnx", "path": "model.onnx"},
                                       [{"quantize": {"mode": "int8", "calibration_samples": 128}}]))
    _trained_onnx(lab["projects"] / "theirs" / "model.onnx")
    p = deployed(lab, "theirs")
    assert "train:theirs" in p.stdout or "import" in p.stdout
    metrics = json.loads((lab["build"] / "theirs" / "metrics.json").read_text())
    assert metrics["trained"] is False and metrics["history"] == []


def test_unsupported_operator_is_refused_before_training(lab):
    write_project(lab["projects"], app("lstm", {"family": "module", "class_name": "WithLstm"}, []))
    (lab["projects"] / "lstm" / "model.py").write_text(MODEL_PY)
    p = run_doit(lab["env"], "deploy:lstm", timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "(LSTM)" in out and "family rnn" in out, out[-3000:]
    assert "Traceback" not in out
    assert not (lab["build"] / "lstm" / "model.pt").exists()  # stopped before any epoch
