"""Tasks: what the net is trained to do, and so how it is trained, compressed, scored on the board
and reported. One settings model per task, listed in ``TASKS``; the task is chosen by the net's
``objective`` (a family's class variable, family module's field): "classification" is the task
``classification``, "reconstruction" the task ``anomaly_detection``, whose settings are the
manifest's ``anomaly`` section, and a classification family with a ``regression`` section has
the objective "regression", the task ``regression``; "detection" (family fomo) is the task
``detection``, whose settings are the manifest's ``detection`` section. A task names its torch side (``implementation``,
passes/tasks/<task>.py: loss, training metric, the compress judge, the samples stages fit on) and
holds its torch-free side in ``scoring`` (kiln/tasks/<task>.py: how validate scores the board's
outputs, the report's column), as a front end names passes/frontends/<kind>.py and holds
kiln/frontends/<kind>.py. ``refuses`` maps a manifest path this task does not accept (another
task's requirement or section) to why; ``Project`` refuses it when the manifest loads."""

from __future__ import annotations

from types import ModuleType
from typing import Any, ClassVar, Literal, get_args

from pydantic import Field, field_validator

from kiln.schema.base import Strict
from kiln.schema.datasets import dataset_class_names
from kiln.tasks import anomaly_detection as _anomaly_detection, classification as _classification
from kiln.tasks import detection as _detection, regression as _regression


class _TaskBase(Strict):
    name: ClassVar[str]
    implementation: ClassVar[str]  # passes/tasks/<name>.py (torch)
    scoring: ClassVar[ModuleType]  # kiln/tasks/<name>.py (torch-free)
    objective: ClassVar[str]  # the net objective that selects this task
    section: ClassVar[str | None] = None  # the manifest section holding its settings (None: it has none)
    missing: ClassVar[str] = ""  # why a manifest without that section is refused ({family}: the family)
    refuses: ClassVar[dict[str, str]] = {}  # manifest path it does not accept -> why ({family})

    def check(self, project) -> None:
        """What only the whole manifest can tell (called when it loads)."""


class Classification(_TaskBase):
    """Classification: cross-entropy on the labels (weighted per class by
    ``training.class_weights``), judged by top-1 accuracy, and by macro-F1 and each class's
    recall where the requirements ask (no manifest section)."""

    name: ClassVar[str] = "classification"
    implementation: ClassVar[str] = "passes.tasks.classification"
    scoring: ClassVar[ModuleType] = _classification
    objective: ClassVar[str] = "classification"
    refuses: ClassVar[dict[str, str]] = {
        "requirements.auc": "requirements.auc: family '{family}' is a classifier; auc applies to anomaly detection "
                            "(a reconstruction objective, e.g. family autoencoder); require accuracy",
        "anomaly": "anomaly: family '{family}' is a classifier; anomaly applies to a reconstruction objective only "
                   "(e.g. family autoencoder)",
        "requirements.mae": "requirements.mae: the app is a classifier (no regression section); mae applies to a "
                            "regressor: add regression: {} to predict a number, or require accuracy",
        "requirements.rmse": "requirements.rmse: the app is a classifier (no regression section); rmse applies to a "
                             "regressor: add regression: {} to predict a number, or require accuracy",
        **{f"requirements.{k}": f"requirements.{k}: family '{{family}}' is a classifier; {k} of object centres "
                                f"applies to a detector (family fomo); require accuracy or macro_f1"
           for k in ("f1", "precision", "recall")},
        "detection": "detection: family '{family}' is a classifier; detection applies to a detector (family fomo)",
    }

    def check(self, project) -> None:
        """The class names ``training.class_weights`` and ``requirements.class_recall.per_class``
        give (and a list's length) against the data's classes, when they are known (listed, or a
        format whose classes are indices); inferred ones once kiln.config has inferred them."""
        names = dataset_class_names(project.dataset)
        if names is None:
            return
        problem = _classification.class_weights_problem(project.training.class_weights, names)
        if problem:
            raise ValueError(problem)
        recall = project.requirements.class_recall
        unknown = [n for n in (recall.per_class or {}) if n not in names] if recall else []
        if unknown:
            raise ValueError(f"requirements.class_recall.per_class.{unknown[0]}: '{unknown[0]}' is not a class of "
                             f"the dataset (classes: {_classification.shown(names)})")


class Anomaly(_TaskBase):
    """Anomaly detection, for a net whose objective is reconstruction (families autoencoder and
    mlperf_ad, a module with objective reconstruction; MLPerf Tiny's anomaly benchmark): it is
    trained and compressed on the ``normal`` classes' samples only; a sample's score is the mean
    squared error of its reconstruction (over the net's input features); the test AUC ranks the
    normal samples (negative) against every other class's (anomalous, positive)."""

    name: ClassVar[str] = "anomaly_detection"
    implementation: ClassVar[str] = "passes.tasks.anomaly_detection"
    scoring: ClassVar[ModuleType] = _anomaly_detection
    objective: ClassVar[str] = "reconstruction"
    section: ClassVar[str | None] = "anomaly"
    missing: ClassVar[str] = ("anomaly.normal: family '{family}' has a reconstruction objective (anomaly detection): "
                              "list the normal classes it is trained on, e.g. anomaly: {normal: [...]}; every other "
                              "class is an anomaly")
    refuses: ClassVar[dict[str, str]] = {
        "requirements.accuracy": "requirements.accuracy: family '{family}' has a reconstruction objective: its "
                                 "outputs are no classes to be right about; require auc: {min: ...} (the ROC AUC of "
                                 "the anomaly score) instead",
        "requirements.macro_f1": "requirements.macro_f1: family '{family}' has a reconstruction objective: its "
                                 "outputs are no classes to score an F1 on; require auc: {min: ...} instead",
        "requirements.class_recall": "requirements.class_recall: family '{family}' has a reconstruction objective: "
                                     "its outputs are no classes to recall; require auc: {min: ...} instead",
        "training.class_weights": "training.class_weights: family '{family}' has a reconstruction objective: its "
                                  "loss is the reconstruction error of the normal samples, with no class to weigh",
        "requirements.mae": "requirements.mae: family '{family}' has a reconstruction objective (anomaly "
                            "detection): require auc: {min: ...}; mae applies to a regressor",
        "requirements.rmse": "requirements.rmse: family '{family}' has a reconstruction objective (anomaly "
                             "detection): require auc: {min: ...}; rmse applies to a regressor",
        "regression": "regression: family '{family}' has a reconstruction objective (anomaly detection); a regressor "
                      "is a net of the classification families (mlp, cnn, ...) with a regression section",
        **{f"requirements.{k}": f"requirements.{k}: family '{{family}}' has a reconstruction objective (anomaly "
                                f"detection): require auc: {{min: ...}}; {k} applies to a detector (family fomo)"
           for k in ("f1", "precision", "recall")},
        "detection": "detection: family '{family}' has a reconstruction objective; detection applies to a detector "
                     "(family fomo)",
    }

    normal: list[str] = Field(min_length=1, description="the classes that are normal, by name (formats without "
                              "class names, gtsrb, digits and synthetic, name them by index: '0', '1', ...); "
                              "every other class is anomalous")

    @field_validator("normal", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        # YAML reads `normal: [0]` as an int: a class index named as the formats without names do
        if isinstance(v, list):
            v = [str(n) if isinstance(n, int) and not isinstance(n, bool) else n for n in v]
            if len(set(map(str, v))) != len(v):
                raise ValueError("a class is listed twice")
        return v

    def indices(self, names: list[str]) -> list[int]:
        """The labels (indices into ``names``) of the normal classes; ValueError naming the
        field when a name is not a class of the data, or when no class is left anomalous."""
        unknown = [(i, n) for i, n in enumerate(self.normal) if n not in names]
        if unknown:
            i, n = unknown[0]
            raise ValueError(f"anomaly.normal.{i}: '{n}' is not a class of the dataset (classes: {', '.join(names)})")
        if len(self.normal) >= len(names):
            raise ValueError(f"anomaly.normal: every class ({', '.join(names)}) is normal: no anomalous samples "
                             "to measure an AUC on")
        return [names.index(n) for n in self.normal]

    def check(self, project) -> None:
        """The normal class names against the data's classes, when they are known (listed, or a
        format whose classes are indices); inferred ones once kiln.config has inferred them."""
        if dataset_class_names(project.dataset) is not None:
            project.normal_indices()


class Regression(_TaskBase):
    """Regression: the net predicts one number, the dataset's numeric label (csv_table's label
    column). The manifest's ``regression`` section selects it for a net of the classification
    families (their head becomes one output wide). Targets are standardized for training with
    the training split's mean and std (data.json ``target``); the board's library returns the
    standardized value and the host de-standardizes it before scoring MAE, RMSE and R²
    (``requirements.mae`` / ``requirements.rmse`` gate a deploy); compress judges a candidate by
    its validation MAE."""

    name: ClassVar[str] = "regression"
    implementation: ClassVar[str] = "passes.tasks.regression"
    scoring: ClassVar[ModuleType] = _regression
    objective: ClassVar[str] = "regression"
    section: ClassVar[str | None] = "regression"
    missing: ClassVar[str] = "regression: family '{family}' regresses a number: add a regression section"
    refuses: ClassVar[dict[str, str]] = {
        f"requirements.{k}": f"requirements.{k}: the app is a regressor (regression section): its output is a "
                             f"number, not a class{why}; require mae: {{max: ...}} or rmse: {{max: ...}} instead"
        for k, why in (("accuracy", " to be right about"), ("macro_f1", " to score an F1 on"),
                       ("class_recall", " to recall"), ("auc", " nor an anomaly score"))
    } | {
        "training.class_weights": "training.class_weights: the app is a regressor (regression section): there is "
                                  "no class to weigh",
        "anomaly": "anomaly: the app is a regressor (regression section); anomaly applies to a reconstruction "
                   "objective only (e.g. family autoencoder)",
        **{f"requirements.{k}": f"requirements.{k}: the app is a regressor (regression section); {k} applies to a "
                                f"detector (family fomo); require mae: {{max: ...}} or rmse: {{max: ...}}"
           for k in ("f1", "precision", "recall")},
        "detection": "detection: the app is a regressor (regression section); detection applies to a detector "
                     "(family fomo)",
    }

    loss: Literal["mse", "mae"] = Field("mse", description="the training loss on the standardized targets: mse "
                                        "(mean squared error) or mae (mean absolute error, less swayed by outliers)")

    def check(self, project) -> None:
        """Kiln trains the net (an imported one's outputs are not standardized targets), the
        dataset can read a numeric label (its format's ``numeric_label``) and lists no classes;
        the dataset is then told that its label is a number (one output)."""
        ds = project.dataset
        arch = project.architecture
        if not getattr(type(arch), "trains", True):
            raise ValueError(f"regression: family '{arch.family}' is imported, not trained by Kiln: a regressor is "
                             "trained on targets standardized with the training split's statistics, which an "
                             "imported model's outputs know nothing of")
        where = getattr(type(ds), "numeric_label", None)
        if where is None:
            able = ", ".join(sorted(get_args(t.model_fields["format"].annotation)[0] for t in _numeric_formats()))
            raise ValueError(f"dataset.format: '{ds.format}' has class labels only; a regressor reads a numeric "
                             f"label from: {able}")
        if "label" in type(ds).model_fields and ds.label is None:
            raise ValueError(f"dataset.label: null reads one class per folder; a regressor reads its numeric target "
                             f"from a label column ({where}): name it")
        if getattr(ds, "classes", None):
            raise ValueError("dataset.classes: the app is a regressor (regression section): its label is a number, "
                             "not one of listed classes; leave classes out")
        ds._numeric = True


class Detection(_TaskBase):
    """Object detection as FOMO does it (kiln/nets/fomo.py): the net predicts a per-class heat
    map on the H/8 x W/8 grid; it is trained with a weighted per-cell cross-entropy against the
    objects' centroid cells (``object_weight``), and the host decodes centres from the board's
    raw map and scores their precision, recall and F1 (kiln/tasks/detection.py;
    ``requirements.f1`` etc. gate a deploy). Distances are in grid cells (8 input pixels)."""

    name: ClassVar[str] = "detection"
    implementation: ClassVar[str] = "passes.tasks.detection"
    scoring: ClassVar[ModuleType] = _detection
    objective: ClassVar[str] = "detection"
    section: ClassVar[str | None] = "detection"
    missing: ClassVar[str] = ("detection: family '{family}' is a detector: add a detection section (detection: {} "
                              "takes the defaults: threshold 0.5, radius 1.5 and match_distance 1.5 grid cells)")
    refuses: ClassVar[dict[str, str]] = {
        f"requirements.{k}": f"requirements.{k}: family '{{family}}' is a detector: its output is a heat map of "
                             f"object centres, {why}; require f1: {{min: ...}} (and precision/recall) instead"
        for k, why in (("accuracy", "not one class per image to be right about"),
                       ("macro_f1", "not one class per image (its f1 is over object centres: require f1)"),
                       ("class_recall", "not one class per image (require recall)"),
                       ("auc", "not an anomaly score"), ("mae", "not a number"), ("rmse", "not a number"))
    } | {
        "training.class_weights": "training.class_weights: family '{family}' is a detector: its loss weighs object "
                                  "cells against background by detection.object_weight",
        "anomaly": "anomaly: family '{family}' is a detector; anomaly applies to a reconstruction objective only",
        "regression": "regression: family '{family}' is a detector; a regressor is a net of the classification "
                      "families (mlp, cnn, ...) with a regression section",
    }

    threshold: float = Field(0.5, gt=0, lt=1, description="a cell is an object of class c when its softmax "
                             "probability of c is at least this")
    radius: float = Field(1.5, ge=0, le=64, description="cells of one class within this many grid cells of a "
                          "stronger one merge into one centre (1.5: a cell and its 8 neighbours)")
    match_distance: float = Field(1.5, gt=0, le=64, description="a detected centre matches a true object of its "
                                  "class within this many grid cells (one cell: 8 input pixels)")
    object_weight: float = Field(100.0, gt=0, le=1e6, description="loss weight of an object cell against a "
                                 "background cell's 1 (FOMO's object_weight: centres are a few cells of many)")

    def check(self, project) -> None:
        """The dataset holds boxes (a detection format: gtsdb, yolo, coco, voc)."""
        if getattr(type(project.dataset), "labels", "class") != "boxes":
            raise ValueError(f"dataset.format: '{project.dataset.format}' has one class label per sample; family "
                             f"'{project.architecture.family}' is a detector and needs boxes (formats gtsdb, yolo, "
                             "coco, voc)")


def label_kind_problem(project) -> str | None:
    """Why a detection dataset (boxes) does not fit a net that is no detector, or None."""
    if getattr(type(project.dataset), "labels", "class") == "boxes" and project.objective != "detection":
        return (f"architecture.family: '{project.architecture.family}' has the {project.objective} objective, but "
                f"dataset.format '{project.dataset.format}' holds boxes (object detection): use family fomo")
    return None


def _numeric_formats() -> list[type]:
    from kiln.schema.datasets import Dataset

    return [t for t in get_args(get_args(Dataset)[0]) if getattr(t, "numeric_label", None)]


# the registry of tasks; adding one is its settings model here, one entry, and its two modules
TASKS: tuple[type[_TaskBase], ...] = (Classification, Anomaly, Regression, Detection)


def task_for(objective: str) -> type[_TaskBase]:
    """The task a net of ``objective`` is trained for."""
    return next(t for t in TASKS if t.objective == objective)


def judged_by(results) -> ModuleType:
    """The scoring module (kiln/tasks/) of the task whose figure the board results hold: report
    tables are built from the results alone; the first task's when none holds one (every
    board failed)."""
    results = list(results)
    found = (t for t in TASKS if any(r.get(t.scoring.METRIC) is not None for r in results))
    return next(found, TASKS[0]).scoring
