"""A detector end to end on tiny data: synthetic GTSDB scenes (two sign classes, 48x48), a fomo
net trained on their boxes, quantized to int8 and deployed to x86-host and rpi4 (qemu) through
`doit deploy`; the host decodes each board's raw heat maps into object centres and scores
precision, recall and F1 against the test objects (requirements.f1)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.tasks import detection as scoring
from tests.conftest import last_result, local_lab, run_doit, write_project

pytestmark = pytest.mark.slow

SIZE = 48


def tiny_detector(root) -> dict:
    return {"name": "tinydet", "requirements": {"f1": {"min": 0.3}},
            "dataset": {"format": "gtsdb", "path": str(root / "gtsdb"), "image_size": [SIZE, SIZE], "classes": [14, 17],
                        "synthetic": {"scenes": 120, "scene_size": [SIZE, SIZE], "sign_px": [10, 16],
                                      "max_per_scene": 3, "classes": 2},
                        "split": {"val": 0.15, "test": 0.2, "seed": 0}},
            "architecture": {"family": "fomo", "alpha": 0.25, "blocks": 4, "head_width": 16},
            "detection": {},
            "training": {"epochs": 25, "batch": 16, "lr": 0.02, "seed": 0, "threads": 1},
            "compression": {"max_accuracy_drop": 0.1, "library_bytes": False,
                            "passes": [{"quantize": {"mode": "int8", "calibration_samples": 64}}]},
            "validation": {"warmup": 1, "timeout_s": 600}, "tuning": {"trials": 0},
            "targets": ["x86-host", "rpi4"]}


def test_a_detector_deploys_int8_and_the_host_scores_the_boards_heat_maps(tmp_path):
    lab = local_lab(tmp_path, "detection")
    write_project(lab["projects"], tiny_detector(tmp_path))
    p = run_doit(lab["env"], "deploy:tinydet", timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    app = lab["build"] / "tinydet"
    labels = json.loads((app / "data" / "test_labels.json").read_text())
    metrics = json.loads((app / "metrics.json").read_text())
    assert metrics["objective"] == "detection" and metrics["test_f1"] > 0.3, metrics
    assert json.loads((app / "compress.json").read_text())["judged_on"] == "val_f1"
    s = scoring.Scorer(("14", "17"), scoring.grid((SIZE, SIZE)), 0.5, 1.5, 1.5)
    maps = {}
    for board in ("x86-host", "rpi4"):
        res = last_result(app, board)
        assert res["passed"] and res["accuracy"] is None, res
        assert res["requirements"][0]["name"] == "f1" and res["requirements"][0]["verdict"] == "pass"
        run = json.loads((app / "last" / f"{board}.json").read_text())
        outs = np.asarray(run["runner"]["outputs"], dtype=np.float64)  # what the board returned: the raw maps
        assert outs.shape == (len(run["runner"]["predictions"]), 3 * 6 * 6)
        got = s.score(s.detect(outs), labels[: len(outs)])  # the host's figure, recomputed from the outputs
        assert (res["f1"], res["precision"], res["recall"]) == pytest.approx((got["f1"], got["precision"], got["recall"]))
        assert res["f1"] > 0.3 and res["postprocess_ms"] > 0
        maps[board] = outs
    np.testing.assert_array_equal(maps["x86-host"], maps["rpi4"])  # the same int8 codes on both arches
    assert last_result(app, "rpi4")["agreement_with_reference"] == 1.0
    report = (app / "report.json").read_text()
    assert '"f1"' in report and '"postprocess_ms"' in report
    assert "Detection (centres decoded by the host" in p.stdout
