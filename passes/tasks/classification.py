"""Task ``classification``, torch side: cross-entropy on the labels, judged by top-1 accuracy
(val for training and compress, test reported). Torch-free side: kiln/tasks/classification.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from passes.support.common import accuracy, load_split

VAL_METRIC, VAL_SIGN = "val_accuracy", 1.0
SCORE_HEAD = False


def loss_fn():
    import torch

    return torch.nn.CrossEntropyLoss()


def loss(fn, out, x, y):
    return fn(out, y)


def validation(model, x, y) -> float:
    return accuracy(model, x, y)[0]


def fit_split(project, data_dir: Path, split: str):
    """Every sample of ``split``."""
    return load_split(data_dir, split)


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


def judge(project, x, y) -> Judge:
    return Judge(x, y)


def train_metrics(project, model, history: list[dict], data_dir: Path, train_samples: int) -> tuple[dict, str]:
    best = max(history, key=lambda r: r["val_accuracy"])
    test_acc, _ = accuracy(model, *load_split(data_dir, "test"))
    return ({"best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"], "test_accuracy": test_acc},
            f"val {best['val_accuracy']:.4f}, test {test_acc:.4f}")


def checkpoint(project) -> dict:
    return {}


def output_shape(project, shape: tuple[int, ...]) -> tuple[int, int]:
    return (1, project.dataset.num_classes)
