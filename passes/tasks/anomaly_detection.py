"""Task ``anomaly_detection``, torch side: the reconstruction loss, the anomaly score of a torch
model, the normal-only splits, and the figures training and compress judge it by. Torch-free
side (normal labels, the ROC AUC, scoring the board's outputs): kiln/tasks/anomaly_detection.py.

An app whose net has a reconstruction objective (families autoencoder and mlperf_ad, a module
with objective reconstruction) is an anomaly detector (MLPerf Tiny's anomaly benchmark works this
way). The manifest's ``anomaly.normal`` lists its normal classes (kiln.schema.Anomaly): it is
trained, fine-tuned and calibrated on their samples only (:func:`fit_split`), and every other
class is anomalous. A sample's score is the mean squared error between the net's output and its
flattened input (the net's input features, as the model sees them: ``to_tensor``), averaged
over the features; a higher score means more anomalous. It trains on MSE against its input and
reports the validation and test MSE of the normal samples and the validation and test ROC AUC
of the score over every sample (no accuracy: there is no label to be right about).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import PassError, ValidationError
from kiln.tasks.anomaly_detection import auc, normal_indices, normal_mask  # noqa: F401  (shared with the board's scoring)
from passes.support.common import load_split, to_tensor
from passes.support.splits import open_split

VAL_METRIC, VAL_SIGN = "val_mse", -1.0  # the MSE of the normal val samples: lower is better
SCORE_HEAD = True  # the library ends in the anomaly score


def loss_fn(weights=None):
    """MSE against the input; ``weights`` is always None (training.class_weights is refused
    for this task when the manifest loads: no class to weigh)."""
    import torch

    return torch.nn.MSELoss()


def loss_weights(project, y_train) -> None:
    return None


def loss(fn, out, x, y):
    return fn(out, x.flatten(1))


def fit_split(project, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``split`` a stage fits on: only the normal classes' (the net must learn
    what normal looks like and nothing else). A split with no normal sample is a PassError
    naming it. x is memory-mapped (copy-on-write) when every sample is normal, else the normal
    ones are read into memory."""
    x, y = open_split(data_dir, split, mode="c")
    keep = normal_mask(y, normal_indices(project))
    if not keep.any():
        raise PassError(f"{Path(data_dir) / (split + '.npz')}: the {split} split holds no sample of the normal classes "
                        f"(anomaly.normal: {', '.join(project.anomaly.normal)})")
    return (x, y) if keep.all() else (x[keep], y[keep])


def scores(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """Per-sample anomaly score of ``model`` on samples ``x`` (as a split stores them): the mean
    over the features of the squared difference between the output and the flattened input,
    float64 (N,). What the kernel library's score head computes on the board."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = to_tensor(x[i : i + batch])
            out.append(((model(xb) - xb.flatten(1)) ** 2).mean(1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def reconstruction_error(model, x, batch: int = 512) -> float:
    """Mean squared error between ``model``'s output and its flattened input over samples ``x``
    (as a split stores them; the model sees ``to_tensor`` of them): the mean of the per-sample
    anomaly scores, the validation metric of autoencoders."""
    s = scores(model, x, batch)
    return float(s.mean()) if len(s) else 0.0


def validation(model, x, y) -> float:
    return reconstruction_error(model, x)


def evaluate(model, x: np.ndarray, y: np.ndarray, normal: list[int], what: str = "the samples") -> dict:
    """``mse``: the mean score of the normal samples (the reconstruction error the net was
    trained to lower); ``auc``: the ROC AUC of the score over all of them (None when they hold
    only one kind); ``samples``/``anomalous``: the counts."""
    s = scores(model, x)
    normal_ = normal_mask(y, normal)
    mse = float(s[normal_].mean()) if normal_.any() else None
    try:
        area = auc(~normal_, s, what)
    except ValidationError:
        area = None  # a tiny split with one kind: reported as None, not a failure of training
    return {"mse": mse, "auc": area, "samples": int(len(s)), "anomalous": int((~normal_).sum())}


@dataclass(frozen=True)
class Judge:
    """The validation split and the figure each compress row is judged on: the val ROC AUC of
    the anomaly score over the whole split, with the MSE of its normal samples (``normal``: the
    normal class labels)."""

    x: Any
    y: Any
    normal: list[int]
    key = "val_auc"
    name = "val AUC"
    drop_key = "auc_drop"

    def measure(self, model) -> dict:
        m = evaluate(model, self.x, self.y, self.normal, "the val split")
        if m["auc"] is None:
            raise PassError("compress: the val split holds only one kind of sample (normal or anomalous): its AUC, "
                            "what compression is judged on, is undefined (raise dataset.split.val)")
        return {"val_auc": m["auc"], "val_mse": m["mse"]}


def judge(project, x, y) -> Judge:
    return Judge(x, y, normal_indices(project))


def train_metrics(project, model, history: list[dict], data_dir: Path, train_samples: int) -> tuple[dict, str]:
    """The MSE of the normal val (best epoch) and test samples, and the ROC AUC of the score over
    the whole validation and test splits (normal against anomalous)."""
    best = min(history, key=lambda r: r["val_mse"])  # first of the best, as fit keeps it
    normal = normal_indices(project)
    val = evaluate(model, *load_split(data_dir, "val"), normal, "the val split")
    test = evaluate(model, *load_split(data_dir, "test"), normal, "the test split")
    metrics = {"best_epoch": best["epoch"], "val_mse": best["val_mse"], "normal": list(project.anomaly.normal),
               "train_samples": train_samples, "val_auc": val["auc"], "test_mse": test["mse"],
               "test_auc": test["auc"], "anomalous": {"val": val["anomalous"], "test": test["anomalous"]}}
    return metrics, (f"val mse {metrics['val_mse']:.5f}, test mse {metrics['test_mse']:.5f}, "
                     f"val auc {_shown(metrics['val_auc'])}, test auc {_shown(metrics['test_auc'])}")


def _shown(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def checkpoint(project) -> dict:
    """The checkpoint says what it was trained on."""
    return {"anomaly": {"normal": list(project.anomaly.normal), "normal_labels": normal_indices(project)}}


def output_shape(project, shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, shape[0] * shape[1] * shape[2])
