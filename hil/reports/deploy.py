"""The deploy stage's report: one JSON per app (build/<app>/report.json) with every board's
verdict, and a table for the terminal. The table's quality column is the task's
(kiln/tasks/<task>.py ``COLUMN``): the accuracy of a classifier, the ROC AUC of an anomaly
detector (its boards' results have ``auc``; their agreement is that of the scores). Below it
the task's own block (kiln/tasks/<task>.py ``details``): a classifier's macro-F1 and weakest
classes per board; every class's recall, precision, F1 and the confusion matrix are in the
JSON (each board's ``per_class``, ``confusion``, ``macro_f1``)."""

from __future__ import annotations

import time

from kiln.artifacts import write_json
from kiln.schema import judged_by


def build(app: str, lab: str, boards: dict[str, dict], data: dict | None = None) -> dict:
    """The app's report. ``data``: what the data stage's data.json says of the data set
    (``synthetic``: the generator's record when the data was generated, not the team's)."""
    failures = []
    for name, r in boards.items():
        if "not_validated" in r:
            continue  # compiled, never run: neither a pass nor a failure
        if "error" in r:
            failures.append(f"board '{name}': {r['error']['step']} failed: {r['error']['message']}")
            continue
        for c in r["requirements"]:
            if c["verdict"] == "fail":
                failures.append(
                    f"board '{name}': requirement {c['name']} not met: measured {c['measured']:.4g}, "
                    f"required {c['op']} {c['limit']:g}"
                )
    validated = [n for n, r in boards.items() if "not_validated" not in r]
    if not validated:
        failures.append("no board was validated: every target is compile-only or the lab has none")
    return {"app": app, "lab": lab, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "passed": not failures, "failures": failures, "validated": validated, "data": data_summary(data),
            "not_validated": [n for n in boards if n not in validated], "boards": boards}


def data_summary(info: dict | None) -> dict:
    """What a report says of the data it was judged on: its root, and whether it was synthetic."""
    info = info or {}
    marker = info.get("synthetic")
    return {"synthetic": bool(marker), "source": (info.get("params") or {}).get("dataset_root"),
            "generator": marker.get("generator") if isinstance(marker, dict) else None,
            "format": info.get("format")}


def verdict(report: dict) -> str:
    """The verdict line: PASSED / FAILED, and on what data when it was not the team's own."""
    data = report.get("data") or {}
    on = (f" on SYNTHETIC data ({data.get('generator') or 'generated'} at {data.get('source')}; "
          "no data was found at dataset.path: not a result on your data)") if data.get("synthetic") else ""
    return f"PASSED{on}" if report["passed"] else f"FAILED{on}:\n  " + "\n  ".join(report["failures"])


def write(path, report: dict) -> None:
    write_json(path, report)


def table(report: dict) -> str:
    task = judged_by(report["boards"].values())  # the task's figure: a classifier's accuracy, a detector's AUC
    metric = task.COLUMN
    head = f"{'board':<14} {'type':<12} {'link':<7} {'verdict':<8} {metric:>7} {'p50 ms':>8} {'p99 ms':>8} {'KiB':>7} {'agree':>7}"
    lines = [f"Kiln report: {report['app']} on lab '{report['lab']}'", head, "-" * len(head)]
    for name, r in report["boards"].items():
        if "not_validated" in r:
            lines.append(f"{name:<14} {r['type']:<12} {'-':<7} {'NOT VALIDATED (compile-only)':<37} {r['model_bytes'] / 1024:>7.1f}")
            continue
        if "error" in r:
            lines.append(f"{name:<14} {r.get('type', '?'):<12} {r.get('transport') or '?':<7} {'ERROR':<8} {r['error']['step']}: {r['error']['message'][:60]}")
            continue
        lat = r["latency_ms"]
        emu = "*" if r["latency_emulated"] else " "
        lines.append(
            f"{name:<14} {r['type']:<12} {r.get('transport') or '?':<7} {'PASS' if r['passed'] else 'FAIL':<8} {r[task.METRIC]:>7.4f} "
            f"{lat['p50']:>7.3f}{emu} {lat['p99']:>7.3f}{emu} {r['model_bytes'] / 1024:>7.1f} {r['agreement_with_reference']:>7.4f}"
        )
    if task.NOTE:
        lines.append(task.NOTE)
    if any(r.get("latency_emulated") for r in report["boards"].values()):
        lines.append("* latency and memory measured under emulation (qemu-user): reported, not enforced")
    fe = {n: r["front_end"] for n, r in report["boards"].items() if r.get("front_end")}
    if fe:
        lines.append("front end in the library against the host's features (max relative difference, "
                     f"first {next(iter(fe.values()))['samples']} raw test samples): "
                     + ", ".join(f"{n} {v['max_rel_diff']:.1e}" for n, v in fe.items()))
    for name, r in report["boards"].items():  # boards that went silent and were power-cycled
        for c in r.get("power_cycles") or []:
            after = c.get("check") or {}
            lines.append(f"{name}: power-cycled ({c['reason'][:80]}): "
                         + (f"answered after {c['answered_s']:.1f} s, check {'passed' if after.get('passed') else 'FAILED'}"
                            if c["passed"] else f"FAILED: {c.get('error')}"))
    for name, r in report["boards"].items():  # a failed board's console log, its last lines
        console = (r.get("error") or {}).get("console")
        if console:
            lines.append(f"{name}: its console ({console['source']}), last lines:")
            lines += [f"  | {ln}" for ln in console["lines"][-10:]]
    lines += task.details(report["boards"])  # a classifier's per-class block (macro-F1, its weakest classes)
    lines += sizing_table(report)
    lines.append(verdict(report))
    return "\n".join(lines)


def _fmt(v, spec: str) -> str:
    """``v`` in ``spec``; a missing figure as '-' of the same width."""
    width = int("".join(ch for ch in spec.split(",")[0].split(".")[0] if ch.isdigit()) or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def sizing_table(report: dict) -> list[str]:
    """Estimate (kiln/sizing.py, made before training) against measurement, per board: p50
    latency in ms and peak memory in KiB, each with measured / estimated. Emulated boards are
    marked: qemu's timings and resident set are not the board's, so their ratios say nothing
    about the estimate."""
    rows = [(n, r) for n, r in report["boards"].items() if r.get("estimate") or "estimate" in r]
    if not rows:
        return []
    head = (f"{'board':<14} {'est ms':>9} {'meas ms':>9} {'ratio':>6}   {'est KiB':>9} {'meas KiB':>9} {'ratio':>6}")
    lines = ["Estimate vs measurement (sizing before training; ratio = measured / estimated)", head, "-" * len(head)]
    for name, r in rows:
        est = r.get("estimate") or {}
        cmp = r.get("estimate_vs_measured") or {}
        lat, mem = cmp.get("latency_ms.p50") or {}, cmp.get("memory_kb") or {}
        emu = "*" if r.get("latency_emulated") else " "
        lines.append(
            f"{name:<14} {_fmt(est.get('latency_ms'), '9.4g')} {_fmt(lat.get('measured'), '8.4g')}{emu} "
            f"{_fmt(lat.get('ratio'), '6.2f')}   {_fmt(est.get('peak_memory_kb'), '9,.0f')} "
            f"{_fmt(mem.get('measured'), '8,.0f')}{emu} {_fmt(mem.get('ratio'), '6.2f')}")
    for w in (report.get("sizing") or {}).get("warnings", []):
        lines.append(f"sizing warning: {w}")
    return lines
