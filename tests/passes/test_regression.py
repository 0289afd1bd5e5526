"""Regression: the manifest's regression section and what it refuses at load, csv_table's
numeric label through the data stage (quantile strata, the training split's target statistics),
standardized targets for fitting, the loss, and the host's scoring of a board's outputs."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pydantic import ValidationError as PydanticError

from kiln.errors import PassError, ValidationError
from kiln.schema import CsvTableDataset, Project, Requirements
from kiln.tasks import regression as scoring
from passes import data, tasks
from passes.formats import csv_table
from passes.tasks import regression

APP = {
    "name": "reg",
    "requirements": {"mae": {"max": 10.0}},
    "dataset": {"format": "csv_table", "path": "table.csv", "label": "y", "features": ["a", "b"]},
    "architecture": {"family": "mlp", "widths": [8]},
    "training": {"epochs": 1, "lr": 0.01},
    "regression": {},
    "targets": ["x86-host"],
}


def manifest(**changes) -> dict:
    m = copy.deepcopy(APP)
    for key, value in changes.items():
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
    return m


def test_a_regression_section_makes_a_one_output_regressor():
    p = Project.model_validate(manifest())
    assert p.objective == "regression" and p.task.name == "regression" and p.task.loss == "mse"
    assert p.dataset.num_classes == 1 and tasks.of(p) is regression
    assert Project.model_validate(manifest(regression={"loss": "mae"})).task.loss == "mae"


@pytest.mark.parametrize("changes, field", [
    ({"requirements": {"accuracy": {"min": 0.5}}}, "requirements.accuracy"),
    ({"requirements": {"mae": {"max": 1}, "macro_f1": {"min": 0.5}}}, "requirements.macro_f1"),
    ({"requirements": {"auc": {"min": 0.5}}}, "requirements.auc"),
    ({"regression": None}, "requirements.mae"),  # a classifier asked for an MAE
    ({"regression": None, "requirements": {"rmse": {"max": 2}}}, "requirements.rmse"),
    ({"regression": {"loss": "huber"}}, "regression.loss"),
    ({"requirements": {"mae": {"max": 0}}}, "requirements.mae.max"),
    ({"architecture": {"family": "autoencoder", "widths": [8]}, "anomaly": {"normal": ["0"]},
      "dataset": {"format": "synthetic", "classes": 2, "image_size": [1, 8]},
      "requirements": {"auc": {"min": 0.5}}}, "regression:"),
    ({"dataset": {"format": "digits"}}, "dataset.format: 'digits' has class labels only"),
    ({"dataset": {**APP["dataset"], "classes": ["lo", "hi"]}}, "dataset.classes"),
    ({"training": {"epochs": 1, "lr": 0.01, "class_weights": "balanced"}}, "training.class_weights"),
    ({"architecture": {"family": "onnx", "path": "model.onnx"}}, "regression: family 'onnx' is imported"),
])
def test_a_wrong_field_is_refused_at_load_naming_it(changes, field):
    with pytest.raises(PydanticError) as e:
        Project.model_validate(manifest(**changes))
    assert field in str(e.value)


def _table(path, n: int = 200, seed: int = 0, bad: str | None = None):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = 300 + 40 * a - 25 * b + rng.normal(0, 2, n)
    lines = ["a,b,y"] + [f"{u:.6f},{v:.6f},{t:.4f}" for u, v, t in zip(a, b, y)]
    if bad is not None:
        lines[5] = f"0.1,0.2,{bad}"
    path.write_text("\n".join(lines) + "\n")
    return path


def _dataset(path) -> CsvTableDataset:
    ds = CsvTableDataset(format="csv_table", path=str(path), label="y", features=["a", "b"])
    ds._numeric = True  # what the manifest's regression section does when it loads
    return ds


def _prepared(tmp_path):
    ds = _dataset(_table(tmp_path / "t.csv"))
    out = tmp_path / "data"
    info = data.prepare(csv_table.load(ds, tmp_path / "t.csv"), out, ds.image_size, 0.2, 0.2, 0,
                        front_end=data.front_end_of(ds))
    return info, out


def test_the_data_stage_splits_numeric_labels_across_their_range_and_records_the_train_stats(tmp_path):
    info, out = _prepared(tmp_path)
    counts = info["counts"]  # about 20 % each held out (the split draws whole groups: about, not exactly)
    assert sum(counts.values()) == 200 and 25 <= counts["val"] <= 55 and 25 <= counts["test"] <= 55
    assert info["class_counts"] is None
    with np.load(out / "train.npz") as z:
        ytr = z["y"]
    assert ytr.dtype == np.float64
    assert info["target"]["mean"] == pytest.approx(ytr.mean()) and info["target"]["std"] == pytest.approx(ytr.std())
    labels = json.loads((out / "test_labels.json").read_text())
    assert all(isinstance(v, float) for v in labels)
    everything = np.concatenate([ytr, labels])
    for split in ("val", "test"):  # quantile strata: each held-out split spans the label's range
        with np.load(out / f"{split}.npz") as z:
            y = z["y"]
        assert y.min() < np.quantile(everything, 0.15) and y.max() > np.quantile(everything, 0.85)


def test_a_label_that_is_not_a_number_is_refused_naming_file_line_and_column(tmp_path):
    path = _table(tmp_path / "t.csv", bad="tall")
    with pytest.raises(PassError, match=r"t\.csv:6: column 'y': 'tall' is not a number"):
        csv_table.load(_dataset(path), path)


def test_fitting_sees_standardized_targets_and_the_loss_is_the_manifests(tmp_path):
    import torch

    _, out = _prepared(tmp_path)
    p = Project.model_validate(manifest())
    _, z = regression.fit_split(p, out, "train")
    assert z.dtype == np.float32 and abs(z.mean()) < 1e-5 and z.std() == pytest.approx(1.0, abs=1e-5)
    assert isinstance(regression.loss_fn(regression.loss_weights(p, z)), torch.nn.MSELoss)
    mae = Project.model_validate(manifest(regression={"loss": "mae"}))
    fn = regression.loss_fn(regression.loss_weights(mae, z))
    assert isinstance(fn, torch.nn.L1Loss)
    out_ = torch.tensor([[1.0], [3.0]])
    assert regression.loss(fn, out_, None, torch.tensor([0.0, 0.0])).item() == pytest.approx(2.0)


def _runner(z) -> dict:
    return {"outputs": [[float(v)] for v in z], "predictions": [0] * len(z)}


def test_the_host_scores_the_boards_standardized_outputs_in_the_labels_units():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(1)
    y = rng.normal(150, 70, 60)
    pred = y + rng.normal(0, 20, 60)
    s = scoring.Scorer(mean=150.0, std=70.0)
    z = (pred - 150.0) / 70.0
    req = Requirements.model_validate({"mae": {"max": 20.0}, "rmse": {"max": 10.0}})
    got, checks = s.quality(req, _runner(z), y, None)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, pred))
    assert got["rmse"] == pytest.approx(mean_squared_error(y, pred) ** 0.5)
    assert got["r2"] == pytest.approx(r2_score(y, pred))
    assert checks == [("mae", got["mae"], 20.0, "<="), ("rmse", got["rmse"], 10.0, "<=")]
    # another board: agreement with the reference board's outputs, within VALUE_ATOL stds
    other = z.copy()
    other[:6] += 0.05
    got2, _ = s.quality(req, _runner(other), y, _runner(z)["outputs"])
    assert got2["agreement_with_reference"] == pytest.approx(0.9)
    assert got2["value_max_abs_diff"] == pytest.approx(0.05 * 70.0)


def test_a_board_without_one_finite_output_per_sample_is_a_clear_error():
    s = scoring.Scorer(mean=0.0, std=1.0)
    req = Requirements.model_validate({"mae": {"max": 1.0}})
    with pytest.raises(ValidationError, match="no 'outputs'"):
        s.quality(req, {"predictions": [0, 0]}, np.zeros(2), None)
    with pytest.raises(ValidationError, match=r"expected \(2, 1\)"):
        s.quality(req, {"outputs": [[0.0, 1.0], [0.0, 1.0]], "predictions": [0, 0]}, np.zeros(2), None)
    with pytest.raises(ValidationError, match="not finite"):
        s.quality(req, _runner([0.0, float("nan")]), np.zeros(2), None)


def _recording(path, n: int, seed: int, gap_at: int | None = None):
    """A recording of two channels at 10 Hz whose label is a smooth function of them."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 10.0
    if gap_at is not None:
        t[gap_at:] += 5.0  # a gap: the segment ends there
    a, b = np.sin(t + seed), rng.normal(size=n)
    y = 20 + 5 * a
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("timestamp,a,b,level\n" + "".join(f"{u:.2f},{v:.5f},{w:.5f},{z:.5f}\n"
                                                     for u, v, w, z in zip(t, a, b, y)))
    return y


def test_csv_windows_gives_each_window_its_last_rows_value_and_refuses_class_folders(tmp_path):
    from kiln.schema import CsvWindowsDataset
    from passes.formats import csv_windows

    ys = [_recording(tmp_path / "rec" / f"r{i}.csv", 40, i, gap_at=25 if i == 0 else None) for i in range(3)]
    ds = CsvWindowsDataset(format="csv_windows", path=str(tmp_path / "rec"), columns=["a", "b"], label="level",
                           sample_rate=10, window=8, stride=4)
    ds._numeric = True
    assert csv_windows.infer(ds, tmp_path / "rec") == {}
    got = csv_windows.load(ds, tmp_path / "rec")
    x, y = got.train
    assert y.dtype == np.float64 and got.source["num_classes"] == 1 and got.group_by == "recording"
    # r0: segments [0, 25) and [25, 40) (the gap): windows end at rows 7, 11, ..., 23 and 32, 36; r1, r2: 7..39
    want = np.concatenate([ys[0][[7, 11, 15, 19, 23, 32, 36]], ys[1][7::4], ys[2][7::4]])
    order = np.argsort([s for s in got.sources["train"]], kind="stable")  # files in scan order: r0, r1, r2
    assert np.allclose(y[order], want, atol=1e-5)
    assert x.shape == (len(want), 8, 2)
    m = manifest(dataset={"format": "csv_windows", "path": str(tmp_path / "rec"), "columns": ["a", "b"],
                          "label": None, "sample_rate": 10, "window": 8, "stride": 4})
    with pytest.raises(PydanticError, match="dataset.label: null"):
        Project.model_validate(m)


def test_image_folders_read_a_regressors_values_from_labels_csv(tmp_path):
    from PIL import Image

    from kiln.schema import ImageFoldersDataset
    from passes.formats import image_folders

    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    rows = ["file,value"]
    for i in range(12):
        Image.fromarray(np.full((6, 6), 20 * i, np.uint8)).save(root / "a" / f"{i}.png")
        rows.append(f"a/{i}.png,{1.5 * i}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = ImageFoldersDataset(format="image_folders", path=str(root), image_size=[4, 4], color="grayscale")
    ds._numeric = True
    assert image_folders.locate(ds, None) == (root, False) and image_folders.infer(ds, root) == {}
    got = image_folders.load(ds, root)
    x, y = np.asarray(got.train[0]), got.train[1]
    assert y.dtype == np.float64 and got.source["num_classes"] == 1
    assert np.allclose(y, 1.5 * (x[:, 0, 0, 0] / 20.0))  # each image's value beside its own pixels
    assert sorted(got.sources["train"]) == sorted(f"a/{i}.png" for i in range(12))
    (root / "labels.csv").write_text("file,value\na/0.png,1\na/missing.png,2\n")
    with pytest.raises(PassError, match=r"labels\.csv:3: 'a/missing.png' is no file"):
        image_folders.load(ds, root)
    p = Project.model_validate(manifest(dataset={"format": "image_folders", "path": str(root), "image_size": [4, 4],
                                                 "color": "grayscale"}))
    assert p.dataset.num_classes == 1


def test_the_nightly_carries_a_regressors_figures_and_flags_a_rising_mae():
    from hil import history, nightly
    from hil.reports import html, schema

    lat = {k: 0.1 for k in ("p50", "p90", "p99", "mean", "min", "max")}
    result = {"accuracy": None, "mae": 43.5, "rmse": 56.1, "r2": 0.45, "latency_ms": lat,
              "model_bytes": 1000, "memory_kb": None, "latency_emulated": False}
    m = nightly.metrics({"runner": {}}, result)
    assert (m["mae"], m["rmse"], m["r2"]) == (43.5, 56.1, 0.45)
    schema.METRICS(m, "metrics", "a night")  # the kiln-nightly/1 contract takes them
    job = {"app": "diabetes", "board": "x86-host", "status": "pass", "flaky": False, "metrics": m,
           "requirements": [{"name": "mae", "measured": 43.5, "op": "<=", "limit": 55.0, "verdict": "pass"}]}
    cell = html._cell(job)
    assert "MAE 43.5" in cell and "R² 0.450" in cell
    assert history.job_metrics(job)["mae"] == 43.5
    assert history.judge("mae", 44.5, [43.5] * 5)["flagged"]  # over 1 % worse than the baseline: flagged
    assert not history.judge("mae", 40.0, [43.5] * 5)["flagged"]  # better: never
