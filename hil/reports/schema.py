"""The nightly result's schema version and its check: ``validate(nightly)`` before any report.

Why no pydantic model here: house rule 1 keeps every pydantic model in ``kiln/schema/``, and
the nightly result is written by the orchestrator as a plain dict that the reports only read.
A small table of expected types (``NIGHTLY`` below, mirroring the shared contract) walks the
dict and names the first key that is missing or wrong, e.g. ``jobs[3].metrics.latency_ms.p99``.
Keys the table does not know are allowed: a later ``kiln-nightly/1`` writer may add fields
without breaking older readers; anything that would is a new version.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Callable

from kiln.artifacts import read_json
from kiln.errors import ValidationError

SCHEMA = "kiln-nightly/1"
STATUSES = ("pass", "fail", "infra", "not_validated", "skipped")
HEALTH = ("good", "unknown", "bad", "maintenance", "retired")

Check = Callable[[Any, str, str], None]  # (value, key path, source name) -> None or raise


def _fail(source: str, path: str, expected: str, value: Any) -> None:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise ValidationError(f"{source}: key '{path}': expected {expected}, got {shown}")


def _typed(name: str, *types: type) -> Check:
    def check(v, path, source):
        # bool is an int in Python; a flag where a number belongs is a writer's bug
        if isinstance(v, bool) and bool not in types or not isinstance(v, types):
            _fail(source, path, name, v)
    return check


STR = _typed("a string", str)
NUM = _typed("a number", int, float)
INT = _typed("an integer", int)
BOOL = _typed("true or false", bool)


def ISO(v, path, source):
    """An ISO 8601 timestamp (the contract says UTC; a zone suffix is accepted)."""
    STR(v, path, source)
    try:
        dt.datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        _fail(source, path, "an ISO 8601 time", v)


def enum(*values) -> Check:
    def check(v, path, source):
        if isinstance(v, bool) or v not in values:
            _fail(source, path, "one of " + ", ".join(map(repr, values)), v)
    return check


def null_or(inner: Check) -> Check:
    def check(v, path, source):
        if v is not None:
            inner(v, path, source)
    return check


def list_of(inner: Check) -> Check:
    def check(v, path, source):
        if not isinstance(v, list):
            _fail(source, path, "a list", v)
        for i, item in enumerate(v):
            inner(item, f"{path}[{i}]", source)
    return check


def dict_of(inner: Check) -> Check:
    def check(v, path, source):
        if not isinstance(v, dict):
            _fail(source, path, "an object", v)
        for k, item in v.items():
            inner(item, f"{path}.{k}", source)
    return check


def optional(inner: Check) -> Check:
    """A key ``obj`` lets be missing (added within kiln-nightly/1: older nights lack it), checked
    when present."""
    def check(v, path, source):
        inner(v, path, source)
    check.optional = True
    return check


def obj(fields: dict[str, Check]) -> Check:
    """An object with every key of ``fields`` present (null only where the check allows it;
    missing only where it is ``optional``)."""
    def check(v, path, source):
        if not isinstance(v, dict):
            _fail(source, path or "(top level)", "an object", v)
        for key, inner in fields.items():
            where = f"{path}.{key}" if path else key
            if key not in v:
                if getattr(inner, "optional", False):
                    continue
                raise ValidationError(f"{source}: key '{where}' is missing")
            inner(v[key], where, source)
    return check


PER_CLASS = obj({"support": INT, "predicted": INT, "recall": null_or(NUM), "precision": null_or(NUM),
                 "f1": null_or(NUM)})
CONFUSION = obj({"classes": list_of(STR), "matrix": list_of(list_of(INT))})
LATENCY = obj({k: NUM for k in ("p50", "p90", "p99", "mean", "min", "max")})
METRICS = obj({
    "accuracy": null_or(NUM), "auc": null_or(NUM), "latency_ms": null_or(LATENCY),
    "latency_windows_ms": null_or(list_of(NUM)), "latency_ms_median_of_windows": null_or(NUM),
    "model_bytes": null_or(INT), "memory_kb": null_or(NUM), "emulated": BOOL,
    # a classifier's per-class truth (kiln/tasks/classification.py per_class)
    "macro_f1": optional(null_or(NUM)), "per_class": optional(null_or(dict_of(PER_CLASS))),
    "confusion": optional(null_or(CONFUSION)),
    # a regressor's figures on the board, in the label's units (kiln/tasks/regression.py)
    "mae": optional(null_or(NUM)), "rmse": optional(null_or(NUM)), "r2": optional(null_or(NUM)),
    # a detector's centre figures and the host's post-processing per frame (kiln/tasks/detection.py)
    "f1": optional(null_or(NUM)), "precision": optional(null_or(NUM)), "recall": optional(null_or(NUM)),
    "postprocess_ms": optional(null_or(NUM)),
})
JOB = obj({
    "app": STR, "board": STR, "type": STR, "status": enum(*STATUSES), "flaky": BOOL,
    "attempts": list_of(obj({"board": STR, "outcome": enum("pass", "fail", "infra"),
                             "error": null_or(STR), "seconds": NUM})),
    "requirements": list_of(obj({"name": STR, "measured": NUM, "op": enum(">=", "<="), "limit": NUM,
                                 "verdict": enum("pass", "fail", "not enforced (emulated)")})),
    "metrics": METRICS,
    "error": null_or(obj({"step": STR, "message": STR,
                          # the failed board's console log (hil/deploy.py console_tail)
                          "console": optional(obj({"source": STR, "lines": list_of(STR)}))})),
    "reason": null_or(STR),
})
BOARD = obj({"type": STR, "health": enum(*HEALTH),
             "check": null_or(obj({"passed": BOOL, "seconds": NUM, "error": null_or(STR)})),
             # power cycles of a board with power control (hil/health_check.py power_cycle)
             "power_cycles": optional(list_of(obj({"action": STR, "reason": STR, "passed": BOOL, "seconds": NUM,
                                                   "error": null_or(STR)})))})
REGRESSION = obj({"app": STR, "board": STR, "metric": STR, "value": null_or(NUM),
                  "baseline": null_or(NUM), "tolerance": null_or(NUM),
                  "kind": enum("metric", "flip"), "message": STR})
NIGHTLY = obj({
    "schema": STR, "run_id": STR, "started": ISO, "finished": ISO, "wall_s": NUM, "lab": STR,
    "host": STR, "boards": dict_of(BOARD), "jobs": list_of(JOB), "regressions": list_of(REGRESSION),
    "exit_code": enum(0, 1, 2),
})


def validate(nightly: Any, source: str = "nightly.json") -> None:
    """Raise ``ValidationError`` naming ``source`` and the first wrong key; None when valid.

    The version is checked first: a result of another version is refused as such, not as a
    pile of wrong keys."""
    if not isinstance(nightly, dict):
        raise ValidationError(f"{source}: expected a JSON object, got {type(nightly).__name__}")
    if "schema" not in nightly:
        raise ValidationError(f"{source}: key 'schema' is missing (expected '{SCHEMA}')")
    if nightly["schema"] != SCHEMA:
        raise ValidationError(f"{source}: key 'schema' is {nightly['schema']!r}: this Kiln reads "
                              f"'{SCHEMA}' only")
    NIGHTLY(nightly, "", source)


def load(path: str | Path) -> dict:
    """Read and validate a nightly.json; errors name the file."""
    try:
        nightly = read_json(path)
    except (OSError, ValueError) as e:
        raise ValidationError(f"{path}: cannot read the nightly result: {e}") from e
    validate(nightly, str(path))
    return nightly
