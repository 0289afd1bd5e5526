"""Tasks' torch-free side: what a task makes of the board's outputs. One module per task
(``kiln.schema.tasks`` names it in the task's ``scoring``), as kiln/frontends/ holds the front
ends' torch-free code; the torch side (loss, training metric, the compress judge, which samples
the stages fit on) is passes/tasks/<task>.py. A module has

* ``METRIC``: the result's figure that says how right a board is (``accuracy``, ``auc``, ``mae``, ``f1``), and
  ``COLUMN``, ``NOTE``: its column in the report table and the line that explains it (or None);
* ``RUNNER_OUTPUTS``: the runner's ``--outputs`` value (``"1"``: every output value comes back,
  as an anomaly detector's scores must);
* ``scorer(project) -> Scorer``: ``answer`` (the runner key compared with the reference board's)
  and ``quality(req, runner, y, reference) -> (figures, checks)``, checks as ``(requirement,
  measured, limit, op)``: how validate scores one board (hil/validate.py);
* ``details(boards) -> lines``: what the terminal report adds below its table (a classifier's
  per-class block; none for an anomaly detector).

numpy is imported inside the functions: the schema names these modules and a manifest loads
without it.
"""

from __future__ import annotations

from kiln.errors import ValidationError


def one_output_per_sample(runner: dict, whose: str, what: str):
    """The runner's ``outputs`` as float64 (N,): one value per sample, the library's (1, 1)
    output (an anomaly detector's score, a regressor's value). ``whose``: what the outputs are,
    for the message when there are none ("an anomaly detector's scores"); ``what``: one output
    in words, for a wrong shape ("one anomaly score per sample (...)")."""
    import numpy as np

    outputs = runner.get("outputs")
    if outputs is None:
        raise ValidationError(f"the runner returned no 'outputs': {whose} are its outputs "
                              "(run the runner with --outputs)")
    try:
        a = np.asarray(outputs, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"the runner's 'outputs' are not one list of numbers per sample ({e})") from e
    if a.ndim != 2 or a.shape[1] != 1 or len(a) != len(runner["predictions"]):
        want = (len(runner["predictions"]), 1)
        raise ValidationError(f"the runner's 'outputs' have shape {a.shape}, expected {want}: {what}")
    return a[:, 0]
