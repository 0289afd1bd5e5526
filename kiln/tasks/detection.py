"""Task ``detection``, torch-free: object centres from a FOMO-style heat map, their precision,
recall and F1, and how a board's outputs are judged. Torch side (the weighted per-cell loss,
validation F1, the compress judge): passes/tasks/detection.py; the net: kiln/nets/fomo.py.

What the board returns. The kernel library ends in the net's raw heat map: per cell of the
H/8 x W/8 grid, classes + 1 logits (background first), flattened in (C, H, W) order, a
(1, (classes + 1) * h * w) float tensor (the int8 library dequantizes its 8-bit codes). The
runner is run with ``--outputs`` so the whole map comes back.

Where post-processing runs: in the host, from the raw map (:func:`decode`). TVM compiles the
net's tensor program; the peak finding and merging below is data-dependent control flow (a
varying number of centres, a greedy merge) that Relax's static-shape kernels do not express,
and keeping it in numpy keeps every board's answer comparable bit for bit with the reference
board (the map is what must agree). Its cost is measured per frame on the host
(``postprocess_ms``) and reported beside the board's latency.

Decoding one map: softmax over the classes + 1 logits of each cell; a cell is a candidate for
class c when its probability of c is at least ``detection.threshold`` (c > 0); per class the
candidates are taken highest probability first, each one absorbing every remaining candidate
within ``detection.radius`` grid cells (Euclidean, between cell centres) into one centre, the
probability-weighted mean of the absorbed cells' centres. Centres are in grid cells: cell
(row i, column j) has its centre at (j + 0.5, i + 0.5).

Scoring: a ground-truth object's centre is (cx * w, cy * h) in the same grid units. Per image
and class, detected and true centres are matched greedily, closest pair first, each used once,
when closer than ``detection.match_distance`` grid cells: matches are true positives, the
detected centres left are false positives, the objects left false negatives. Precision
TP / (TP + FP), recall TP / (TP + FN), F1 2 TP / (2 TP + FP + FN), per class and over all
classes (micro: the counts summed); with nothing to count (no object, no detection) each is 1.
``requirements.f1`` (and ``precision``, ``recall``) gate a deploy on the overall figures.

Agreement with the reference board: the share of test images whose decoded centre sets
(class, position) are identical to the reference board's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from kiln.errors import ValidationError

METRIC, COLUMN = "f1", "f1"
NOTE = ("f1: F1 of the object centres the host decodes from the board's heat map, matched to the test objects "
        "within detection.match_distance grid cells (P, R below); agree: share of test images whose decoded "
        "centres equal the reference board's")
RUNNER_OUTPUTS = "1"
STRIDE = 8  # the heat map's grid is 1/8 of the input (kiln/nets/fomo.py)


def grid(image_size) -> tuple[int, int]:
    """(rows, columns) of the heat map for an (H, W) input."""
    return tuple(-(-int(s) // STRIDE) for s in image_size)


def objects(boxes):
    """The real rows of one image's boxes (K, 5) (padding rows, class -1, dropped), float64."""
    import numpy as np

    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    return b[b[:, 0] >= 0]


def cell_targets(y, cells: tuple[int, int]):
    """Per-cell training targets of boxes ``y`` (N, K, 5) on a (rows, columns) grid: int64
    (N, rows, columns), 0 (background) except each object's centroid cell, which holds its
    class + 1; when two objects fall in one cell the later row wins."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    rows, cols = cells
    t = np.zeros((len(y), rows, cols), dtype=np.int64)
    for k in range(y.shape[1] if y.ndim == 3 else 0):
        b = y[:, k]
        n = np.nonzero(b[:, 0] >= 0)[0]
        r = np.clip(np.floor(b[n, 2] * rows), 0, rows - 1).astype(np.int64)
        c = np.clip(np.floor(b[n, 1] * cols), 0, cols - 1).astype(np.int64)
        t[n, r, c] = b[n, 0].astype(np.int64) + 1
    return t


def softmax(logits, axis: int = 0):
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def decode(logits, threshold: float, radius: float) -> list[tuple[int, float, float, float]]:
    """Object centres of one heat map ``logits`` (classes + 1, rows, columns), background first:
    ``(class, x, y, score)`` with x, y in grid cells, sorted by class then score (highest
    first). See the module's docstring for the rule."""
    import numpy as np

    p = softmax(logits, 0)
    out = []
    for c in range(1, p.shape[0]):
        rows, cols = np.nonzero(p[c] >= threshold)
        if not len(rows):
            continue
        score = p[c, rows, cols]
        order = np.argsort(-score, kind="stable")
        xs, ys, score = cols[order] + 0.5, rows[order] + 0.5, score[order]
        left = np.ones(len(xs), dtype=bool)
        for i in range(len(xs)):
            if not left[i]:
                continue
            near = left & ((xs - xs[i]) ** 2 + (ys - ys[i]) ** 2 <= radius * radius)
            left &= ~near
            w = score[near]
            out.append((c - 1, float((xs[near] * w).sum() / w.sum()), float((ys[near] * w).sum() / w.sum()),
                        float(score[i])))
    return out


def true_centres(boxes, cells: tuple[int, int]) -> list[tuple[int, float, float]]:
    """(class, x, y) in grid cells of one image's boxes (K, 5) or its test-label list."""
    rows, cols = cells
    return [(int(b[0]), float(b[1]) * cols, float(b[2]) * rows) for b in objects(boxes)]


def match(found, truth, distance: float, classes: int):
    """Per-class (TP, FP, FN) counts, int64 (classes, 3), of detected centres ``found``
    ((class, x, y, ...)) against true ones ``truth`` ((class, x, y)) of one image."""
    import numpy as np

    counts = np.zeros((classes, 3), dtype=np.int64)
    for c in range(classes):
        f = [(x, y) for k, x, y, *_ in found if k == c]
        t = [(x, y) for k, x, y in truth if k == c]
        pairs = sorted((math.dist(a, b), i, j) for i, a in enumerate(f) for j, b in enumerate(t))
        used_f, used_t = set(), set()
        for d, i, j in pairs:
            if d <= distance and i not in used_f and j not in used_t:
                used_f.add(i)
                used_t.add(j)
        counts[c] = (len(used_f), len(f) - len(used_f), len(t) - len(used_t))
    return counts


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall and F1 of counts; 1.0 where the denominator is zero (nothing to miss)."""
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / (tp + fn) if tp + fn else 1.0,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0}


def figures(counts, names: list[str]) -> dict:
    """Overall (micro) precision, recall and F1 of per-class counts (classes, 3), the counts,
    and each class's figures by name."""
    import numpy as np

    counts = np.asarray(counts, dtype=np.int64).reshape(len(names), 3)
    tp, fp, fn = (int(v) for v in counts.sum(0))
    per_class = {n: {**prf(*map(int, counts[i])), "tp": int(counts[i, 0]), "fp": int(counts[i, 1]),
                     "fn": int(counts[i, 2])} for i, n in enumerate(names)}
    return {**prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "per_class": per_class}


def maps_of(outputs, classes: int, cells: tuple[int, int]):
    """The runner's (or a model's) flat outputs, one row per image, as heat maps float64
    (N, classes + 1, rows, columns); a ValidationError when a row is not that size."""
    import numpy as np

    try:
        a = np.asarray(outputs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"the runner's 'outputs' are not one list of numbers per image ({e})") from e
    want = (classes + 1) * cells[0] * cells[1]
    if a.ndim != 2 or a.shape[1] != want:
        raise ValidationError(f"the runner's 'outputs' have shape {a.shape}, expected (images, {want}): a heat map of "
                              f"{classes} + 1 classes on a {cells[0]}x{cells[1]} grid per image")
    if not np.isfinite(a).all():
        raise ValidationError(f"the runner's 'outputs' hold {int((~np.isfinite(a)).sum())} values that are not finite")
    return a.reshape(len(a), classes + 1, *cells)


@dataclass(frozen=True)
class Scorer:
    """Scores a board's heat maps against the test objects: ``names`` the classes, ``cells`` the
    grid, and the manifest's ``detection`` settings."""

    names: tuple[str, ...]
    cells: tuple[int, int]
    threshold: float
    radius: float
    match_distance: float
    answer: ClassVar[str] = "outputs"
    ragged_labels: ClassVar[bool] = True  # test labels are a list of objects per image (hil/validate.py)

    def detect(self, outputs) -> list[list[tuple]]:
        return [decode(m, self.threshold, self.radius) for m in maps_of(outputs, len(self.names), self.cells)]

    def score(self, found: list[list[tuple]], labels) -> dict:
        import numpy as np

        counts = np.zeros((len(self.names), 3), dtype=np.int64)
        for f, boxes in zip(found, labels):
            counts += match(f, true_centres(boxes, self.cells), self.match_distance, len(self.names))
        return figures(counts, list(self.names))

    def quality(self, req, runner: dict, y, reference: list | None) -> tuple[dict, list[tuple]]:
        import time

        outputs = runner.get("outputs")
        if outputs is None:
            raise ValidationError("the runner returned no 'outputs': a detector's heat maps are its outputs "
                                  "(run the runner with --outputs)")
        t0 = time.perf_counter()
        found = self.detect(outputs)  # the host's post-processing of every frame, timed
        post_ms = 1e3 * (time.perf_counter() - t0) / max(1, len(found))
        got = self.score(found, list(y)[: len(found)])
        if reference is None:
            agreement = 1.0
        else:
            ref = self.detect(reference)
            if len(ref) < len(found):
                raise ValidationError(f"board returned {len(found)} heat maps, the reference board {len(ref)}")
            agreement = sum(a == b for a, b in zip(found, ref)) / len(found) if found else 1.0
        checks = [(k, got[k], getattr(req, k).min, ">=") for k in ("f1", "precision", "recall")
                  if getattr(req, k, None)]
        got["centres_per_class"] = got.pop("per_class")  # not a classifier's per_class (the nightly reads that)
        return {**got, "accuracy": None, "agreement_with_reference": agreement, "postprocess_ms": post_ms,
                "objects": got["tp"] + got["fn"], "detections": got["tp"] + got["fp"]}, checks


def scorer(project) -> Scorer:
    from kiln.schema import dataset_class_names

    ds, s = project.dataset, project.detection
    return Scorer(tuple(dataset_class_names(ds)), grid(ds.image_size), s.threshold, s.radius, s.match_distance)


def _f(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def details(boards: dict[str, dict]) -> list[str]:
    """The report table's detection block: each board's F1, precision, recall, the counts, the
    board's median latency per frame and the host's post-processing per frame."""
    rows = [(n, r) for n, r in boards.items() if r.get("f1") is not None]
    if not rows:
        return []
    head = (f"{'board':<14} {'F1':>6} {'P':>6} {'R':>6} {'TP':>5} {'FP':>5} {'FN':>5} {'p50 ms':>8} "
            f"{'post ms':>8} {'total ms':>9}")
    lines = ["Detection (centres decoded by the host from the board's heat map; ms per frame)", head, "-" * len(head)]
    for n, r in rows:
        p50 = (r.get("latency_ms") or {}).get("p50")
        post = r.get("postprocess_ms")
        total = p50 + post if p50 is not None and post is not None else None
        lines.append(f"{n:<14} {_f(r['f1']):>6} {_f(r.get('precision')):>6} {_f(r.get('recall')):>6} "
                     f"{r.get('tp', 0):>5} {r.get('fp', 0):>5} {r.get('fn', 0):>5} {_f(p50, '.3f'):>8} "
                     f"{_f(post, '.3f'):>8} {_f(total, '.3f'):>9}")
    return lines
