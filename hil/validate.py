"""Validate: the host turns a board's raw runner output into metrics and verdicts against the
manifest's requirements. The board never decides pass or fail."""

from __future__ import annotations

import math

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


def memory_kb(runner: dict, input_kb: float) -> float | None:
    """The app's peak memory on the board: the runner's peak resident set (VmHWM) less the test
    inputs it holds (all of them, read up front: a harness cost, not the app's), KiB."""
    rss = runner.get("peak_rss_kb")
    return None if rss is None else max(0.0, float(rss) - input_kb)


def _ratio(measured: float | None, estimated: float | None) -> dict | None:
    if measured is None or estimated is None:
        return None
    return {"estimated": estimated, "measured": measured, "ratio": measured / estimated if estimated else None}


def evaluate(req: Requirements, runner: dict, labels: list[int], library_bytes: int, emulated: bool,
             reference: list[int] | None, input_kb: float = 0.0, estimate: dict | None = None) -> dict:
    """Metrics and per-requirement verdicts for one board. ``reference`` holds the reference
    board's predictions (None when this board is the reference); ``input_kb`` the size of the
    test inputs the runner held; ``estimate`` kiln.sizing's estimate for the board type, put
    next to the measurement (measured / estimated ratios). Latency and memory on an emulated
    board are reported, not enforced: qemu's timings and resident set are not the board's."""
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
    mem = memory_kb(runner, input_kb)
    if req.memory_kb:
        if mem is None:
            raise ValidationError("requirements.memory_kb is set but the runner reported no peak_rss_kb")
        checks.append(_check("memory_kb", mem, req.memory_kb.max, "<=", enforced=not emulated))
    if req.agreement:
        checks.append(_check("agreement", agreement, req.agreement.min, ">="))
    est = estimate or {}
    return {
        "samples": int(len(preds)), "accuracy": acc, "latency_ms": lat, "latency_emulated": emulated,
        "model_bytes": library_bytes, "agreement_with_reference": agreement,
        "peak_rss_kb": runner.get("peak_rss_kb"), "memory_kb": mem, "memory_emulated": emulated,
        "input_kb": input_kb, "estimate": estimate,
        "estimate_vs_measured": {"latency_ms.p50": _ratio(lat["p50"], est.get("latency_ms")),
                                 "memory_kb": _ratio(mem, est.get("peak_memory_kb"))},
        "requirements": checks, "passed": all(c["verdict"] != FAIL for c in checks),
    }


def _estimates(project, types: set[str]) -> dict[str, dict | None]:
    """kiln.sizing's estimate per board type (as made when the manifest loaded; None for a
    family sized only from torch, or a board type that no longer loads)."""
    from kiln import sizing
    from kiln.config import load_board
    from kiln.errors import KilnError

    out = {}
    for t in sorted(types):
        try:
            board = load_board(t)
        except KilnError:
            out[t] = None
            continue
        est = sizing.estimate(project, board)
        if est is not None:
            est["violations"] = sizing.violations(project, board, est)
        out[t] = est
    return out


# -- the deploy stage's last step: every board's run -> results and the app's report -----------

def run(project, layout, instance_names: list[str], compile_only: list[str], lab_name: str, run_id: str) -> dict:
    """Turn every board's last run into its result and the app's report (runs/<run id>/ and
    build/<app>/report.json); raise ValidationError naming board and requirement when any
    requirement is missed. Compile-only board types are listed with their kernel library as
    not validated."""
    from hil import report
    from kiln.artifacts import read_json, write_json

    labels = read_json(layout.data / "test_labels.json")
    runs = {n: read_json(layout.last_run(n)) for n in instance_names}
    ok = [n for n in instance_names if "error" not in runs[n]]
    ref = next((n for n in ok if not runs[n]["emulated"]), ok[0] if ok else None)
    estimates = _estimates(project, {runs[n]["type"] for n in instance_names} | set(compile_only))
    sample_kb = project.dataset.channels * math.prod(project.dataset.image_size) * 4 / 1024  # float32 inputs
    results = {}
    for name in instance_names:
        r = runs[name]
        res = {"instance": name, "type": r["type"], "transport": r.get("transport"), "run_id": r.get("run_id")}
        if "error" in r:
            res["error"] = r["error"]
        else:
            lib = read_json(layout.compile_json(r["type"]))["library_bytes"]
            reference = None if name == ref else runs[ref]["runner"]["predictions"]
            res.update(evaluate(project.requirements, r["runner"], labels, lib, r["emulated"], reference,
                                input_kb=r["runner"].get("count", 0) * sample_kb, estimate=estimates.get(r["type"])))
            res["reference_board"] = ref
            res["timings_s"] = r["timings_s"]
            res["upload"] = {"sent_bytes": r["uploaded_bytes"], "cached_bytes": r["cached_bytes"]}
        write_json(layout.result(run_id, name), res)
        results[name] = res
    for t in compile_only:
        lib = read_json(layout.compile_json(t))
        results[t] = {"type": t, "not_validated": "compile-only board: its runtime cannot run in this lab",
                      "model_bytes": lib["library_bytes"], "library": str(layout.library(t)), "target": lib["target"],
                      "estimate": estimates.get(t)}
    rep = report.build(project.name, lab_name, results)
    rep["sizing"] = {"on_violation": project.sizing.on_violation,
                     "warnings": [v for e in estimates.values() if e for v in e.get("violations", [])]}
    rep["run_id"] = run_id
    report.write(layout.run_report(run_id), rep)
    report.write(layout.report, rep)
    print(report.table(rep))
    if not rep["passed"]:
        raise ValidationError("; ".join(rep["failures"]))
    return rep
