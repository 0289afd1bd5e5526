"""Task ``classification``, torch-free: a board is judged on the runner's ``predictions`` (top-1
accuracy against the test labels; agreement: the share of predictions equal to the reference
board's), and the host adds the per-class truth Edge Impulse shows in every test report: each
class's recall (its accuracy: the share of its samples predicted as it), precision and F1, the
confusion matrix and the macro-F1 (:func:`per_class`, the same figures scikit-learn's
``classification_report`` gives). ``requirements.macro_f1`` and ``requirements.class_recall``
gate a deploy on them. The train stage records the same report of the float model on the test
split (metrics.json ``test_per_class``). Torch side: passes/tasks/classification.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kiln.errors import PassError, ValidationError

METRIC, COLUMN, NOTE = "accuracy", "acc", None
RUNNER_OUTPUTS = "0"
WORST = 3  # classes of lowest recall the terminal table names per board (every class: report.json)


def per_class(y, preds, classes: list[str] | None = None) -> dict:
    """The per-class report of predictions ``preds`` against labels ``y``: ``macro_f1``,
    ``per_class`` (class name -> support, predicted, recall, precision, f1) and ``confusion``
    (``matrix[i][j]``: samples of true class i predicted as j, in the order of ``classes``).

    A class with no sample has no recall (None); a class never predicted has precision 0 when it
    has samples (None when it has none either); F1 is 0 where precision and recall are. The
    macro-F1 averages F1 over the classes that occur in ``y`` or ``preds`` (scikit-learn's
    ``f1_score(average="macro")``). A label beyond ``classes`` (a bug of the board's library)
    gets a row and column named by its index."""
    import numpy as np

    y, p = np.asarray(y, dtype=np.int64).ravel(), np.asarray(preds, dtype=np.int64).ravel()
    if y.shape != p.shape:
        raise ValidationError(f"per-class report: {p.size} predictions for {y.size} labels")
    names = [str(c) for c in classes] if classes is not None else []
    k = max(len(names), int(y.max(initial=-1)) + 1, int(p.max(initial=-1)) + 1)
    if (y < 0).any() or (p < 0).any():
        raise ValidationError("per-class report: a negative class label or prediction")
    names += [str(i) for i in range(len(names), k)]
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, p), 1)
    support, predicted, tp = cm.sum(1), cm.sum(0), np.diag(cm)
    rows, f1s = {}, []
    for i, name in enumerate(names):
        recall = float(tp[i] / support[i]) if support[i] else None
        precision = float(tp[i] / predicted[i]) if predicted[i] else (0.0 if support[i] else None)
        f1 = None
        if support[i] or predicted[i]:
            r, q = recall or 0.0, precision or 0.0
            f1 = 2 * r * q / (r + q) if r + q else 0.0
            f1s.append(f1)
        rows[name] = {"support": int(support[i]), "predicted": int(predicted[i]), "recall": recall,
                      "precision": precision, "f1": f1}
    return {"macro_f1": float(np.mean(f1s)) if f1s else None, "per_class": rows,
            "confusion": {"classes": names, "matrix": cm.tolist(), "rows": "true class",
                          "columns": "predicted class"}}


def loss_weights(spec, classes: list[str], train_counts) -> list[float] | None:
    """The cross-entropy's per-class weights for ``training.class_weights`` (``spec``): None
    (unset: every class alike), "balanced" (scikit-learn's: ``n_samples / (n_classes *
    count_c)`` over the training split's ``train_counts``), a list (one per class, in class
    order) or a mapping class name -> weight (classes not named weigh 1). The manifest's names
    and length are checked when it loads (kiln.schema.Classification.check); here again, since
    the classes of a format that infers them are known only by then."""
    import numpy as np

    if spec is None:
        return None
    counts = np.asarray(train_counts, dtype=np.float64)
    if spec == "balanced":
        if len(counts) != len(classes) or (counts == 0).any():
            missing = [classes[i] for i in np.flatnonzero(counts == 0)] if len(counts) == len(classes) else classes
            raise PassError(f"training.class_weights: balanced needs training samples of every class; none of "
                            f"{', '.join(missing)}")
        return (counts.sum() / (len(counts) * counts)).tolist()
    problem = class_weights_problem(spec, classes)
    if problem:
        raise PassError(problem)
    if isinstance(spec, dict):
        return [float(spec.get(c, 1.0)) for c in classes]
    return [float(w) for w in spec]


def shown(names: list[str], most: int = 12) -> str:
    """Class names for a message: the first ``most``, then how many more."""
    more = f", ... ({len(names)} classes)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def class_weights_problem(spec, classes: list[str]) -> str | None:
    """Why ``training.class_weights`` does not fit ``classes`` (a message naming the field), or None."""
    if isinstance(spec, list) and len(spec) != len(classes):
        return (f"training.class_weights: {len(spec)} weights for {len(classes)} classes ({shown(classes)}): "
                "a list gives one weight per class, in class order (or name them: {class: weight})")
    if isinstance(spec, dict):
        unknown = [n for n in spec if n not in classes]
        if unknown:
            return (f"training.class_weights.{unknown[0]}: '{unknown[0]}' is not a class of the dataset "
                    f"(classes: {shown(classes)})")
    return None


def class_limits(req, classes: list[str]) -> dict[str, float]:
    """Each class's lowest acceptable recall under ``requirements.class_recall`` (``per_class``
    over ``min``); classes without one are left out."""
    cr = getattr(req, "class_recall", None)
    if cr is None:
        return {}
    per = cr.per_class or {}
    out = {c: per.get(c, cr.min) for c in classes}
    return {c: v for c, v in out.items() if v is not None}


@dataclass(frozen=True)
class Scorer:
    """Scores a board's predictions against the test labels; ``classes``: the class names in
    label order (None: named by index)."""

    classes: tuple[str, ...] | None = None
    answer: ClassVar[str] = "predictions"

    def quality(self, req, runner: dict, y, reference: list | None) -> tuple[dict, list[tuple]]:
        import numpy as np

        preds = np.asarray(runner["predictions"])
        acc = float((preds == y).mean())
        agreement = 1.0 if reference is None else float((preds == np.asarray(reference[: len(preds)])).mean())
        report = per_class(y, preds, list(self.classes) if self.classes is not None else None)
        checks = [("accuracy", acc, req.accuracy.min, ">=")] if req.accuracy else []
        if getattr(req, "macro_f1", None):
            checks.append(("macro_f1", report["macro_f1"] or 0.0, req.macro_f1.min, ">="))
        for name, limit in class_limits(req, list(report["per_class"])).items():
            recall = report["per_class"][name]["recall"]
            if recall is None:
                raise ValidationError(f"requirements.class_recall: class '{name}' has no sample among the {len(y)} "
                                      "test samples sent to the board, so its recall cannot be judged: raise "
                                      "validation.samples (or leave validation.samples unset: the whole test split)")
            checks.append((f"class_recall.{name}", recall, limit, ">="))
        return {"accuracy": acc, "agreement_with_reference": agreement, **report}, checks


def scorer(project=None) -> Scorer:
    if project is None:
        return Scorer()
    from kiln.schema.datasets import dataset_class_names  # kiln.schema imports this module

    names = dataset_class_names(project.dataset)
    return Scorer(tuple(names) if names is not None else None)


# -- the terminal's per-class block --------------------------------------------------------------

def _f(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def details(boards: dict[str, dict]) -> list[str]:
    """The report table's per-class block: per board, its macro-F1 and the ``WORST`` classes of
    lowest recall (every class's recall, precision, F1 and the confusion matrix: report.json)."""
    rows = [(n, r) for n, r in boards.items() if r.get("per_class")]
    if not rows:
        return []
    head = f"{'board':<14} {'macro-F1':>8}  lowest recall (class recall)"
    lines = ["Per class on the board (recall, precision, F1 and the confusion matrix of every class: report.json)",
             head, "-" * len(head)]
    for name, r in rows:
        ranked = sorted(((v["recall"], c) for c, v in r["per_class"].items() if v["recall"] is not None))
        worst = ", ".join(f"{c} {rec:.4f}" for rec, c in ranked[:WORST])
        lines.append(f"{name:<14} {_f(r.get('macro_f1')):>8}  {worst}")
    return lines


def report_lines(report: dict, matrix_max: int = 12) -> list[str]:
    """A per-class report (:func:`per_class`'s) as a table: one row per class (support, recall,
    precision, F1), the macro-F1, and the confusion matrix when it has at most ``matrix_max``
    classes (wider ones stay in the JSON)."""
    classes = list(report["per_class"])
    width = max([5, *map(len, classes)])
    lines = [f"{'class':<{width}} {'support':>7} {'recall':>7} {'precision':>9} {'F1':>7}"]
    for c, v in report["per_class"].items():
        lines.append(f"{c:<{width}} {v['support']:>7} {_f(v['recall']):>7} {_f(v['precision']):>9} {_f(v['f1']):>7}")
    lines.append(f"{'macro-F1':<{width}} {'':>7} {'':>7} {'':>9} {_f(report['macro_f1']):>7}")
    if len(classes) <= matrix_max:
        m = report["confusion"]["matrix"]
        cell = max([4, *(len(str(v)) for row in m for v in row), *map(len, classes)]) + 1
        lines.append("confusion matrix (rows: true class, columns: predicted class)")
        lines.append(" " * width + "".join(f"{c:>{cell}}" for c in classes))
        lines += [f"{c:<{width}}" + "".join(f"{v:>{cell}}" for v in row) for c, row in zip(classes, m)]
    return lines
