"""A regressor on real data end to end: scikit-learn's diabetes table (442 patients, 10
features, the disease progression a year on: the wheel ships it) as a team's CSV with a numeric
label column, trained on standardized targets, quantized to int8 and deployed to x86-host and
rpi4 (qemu) through `doit deploy`; the host de-standardizes each board's outputs and scores MAE,
RMSE and R² against the test labels (requirements mae.max and rmse.max)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import last_result, local_lab, run_doit, write_project

pytestmark = pytest.mark.slow


def diabetes_csv(dest: Path) -> Path:
    """scikit-learn's diabetes set as one CSV: its ten (scaled) features, then ``progression``."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    rows = [",".join([*d.feature_names, "progression"])]
    rows += [",".join(f"{v:.6g}" for v in x) + f",{t:g}" for x, t in zip(d.data, d.target)]
    dest.write_text("\n".join(rows) + "\n")
    return dest


def diabetes_app(path: Path, epochs: int = 20, **extra) -> dict:
    return {"name": "diabetes", "requirements": {"mae": {"max": 55.0}, "rmse": {"max": 70.0}},
            "dataset": {"format": "csv_table", "path": str(path), "label": "progression",
                        "split": {"val": 0.15, "test": 0.2, "seed": 0}},
            "architecture": {"family": "mlp", "widths": [32, 16]},
            "training": {"epochs": epochs, "batch": 32, "lr": 0.01, "seed": 0, "threads": 2},
            "regression": {"loss": "mse"},
            "compression": {"max_accuracy_drop": 0.05, "library_bytes": False,
                            "passes": [{"quantize": {"mode": "int8", "calibration_samples": 128}}]},
            "validation": {"warmup": 1, "timeout_s": 600}, "tuning": {"trials": 0},
            "targets": ["x86-host", "rpi4"], **extra}


def test_a_regressor_deploys_int8_and_the_host_scores_the_boards_outputs(tmp_path):
    lab = local_lab(tmp_path, "regression")
    write_project(lab["projects"], diabetes_app(diabetes_csv(tmp_path / "diabetes.csv")))
    p = run_doit(lab["env"], "deploy:diabetes", timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    app = lab["build"] / "diabetes"
    target = json.loads((app / "data" / "data.json").read_text())["target"]
    labels = np.asarray(json.loads((app / "data" / "test_labels.json").read_text()))
    metrics = json.loads((app / "metrics.json").read_text())
    # learnt, against predicting the training mean (bench/regression.py puts RidgeCV beside it)
    mean_mae = float(np.abs(labels - target["mean"]).mean())
    assert metrics["test_mae"] < 0.9 * mean_mae and metrics["test_r2"] > 0.2, (metrics, mean_mae)
    compress = json.loads((app / "compress.json").read_text())
    assert compress["judged_on"] == "val_neg_mae_std" and compress["mae_rise_std"] <= 0.05
    outs = {}
    for board in ("x86-host", "rpi4"):
        res = last_result(app, board)
        assert res["passed"] and res["accuracy"] is None, res
        assert [(c["name"], c["verdict"]) for c in res["requirements"][:2]] == [("mae", "pass"), ("rmse", "pass")]
        run = json.loads((app / "last" / f"{board}.json").read_text())
        z = np.asarray(run["runner"]["outputs"], dtype=np.float64)[:, 0]  # what the board returned: standardized
        pred = z * target["std"] + target["mean"]
        y = labels[: len(pred)]
        assert res["mae"] == pytest.approx(np.abs(pred - y).mean())  # the host's figure, from the board's outputs
        assert res["r2"] == pytest.approx(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
        assert res["mae"] < 0.9 * mean_mae and res["r2"] > 0.2
        outs[board] = z
    # the same int8 library on two arches computes the same codes
    assert np.abs(outs["x86-host"] - outs["rpi4"]).max() < 1e-4
    assert last_result(app, "rpi4")["agreement_with_reference"] == 1.0
    report = (app / "report.json").read_text()
    assert '"mae"' in report and '"r2"' in report
