"""Task ``regression``, torch-free: the target's standardization, MAE/RMSE/R², and how a board's
outputs are judged. Torch side (the loss on standardized targets, the compress judge):
passes/tasks/regression.py.

The net is trained on standardized targets, ``(y - mean) / std`` with the training split's mean
and std, which the data stage records in data.json (``target``). Its kernel library therefore
returns the standardized value (one float per sample: the int8 graph's last output is
dequantized), and the runner is run with ``--outputs`` so every value comes back. The host
de-standardizes the board's outputs with the recorded mean and std and scores them against the
test labels (test_labels.json holds the values in the label's units): MAE, RMSE and R² (one
minus the residual sum of squares over the test labels' total sum of squares: scikit-learn's
``r2_score``). ``requirements.mae.max`` and ``requirements.rmse.max`` gate a deploy. Predictions
mean nothing here (the argmax of one value), so agreement with the reference board is the share
of outputs within ``VALUE_ATOL`` standardized units (a hundredth of the target's std) of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from kiln.errors import PassError, ValidationError

METRIC, COLUMN = "mae", "mae"
NOTE = ("mae: mean absolute error of the board's de-standardized outputs, in the label's units (RMSE, R²: below); "
        "agree: share of outputs within kiln/tasks/regression.py VALUE_ATOL target stds of the reference board's")
RUNNER_OUTPUTS = "1"
VALUE_ATOL = 1e-2  # an output agrees with the reference board's within this many target stds


def target_stats(y) -> dict:
    """The training split's target statistics data.json records (``target``): mean and std
    (a constant target gets std 1, so standardizing never divides by zero), min and max."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    if not len(y):
        raise PassError("data: the training split holds no sample, so its targets cannot be standardized")
    std = float(y.std())
    return {"mean": float(y.mean()), "std": std if std > 0 else 1.0, "min": float(y.min()), "max": float(y.max())}


def read_stats(data_dir: Path) -> dict:
    """The target statistics the data stage recorded in ``data_dir``/data.json; a PassError when
    it recorded none (data written for a classifier: rerun the data task)."""
    from kiln.artifacts import Layout, read_json

    path = Path(data_dir) / Layout.DATA_JSON
    try:
        target = read_json(path).get("target")
    except (OSError, ValueError) as e:
        raise PassError(f"{path}: cannot read the target statistics of a regressor ({e}); rerun the data task") from e
    if not target:
        raise PassError(f"{path}: no 'target' statistics (the data was split for a classifier); rerun the data task")
    return target


def figures(y, pred) -> dict:
    """MAE, RMSE and R² of predictions ``pred`` against values ``y`` (both in the label's units);
    R² is None for fewer than two samples or a constant ``y`` (undefined)."""
    import numpy as np

    y, pred = np.asarray(y, dtype=np.float64).ravel(), np.asarray(pred, dtype=np.float64).ravel()
    if y.shape != pred.shape:
        raise ValidationError(f"regression figures: {pred.size} predictions for {y.size} labels")
    if not len(y):
        return {"mae": None, "rmse": None, "r2": None}
    err = pred - y
    total = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": 1.0 - float((err ** 2).sum()) / total if len(y) > 1 and total > 0 else None}


def board_values(runner: dict):
    """A regressor's standardized outputs from the runner's ``outputs`` (one value per sample:
    the library's (1, 1) output), float64 (N,)."""
    import numpy as np

    from kiln.tasks import one_output_per_sample

    a = one_output_per_sample(runner, "a regressor's values", "one value per sample (the regressor's (1, 1) output)")
    if not np.isfinite(a).all():
        raise ValidationError(f"the runner's 'outputs' hold {int((~np.isfinite(a)).sum())} values that are not finite")
    return a


@dataclass(frozen=True)
class Scorer:
    """Scores a board's standardized outputs against the test values: ``mean``/``std``, the
    training split's target statistics the outputs are de-standardized with."""

    mean: float
    std: float
    answer: ClassVar[str] = "outputs"

    def quality(self, req, runner: dict, y, reference: list | None) -> tuple[dict, list[tuple]]:
        import numpy as np

        z = board_values(runner)
        pred = z * self.std + self.mean
        got = figures(y, pred)
        if reference is None:
            agreement, diff = 1.0, 0.0
        else:
            ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)[: len(z), 0]
            if len(ref) < len(z):
                raise ValidationError(f"board returned {len(z)} outputs, the reference board {len(ref)}")
            gap = np.abs(z - ref)
            agreement, diff = (float((gap <= VALUE_ATOL).mean()), float(gap.max() * self.std)) if len(z) else (1.0, 0.0)
        checks = []
        if getattr(req, "mae", None):
            checks.append(("mae", got["mae"], req.mae.max, "<="))
        if getattr(req, "rmse", None):
            checks.append(("rmse", got["rmse"], req.rmse.max, "<="))
        return {**got, "accuracy": None, "agreement_with_reference": agreement, "value_max_abs_diff": diff,
                "target": {"mean": self.mean, "std": self.std},
                "prediction_mean": float(pred.mean()) if len(pred) else None}, checks


def scorer(project) -> Scorer:
    """The app's Scorer, with the target statistics its data stage recorded."""
    from kiln.artifacts import Layout

    try:
        stats = read_stats(Layout(project.name).data)
    except PassError as e:
        raise ValidationError(str(e)) from e
    return Scorer(stats["mean"], stats["std"])


def _f(v, spec: str = ".4g") -> str:
    return "-" if v is None else format(v, spec)


def details(boards: dict[str, dict]) -> list[str]:
    """The report table's regression block: each board's MAE, RMSE and R² in the label's units."""
    rows = [(n, r) for n, r in boards.items() if r.get("mae") is not None]
    if not rows:
        return []
    head = f"{'board':<14} {'MAE':>10} {'RMSE':>10} {'R2':>8}"
    lines = ["Regression on the board (de-standardized by the host, in the label's units)", head, "-" * len(head)]
    lines += [f"{n:<14} {_f(r['mae']):>10} {_f(r['rmse']):>10} {_f(r.get('r2'), '.4f'):>8}" for n, r in rows]
    return lines
