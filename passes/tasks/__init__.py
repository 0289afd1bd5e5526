"""Tasks' torch side, one module per task, named by the task's settings model
(kiln/schema/tasks.py ``implementation``); the torch-free side (scoring the board's outputs,
the report's column) is kiln/tasks/<task>.py. A module has

* ``loss_fn(weights)`` and ``loss(loss_fn, out, x, y)``: the training loss of a batch (``x``
  the augmented input the net saw, ``y`` the labels); ``loss_weights(project, y_train)``: the
  per-class weights ``training.class_weights`` gives (None: unweighted);
* ``VAL_METRIC``, ``VAL_SIGN``: the validation figure a fit keeps its best epoch by (higher is
  better times the sign), ``validation(model, x, y) -> float`` measuring it;
* ``fit_split(project, data_dir, split) -> (x, y)``: the samples the stages fit on;
* ``judge(project, x, y) -> Judge``: how compress judges a candidate (``key``, ``name``,
  ``drop_key``, ``measure(model) -> dict``);
* ``train_metrics(project, model, history, data_dir, train_samples) -> (metrics, summary)``
  and ``checkpoint(project) -> dict``: what the train stage records;
* ``SCORE_HEAD``: whether the exported graph ends in a score behind the net;
* ``output_shape(project, shape)``: what the net must return for a (1, C, H, W) input.

The stages ask the project's task (:func:`of`) and never branch on which it is.
"""

from __future__ import annotations

from kiln.registry import implementation
from kiln.schema import TASKS, task_for
from passes.tasks import anomaly_detection, classification, detection, regression  # noqa: F401  (the stages' sources, kiln.sources)

LOSSES = tuple(t.objective for t in TASKS)  # what training.fit's ``loss`` names: the net's objective


def of(project):
    """The torch module of ``project``'s task."""
    return implementation(project.task)


def by_objective(objective: str):
    """The torch module of the task a net of ``objective`` is trained for."""
    return implementation(task_for(objective))


def fit_split(project, data_dir, split: str):
    """The samples of ``split`` the stages fit on (an anomaly detector's: the normal ones)."""
    return of(project).fit_split(project, data_dir, split)
