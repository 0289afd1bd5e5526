"""Task ``detection``, torch side: FOMO's weighted per-cell loss, the validation F1 of object
centres, the compress judge and the train stage's figures. Torch-free side (targets from boxes,
decoding the heat map, matching, P/R/F1, scoring the board's outputs): kiln/tasks/detection.py.

The net (kiln/nets/fomo.py) returns per cell of the H/8 x W/8 grid the logits of background and
each class, flattened. Every stage fits on the splits as the data stage wrote them: uint8 scenes
and their boxes (N, max_objects, 5), rows [class, cx, cy, w, h] normalized, padding -1
(:func:`fit_split` returns them as they are); the loss makes each batch's targets from its boxes:
each object's centroid cell holds its class, every other cell background (the later object wins
a cell two objects share), as FOMO trains. The loss is cross-entropy per cell, weighted: 1 for a
background cell and ``detection.object_weight`` (FOMO's object_weight, 100 by default) for an
object cell. A scene has a handful of object cells among its h x w, so unweighted the net learns
that everything is background; a fixed weight (not the inverse frequency of each split) keeps
the loss the same whatever the scenes' density, as in FOMO.

The validation figure (what fit keeps its best epoch by, and compress judges a candidate by) is
the F1 of the centres decoded with the manifest's ``detection`` settings, matched to the true
centres (kiln.tasks.detection). The training loop calls ``validation(model, x, y)`` without the
project, so :func:`fit_split` records the app's settings for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.tasks.detection import STRIDE, decode, figures, grid, match, true_centres
from passes.support.common import load_split, to_tensor

VAL_METRIC, VAL_SIGN = "val_f1", 1.0  # the val F1 of the decoded centres: higher is better
SCORE_HEAD = False  # the library ends in the net's own heat map
_SETTINGS: dict[str, Any] = {"threshold": 0.5, "radius": 1.5, "match_distance": 1.5}  # set by fit_split


def _remember(project) -> dict:
    s = project.detection
    _SETTINGS.update(threshold=s.threshold, radius=s.radius, match_distance=s.match_distance)
    return dict(_SETTINGS)


def loss_weights(project, y_train) -> list[float]:
    """The per-class weights of the cross-entropy: 1 for background (class 0 of the map), the
    manifest's ``detection.object_weight`` for every object class."""
    return [1.0] + [float(project.detection.object_weight)] * project.dataset.num_classes


def loss_fn(weights: list[float] | None = None):
    import torch

    return torch.nn.CrossEntropyLoss(weight=None if weights is None else torch.tensor(weights, dtype=torch.float32))


def targets(y, cells: tuple[int, int]):
    """Per-cell targets (N, rows, columns) int64 of a batch of boxes ``y`` (N, K, 5), torch: the
    same as kiln.tasks.detection.cell_targets (tests check both agree)."""
    import torch

    rows, cols = cells
    t = torch.zeros((y.shape[0], rows, cols), dtype=torch.int64, device=y.device)
    for k in range(y.shape[1]):
        b = y[:, k]
        n = torch.nonzero(b[:, 0] >= 0).flatten()
        r = torch.clamp(torch.floor(b[n, 2].double() * rows), 0, rows - 1).long()
        c = torch.clamp(torch.floor(b[n, 1].double() * cols), 0, cols - 1).long()
        t[n, r, c] = b[n, 0].long() + 1
    return t


def loss(fn, out, x, y):
    cells = grid(x.shape[2:])
    t = targets(y, cells)
    return fn(out.reshape(len(out), -1, *cells), t)


def fit_split(project, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The scenes of ``split`` and their boxes (N, K, 5) float32, as the data stage wrote them
    (the loss makes the cell targets batch by batch); records the app's detection settings for
    :func:`validation`."""
    _remember(project)
    return load_split(data_dir, split)


def heat_maps(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """``model``'s heat maps of scenes ``x`` (as a split stores them): float64 (N, C + 1, rows, columns)."""
    import torch

    cells = (-(-x.shape[1] // STRIDE), -(-x.shape[2] // STRIDE))
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = model(to_tensor(x[i : i + batch]))
            out.append(o.reshape(len(o), -1, *cells).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 1, *cells))


def evaluate(model, x, y, settings: dict, names: list[str]) -> dict:
    """Precision, recall and F1 (overall and per class) of ``model``'s decoded centres on
    scenes ``x`` against boxes ``y``."""
    return score_maps(heat_maps(model, x), y, settings, names)


def score_maps(maps: np.ndarray, y, settings: dict, names: list[str]) -> dict:
    """The figures of heat maps ``maps`` (N, C + 1, rows, columns) against boxes ``y``."""
    cells = maps.shape[2:]
    counts = np.zeros((len(names), 3), dtype=np.int64)
    for m, boxes in zip(maps, np.asarray(y)):
        found = decode(m, settings["threshold"], settings["radius"])
        counts += match(found, true_centres(boxes, cells), settings["match_distance"], len(names))
    return figures(counts, names)


def validation(model, x, y) -> float:
    """The F1 of the centres decoded from ``model``'s maps of the val scenes (the settings
    :func:`fit_split` recorded)."""
    maps = heat_maps(model, x)
    return score_maps(maps, y, _SETTINGS, [str(i) for i in range(maps.shape[1] - 1)])["f1"] if len(maps) else 0.0


@dataclass(frozen=True)
class Judge:
    """The val scenes and boxes, and the figure each compress row is judged on: the val F1 of
    the decoded centres, with precision and recall beside it."""

    x: Any
    y: Any
    settings: dict
    names: list[str]
    key = "val_f1"
    name = "val F1"
    drop_key = "f1_drop"

    def measure(self, model) -> dict:
        got = evaluate(model, self.x, self.y, self.settings, self.names)
        return {"val_f1": got["f1"], "val_precision": got["precision"], "val_recall": got["recall"]}


def _names(project) -> list[str]:
    from kiln.schema import dataset_class_names

    return list(dataset_class_names(project.dataset))


def judge(project, x, y) -> Judge:
    return Judge(x, y, _remember(project), _names(project))


def train_metrics(project, model, history: list[dict], data_dir: Path, train_samples: int) -> tuple[dict, str]:
    """The float model's val and test precision, recall and F1 of centres (and per class on
    the test split), the best epoch and the loss's object weight."""
    best = max(history, key=lambda r: r[VAL_METRIC])  # first of the best, as fit keeps it
    settings, names = _remember(project), _names(project)
    val = evaluate(model, *load_split(data_dir, "val"), settings, names)
    test = evaluate(model, *load_split(data_dir, "test"), settings, names)
    metrics = {"best_epoch": best["epoch"], VAL_METRIC: best[VAL_METRIC], "detection": project.detection.model_dump(),
               "train_samples": train_samples,
               **{f"val_{k}": val[k] for k in ("f1", "precision", "recall")},
               **{f"test_{k}": test[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")},
               "test_per_class": test["per_class"]}
    return metrics, (f"val F1 {val['f1']:.3f}, test F1 {test['f1']:.3f} (P {test['precision']:.3f}, "
                     f"R {test['recall']:.3f})")


def checkpoint(project) -> dict:
    """The checkpoint says what it was trained for."""
    return {"detection": project.detection.model_dump()}


def output_shape(project, shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = grid(shape[1:])
    return (1, (project.dataset.num_classes + 1) * rows * cols)
