"""Validate: the host turns a board's raw runner output into metrics and verdicts against the
manifest's requirements. The board never decides pass or fail.

How right a board is, is the app's task's to say (kiln/tasks/<task>.py, a ``Scorer``): a
classifier is judged on the runner's ``predictions`` (accuracy; agreement: the share of
predictions equal to the reference board's; per class: recall, precision, F1, the confusion
matrix and the macro-F1, gated by requirements.macro_f1 and requirements.class_recall); an
anomaly detector on the anomaly scores its
library returns under ``outputs`` (the ROC AUC of the scores; agreement: scores within a
tolerance of the reference board's). Latency, size and memory are judged here alike for every
task."""

from __future__ import annotations

import math

import numpy as np

from kiln.errors import ValidationError
from kiln.schema import Requirements
from kiln.tasks import classification

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
             reference: list | None, input_kb: float = 0.0, estimate: dict | None = None,
             task=None) -> dict:
    """Metrics and per-requirement verdicts for one board. ``reference`` holds the reference
    board's answers (``task.answer``: a classifier's predictions, an anomaly detector's
    ``outputs``, the scores; None when this board is the reference); ``input_kb`` the size of
    the test inputs the runner held; ``estimate`` kiln.sizing's estimate for the board type,
    put next to the measurement (measured / estimated ratios); ``task`` the app's task's Scorer
    (kiln/tasks/; None: a classifier's), which scores the board's answers. Latency and memory
    on an emulated board are reported, not enforced: qemu's timings and resident set are not
    the board's."""
    preds = np.asarray(runner["predictions"])
    if len(labels) < len(preds):
        raise ValidationError(f"board returned {len(preds)} predictions for {len(labels)} test labels")
    # a detector's test labels are a list of objects per image (ragged): its Scorer takes them as they are
    y = labels[: len(preds)] if getattr(task, "ragged_labels", False) else np.asarray(labels[: len(preds)])
    quality, wanted = (task or classification.Scorer()).quality(req, runner, y, reference)
    checks = [_check(*c) for c in wanted]
    agreement = quality["agreement_with_reference"]
    lat = latency_ms(runner["latencies_us"])
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
        "samples": int(len(preds)), **quality, "latency_ms": lat, "latency_emulated": emulated,
        "model_bytes": library_bytes,
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


FRONT_END_TOL = 1e-4  # the board's front end features against the host's, relative (issue #13)


def _sample_kb(layout) -> float:
    """KiB of one test sample as the runner holds it (float32 features, or raw int16/uint8)."""
    from kiln.artifacts import read_json

    info = read_json(layout.data_json)["test_inputs"]
    size = {"float32": 4, "int16": 2, "uint8": 1, "int8": 1}[info.get("dtype", "float32")]
    return size * math.prod(info["shape"][1:]) / 1024


def _host_features(layout) -> np.ndarray | None:
    """The host's features of the test split (what the net was trained and checked on), NCHW,
    for an app with a front end; None without one."""
    if not (layout.front_end_json).is_file():
        return None
    with np.load(layout.split("test")) as z:
        return z["x"].transpose(0, 3, 1, 2)


def front_end_check(runner: dict, host: np.ndarray) -> dict:
    """The board's front end features (its own library, run on the first raw test samples)
    against the host's: per sample max |board - host| / max |host|, the worst over samples."""
    outs = runner.get("outputs")
    if not isinstance(outs, list) or not outs:
        raise ValidationError("the front end's runner returned no outputs (kiln-runner --outputs 1)")
    board = np.asarray(outs, dtype=np.float64)
    ref = host[: len(board)].reshape(len(board), -1).astype(np.float64)
    if board.shape != ref.shape:
        raise ValidationError(f"the front end's library returned {board.shape[1]} features per sample, "
                              f"the host computed {ref.shape[1]}")
    rel = np.abs(board - ref).max(1) / np.maximum(np.abs(ref).max(1), 1e-30)
    return {"samples": len(board), "max_rel_diff": float(rel.max()), "max_abs_diff": float(np.abs(board - ref).max()),
            "tolerance": FRONT_END_TOL}


# -- the deploy stage's last step: every board's run -> results and the app's report -----------

def run(project, layout, instance_names: list[str], compile_only: list[str], lab_name: str, run_id: str,
        latest: bool = True) -> dict:
    """Turn every board's last run into its result and the app's report (runs/<run id>/ and,
    with ``latest``, build/<app>/report.json, the last deploy's: a nightly passes False and
    leaves it alone, its report is the night's); raise ValidationError naming board and requirement when any
    requirement is missed. Compile-only board types are listed with their kernel library as
    not validated."""
    from hil.reports import deploy as report
    from kiln.artifacts import read_json, write_json

    labels = read_json(layout.test_labels)
    runs = {n: read_json(layout.last_run(n)) for n in instance_names}
    ok = [n for n in instance_names if "error" not in runs[n]]
    ref = next((n for n in ok if not runs[n]["emulated"]), ok[0] if ok else None)
    estimates = _estimates(project, {runs[n]["type"] for n in instance_names} | set(compile_only))
    sample_kb = _sample_kb(layout)
    host_features = _host_features(layout)
    task = project.task.scoring.scorer(project)  # how the app's task scores a board (kiln/tasks/)
    results = {}
    for name in instance_names:
        r = runs[name]
        res = {"instance": name, "type": r["type"], "transport": r.get("transport"), "run_id": r.get("run_id")}
        if r.get("power_cycles"):  # the board went silent and was power-cycled (hil/deploy.py)
            res["power_cycles"] = r["power_cycles"]
        if "error" in r:
            res["error"] = r["error"]
        else:
            lib = read_json(layout.compile_json(r["type"]))["library_bytes"]
            reference = None if name == ref else runs[ref]["runner"].get(task.answer)
            res.update(evaluate(project.requirements, r["runner"], labels, lib, r["emulated"], reference,
                                input_kb=r["runner"].get("count", 0) * sample_kb, estimate=estimates.get(r["type"]),
                                task=task))
            res["reference_board"] = ref
            if host_features is not None and "front_end" in r.get("checks", {}):
                res["front_end"] = front_end_check(r["checks"]["front_end"], host_features)
                res["requirements"].append(_check("front_end_rel_diff", res["front_end"]["max_rel_diff"],
                                                  FRONT_END_TOL, "<="))
                res["passed"] = res["passed"] and res["requirements"][-1]["verdict"] != FAIL
            res["timings_s"] = r["timings_s"]
            res["upload"] = {"sent_bytes": r["uploaded_bytes"], "cached_bytes": r["cached_bytes"]}
        write_json(layout.result(run_id, name), res)
        results[name] = res
    for t in compile_only:
        lib = read_json(layout.compile_json(t))
        results[t] = {"type": t, "not_validated": "compile-only board: its runtime cannot run in this lab",
                      "model_bytes": lib["library_bytes"], "library": str(layout.library(t)), "target": lib["target"],
                      "estimate": estimates.get(t)}
    rep = report.build(project.name, lab_name, results, read_json(layout.data_json))
    rep["sizing"] = {"on_violation": project.sizing.on_violation,
                     "warnings": [v for e in estimates.values() if e for v in e.get("violations", [])]}
    rep["run_id"] = run_id
    if layout.metrics.is_file():  # the train stage's word: "warm start from <data> for N epochs" or "trained from scratch"
        rep["training"] = read_json(layout.metrics).get("start")
    report.write(layout.run_report(run_id), rep)
    if latest:
        report.write(layout.report, rep)
    print(report.table(rep))
    if rep.get("training"):
        print(f"model: {rep['training']}")
    if not rep["passed"]:
        raise ValidationError("; ".join(rep["failures"]))
    return rep
