"""Anomaly detection, shared by the stages and the board validation: which samples are normal,
the anomaly score, and the ROC AUC of that score.

An app whose net has a reconstruction objective (families autoencoder and mlperf_ad, a module
with objective reconstruction) is an anomaly detector (MLPerf Tiny's anomaly benchmark works this
way). The manifest's ``anomaly.normal`` lists its normal classes (kiln.schema.Anomaly): it is
trained, fine-tuned and calibrated on their samples only (:func:`fit_split`), and every other
class is anomalous. A sample's score is the mean squared error between the net's output and its
flattened input (the net's input features, as the model sees them: ``to_tensor``), averaged
over the features; a higher score means more anomalous. The AUC is the area under the ROC
curve of the score with anomalous samples as the positive class: the probability that an
anomalous sample scores above a normal one, ties counting one half (the Mann-Whitney U over the
product of the two counts); scikit-learn's ``roc_auc_score`` computes it.

Classifiers pass through :func:`fit_split` unchanged, so the stages call it whatever the app.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.errors import ManifestError, PassError, ValidationError
from passes.support.common import load_split, to_tensor

RECONSTRUCTION = "reconstruction"


def is_detector(project) -> bool:
    """Whether ``project`` is an anomaly detector (its net's objective is reconstruction)."""
    return getattr(project.architecture, "objective", "classification") == RECONSTRUCTION


def normal_indices(project) -> list[int]:
    """The labels of ``project``'s normal classes (``anomaly.normal`` resolved against the
    dataset's class names); a ManifestError naming the field when they do not resolve."""
    try:
        return project.normal_indices()
    except ValueError as e:
        raise ManifestError(f"{project.name}: {e}") from e


def normal_mask(y: np.ndarray, normal: list[int]) -> np.ndarray:
    """True where label ``y`` is one of the ``normal`` class labels."""
    return np.isin(np.asarray(y), np.asarray(normal, dtype=np.int64))


def fit_split(project, data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``split`` a stage fits on: all of them for a classifier; for an anomaly
    detector only the normal classes' (the net must learn what normal looks like and nothing
    else). A split with no normal sample is a PassError naming it."""
    x, y = load_split(data_dir, split)
    if not is_detector(project):
        return x, y
    keep = normal_mask(y, normal_indices(project))
    if not keep.any():
        raise PassError(f"{Path(data_dir) / (split + '.npz')}: the {split} split holds no sample of the normal classes "
                        f"(anomaly.normal: {', '.join(project.anomaly.normal)})")
    return x[keep], y[keep]


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


def auc(anomalous: np.ndarray, score: np.ndarray, what: str = "the samples") -> float:
    """ROC AUC of ``score`` (higher: more anomalous) against the boolean ``anomalous`` labels;
    ties count one half. Undefined without both kinds of sample: a ValidationError saying so."""
    from sklearn.metrics import roc_auc_score

    anomalous = np.asarray(anomalous, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if anomalous.shape != score.shape:
        raise ValidationError(f"AUC of {what}: {score.size} scores for {anomalous.size} labels")
    n_anom = int(anomalous.sum())
    if n_anom == 0 or n_anom == anomalous.size:
        kind = "anomalous" if n_anom == 0 else "normal"
        raise ValidationError(f"AUC of {what}: the {anomalous.size} samples hold no {kind} sample, so the AUC is "
                              "undefined (more samples, or a split with both kinds)")
    if not np.isfinite(score).all():
        raise ValidationError(f"AUC of {what}: {int((~np.isfinite(score)).sum())} scores are not finite")
    return float(roc_auc_score(anomalous, score))


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
