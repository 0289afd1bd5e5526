"""Dataset format ``synthetic`` (deterministic, learnable, any shape), per-instance channels and
classes for every format, and one epoch of the train stage for each MLPerf Tiny preset, a
reconstruction family and a team's own module on tiny synthetic data."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from kiln import config
from kiln.artifacts import Layout
from kiln.errors import ManifestError, PassError
from kiln.schema import DigitsDataset, GtsrbDataset, Project, SyntheticDataset
from passes import data, train
from passes.formats.synthetic import generate, templates
from tests.conftest import write_project


def _ds(**kw) -> SyntheticDataset:
    return SyntheticDataset.model_validate({"format": "synthetic", **kw})


@pytest.mark.parametrize("channels, size", [(1, (1, 640)), (1, (49, 10)), (3, (32, 32)), (2, (1, 1))])
def test_synthetic_is_deterministic_any_shape_uint8(channels, size):
    (x, y), (xt, yt) = generate(4, channels, size, per_class=5, test_per_class=3, seed=7)
    assert x.shape == (20, *size, channels) and x.dtype == np.uint8 and xt.shape == (12, *size, channels)
    assert np.bincount(y).tolist() == [5] * 4 and np.bincount(yt).tolist() == [3] * 4
    (x2, _), (xt2, _) = generate(4, channels, size, per_class=5, test_per_class=3, seed=7)
    assert np.array_equal(x, x2) and np.array_equal(xt, xt2)
    (x3, _), _ = generate(4, channels, size, per_class=5, test_per_class=3, seed=8)
    assert not np.array_equal(x, x3)
    # the test set's size does not change the training samples
    (x4, _), _ = generate(4, channels, size, per_class=5, test_per_class=9, seed=7)
    assert np.array_equal(x, x4)


@pytest.mark.parametrize("size", [(1, 640), (49, 10), (16, 16)])
def test_synthetic_classes_are_learnable(size):
    """Nearest class mean (from the training samples) classifies the test samples: the classes
    differ by more than the noise, at every shape."""
    (x, y), (xt, yt) = generate(6, 2, size, per_class=20, test_per_class=10, seed=0)
    means = np.stack([x[y == k].reshape(20, -1).mean(0) for k in range(6)])
    d = ((xt.reshape(len(yt), 1, -1).astype(np.float64) - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == yt).mean() >= 0.95
    t = templates(6, 2, size, 0)
    assert 0.15 <= t.min() and t.max() <= 0.85


def test_channels_and_classes_are_read_per_instance_for_every_format():
    syn = _ds(channels=3, classes=7, image_size=[1, 640])
    assert (syn.channels, syn.num_classes, syn.image_size) == (3, 7, (1, 640))
    g = GtsrbDataset.model_validate({"format": "gtsrb", "path": "x"})
    d = DigitsDataset.model_validate({"format": "digits"})
    assert (g.channels, g.num_classes, d.channels, d.num_classes) == (3, 43, 1, 10)
    assert "channels" not in g.model_dump() and syn.model_dump()["channels"] == 3


@pytest.mark.parametrize("size, ok", [((1, 640), True), ((1024, 1), True), ((0, 5), False), ((4, 1025), False)])
def test_image_size_is_one_to_1024_per_side(size, ok):
    if ok:
        assert _ds(image_size=list(size)).image_size == size
    else:
        with pytest.raises(ValueError, match="between 1 and 1024"):
            _ds(image_size=list(size))


def test_bad_synthetic_field_names_file_and_field(kiln_env):
    data_ = _project({"family": "mlp", "widths": [8]}, channels=0)
    manifest = write_project(kiln_env["projects"], data_)
    with pytest.raises(ManifestError) as e:
        config.load_project("tiny")
    assert str(manifest) in str(e.value) and "field 'dataset.channels'" in str(e.value) and "greater than or equal to 1" in str(e.value)


# --- the train stage on tiny synthetic projects ----------------------------------------------------


def _project(arch: dict, *, channels=1, classes=3, image_size=(16, 16), epochs=1, **ds) -> dict:
    return {
        "name": "tiny", "requirements": {},
        "dataset": {"format": "synthetic", "channels": channels, "classes": classes, "image_size": list(image_size),
                    "per_class": 4, "test_per_class": 2, "seed": 0, "split": {"val": 0.25, "test": 0.2}, **ds},
        "architecture": arch,
        "training": {"epochs": epochs, "batch": 16, "lr": 0.003, "seed": 0, "threads": 1},
        "targets": ["x86-host"],
        # a reconstruction objective detects anomalies: class 0 is normal
        **({"anomaly": {"normal": ["0"]}} if _reconstructs(arch) else {}),
    }


def _reconstructs(arch: dict) -> bool:
    return arch["family"] in ("autoencoder", "mlperf_ad") or arch.get("objective") == "reconstruction"


def _data_then_train(kiln_env, manifest: dict):
    write_project(kiln_env["projects"], manifest)
    project = config.load_project("tiny")
    layout = Layout("tiny")
    info = data.run(project, layout)
    t0 = time.perf_counter()
    metrics = train.run(project, layout)
    return project, layout, info, metrics, time.perf_counter() - t0


# (preset, channels, classes, image_size): MLPerf Tiny's reference inputs
PRESETS = [("mlperf_kws", 1, 12, (49, 10)), ("mlperf_vww", 3, 2, (96, 96)), ("mlperf_ic", 3, 10, (32, 32)),
           ("mlperf_ad", 1, 2, (1, 640))]


@pytest.mark.parametrize("family, channels, classes, size", PRESETS, ids=[p[0] for p in PRESETS])
def test_each_preset_trains_an_epoch_on_tiny_synthetic_data(kiln_env, family, channels, classes, size):
    import torch

    project, layout, info, metrics, seconds = _data_then_train(
        kiln_env, _project({"family": family}, channels=channels, classes=classes, image_size=size))
    assert info["test_inputs"]["shape"] == [classes * 2, channels, *size]
    assert seconds < 20
    ckpt = torch.load(layout.model_pt, weights_only=False)
    assert ckpt["architecture"] == {"family": family, "max_macs": None} and ckpt["channels"] == channels
    assert len(metrics["history"]) == 1 and metrics["macs"] > 0
    if family == "mlperf_ad":  # reconstruction: MSE, no accuracy
        assert metrics["objective"] == "reconstruction" and "val_accuracy" not in metrics
        assert 0 < metrics["val_mse"] < 1 and 0 < metrics["test_mse"] < 1
        assert "val_accuracy" not in metrics["history"][0] and "val_mse" in metrics["history"][0]
    else:
        assert metrics["objective"] == "classification" and 0 <= metrics["test_accuracy"] <= 1
    assert json.loads(layout.metrics.read_text())["params"] == metrics["params"]


def test_reconstruction_training_lowers_the_error(kiln_env):
    from passes.support.training import reconstruction_error

    manifest = _project({"family": "autoencoder", "widths": [32], "bottleneck": 8}, classes=2, image_size=(1, 64),
                        epochs=30, per_class=64)
    manifest["training"]["lr"] = 0.01
    project, layout, _, metrics, _ = _data_then_train(kiln_env, manifest)
    from kiln import nets

    untrained = nets.build(project.architecture, 1, 2, (1, 64))
    xva = np.load(layout.data / "val.npz")["x"]
    assert metrics["val_mse"] < 0.5 * reconstruction_error(untrained, xva)
    assert metrics["best_epoch"] == min(metrics["history"], key=lambda r: r["val_mse"])["epoch"]


def test_classifier_learns_synthetic_data(kiln_env):
    manifest = _project({"family": "conv1d", "widths": [8, 8]}, channels=2, classes=4, image_size=(1, 32),
                        epochs=12, per_class=24, test_per_class=8)
    manifest["training"]["lr"] = 0.02
    *_, metrics, _ = _data_then_train(kiln_env, manifest)
    assert metrics["test_accuracy"] >= 0.9


MODEL_PY = '''
import torch
import torch.nn as nn


class Gated(nn.Module):
    def __init__(self, in_channels, num_classes, input_size, hidden=8):
        super().__init__()
        h, w = input_size
        self.flat, self.a, self.b = nn.Flatten(), nn.Linear(in_channels * h * w, hidden), nn.Linear(in_channels * h * w, hidden)
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        x = self.flat(x)
        return self.out(torch.sigmoid(self.a(x)) * torch.tanh(self.b(x)))


class WrongShape(Gated):
    def forward(self, x):
        return super().forward(x)[:, :1]


class AE(nn.Module):
    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        f = in_channels * input_size[0] * input_size[1]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(f, 4), nn.ReLU(), nn.Linear(4, f))

    def forward(self, x):
        return self.net(x)


class WithLSTM(nn.Module):
    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.lstm, self.out = nn.LSTM(in_channels, 4, batch_first=True), nn.Linear(4, num_classes)

    def forward(self, x):
        y, _ = self.lstm(x[:, :, 0, :].transpose(1, 2))
        return self.out(y[:, 3])
'''


def test_module_family_trains_with_budget_and_output_checked(kiln_env):
    manifest = _project({"family": "module", "class_name": "Gated", "kwargs": {"hidden": 6}}, image_size=(1, 8))
    (kiln_env["projects"] / "tiny").mkdir()
    (kiln_env["projects"] / "tiny" / "model.py").write_text(MODEL_PY)
    *_, metrics, _ = _data_then_train(kiln_env, manifest)
    assert metrics["macs"] == 2 * 8 * 6 + 6 + 6 * 3  # two projections, the gate product, the head
    manifest["architecture"]["max_macs"] = 50
    with pytest.raises(ManifestError, match=r"max_macs: the model needs 120 MACs.*budget of 50"):
        _data_then_train(kiln_env, manifest)
    manifest["architecture"] = {"family": "module", "class_name": "WrongShape"}
    with pytest.raises(ManifestError, match=r"WrongShape returns \(1, 1\) for a \(1, 1, 1, 8\) input, expected \(1, 3\)"):
        _data_then_train(kiln_env, manifest)


def test_module_family_declares_a_reconstruction_objective(kiln_env):
    manifest = _project({"family": "module", "class_name": "AE", "objective": "reconstruction"}, image_size=(1, 8))
    (kiln_env["projects"] / "tiny").mkdir()
    (kiln_env["projects"] / "tiny" / "model.py").write_text(MODEL_PY)
    *_, metrics, _ = _data_then_train(kiln_env, manifest)
    assert metrics["objective"] == "reconstruction" and "val_mse" in metrics and "val_accuracy" not in metrics
    manifest["architecture"]["objective"] = "classification"  # (1, 8) out, 3 classes
    del manifest["anomaly"]  # a classifier has no normal classes
    with pytest.raises(ManifestError, match=r"AE returns \(1, 8\) for a \(1, 1, 1, 8\) input, expected \(1, 3\)"):
        _data_then_train(kiln_env, manifest)


def test_module_with_an_operator_tvm_lacks_stops_before_training(kiln_env):
    manifest = _project({"family": "module", "class_name": "WithLSTM"}, image_size=(1, 4))
    (kiln_env["projects"] / "tiny").mkdir()
    (kiln_env["projects"] / "tiny" / "model.py").write_text(MODEL_PY)
    with pytest.raises(ManifestError, match=r"(?s)module WithLSTM .*model\.py.*\(LSTM\): TVM's ONNX frontend has no LSTM"):
        _data_then_train(kiln_env, manifest)
    assert not Layout("tiny").model_pt.exists()


def test_train_refuses_a_family_kiln_does_not_train(tmp_path):
    p = Project.model_validate(_project({"family": "onnx", "path": str(tmp_path / "m.onnx")}))
    with pytest.raises(PassError, match="family 'onnx' is not trained by Kiln"):
        train.run(p, Layout("tiny"))


def test_fit_refuses_an_unknown_loss():
    from passes.support.training import fit

    with pytest.raises(ValueError, match="loss must be one of classification, reconstruction"):
        fit(None, np.zeros((1, 2, 2, 1), np.uint8), np.zeros(1, np.int64), epochs=1, batch=1, lr=0.1, aug=None,
            gen=None, loss="hinge")
