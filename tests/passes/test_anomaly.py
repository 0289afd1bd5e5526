"""Anomaly detection: the manifest's anomaly section, the score and its AUC, an autoencoder app
trained and compressed on its normal samples only through ``doit compress``, and the board
validation of its scores (auc.min, score agreement with the reference board)."""

from __future__ import annotations

import copy
import itertools
import json
import os

import numpy as np
import pytest

from hil import validate
from hil.reports import deploy as report
from kiln.errors import ManifestError, ValidationError
from kiln.schema import Project, Requirements
from kiln.tasks.anomaly_detection import Scorer
from passes import tasks
from passes.tasks import anomaly_detection as anomaly
from tests.conftest import run_doit, write_project

APP = {  # 3 synthetic classes of 32 values; class "0" is normal, "1" and "2" are anomalies
    "name": "ad",
    "requirements": {"auc": {"min": 0.8}},
    "dataset": {"format": "synthetic", "channels": 1, "classes": 3, "image_size": [1, 32], "per_class": 60,
                "test_per_class": 20, "seed": 0, "split": {"val": 0.2, "test": 0.2, "seed": 0}},
    "architecture": {"family": "autoencoder", "widths": [16], "bottleneck": 4},
    "training": {"epochs": 40, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
    "compression": {"max_accuracy_drop": 0.1, "library_bytes": True, "passes": [
        {"prune": {"method": "structured", "amount": 0.25, "finetune_epochs": 1}},
        {"quantize": {"mode": "int8", "calibration_samples": 64}}]},
    "anomaly": {"normal": ["0"]},
    "targets": ["x86-host"],
}


def app(**changes) -> dict:
    data = copy.deepcopy(APP)
    data.update(changes)
    return data


# --- the AUC and the score ----------------------------------------------------------------------


def brute_auc(anomalous, score) -> float:
    """Every (anomalous, normal) pair: 1 when the anomaly scores higher, 1/2 on a tie."""
    pos = [s for a, s in zip(anomalous, score) if a]
    neg = [s for a, s in zip(anomalous, score) if not a]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auc_is_the_pair_count_with_ties_as_halves():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(2, 40))
        labels = rng.random(n) < 0.4
        labels[0], labels[1] = True, False  # both kinds
        score = rng.integers(0, 5, n).astype(float)  # few values: many ties
        assert anomaly.auc(labels, score) == pytest.approx(brute_auc(labels, score), abs=1e-12), trial
    # orientation: anomalies scoring higher is 1, lower is 0, all tied is one half
    assert anomaly.auc([True, False, True], [3.0, 1.0, 2.0]) == 1.0
    assert anomaly.auc([True, False, True], [0.0, 1.0, 0.5]) == 0.0
    assert anomaly.auc([True, False], [2.0, 2.0]) == 0.5


def test_auc_without_both_kinds_is_an_error_that_says_so():
    with pytest.raises(ValidationError, match="hold no anomalous sample, so the AUC is undefined"):
        anomaly.auc([False, False], [0.1, 0.2], "the val split")
    with pytest.raises(ValidationError, match="hold no normal sample"):
        anomaly.auc([True, True], [0.1, 0.2])
    with pytest.raises(ValidationError, match="not finite"):
        anomaly.auc([True, False], [np.nan, 0.2])


def test_score_is_the_per_sample_mean_squared_reconstruction_error():
    import torch

    class Half(torch.nn.Module):  # reconstructs half of its input
        def forward(self, x):
            return x.flatten(1) * 0.5

    x = np.zeros((3, 1, 4, 1), np.uint8)
    x[1] = 255
    x[2, 0, :2] = 255
    s = anomaly.scores(Half(), x)
    # (1 - 0.5)^2 = 0.25 where the value is 1 (255): mean over the 4 features
    assert s.dtype == np.float64 and s == pytest.approx([0.0, 0.25, 0.125])
    m = anomaly.evaluate(Half(), x, np.array([0, 1, 1]), [0])
    assert m == {"mse": 0.0, "auc": 1.0, "samples": 3, "anomalous": 2}
    assert anomaly.evaluate(Half(), x, np.array([1, 1, 1]), [0])["auc"] is None  # one kind only


# --- the manifest ---------------------------------------------------------------------------------


def _refused(data: dict, match: str):
    with pytest.raises(ValueError, match=match):
        Project.model_validate(data)


def test_the_manifest_says_which_classes_are_normal():
    p = Project.model_validate(app())
    assert p.objective == "reconstruction" and p.normal_indices() == [0]
    assert Project.model_validate(app(anomaly={"normal": [2, 1]})).normal_indices() == [2, 1]  # YAML ints: indices
    _refused(app(anomaly=None), r"anomaly.normal: family 'autoencoder' has a reconstruction objective.*normal classes")
    _refused(app(anomaly={"normal": ["7"]}), r"anomaly.normal.0: '7' is not a class of the dataset \(classes: 0, 1, 2\)")
    _refused(app(anomaly={"normal": ["0", "1", "2"]}), "every class .* is normal: no anomalous samples")
    _refused(app(anomaly={"normal": []}), "at least 1 item")
    _refused(app(anomaly={"normal": ["0", 0]}), "a class is listed twice")
    _refused(app(requirements={"accuracy": {"min": 0.5}}), r"requirements.accuracy: .*reconstruction objective.*auc")
    classifier = app(architecture={"family": "mlp", "widths": [8]}, anomaly=None)
    assert Project.model_validate(dict(classifier, requirements={"accuracy": {"min": 0.5}})).anomaly is None
    _refused(classifier, r"requirements.auc: family 'mlp' is a classifier")
    _refused(dict(classifier, requirements={}, anomaly={"normal": ["0"]}), "anomaly: family 'mlp' is a classifier")


def test_a_bad_anomaly_section_is_refused_when_the_manifest_loads(kiln_env):
    from kiln import config

    write_project(kiln_env["projects"], app(anomaly={"normal": ["3"]}))
    with pytest.raises(ManifestError, match=r"(?s)project.yaml: invalid.*anomaly.normal.0: '3' is not a class"):
        config.load_project("ad")


def test_fit_split_keeps_the_normal_samples_of_a_detector_only(tmp_path):
    y = np.array([0, 1, 2, 0, 2, 0])
    np.savez(tmp_path / "train.npz", x=np.arange(6, dtype=np.uint8).reshape(6, 1, 1, 1), y=y)
    x, yy = tasks.fit_split(Project.model_validate(app()), tmp_path, "train")
    assert yy.tolist() == [0, 0, 0] and x.ravel().tolist() == [0, 3, 5]
    x, yy = tasks.fit_split(Project.model_validate(app(anomaly={"normal": ["1", "2"]})), tmp_path, "train")
    assert yy.tolist() == [1, 2, 2]
    classifier = Project.model_validate(app(architecture={"family": "mlp", "widths": [8]}, anomaly=None, requirements={}))
    assert len(tasks.fit_split(classifier, tmp_path, "train")[1]) == 6
    np.savez(tmp_path / "val.npz", x=np.zeros((2, 1, 1, 1), np.uint8), y=np.array([1, 2]))
    with pytest.raises(Exception, match=r"val.npz: the val split holds no sample of the normal classes \(anomaly.normal: 0\)"):
        tasks.fit_split(Project.model_validate(app()), tmp_path, "val")


def test_compression_is_judged_on_the_val_auc():
    from passes.compress import _budget_failures

    val = anomaly.Judge(None, None, [0])
    proj = Project.model_validate(app())
    assert val.key == "val_auc"
    base, final = {"val_auc": 0.95, "weight_bytes": 100}, {"val_auc": 0.80, "size_bytes": 50, "coded_bytes": None}
    (msg,) = _budget_failures(proj, base, final, val)
    assert msg.startswith("val AUC dropped 0.1500 (0.9500 -> 0.8000), over compression.max_accuracy_drop 0.1")


# --- end to end: doit compress of an autoencoder app -----------------------------------------


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The tiny anomaly-detection app through ``doit compress`` (data, train, compress)."""
    root = tmp_path_factory.mktemp("ad")
    write_project(root / "projects", APP)
    env = dict(os.environ, KILN_PROJECTS=str(root / "projects"), KILN_BUILD=str(root / "build"), OMP_NUM_THREADS="1")
    p = run_doit(env, "compress:ad", timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return root / "build" / "ad"


def test_an_autoencoder_app_trains_on_normal_samples_and_compresses(compressed):
    import torch

    data = json.loads((compressed / "data" / "data.json").read_text())
    metrics = json.loads((compressed / "metrics.json").read_text())
    normal_train = data["class_counts"]["train"][0]
    assert metrics["train_samples"] == normal_train < data["counts"]["train"]  # class 0's samples only
    assert metrics["normal"] == ["0"] and metrics["anomalous"]["test"] == 40
    assert metrics["val_auc"] > 0.8 and metrics["test_auc"] > 0.8, metrics  # anomalies reconstruct worse
    assert "val_accuracy" not in metrics and 0 < metrics["test_mse"] < 0.05

    comp = json.loads((compressed / "compress.json").read_text())
    rows = comp["passes"]
    assert [r["pass"] for r in rows] == ["baseline", "prune", "quantize"]
    assert comp["judged_on"] == "val_auc" and "accuracy_drop" not in comp
    assert comp["auc_drop"] == pytest.approx(rows[0]["val_auc"] - rows[-1]["val_auc"])
    for r in rows:
        assert "val_accuracy" not in r and r["val_auc"] > 0.8 and r["val_mse"] > 0 and r["library_bytes"] > 0
    assert rows[1]["params"] < rows[0]["params"] and rows[2]["weight_bytes"] < rows[1]["weight_bytes"]

    ckpt = torch.load(compressed / "compressed.pt", weights_only=False)
    assert ckpt["quantization"]["calibration"]["samples"] == normal_train  # calibrated on normal samples only
    assert ckpt["anomaly"] == {"normal": ["0"], "normal_labels": [0]}


# --- on the board ----------------------------------------------------------------------------------

REQ = Requirements.model_validate({"auc": {"min": 0.9}, "agreement": {"min": 0.99}, "latency_ms": {"p99_max": 5}})


def board(scores, lat_us=1000, outputs=True) -> dict:
    out = {"predictions": [0] * len(scores), "latencies_us": [lat_us] * len(scores), "count": len(scores),
           "peak_rss_kb": 1000}
    if outputs:
        out["outputs"] = [[s] for s in scores]
    return out


LABELS = [0, 1, 0, 2, 0, 1]  # normal: 0


def test_board_auc_from_its_scores_against_the_requirement():
    good = [0.01, 0.5, 0.02, 0.4, 0.03, 0.6]
    res = validate.evaluate(REQ, board(good), LABELS, 1024, False, None, task=Scorer([0]))
    assert res["auc"] == 1.0 and res["accuracy"] is None and res["passed"] and res["anomalous_samples"] == 3
    assert {c["name"]: c["verdict"] for c in res["requirements"]} == {"auc": "pass", "latency_ms.p99": "pass",
                                                                     "agreement": "pass"}
    bad = [0.5, 0.01, 0.02, 0.4, 0.03, 0.02]  # two anomalies score like normal samples
    res = validate.evaluate(REQ, board(bad), LABELS, 1024, False, good, task=Scorer([0]))
    assert res["auc"] == pytest.approx(brute_auc([y != 0 for y in LABELS], bad))
    checks = {c["name"]: c for c in res["requirements"]}
    assert checks["auc"]["verdict"] == "fail" and checks["auc"]["limit"] == 0.9
    assert checks["agreement"]["verdict"] == "fail" and res["agreement_with_reference"] == pytest.approx(3 / 6)
    rep = report.build("ad", "lab", {"b": dict(res, type="x86-host")})
    assert res["auc"] == pytest.approx(2.5 / 9)  # of 9 pairs, 2 won and 1 tied
    assert "board 'b': requirement auc not met: measured 0.2778, required >= 0.9" in rep["failures"]
    assert "auc" in report.table(rep).splitlines()[1]


def test_board_scores_agree_with_the_reference_within_a_tolerance():
    ref = [0.01, 0.5, 0.02, 0.4, 0.03, 0.6]
    near = [s * (1 + 1e-5) for s in ref]  # an FMA's worth: agrees
    res = validate.evaluate(REQ, board(near), LABELS, 1024, True, ref, task=Scorer([0]))
    assert res["agreement_with_reference"] == 1.0 and res["score_max_rel_diff"] == pytest.approx(1e-5, rel=1e-3)
    off = list(ref)
    off[1] *= 1.01
    assert validate.evaluate(REQ, board(off), LABELS, 1024, True, ref, task=Scorer([0]))["agreement_with_reference"] == \
        pytest.approx(5 / 6)


def test_a_detector_board_without_one_score_per_sample_is_an_error():
    with pytest.raises(ValidationError, match="no 'outputs'.*--outputs"):
        validate.evaluate(REQ, board([0.1] * 6, outputs=False), LABELS, 1, False, None, task=Scorer([0]))
    wide = board([0.1] * 6)
    wide["outputs"] = [[0.1, 0.2]] * 6  # the reconstruction, not the score head
    with pytest.raises(ValidationError, match=r"shape \(6, 2\), expected \(6, 1\): one anomaly score per sample"):
        validate.evaluate(REQ, wide, LABELS, 1, False, None, task=Scorer([0]))
    with pytest.raises(ValidationError, match="hold no anomalous sample"):
        validate.evaluate(REQ, board([0.1, 0.2]), [0, 0], 1, False, None, task=Scorer([0]))


def test_a_classifier_is_validated_as_before():
    req = Requirements.model_validate({"accuracy": {"min": 0.5}, "agreement": {"min": 0.9}})
    res = validate.evaluate(req, board([0] * 4, outputs=False) | {"predictions": [0, 1, 1, 1]}, [0, 1, 2, 1], 1,
                            False, [0, 1, 1, 0])
    assert res["accuracy"] == 0.75 and res["agreement_with_reference"] == 0.75 and "auc" not in res
    assert "acc" in report.table(report.build("c", "lab", {"b": dict(res, type="x")})).splitlines()[1]


def test_the_deploy_validation_of_a_detector_reads_every_board_s_scores(kiln_env):
    """hil.validate.run over two boards' last runs (as the hil task leaves them): each board's
    AUC from its ``outputs``, the emulated board's scores compared with the native one's."""
    from kiln.artifacts import Layout, write_json

    project = Project.model_validate(app(requirements={"auc": {"min": 0.9}, "agreement": {"min": 0.99}},
                                         targets=["x86-host", "rpi4"]))
    lay = Layout("ad")
    n = len(LABELS)
    write_json(lay.data / "test_labels.json", LABELS)
    write_json(lay.data / "data.json", {"test_inputs": {"dtype": "float32", "shape": [n, 1, 1, 32]}})
    scores = {"x86-host": [0.01, 0.5, 0.02, 0.4, 0.03, 0.6], "rpi4": [0.01, 0.5, 0.02, 0.4, 0.03, 0.6000001]}
    for inst, emulated in (("x86-host", False), ("rpi4", True)):
        write_json(lay.compile_json(inst), {"library_bytes": 2048})
        write_json(lay.last_run(inst), {"type": inst, "emulated": emulated, "transport": "local", "run_id": "r1",
                                        "runner": board(scores[inst]), "timings_s": {}, "uploaded_bytes": 0,
                                        "cached_bytes": 0})
    rep = validate.run(project, lay, ["x86-host", "rpi4"], [], "lab", "r1")
    assert rep["passed"], rep["failures"]
    for inst in ("x86-host", "rpi4"):
        res = rep["boards"][inst]
        assert res["auc"] == 1.0 and res["reference_board"] == "x86-host" and res["agreement_with_reference"] == 1.0
    assert 0 < rep["boards"]["rpi4"]["score_max_rel_diff"] < 1e-6
    scores["rpi4"][0] = 0.7  # a normal sample scores as the worst anomaly on the emulated board
    write_json(lay.last_run("rpi4"), dict(json.loads(lay.last_run("rpi4").read_text()), runner=board(scores["rpi4"])))
    with pytest.raises(ValidationError, match=r"board 'rpi4': requirement auc not met: measured 0.6667.*"
                                              r"board 'rpi4': requirement agreement not met: measured 0.8333"):
        validate.run(project, lay, ["x86-host", "rpi4"], [], "lab", "r2")
