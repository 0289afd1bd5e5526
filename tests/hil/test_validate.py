"""Host-side validation and the report: verdicts per requirement, emulated latency not enforced."""

from __future__ import annotations

import pytest

from hil import validate
from hil.reports import deploy as report
from kiln.errors import ValidationError
from kiln.schema import Requirements

REQ = Requirements.model_validate({"accuracy": {"min": 0.75}, "latency_ms": {"p50_max": 2, "p99_max": 5},
                                   "model_kb": {"max": 100}, "agreement": {"min": 0.999}})


def runner(preds, lat_us):
    return {"predictions": preds, "latencies_us": lat_us, "count": len(preds), "peak_rss_kb": 1000}


def verdicts(res):
    return {c["name"]: c["verdict"] for c in res["requirements"]}


def test_all_pass_on_native_board():
    res = validate.evaluate(REQ, runner([0, 1, 2, 3], [1000, 1000, 1500, 4000]), [0, 1, 2, 0], 50 * 1024, False, None)
    assert res["accuracy"] == 0.75 and res["passed"]
    assert res["latency_ms"]["p50"] == pytest.approx(1.25)
    assert set(verdicts(res).values()) == {"pass"}


def test_failures_are_named():
    res = validate.evaluate(REQ, runner([0, 0, 0, 0], [9000] * 4), [0, 1, 2, 3], 200 * 1024, False, [0, 1, 2, 3])
    assert verdicts(res) == {"accuracy": "fail", "latency_ms.p50": "fail", "latency_ms.p99": "fail",
                             "model_kb": "fail", "agreement": "fail"}
    assert not res["passed"] and res["agreement_with_reference"] == 0.25


def test_emulated_latency_is_reported_not_enforced():
    res = validate.evaluate(REQ, runner([0, 1], [90_000, 95_000]), [0, 1], 1024, True, [0, 1])
    assert verdicts(res)["latency_ms.p99"] == validate.NOT_ENFORCED
    assert res["latency_emulated"] and res["passed"] and res["latency_ms"]["p99"] > 90


def test_more_predictions_than_labels_is_an_error():
    with pytest.raises(ValidationError, match="3 predictions for 2 test labels"):
        validate.evaluate(REQ, runner([0, 1, 2], [1, 1, 1]), [0, 1], 1, False, None)


def test_report_lists_failed_board_and_requirement_and_keeps_others():
    ok = validate.evaluate(REQ, runner([0, 1], [1000, 1000]), [0, 1], 1024, False, None)
    bad = validate.evaluate(REQ, runner([0, 0], [1000, 1000]), [0, 1], 1024, True, [0, 1])
    ok["type"] = bad["type"] = "x"
    down = {"type": "rpi4", "error": {"step": "upload", "message": "link dropped"}}
    rep = report.build("app", "lab", {"a": ok, "b": bad, "c": down})
    assert not rep["passed"]
    assert any("board 'b': requirement accuracy not met" in f for f in rep["failures"])
    assert any("board 'c': upload failed: link dropped" in f for f in rep["failures"])
    assert rep["boards"]["a"]["passed"]
    text = report.table(rep)
    assert "PASS" in text and "FAIL" in text and "ERROR" in text and "emulation" in text


def test_a_report_on_synthetic_data_says_so_in_its_verdict_and_json():
    """A mistyped dataset.path trained on a synthetic set and the report said PASSED with no
    word of it: the verdict line and report.json now say the data was synthetic."""
    ok = validate.evaluate(REQ, runner([0, 1], [1000, 1000]), [0, 1], 1024, False, None)
    ok["type"] = "x"
    data_json = {"format": "image_folders", "params": {"dataset_root": "/b/app/synthetic"},
                 "synthetic": {"generator": "kiln synthetic image_folders", "version": 1}}
    rep = report.build("app", "lab", {"a": ok}, data_json)
    assert rep["passed"] and rep["data"] == {"synthetic": True, "source": "/b/app/synthetic",
                                             "generator": "kiln synthetic image_folders", "format": "image_folders"}
    last = report.table(rep).splitlines()[-1]
    assert last.startswith("PASSED on SYNTHETIC data (kiln synthetic image_folders at /b/app/synthetic")
    real = report.build("app", "lab", {"a": ok}, {**data_json, "synthetic": None})
    assert real["data"]["synthetic"] is False and report.table(real).splitlines()[-1] == "PASSED"


# -- per-class truth: recall, precision, F1, the confusion matrix, macro-F1 -------------------------

Y = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]       # 3 classes: 'yes' x4, 'no' x3, 'stop' x3
P = [0, 0, 0, 1, 1, 1, 2, 2, 0, 2]       # yes 3/4, no 2/3, stop 2/3 right
NAMES = ("yes", "no", "stop")


def scored(req: dict, preds=P, labels=Y):
    from kiln.tasks.classification import Scorer

    return validate.evaluate(Requirements.model_validate(req), runner(preds, [1000] * len(preds)), labels, 1024,
                             False, None, task=Scorer(NAMES))


def test_per_class_numbers_and_confusion_matrix_on_a_known_prediction_vector():
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    res = scored({})
    assert res["confusion"]["classes"] == list(NAMES)
    assert res["confusion"]["matrix"] == [[3, 1, 0], [0, 2, 1], [1, 0, 2]] == confusion_matrix(Y, P).tolist()
    yes, no, stop = (res["per_class"][n] for n in NAMES)
    assert yes == {"support": 4, "predicted": 4, "recall": 0.75, "precision": 0.75, "f1": 0.75}
    assert no["recall"] == pytest.approx(2 / 3) and no["precision"] == pytest.approx(2 / 3)
    assert stop["support"] == 3 and stop["predicted"] == 3
    ref = classification_report(Y, P, target_names=list(NAMES), output_dict=True)
    for n in NAMES:
        for ours, theirs in (("recall", "recall"), ("precision", "precision"), ("f1", "f1-score")):
            assert res["per_class"][n][ours] == pytest.approx(ref[n][theirs])
    assert res["macro_f1"] == pytest.approx(f1_score(Y, P, average="macro")) == pytest.approx((0.75 + 2 / 3 + 2 / 3) / 3)
    # a class never predicted has precision 0; one with no sample has no recall; macro-F1 as scikit-learn's
    odd = scored({}, preds=[0, 0, 0, 0, 0, 0], labels=[0, 0, 0, 1, 1, 1])
    assert odd["per_class"]["no"] == {"support": 3, "predicted": 0, "recall": 0.0, "precision": 0.0, "f1": 0.0}
    assert odd["per_class"]["stop"] == {"support": 0, "predicted": 0, "recall": None, "precision": None, "f1": None}
    assert odd["macro_f1"] == pytest.approx(f1_score([0, 0, 0, 1, 1, 1], [0] * 6, average="macro", zero_division=0))


def test_macro_f1_gates_the_deploy():
    assert verdicts(scored({"macro_f1": {"min": 0.69}})) == {"macro_f1": "pass"}
    res = scored({"macro_f1": {"min": 0.75}})
    assert verdicts(res) == {"macro_f1": "fail"} and not res["passed"]
    res["type"] = "rpi4"
    rep = report.build("kws", "lab", {"rpi4-1": res})
    assert rep["failures"] == ["board 'rpi4-1': requirement macro_f1 not met: measured 0.6944, required >= 0.75"]


def test_a_per_class_minimum_names_the_class():
    res = scored({"class_recall": {"min": 0.6, "per_class": {"yes": 0.8}}})
    assert verdicts(res) == {"class_recall.yes": "fail", "class_recall.no": "pass", "class_recall.stop": "pass"}
    res["type"] = "rpi4"
    rep = report.build("kws", "lab", {"rpi4-1": res})
    assert rep["failures"] == ["board 'rpi4-1': requirement class_recall.yes not met: measured 0.75, required >= 0.8"]
    assert verdicts(scored({"class_recall": {"per_class": {"stop": 0.6}}})) == {"class_recall.stop": "pass"}
    # a class the board got no sample of cannot be judged: said, naming the class and the setting to raise
    with pytest.raises(ValidationError, match=r"class_recall: class 'stop' has no sample among the 4 .*validation.samples"):
        scored({"class_recall": {"min": 0.5}}, preds=[0, 0, 1, 1], labels=[0, 0, 1, 1])


def test_the_terminal_table_has_a_compact_per_class_block():
    a, b = scored({"macro_f1": {"min": 0.5}}), scored({}, preds=[0] * 10)
    a["type"] = b["type"] = "rpi4"
    text = report.table(report.build("kws", "lab", {"rpi4-1": a, "rpi4-2": b}))
    block = text[text.index("Per class on the board"):].splitlines()
    assert block[1].split()[:2] == ["board", "macro-F1"]
    assert block[3].split() == ["rpi4-1", "0.6944", "no", "0.6667,", "stop", "0.6667,", "yes", "0.7500"]
    assert block[4].split() == ["rpi4-2", "0.1905", "no", "0.0000,", "stop", "0.0000,", "yes", "1.0000"]
    assert all(len(line) <= 100 for line in block[:5])


def test_the_classification_requirements_are_refused_for_an_anomaly_detector():
    from tests.passes.test_anomaly import app
    from kiln.schema import Project

    for req, name in (({"macro_f1": {"min": 0.5}}, "macro_f1"), ({"class_recall": {"min": 0.5}}, "class_recall")):
        with pytest.raises(ValueError, match=rf"requirements.{name}: family 'autoencoder' has a reconstruction objective"):
            Project.model_validate(app(requirements={"auc": {"min": 0.5}, **req}))
