"""Tasks' torch-free side: what a task makes of the board's outputs. One module per task
(``kiln.schema.tasks`` names it in the task's ``scoring``), as kiln/frontends/ holds the front
ends' torch-free code; the torch side (loss, training metric, the compress judge, which samples
the stages fit on) is passes/tasks/<task>.py. A module has

* ``METRIC``: the result's figure that says how right a board is (``accuracy``, ``auc``, ``mae``), and
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
