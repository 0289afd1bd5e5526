"""Task ``classification``, torch-free: a board is judged on the runner's ``predictions`` (top-1
accuracy against the test labels; agreement: the share of predictions equal to the reference
board's). Torch side: passes/tasks/classification.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

METRIC, COLUMN, NOTE = "accuracy", "acc", None
RUNNER_OUTPUTS = "0"


@dataclass(frozen=True)
class Scorer:
    answer: ClassVar[str] = "predictions"

    def quality(self, req, runner: dict, y, reference: list | None) -> tuple[dict, list[tuple]]:
        import numpy as np

        preds = np.asarray(runner["predictions"])
        acc = float((preds == y).mean())
        agreement = 1.0 if reference is None else float((preds == np.asarray(reference[: len(preds)])).mean())
        checks = [("accuracy", acc, req.accuracy.min, ">=")] if req.accuracy else []
        return {"accuracy": acc, "agreement_with_reference": agreement}, checks


def scorer(project=None) -> Scorer:
    return Scorer()
