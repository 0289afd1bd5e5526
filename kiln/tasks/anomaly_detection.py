"""Task ``anomaly_detection``, torch-free: which samples are normal, the ROC AUC of an anomaly
score, and how a board's scores are judged. Torch side (the reconstruction loss, the score of a
torch model, the normal-only splits): passes/tasks/anomaly_detection.py.

An anomaly detector's kernel library ends in the per-sample anomaly score, a (1, 1) float
tensor, and its runner is run with ``--outputs``, returning every output value under
``outputs`` (one list per sample). Its ``auc`` is the ROC AUC of those scores, the test samples
of the normal classes against all others. Predictions mean nothing there (the argmax of one
value), so its agreement is the share of samples whose score is within ``SCORE_RTOL``
(relative) of the reference board's: the same int8 library on another arch computes the same
codes, and the float score head may differ in its last bits (an FMA, a summation order), never
by a thousandth.

The AUC is the area under the ROC curve of the score with anomalous samples as the positive
class: the probability that an anomalous sample scores above a normal one, ties counting one
half (the Mann-Whitney U over the product of the two counts); scikit-learn's ``roc_auc_score``
computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kiln.errors import ManifestError, ValidationError

METRIC, COLUMN = "auc", "auc"
NOTE = ("auc: ROC AUC of the board's anomaly scores (normal against anomalous test samples); "
        "agree: share of scores within kiln/tasks/anomaly_detection.py SCORE_RTOL of the reference board's")
RUNNER_OUTPUTS = "1"
SCORE_RTOL = 1e-3  # an anomaly score agrees with the reference board's within this share of it
SCORE_ATOL = 1e-9  # ... or this much (a perfect reconstruction scores 0 on both)


def normal_indices(project) -> list[int]:
    """The labels of ``project``'s normal classes (``anomaly.normal`` resolved against the
    dataset's class names); a ManifestError naming the field when they do not resolve."""
    try:
        return project.normal_indices()
    except ValueError as e:
        raise ManifestError(f"{project.name}: {e}") from e


def normal_mask(y, normal: list[int]):
    """True where label ``y`` is one of the ``normal`` class labels."""
    import numpy as np

    return np.isin(np.asarray(y), np.asarray(normal, dtype=np.int64))


def auc(anomalous, score, what: str = "the samples") -> float:
    """ROC AUC of ``score`` (higher: more anomalous) against the boolean ``anomalous`` labels;
    ties count one half. Undefined without both kinds of sample: a ValidationError saying so."""
    import numpy as np
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


def board_scores(runner: dict):
    """An anomaly detector's per-sample scores from the runner's ``outputs`` (one value per
    sample: the library's (1, 1) score head), float64 (N,)."""
    from kiln.tasks import one_output_per_sample

    return one_output_per_sample(runner, "an anomaly detector's scores",
                                 "one anomaly score per sample (the library's (1, 1) score head)")


def score_agreement(scores, reference: list | None) -> tuple[float, float]:
    """(share of samples whose score is within SCORE_RTOL of the reference board's, the largest
    relative difference); (1.0, 0.0) for the reference board itself."""
    import numpy as np

    if reference is None:
        return 1.0, 0.0
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)[: len(scores), 0]
    if len(ref) < len(scores):
        raise ValidationError(f"board returned {len(scores)} scores, the reference board {len(ref)}")
    diff = np.abs(scores - ref)
    ok = diff <= SCORE_RTOL * np.abs(ref) + SCORE_ATOL
    rel = diff / np.maximum(np.abs(ref), SCORE_ATOL)
    return float(ok.mean()) if len(ok) else 1.0, float(rel.max()) if len(rel) else 0.0


@dataclass(frozen=True)
class Scorer:
    """Scores a board's outputs against the test labels; ``normal``: the normal class labels."""

    normal: list[int]
    answer: ClassVar[str] = "outputs"

    def quality(self, req, runner: dict, y, reference: list | None) -> tuple[dict, list[tuple]]:
        scores = board_scores(runner)
        anomalous = ~normal_mask(y, self.normal)
        area = auc(anomalous, scores, f"the {len(y)} test samples sent to the board")
        agreement, rel = score_agreement(scores, reference)
        checks = [("auc", area, req.auc.min, ">=")] if req.auc else []
        return {"auc": area, "accuracy": None, "agreement_with_reference": agreement, "score_max_rel_diff": rel,
                "anomalous_samples": int(anomalous.sum()), "score_mean": {
                    "normal": float(scores[~anomalous].mean()), "anomalous": float(scores[anomalous].mean())}}, checks


def scorer(project) -> Scorer:
    return Scorer(normal_indices(project))


def details(boards: dict[str, dict]) -> list[str]:
    """The report table's per-task block: none (the AUC and the score means are the whole story)."""
    return []
