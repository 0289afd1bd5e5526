"""JUnit XML of a nightly: a <testsuite> per app, a <testcase> per app x board x requirement.

The layout follows the common JUnit schema (the one Jenkins, GitLab and pytest's xunit2 read):
<testsuites> of <testsuite name tests failures errors skipped time timestamp hostname>, each of
<testcase classname name time> holding at most one of <failure>/<error>/<skipped>, then
<system-out>. Mapping of a job's status:

- fail: the requirements that failed are <failure>; a step that failed with no failed requirement
  (the runner's output was wrong, say) is a testcase named after the step, also a <failure>;
- infra (link, upload, timeout, board gone): <error> — not a test failure, CI can tell them apart;
- not_validated / skipped: <skipped> with the reason; a requirement not enforced under emulation
  is <skipped> too (measured, not tested);
- the ``lab`` testsuite: a testcase per board's health check and per power cycle (recovery),
  an <error> when it failed, so that a night whose only trouble is a dead board says so;
- flaky (passed only after an infrastructure retry): never a silent pass — each of its testcases
  carries <property name="flaky" value="true"/> and the word "flaky" in system-out (JUnit has no
  flaky element; twister drops the information, the property keeps it machine-readable).
"""

from __future__ import annotations

import datetime as dt
import xml.etree.ElementTree as ET
from pathlib import Path

from kiln.artifacts import write_bytes

NOT_ENFORCED = "not enforced (emulated)"


def _timestamp(iso: str) -> str:
    """The schema's timestamp: xs:dateTime without a zone (UTC here, as the nightly's)."""
    t = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return t.strftime("%Y-%m-%dT%H:%M:%S")


def _requirement_text(r: dict) -> str:
    return f"{r['name']}: measured {r['measured']:.6g}, required {r['op']} {r['limit']:.6g}"


def _attempts_text(job: dict) -> str:
    lines = [f"attempt {i} on {a['board']}: {a['outcome']} ({a['seconds']:.1f} s)"
             + (f": {a['error']}" if a.get("error") else "") for i, a in enumerate(job["attempts"], 1)]
    if job["flaky"]:
        lines.insert(0, "flaky: passed only after an infrastructure retry")
    console = (job.get("error") or {}).get("console")
    if console:  # the failed board's console log (hil/deploy.py console_tail)
        lines += [f"-- the board's console ({console['source']}), last {len(console['lines'])} lines --",
                  *console["lines"]]
    return "\n".join(lines)


def _cases(job: dict) -> list[tuple[str, str | None, str | None, str]]:
    """(name, outcome tag or None for a pass, its message, its type) for each testcase of a job."""
    status, err = job["status"], job.get("error")
    reason = job.get("reason") or (f"{err['step']}: {err['message']}" if err else status)
    reqs = job["requirements"]
    if status == "infra":
        message = f"{err['step']}: {err['message']}" if err else reason
        names = [r["name"] for r in reqs] or [err["step"] if err else "run"]
        return [(n, "error", message, "infrastructure") for n in names]
    if status in ("not_validated", "skipped"):
        names = [r["name"] for r in reqs] or ["validate"]
        return [(n, "skipped", reason, status) for n in names]
    cases = []
    for r in reqs:
        if r["verdict"] == "fail":
            cases.append((r["name"], "failure", _requirement_text(r), "requirement"))
        elif r["verdict"] == NOT_ENFORCED:
            cases.append((r["name"], "skipped", f"{NOT_ENFORCED}: {_requirement_text(r)}", "emulated"))
        else:
            cases.append((r["name"], None, None, ""))
    failed_req = any(tag == "failure" for _, tag, _, _ in cases)
    if status == "fail" and not failed_req:
        # the job failed in a step, before or beside its requirements: say where
        step = err["step"] if err else "validate"
        cases.append((step, "failure", reason, "step"))
    if not cases:
        cases.append(("validate", None, None, ""))
    return cases


def _testcase(suite: ET.Element, job: dict, case: tuple, seconds: float) -> str | None:
    name, tag, message, kind = case
    tc = ET.SubElement(suite, "testcase", classname=f"{job['app']}.{job['board']}", name=name,
                       time=f"{seconds:.3f}")
    if job["flaky"]:
        props = ET.SubElement(tc, "properties")
        ET.SubElement(props, "property", name="flaky", value="true")
    if tag:
        ET.SubElement(tc, tag, message=message or "", type=kind).text = message
    ET.SubElement(tc, "system-out").text = _attempts_text(job)
    return tag


def build(nightly: dict) -> ET.Element:
    """The <testsuites> element of a (validated) nightly result."""
    stamp = _timestamp(nightly["started"])
    root = ET.Element("testsuites", name=f"kiln nightly {nightly['run_id']}")
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    total_time = 0.0
    apps = sorted({j["app"] for j in nightly["jobs"]})
    for suite_id, app in enumerate(apps):
        suite = ET.SubElement(root, "testsuite", name=app, id=str(suite_id), timestamp=stamp,
                              hostname=nightly["host"])
        counts = dict.fromkeys(totals, 0)
        suite_time = 0.0
        for job in sorted((j for j in nightly["jobs"] if j["app"] == app), key=lambda j: j["board"]):
            cases = _cases(job)
            # one job measures all its requirements in one deploy: its time is shared among them
            seconds = sum(a["seconds"] for a in job["attempts"])
            suite_time += seconds
            for case in cases:
                tag = _testcase(suite, job, case, seconds / len(cases))
                counts["tests"] += 1
                if tag == "failure":
                    counts["failures"] += 1
                elif tag == "error":
                    counts["errors"] += 1
                elif tag == "skipped":
                    counts["skipped"] += 1
        for k, v in counts.items():
            suite.set(k, str(v))
            totals[k] += v
        suite.set("time", f"{suite_time:.3f}")
        total_time += suite_time
    lab_counts, lab_time = _lab_suite(root, nightly, len(apps), stamp)
    for k, v in lab_counts.items():
        totals[k] += v
    total_time += lab_time
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", f"{total_time:.3f}")
    return root


def _lab_suite(root: ET.Element, nightly: dict, suite_id: int, stamp: str) -> tuple[dict, float]:
    """The ``lab`` testsuite: a testcase per board's health check (an <error> when it failed: a
    dead board is the infrastructure's failure, not a test's) and one per power cycle (an <error>
    when the board did not answer after it). A board left unchecked (maintenance, retired, busy)
    is <skipped> with its state."""
    counts = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    seconds_total = 0.0
    suite = ET.Element("testsuite", name="lab", id=str(suite_id), timestamp=stamp, hostname=nightly["host"])

    def case(board: str, name: str, seconds: float, tag: str | None, message: str, out: str) -> None:
        nonlocal seconds_total
        tc = ET.SubElement(suite, "testcase", classname=f"lab.{board}", name=name, time=f"{seconds:.3f}")
        if tag:
            ET.SubElement(tc, tag, message=message, type="infrastructure" if tag == "error" else "board").text = message
            counts["errors" if tag == "error" else "skipped"] += 1
        ET.SubElement(tc, "system-out").text = out
        counts["tests"] += 1
        seconds_total += seconds

    for board, info in sorted(nightly.get("boards", {}).items()):
        check, cycles = info.get("check"), info.get("power_cycles") or []
        first = (check or {}).get("first")
        if first is not None:  # the check before a power cycle
            case(board, "health_check", first["seconds"], None if first["passed"] else "error",
                 f"health check failed: {first.get('error')}", "before a power cycle")
        for i, c in enumerate(cycles, 1):
            out = f"power cycle {i}: {c['reason']}" + (f"; answered after {c['answered_s']:.2f} s"
                                                        if c.get("answered_s") is not None else "")
            case(board, f"power_cycle {i}", c["seconds"], None if c["passed"] else "error",
                 f"power cycle failed: {c.get('error')}", out)
            after = c.get("check")
            if after is not None:
                case(board, f"health_check after power_cycle {i}", after["seconds"],
                     None if after["passed"] else "error", f"health check failed: {after.get('error')}", "")
        if check is not None:
            name = "health_check" + (" after power_cycle 1" if first is not None else "")
            case(board, name, check["seconds"], None if check["passed"] else "error",
                 f"health check failed: {check.get('error')} (board marked {info['health']})",
                 f"board health: {info['health']}")
        elif not cycles:
            why = info.get("busy") or f"not checked: board is {info['health']}"
            case(board, "health_check", 0.0, "skipped", why, why)
    if counts["tests"]:
        root.append(suite)
        for k, v in counts.items():
            suite.set(k, str(v))
        suite.set("time", f"{seconds_total:.3f}")
    return counts, seconds_total


def write_junit(nightly: dict, path: str | Path) -> None:
    """Write the JUnit XML of ``nightly`` to ``path`` atomically."""
    root = build(nightly)
    ET.indent(root)
    write_bytes(path, ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")
