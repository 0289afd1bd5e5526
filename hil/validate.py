"""Validate: the host turns a board's raw runner output into metrics and verdicts against the
manifest's requirements. The board never decides pass or fail."""

from __future__ import annotations

import numpy as np

from kiln.errors import ValidationError
from kiln.schema import Requirements

PASS, FAIL, NOT_ENFORCED = "pass", "fail", "not enforced (emulated)"


def latency_ms(latencies_us: list[float]) -> dict[str, float]:
    a = np.asarray(latencies_us, dtype=np.float64) / 1000.0
    if a.size == 0:
        raise ValidationError("no latencies to summarise")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def _check(name: str, measured: float, limit: float, op: str, enforced: bool = True) -> dict:
    ok = measured >= limit if op == ">=" else measured <= limit
    verdict = (PASS if ok else FAIL) if enforced else NOT_ENFORCED
    return {"name": name, "measured": measured, "op": op, "limit": limit, "verdict": verdict}


def evaluate(req: Requirements, runner: dict, labels: list[int], library_bytes: int, emulated: bool,
             reference: list[int] | None) -> dict:
    """Metrics and per-requirement verdicts for one board. ``reference`` holds the reference
    board's predictions (None when this board is the reference)."""
    preds = np.asarray(runner["predictions"])
    if len(labels) < len(preds):
        raise ValidationError(f"board returned {len(preds)} predictions for {len(labels)} test labels")
    y = np.asarray(labels[: len(preds)])
    acc = float((preds == y).mean())
    lat = latency_ms(runner["latencies_us"])
    agreement = 1.0 if reference is None else float((preds == np.asarray(reference[: len(preds)])).mean())
    checks = []
    if req.accuracy:
        checks.append(_check("accuracy", acc, req.accuracy.min, ">="))
    if req.latency_ms:
        for q in ("p50", "p99"):
            limit = getattr(req.latency_ms, f"{q}_max")
            if limit is not None:
                checks.append(_check(f"latency_ms.{q}", lat[q], limit, "<=", enforced=not emulated))
    if req.model_kb:
        checks.append(_check("model_kb", library_bytes / 1024, req.model_kb.max, "<="))
    if req.agreement:
        checks.append(_check("agreement", agreement, req.agreement.min, ">="))
    return {
        "samples": int(len(preds)), "accuracy": acc, "latency_ms": lat, "latency_emulated": emulated,
        "model_bytes": library_bytes, "agreement_with_reference": agreement,
        "peak_rss_kb": runner.get("peak_rss_kb"), "requirements": checks,
        "passed": all(c["verdict"] != FAIL for c in checks),
    }
