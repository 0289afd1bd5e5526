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
