"""Task ``regression``, torch side: the loss on standardized targets, the validation figure, the
compress judge and the train stage's figures. Torch-free side (target statistics, MAE/RMSE/R²,
scoring the board's outputs): kiln/tasks/regression.py.

A regressor is a net of the classification families whose head is one output wide (the
dataset's ``num_classes`` is 1). Every stage that fits it (train, prune and weight coding's
fine-tuning, quantize's calibration) gets the targets standardized with the training split's
mean and std (:func:`fit_split`, from data.json ``target``): the net learns ``(y - mean) / std``,
so its scale does not depend on the label's units (a price in dollars and a temperature train
alike), and its output is de-standardized wherever a figure is reported (:func:`predict`). The
loss is ``regression.loss``: MSE (default) or MAE on the standardized values.

Compress judges a candidate by its validation MAE: the figure a row is judged on must be higher
when better and its drop is bounded by ``compression.max_accuracy_drop``, so the key is the
negated MAE in target stds (``val_neg_mae_std``): a budget of 0.02 lets the MAE rise by 2 % of
the target's std. The row also records the MAE, RMSE and R² in the label's units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import Layout
from kiln.tasks.regression import figures, read_stats
from passes.support.common import load_split, to_tensor

VAL_METRIC, VAL_SIGN = "val_mae_std", -1.0  # the val MAE of the standardized targets (in target stds): lower is better
SCORE_HEAD = False  # the library ends in the net's own (standardized) output


def loss_weights(project, y_train) -> list[float] | None:
    """The loss's terms: None for MSE (``regression.loss: mse``, the default); for MAE the
    weights ``[0, 1]`` of (squared, absolute) error, what :func:`loss_fn` builds the loss from
    (the stages hand the task's loss weights to its loss, passes/support/training.py)."""
    return None if project.regression.loss == "mse" else [0.0, 1.0]


def loss_fn(weights: list[float] | None = None):
    """MSE (``weights`` None or [1, 0]) or MAE ([0, 1]) on the standardized targets."""
    import torch

    if weights is None or list(weights) == [1.0, 0.0]:
        return torch.nn.MSELoss()
    if list(weights) == [0.0, 1.0]:
        return torch.nn.L1Loss()
    raise ValueError(f"regression loss weights {weights!r}: expected None (mse) or [0, 1] (mae)")


def loss(fn, out, x, y):
    return fn(out[:, 0], y.to(out.dtype))


def _standardized(y, stats: dict) -> np.ndarray:
    return ((np.asarray(y, dtype=np.float64) - stats["mean"]) / stats["std"]).astype(np.float32)


def fit_split(project, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``split`` with their targets standardized (float32) by the training
    split's mean and std (data.json ``target``)."""
    x, y = load_split(data_dir, split)
    return x, _standardized(y, read_stats(data_dir))


def outputs(model, x: np.ndarray, batch: int = 512) -> np.ndarray:
    """``model``'s standardized outputs on samples ``x`` (as a split stores them), float64 (N,)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(to_tensor(x[i : i + batch]))[:, 0].double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def predict(model, x: np.ndarray, stats: dict) -> np.ndarray:
    """``model``'s predictions in the label's units (its outputs de-standardized)."""
    return outputs(model, x) * stats["std"] + stats["mean"]


def validation(model, x, y) -> float:
    """The MAE of the standardized targets ``y`` (in target stds): the figure fit keeps its best
    epoch by."""
    z = outputs(model, x)
    return float(np.abs(z - np.asarray(y, dtype=np.float64)).mean()) if len(z) else 0.0


def evaluate(model, x, y, stats: dict) -> dict:
    """MAE, RMSE and R² of ``model`` on samples ``x`` against values ``y`` in the label's units."""
    return figures(y, predict(model, x, stats))


@dataclass(frozen=True)
class Judge:
    """The validation split (values in the label's units) and the figure each compress row is
    judged on: the negated val MAE in target stds (higher is better, as compress needs), with the
    MAE, RMSE and R² in the label's units beside it."""

    x: Any
    y: Any
    stats: dict
    key = "val_neg_mae_std"
    name = "val -MAE/std"
    drop_key = "mae_rise_std"

    def measure(self, model) -> dict:
        got = evaluate(model, self.x, self.y, self.stats)
        return {"val_neg_mae_std": -got["mae"] / self.stats["std"], "val_mae": got["mae"], "val_rmse": got["rmse"],
                "val_r2": got["r2"]}


def judge(project, x, y) -> Judge:
    return Judge(x, y, read_stats(Layout(project.name).data))


def train_metrics(project, model, history: list[dict], data_dir: Path, train_samples: int) -> tuple[dict, str]:
    """The val and test MAE, RMSE and R² of the float model in the label's units, the target
    statistics it was standardized with, and the loss."""
    best = min(history, key=lambda r: r[VAL_METRIC])  # first of the best, as fit keeps it
    stats = read_stats(data_dir)
    val = evaluate(model, *load_split(data_dir, "val"), stats)
    test = evaluate(model, *load_split(data_dir, "test"), stats)
    metrics = {"best_epoch": best["epoch"], VAL_METRIC: best[VAL_METRIC], "loss_kind": project.regression.loss,
               "target": stats, "train_samples": train_samples,
               **{f"val_{k}": v for k, v in val.items()}, **{f"test_{k}": v for k, v in test.items()}}
    return metrics, (f"val MAE {val['mae']:.4g}, test MAE {test['mae']:.4g}, test RMSE {test['rmse']:.4g}, "
                     f"test R2 {_shown(test['r2'])}")


def _shown(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def checkpoint(project) -> dict:
    """The checkpoint says what it was trained for."""
    return {"regression": project.regression.model_dump()}


def output_shape(project, shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, 1)
