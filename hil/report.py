"""Report: one JSON per app with every board's verdict, and a table for the terminal."""

from __future__ import annotations

import time

from kiln.artifacts import write_json


def build(app: str, lab: str, boards: dict[str, dict]) -> dict:
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
            "passed": not failures, "failures": failures, "validated": validated,
            "not_validated": [n for n in boards if n not in validated], "boards": boards}


def write(path, report: dict) -> None:
    write_json(path, report)


def table(report: dict) -> str:
    head = f"{'board':<14} {'type':<12} {'link':<7} {'verdict':<8} {'acc':>7} {'p50 ms':>8} {'p99 ms':>8} {'KiB':>7} {'agree':>7}"
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
            f"{name:<14} {r['type']:<12} {r.get('transport') or '?':<7} {'PASS' if r['passed'] else 'FAIL':<8} {r['accuracy']:>7.4f} "
            f"{lat['p50']:>7.3f}{emu} {lat['p99']:>7.3f}{emu} {r['model_bytes'] / 1024:>7.1f} {r['agreement_with_reference']:>7.4f}"
        )
    if any(r.get("latency_emulated") for r in report["boards"].values()):
        lines.append("* latency measured under emulation (qemu-user): reported, not enforced")
    lines.append("PASSED" if report["passed"] else "FAILED:\n  " + "\n  ".join(report["failures"]))
    return "\n".join(lines)
