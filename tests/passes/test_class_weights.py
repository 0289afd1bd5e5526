"""Imbalance: ``training.class_weights`` (balanced, a list, a mapping) in the classification loss,
refused where it cannot apply (an anomaly detector, an unknown class, a wrong length) when the
manifest loads; the data stage's per-class counts and its imbalance warning; the train stage's
per-class test report in metrics.json."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

from kiln.artifacts import read_json
from kiln.errors import ManifestError
from kiln.schema import Project
from kiln.tasks.classification import loss_weights
from passes import data, train
from passes.tasks import anomaly_detection, classification
from tests.conftest import write_project
from tests.passes.conftest import layout_at, small_manifest
from tests.passes.test_anomaly import APP as DETECTOR

CLASSIFIER = {**copy.deepcopy(DETECTOR), "name": "clf", "anomaly": None, "requirements": {"accuracy": {"min": 0.5}},
              "architecture": {"family": "mlp", "widths": [8]}, "compression": {"library_bytes": False}}


def clf(**training) -> dict:
    d = copy.deepcopy(CLASSIFIER)
    d["training"].update(training)
    return d


def test_balanced_is_inverse_class_frequency_on_the_training_split():
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = classification.loss_weights(Project.model_validate(clf(class_weights="balanced")), y)
    # scikit-learn's "balanced": n_samples / (n_classes * count)
    assert w == pytest.approx([100 / (3 * 60), 100 / (3 * 30), 100 / (3 * 10)])
    from sklearn.utils.class_weight import compute_class_weight

    assert w == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=y).tolist())
    assert classification.loss_weights(Project.model_validate(clf()), y) is None  # unset: unweighted, as before


def test_explicit_weights_a_list_in_class_order_or_a_mapping_by_name():
    y = np.array([0, 1, 2])
    assert classification.loss_weights(Project.model_validate(clf(class_weights=[1, 2, 0.5])), y) == [1, 2, 0.5]
    # YAML reads {2: 4} with an int key: the class named '2' (formats without names use indices)
    p = Project.model_validate(clf(class_weights={2: 4.0, "0": 0.5}))
    assert p.training.class_weights == {"2": 4.0, "0": 0.5}
    assert classification.loss_weights(p, y) == [0.5, 1.0, 4.0]  # a class not named weighs 1


def test_the_weights_change_the_loss_as_a_weighted_mean():
    import torch

    torch.manual_seed(0)
    out, y = torch.randn(6, 3), torch.tensor([0, 0, 0, 0, 1, 2])
    w = loss_weights("balanced", ["a", "b", "c"], np.bincount(y.numpy(), minlength=3))
    plain = classification.loss(classification.loss_fn(), out, None, y)
    assert classification.loss_fn().weight is None  # unset: today's loss, bit for bit
    weighted = classification.loss(classification.loss_fn(w), out, None, y)
    per = torch.nn.functional.cross_entropy(out, y, reduction="none")
    wy = torch.tensor(w)[y]
    assert float(weighted) == pytest.approx(float((wy * per).sum() / wy.sum()), rel=1e-6)
    assert float(plain) == pytest.approx(float(per.mean()), rel=1e-6)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-3)
    assert float(classification.loss(classification.loss_fn([1.0] * 3), out, None, y)) == pytest.approx(float(plain))


@pytest.mark.parametrize("weights, match", [
    ([1, 2], r"training.class_weights: 2 weights for 3 classes \(0, 1, 2\)"),
    ({"7": 2.0}, r"training.class_weights.7: '7' is not a class of the dataset \(classes: 0, 1, 2\)"),
    ("balance", r"(?s)class_weights.*expected 'balanced'"),
    ([1, 0, 1], r"(?s)class_weights.*greater than 0"),
])
def test_bad_class_weights_are_refused_at_load_naming_the_field(weights, match):
    with pytest.raises(ValueError, match=match):
        Project.model_validate(clf(class_weights=weights))


def test_class_weights_are_refused_for_an_anomaly_detector():
    d = copy.deepcopy(DETECTOR)
    d["training"]["class_weights"] = "balanced"
    with pytest.raises(ValueError, match=r"training.class_weights: family 'autoencoder' has a reconstruction "
                                         r"objective: .*no class to weigh"):
        Project.model_validate(d)
    assert anomaly_detection.loss_weights(Project.model_validate(DETECTOR), np.zeros(3, np.int64)) is None


def test_inferred_class_names_are_checked_when_the_manifest_loads(kiln_env):
    """image_folders without listed classes: the names are known only once kiln.config has read
    the folders, and a weight for a class that is not there is refused then, naming file and field."""
    from PIL import Image

    from kiln import config

    root = kiln_env["root"] / "pics"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    d = {**copy.deepcopy(CLASSIFIER), "name": "pets",
         "dataset": {"format": "image_folders", "path": str(root), "image_size": [8, 8]}}
    d["training"]["class_weights"] = {"cat": 2.0, "owl": 1.0}
    path = write_project(kiln_env["projects"], d)
    with pytest.raises(ManifestError, match=r"(?s)" + str(path) + r".*training.class_weights.owl: 'owl' is not a "
                                            r"class of the dataset \(classes: cat, dog\)"):
        config.load_project("pets")
    d["training"]["class_weights"] = {"cat": 2.0}
    write_project(kiln_env["projects"], d)
    assert config.load_project("pets").training.class_weights == {"cat": 2.0}


# -- the data stage's counts and its imbalance warning ---------------------------------------------


def test_imbalance_is_warned_naming_the_classes_and_the_split(caplog):
    splits = {"train": (None, np.array([0] * 220 + [1] * 20 + [2] * 12)),
              "val": (None, np.array([0] * 20 + [1] * 4 + [2] * 3)),
              "test": (None, np.array([0] * 20 + [1] * 5 + [2] * 5))}
    with caplog.at_level(logging.INFO, logger="kiln.data"):
        warnings = data.report_class_counts(splits, ["yes", "no", "stop"])
    assert len(warnings) == 1  # val 6.7x, test 4x: under the threshold
    assert "the train split is imbalanced: class 'yes' has 220 samples, class 'stop' 12 (18.3x, over 10x)" in warnings[0]
    assert "training.class_weights: balanced" in warnings[0]
    table = next(r.getMessage() for r in caplog.records if "samples per class and split" in r.getMessage())
    assert table.splitlines()[1].split() == ["class", "train", "val", "test"]
    assert table.splitlines()[-1].split() == ["stop", "12", "3", "5"]
    assert any(r.levelno == logging.WARNING and "'yes'" in r.getMessage() for r in caplog.records)
    assert data.report_class_counts({"train": (None, np.array([0] * 100 + [1] * 10))}, ["a", "b"]) == []  # 10x: not over


def test_prepare_reports_the_counts_it_writes(tmp_path, caplog):
    from passes.formats import Loaded

    rng = np.random.default_rng(0)
    y = np.array([0] * 300 + [1] * 20)
    x = rng.integers(0, 255, (len(y), 4, 4, 1), dtype=np.uint8)
    loaded = Loaded(train=(x, y), val=None, test=None,
                    source={"num_classes": 2, "channels": 1, "classes": ["common", "rare"]}, report={})
    with caplog.at_level(logging.WARNING, logger="kiln.data"):
        info = data.prepare(loaded, tmp_path, (4, 4), 0.2, 0.2, 0)
    assert info["class_counts"]["train"][1] < info["class_counts"]["train"][0]
    assert any("class 'common'" in r.getMessage() and "class 'rare'" in r.getMessage() for r in caplog.records)


# -- the train stage: the weights it used and the per-class test report ---------------------------


def test_train_records_the_weights_and_the_per_class_test_report(tmp_path):
    rng = np.random.default_rng(0)
    templates = rng.uniform(0, 255, size=(10, 8, 8, 1))
    lay = layout_at(tmp_path)
    lay.data.mkdir(parents=True)
    for split, per in (("train", [60] * 9 + [6]), ("val", [10] * 10), ("test", [10] * 10)):
        y = np.repeat(np.arange(10), per)
        x = np.clip(templates[y] * 0.7 + rng.normal(0, 40, size=(len(y), 8, 8, 1)), 0, 255).astype(np.uint8)
        np.savez(lay.data / f"{split}.npz", x=x, y=y.astype(np.int64))
    d = small_manifest()
    d["training"].update(epochs=1, class_weights="balanced")
    metrics = train.run(Project.model_validate(d), lay)
    assert metrics["class_weights"] == pytest.approx([546 / 600] * 9 + [546 / 60])
    rep = read_json(lay.metrics)["test_per_class"]
    assert list(rep["per_class"]) == [str(i) for i in range(10)]
    assert all(v["support"] == 10 for v in rep["per_class"].values())
    cm = np.array(rep["confusion"]["matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 100
    assert np.trace(cm) / 100 == pytest.approx(metrics["test_accuracy"])
    assert metrics["test_macro_f1"] == rep["macro_f1"]
