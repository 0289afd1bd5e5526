"""Task ``classification``, torch side: cross-entropy on the labels (weighted per class by
``training.class_weights``), judged by top-1 accuracy (val for training and compress; compress
judges by val macro-F1 where requirements.macro_f1 is set), test reported with its per-class
report: recall, precision, F1, confusion matrix, macro-F1).
Torch-free side: kiln/tasks/classification.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.schema.datasets import dataset_class_names
from kiln.tasks.classification import loss_weights as _resolve, per_class
from passes.support.common import accuracy, load_split
from passes.support.splits import open_split

VAL_METRIC, VAL_SIGN = "val_accuracy", 1.0
SCORE_HEAD = False


def loss_fn(weights: list[float] | None = None):
    """Cross-entropy; ``weights``: one per class (:func:`loss_weights`), None: every class alike."""
    import torch

    if weights is None:
        return torch.nn.CrossEntropyLoss()
    return torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))


def class_names(project) -> list[str]:
    names = dataset_class_names(project.dataset)
    return list(names) if names is not None else [str(i) for i in range(project.dataset.num_classes)]


def loss_weights(project, y_train) -> list[float] | None:
    """The loss's per-class weights for ``training.class_weights`` on the training labels
    ``y_train`` (None when unset: today's unweighted loss)."""
    names = class_names(project)
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=len(names))
    return _resolve(project.training.class_weights, names, counts)


def loss(fn, out, x, y):
    return fn(out, y)


def validation(model, x, y) -> float:
    return accuracy(model, x, y)[0]


def fit_split(project, data_dir: Path, split: str):
    """Every sample of ``split``, x memory-mapped (copy-on-write: an in-place change stays in
    this process; passes/support/splits.py)."""
    return open_split(data_dir, split, mode="c")


@dataclass(frozen=True)
class Judge:
    """The validation split and the figure each compress row is judged on: val top-1."""

    x: Any
    y: Any
    key = "val_accuracy"
    name = "val accuracy"
    drop_key = "accuracy_drop"

    def measure(self, model) -> dict:
        return {"val_accuracy": accuracy(model, self.x, self.y)[0]}


@dataclass(frozen=True)
class MacroF1Judge:
    """The judge where the manifest asks for ``requirements.macro_f1``: each compress row is
    judged on val macro-F1, the figure the board is held to (top-1 can hold while a rare class
    is lost: on imbalanced data that is the drop that matters)."""

    x: Any
    y: Any
    classes: tuple[str, ...]
    key = "val_macro_f1"
    name = "val macro-F1"
    drop_key = "macro_f1_drop"

    def measure(self, model) -> dict:
        acc, preds = accuracy(model, self.x, self.y)
        f1 = per_class(self.y, preds, list(self.classes))["macro_f1"]
        return {"val_macro_f1": 0.0 if f1 is None else f1, "val_accuracy": acc}


def judge(project, x, y) -> Judge | MacroF1Judge:
    if project.requirements.macro_f1 is not None:
        return MacroF1Judge(x, y, tuple(class_names(project)))
    return Judge(x, y)


def train_metrics(project, model, history: list[dict], data_dir: Path, train_samples: int) -> tuple[dict, str]:
    """Best val accuracy, and on the test split the float model's accuracy, macro-F1 and
    per-class report (``test_per_class``: recall, precision, F1 per class, the confusion matrix)."""
    best = max(history, key=lambda r: r["val_accuracy"])
    x, y = load_split(data_dir, "test")
    test_acc, preds = accuracy(model, x, y)
    report = per_class(y, preds, class_names(project))
    return ({"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "test_accuracy": test_acc,
             "test_macro_f1": report["macro_f1"], "test_per_class": report},
            f"val {best['val_accuracy']:.4f}, test {test_acc:.4f}, test macro-F1 {_shown(report['macro_f1'])}")


def _shown(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def checkpoint(project) -> dict:
    return {}


def output_shape(project, shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, project.dataset.num_classes)
