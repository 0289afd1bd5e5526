"""Nightly lab runs: every app on every lab board whose type it targets, boards in parallel.

``doit nightly`` first builds every app's kernel libraries (each build stage once per app and
board type, through doit's own tasks), then this module runs the jobs:

* one worker thread per lab instance, one job at a time on it; the jobs of a board type wait in
  one queue, so several boards of a type share them;
* each worker holds a lease on its board for as long as it works there (hil/lab/leases.py): a
  second nightly run at the same time never uses that board; it waits for it, or skips it
  (``busy``), and says which;
* before its first job a board gets its health check (hil/health_check.py); a board that fails
  it is marked bad and skipped; maintenance and retired boards are never used;
* a job that fails for the infrastructure (link, upload, timeout, board gone) is retried on
  another board of the same type, when there is one; one that passes only on a retry is
  recorded as flaky, never as a plain pass;
* every job's latency is also measured as the median of ``windows`` windows of back-to-back
  inferences (MLPerf Tiny's way), so that nights can be compared.

Then each app is validated by hil/validate.py as a deploy is, the night goes into the history
(hil/history.py), regressions are flagged against the previous nights, and the reports are
written to build/nightly/<run id>/: nightly.json (schema kiln-nightly/1), junit.xml and
report.html. The exit code (``python -m hil.nightly``, and the night's ``exit_code``) is 0 when
everything passed, 1 on a failed requirement or a regression, 2 when only the infrastructure
failed; ``python -m hil.nightly`` exits 64 (EX_USAGE) on bad arguments, before anything runs.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hil.deploy import infra_failure
from kiln.artifacts import Layout, build_root, read_json, write_json
from kiln.errors import KilnError, ValidationError

log = logging.getLogger("kiln.nightly")
SCHEMA = "kiln-nightly/1"
WINDOWS = 5  # latency windows per job (MLPerf Tiny's runner takes the median of 5)
WINDOW_SIZE = 20  # back-to-back inferences per window (at most the samples sent)
EXIT_PASSED, EXIT_FAILED, EXIT_INFRA = 0, 1, 2
EXIT_USAGE = 64  # python -m hil.nightly's bad arguments (sysexits.h EX_USAGE), not argparse's 2 = EXIT_INFRA


def nightly_root() -> Path:
    return build_root() / "nightly"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    app: str
    type: str
    attempts: list[dict] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)  # instances it failed on for the infrastructure
    record: dict | None = None  # the last run's record (hil/deploy.py)
    board: str | None = None  # the instance that gave the record


class Night:
    """One nightly run over a live inventory."""

    def __init__(self, apps: dict, boards: dict, inventory, lab_dir: Path, run_id: str, busy: str = "wait",
                 windows: int = WINDOWS, lease_timeout_s: float = 3600, max_attempts: int = 2,
                 only: list[str] | None = None, leasing=None, only_from: str = "boards"):
        from hil.lab import LocalLeasing, compile_only

        self.leasing = leasing or LocalLeasing()  # the lab's own leases and shared health (labgrid)

        self.apps, self.boards, self.inventory, self.lab_dir = apps, boards, inventory, lab_dir
        self.run_id, self.busy, self.windows = run_id, busy, windows
        self.lease_timeout_s, self.max_attempts = lease_timeout_s, max_attempts
        left_out = set()  # types of the boards boards=a,b leaves out: not part of this night
        if only:  # boards=a,b (or $KILN_BOARDS, as only_from says): the night on those boards alone
            unknown = sorted(set(only) - {b.name for b in inventory.boards})
            if unknown:
                raise ValidationError(f"nightly: {only_from}={','.join(only)}: no board {', '.join(unknown)} in lab "
                                      f"'{inventory.name}' (its boards: {', '.join(b.name for b in inventory.boards)})")
            inventory = inventory.model_copy(update={"boards": [b for b in inventory.boards if b.name in only]})
            left_out = {b.type for b in self.inventory.boards} - {b.type for b in inventory.boards}
            self.inventory = inventory
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{run_id}"
        self.lock = threading.Lock()
        self.board_info: dict[str, dict] = {}
        self.queues: dict[str, queue.Queue] = {}
        self.jobs: list[Job] = []
        self.listed: list[dict] = []  # compile-only and unrunnable pairs: listed, not run
        live_types = {b.type for b in inventory.boards}
        for app, p in apps.items():
            built_only = set(compile_only(p, boards))
            for t in p.targets:
                if t in left_out:
                    continue
                if t in built_only:
                    self.listed.append({"app": app, "type": t, "status": "not_validated",
                                        "reason": "compile-only board type: its runtime cannot run in this lab"})
                elif t not in live_types:
                    self.listed.append({"app": app, "type": t, "status": "skipped",
                                        "reason": f"the lab has no board of type {t}"})
                else:
                    job = Job(app, t)
                    self.jobs.append(job)
                    self.queues.setdefault(t, queue.Queue()).put(job)

    # -- workers ------------------------------------------------------------------------------
    def _usable(self, inst) -> bool:
        """Health before the board's first job: maintenance and retired boards are not used;
        the others are checked, and a failed check marks the board bad."""
        from hil import health_check

        shared = self.leasing.shared_health(inst.name)  # another runner's word, on a shared lab
        if shared in ("bad", "maintenance", "retired"):
            self.board_info[inst.name] = {"type": inst.type, "health": shared, "check": None}
            log.info("board %s is %s for every runner of the lab: not used", inst.name, shared)
            return False
        if inst.power is None:  # nothing to cycle: checked, and marked bad when it fails
            (now, check), cycles = health_check.check_board(inst, self.boards[inst.type], self.lab_dir), []
        else:
            now, check, cycles = health_check.check_and_recover(inst, self.boards[inst.type], self.lab_dir)
        self.board_info[inst.name] = {"type": inst.type, "health": now, "check": check}
        if cycles:
            self.board_info[inst.name]["power_cycles"] = cycles
            log.warning("board %s failed its health check (%s): power-cycled, %s", inst.name,
                        check["first"]["error"], "recovered" if check["passed"] else "still failing")
        if check is not None:
            self.leasing.publish_health(inst.name, now)
        if check is None:
            log.info("board %s is %s: not used", inst.name, now)
            return False
        if not check["passed"]:
            log.warning("board %s failed its health check (%s): marked bad, skipped", inst.name, check.get("error"))
        return check["passed"]

    def _others(self, job: Job, inst) -> bool:
        """Another usable board of the job's type that it has not failed on."""
        return any(b.type == job.type and b.name != inst.name and b.name not in job.excluded
                   and self.board_info.get(b.name, {}).get("health") not in ("bad", "maintenance", "retired")
                   for b in self.inventory.boards)

    def _run_job(self, job: Job, inst, lease) -> None:
        from hil import deploy
        from hil.lab import fenced

        p = self.apps[job.app]
        t0, start = time.perf_counter(), time.time()
        rec = fenced(deploy.job(p, self.boards[job.type], inst, Layout(job.app), self.lab_dir, self.run_id,
                                latency_windows=self.windows), lease, inst.name)
        err = rec.get("error")
        outcome = "infra" if infra_failure(err) else ("fail" if err else "ran")
        job.attempts.append({"board": inst.name, "outcome": outcome, "error": err and err["message"][:500],
                             "seconds": round(time.perf_counter() - t0, 2), "start": start, "end": time.time()})
        if outcome == "infra" and inst.power is not None and len(job.attempts) < self.max_attempts:
            if self._recover(inst, f"went silent during {job.app}: {err['message'][:200]}"):
                log.warning("%s on %s: the board went silent (%s): power-cycled, it answers again: retried on it",
                            job.app, inst.name, err["message"][:200])
                self.queues[job.type].put(job)
                return
        if outcome == "infra" and len(job.attempts) < self.max_attempts and self._others(job, inst):
            log.warning("%s on %s: infrastructure failure (%s): retried on another %s", job.app, inst.name,
                        err["message"][:200], job.type)
            job.excluded.add(inst.name)
            self.queues[job.type].put(job)
            return
        job.record, job.board = rec, inst.name
        deploy.write_record(Layout(job.app), inst.name, self.run_id, rec)

    def _recover(self, inst, reason: str) -> bool:
        """A board that went silent mid-job: power-cycled, waited for, checked again; marked bad
        when the check still fails. Whether it answers again."""
        from hil import health_check
        from hil.lab.health import record_check

        info = self.board_info.setdefault(inst.name, {"type": inst.type, "health": "good", "check": None})
        cycle = health_check.power_cycle(inst, self.lab_dir, reason)
        info.setdefault("power_cycles", []).append(cycle)
        check = (health_check.health_check(inst, self.boards[inst.type], self.lab_dir) if cycle["passed"]
                 else {"passed": False, "seconds": 0.0, "error": f"power: {cycle['error']}"})
        cycle["check"] = check
        info["health"] = record_check(inst.name, check["passed"], (check["error"] or "") + " (after a power cycle)"
                                      if not check["passed"] else "after a power cycle", None)
        self.leasing.publish_health(inst.name, info["health"])
        if not check["passed"]:
            log.warning("board %s still fails after a power cycle (%s): marked bad", inst.name, check["error"])
        return check["passed"]

    def _worker(self, inst) -> None:
        q = self.queues.get(inst.type)
        if q is None:
            return
        try:
            lease = self.leasing.acquire(inst.name, self.holder, wait=self.busy == "wait",
                                         timeout_s=self.lease_timeout_s)
        except KilnError as e:
            lease = None
            log.warning("board %s: %s", inst.name, e)
        if lease is None:
            from hil.lab import health

            self.board_info[inst.name] = {"type": inst.type, "health": health.state(inst.name), "check": None,
                                          "busy": f"held by another run: skipped (busy={self.busy})"}
            log.warning("board %s is leased by another run: skipped (busy=%s)", inst.name, self.busy)
            return
        with lease:
            try:
                inst = self.leasing.bind(inst, lease)  # a labgrid serial board's port: known once held
            except KilnError as e:
                self.board_info[inst.name] = {"type": inst.type, "health": "unknown", "check": None,
                                              "busy": f"not reachable under its lease: {e}"}
                log.warning("board %s: %s", inst.name, e)
                return
            if not self._usable(inst):
                return
            passed_over: list[Job] = []
            while True:
                try:
                    job = q.get_nowait()
                except queue.Empty:
                    break
                if inst.name in job.excluded:  # failed here already: leave it to another board
                    passed_over.append(job)
                    continue
                self._run_job(job, inst, lease)
                if self.board_info.get(inst.name, {}).get("health") != "good":
                    break  # went silent and did not come back: its other jobs go to other boards
            for job in passed_over:
                q.put(job)

    def run_jobs(self) -> None:
        """Every board's worker at once; but a board tagged ``native`` is this machine, whose
        cores the emulated boards would share: its jobs run first, alone, so that its timings
        are its own (measured: traffic_signs' p99 on x86-host, 0.16 ms deployed alone, was 4.9 and
        10.6 ms in two nights with three qemu boards beside it: the second failed its 10 ms limit)."""
        native = [b for b in self.inventory.boards if "native" in (b.tags or [])]
        for group in (native, [b for b in self.inventory.boards if b not in native]):
            threads = [threading.Thread(target=self._worker, args=(b,), name=f"nightly-{b.name}", daemon=True)
                       for b in group]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    # -- results ------------------------------------------------------------------------------
    def _validate(self) -> dict[str, dict]:
        """hil/validate.py over each app's boards that returned a record: per-board results."""
        from hil import validate

        out: dict[str, dict] = {}
        for app, p in self.apps.items():
            names = sorted({j.board for j in self.jobs if j.app == app and j.board})
            if not names:
                continue
            lay = Layout(app)
            try:
                validate.run(p, lay, names, [], self.inventory.name, self.run_id, latest=False)
            except ValidationError as e:
                log.info("%s: %s", app, e)
            for n in names:
                out[(app, n)] = read_json(lay.result(self.run_id, n))
        return out

    def job_entry(self, job: Job, result: dict | None) -> dict:
        # a job no board took is named by its board type (the contract's board is always a name)
        entry = {"app": job.app, "board": job.board or job.type, "type": job.type, "attempts": job.attempts,
                 "flaky": False, "requirements": [], "metrics": dict(NO_METRICS), "error": None, "reason": None}
        if job.record is None:  # every attempt failed for the infrastructure, or no board took it
            entry.update(status="infra" if job.attempts else "skipped",
                         reason="no usable board of this type" if not job.attempts else None,
                         error={"step": "infrastructure", "message": job.attempts[-1]["error"]} if job.attempts else None)
            return entry
        if "error" in job.record:
            entry["error"] = job.record["error"]
            entry["status"] = "infra" if infra_failure(job.record["error"]) else "fail"
            return entry
        res = result or {}
        entry["requirements"] = res.get("requirements", [])
        entry["status"] = "pass" if res.get("passed") else "fail"
        job.attempts[-1]["outcome"] = entry["status"]  # the attempt that ran: judged now
        entry["flaky"] = entry["status"] == "pass" and any(a["outcome"] == "infra" for a in job.attempts)
        entry["metrics"] = metrics(job.record, res)
        return entry

    def report(self, started: str, wall_s: float) -> dict:
        results = self._validate()
        jobs = [self.job_entry(j, results.get((j.app, j.board))) for j in self.jobs]
        jobs += [{"app": x["app"], "board": x["type"], "type": x["type"], "status": x["status"], "flaky": False,
                  "attempts": [], "requirements": [], "metrics": dict(NO_METRICS), "error": None, "reason": x["reason"]}
                 for x in self.listed]
        from hil.lab import health

        for b in self.inventory.boards:  # boards no job needed: their state as it stands
            self.board_info.setdefault(b.name, {"type": b.type, "health": health.state(b.name), "check": None})
        return {"schema": SCHEMA, "run_id": self.run_id, "started": started, "finished": _now(),
                "wall_s": round(wall_s, 2), "lab": self.inventory.name, "host": socket.gethostname(),
                "boards": self.board_info, "jobs": jobs, "regressions": [], "exit_code": None}


NO_METRICS = {"accuracy": None, "auc": None, "latency_ms": None, "latency_windows_ms": None,
              "latency_ms_median_of_windows": None, "model_bytes": None, "memory_kb": None, "emulated": False,
              "macro_f1": None, "per_class": None, "confusion": None, "mae": None, "rmse": None, "r2": None,
              "f1": None, "precision": None, "recall": None, "postprocess_ms": None}


def metrics(record: dict, result: dict) -> dict:
    """What a night compares: quality, latency (per inference and the median of the windows),
    size and memory, and whether the board was emulated."""
    runner = record.get("runner", {})
    windows = [w / 1000.0 for w in runner.get("windows_us") or []]
    return {"accuracy": result.get("accuracy"), "auc": result.get("auc"), "latency_ms": result.get("latency_ms"),
            "latency_windows_ms": windows or None,
            "latency_ms_median_of_windows": statistics.median(windows) if windows else None,
            "model_bytes": result.get("model_bytes"), "memory_kb": result.get("memory_kb"),
            "emulated": bool(result.get("latency_emulated", record.get("emulated"))),
            # a classifier's per-class truth (kiln/tasks/classification.py per_class), for the HTML
            "macro_f1": result.get("macro_f1"), "per_class": result.get("per_class"),
            "confusion": result.get("confusion"),
            # a regressor's figures, in the label's units (kiln/tasks/regression.py)
            "mae": result.get("mae"), "rmse": result.get("rmse"), "r2": result.get("r2"),
            # a detector's centre figures and the host's post-processing per frame (kiln/tasks/detection.py)
            "f1": result.get("f1"), "precision": result.get("precision"), "recall": result.get("recall"),
            "postprocess_ms": result.get("postprocess_ms")}


def exit_code(night: dict) -> int:
    """0: every job passed; 1: a failed requirement or a regression; 2: the infrastructure alone
    failed (a job lost to it, a job no board could take, a board that failed its health check)."""
    statuses = [j["status"] for j in night["jobs"]]
    if "fail" in statuses or night["regressions"]:
        return EXIT_FAILED
    checks = [b.get("check") for b in night["boards"].values()]
    if "infra" in statuses or "skipped" in statuses or any(c and not c["passed"] for c in checks):
        return EXIT_INFRA
    return EXIT_PASSED


def run(apps: dict, boards: dict, lab_path: Path, run_id: str, busy: str = "wait",
        out_root: Path | None = None, only: list[str] | None = None, only_from: str = "boards") -> dict:
    """One nightly run: jobs on the lab, validation, history, regressions and the reports.
    Returns the night (nightly.json's contents)."""
    from hil import history as hist
    from hil.lab import close_opened, leasing, open_lab
    from hil.reports import write_reports
    from hil.reports.schema import validate
    from kiln.config import load_inventory

    out_root = out_root or nightly_root()
    out = out_root / run_id
    started, t0 = _now(), time.perf_counter()
    inv_path = open_lab(lab_path)
    try:
        _freeze(lab_path, [b for b in os.environ.get("KILN_NIGHTLY_FREEZE", "").split(",") if b.strip()])
        night = Night(apps, boards, load_inventory(inv_path), inv_path.parent, run_id, busy=busy, only=only,
                      leasing=leasing(lab_path), only_from=only_from)
        log.info("nightly %s: %d jobs on %d boards (%d listed only)", run_id, len(night.jobs),
                 len(night.inventory.boards), len(night.listed))
        night.run_jobs()
        result = night.report(started, time.perf_counter() - t0)
    finally:
        close_opened()
    db = hist.History(out_root / "history.sqlite")
    result["regressions"] = hist.regressions(db, result)
    result["exit_code"] = exit_code(result)
    validate(result)
    write_json(out / "nightly.json", result)
    db.record(result)
    write_reports(result, out, history=db)
    write_json(out_root / "latest.json", {"run_id": run_id, "dir": str(out), "exit_code": result["exit_code"]})
    log.info("nightly %s: %s; reports in %s", run_id, summary(result), out)
    return result


def _freeze(lab_path: Path, names: list[str]) -> None:
    """``--freeze BOARD`` ($KILN_NIGHTLY_FREEZE): hang those boards of an emulated lab before the
    night (hil/emulator/lab.py freeze), to see them recovered by a power cycle."""
    if not names:
        return
    from kiln.config import load_lab
    from kiln.registry import implementation

    backend = implementation(load_lab(lab_path))
    if not hasattr(backend, "freeze"):
        raise ValidationError(f"nightly --freeze {','.join(names)}: lab {lab_path} is not an emulated lab "
                              "(only its boards can be frozen on purpose)")
    backend.freeze([n.strip() for n in names])


def summary(night: dict) -> str:
    counts: dict[str, int] = {}
    for j in night["jobs"]:
        counts[j["status"]] = counts.get(j["status"], 0) + 1
    flaky = sum(j["flaky"] for j in night["jobs"])
    return (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + (f", {flaky} flaky" if flaky else "")
            + f", {len(night['regressions'])} regression(s), exit {night['exit_code']}")


def task_action(apps: dict, boards: dict, lab_path: Path, run_id: str, busy: str = "wait",
                only: list[str] | None = None, only_from: str = "boards") -> None:
    """doit nightly's action: the night's exit code is in nightly.json and latest.json; a
    night that did not pass fails the task, naming why (CI reads the code: python -m hil.nightly)."""
    if busy not in ("wait", "skip"):
        raise ValidationError(f"nightly: busy={busy!r}: expected wait (for a board another run holds) or skip")
    night = run(apps, boards, lab_path, run_id, busy=busy, only=only, only_from=only_from)
    print(summary(night))
    if night["exit_code"] != EXIT_PASSED:
        raise ValidationError(f"nightly {run_id}: {summary(night)} (build/nightly/{run_id}/report.html)")


EXIT_CODES = f"""exit codes (cron and CI read these):
  {EXIT_PASSED}   every job passed
  {EXIT_FAILED}   a requirement failed or a regression was flagged
  {EXIT_INFRA}   only the infrastructure failed (a job lost to it, a board that failed its
      health check, a job no board could take)
  {EXIT_USAGE}  bad command-line arguments (EX_USAGE): nothing ran"""


def parser():
    """``python -m hil.nightly``'s arguments; a bad one exits with EXIT_USAGE, not argparse's 2
    (which cron would read as EXIT_INFRA, the infrastructure failed)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    ap = Parser(prog="python -m hil.nightly", epilog=EXIT_CODES,
                description="Run `doit nightly` (every app on every lab board whose type it targets) and exit "
                            "with the night's code.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--busy", choices=("wait", "skip"), default="wait",
                    help="a board leased by another run: wait for it, or skip it")
    ap.add_argument("--freeze", metavar="BOARD[,BOARD]", default="",
                    help="an emulated lab's boards to hang on purpose (SIGSTOP) before the night: "
                         "they are recovered by a power cycle")
    return ap


def main(argv: list[str] | None = None) -> int:
    """``python -m hil.nightly [--busy wait|skip]``: ``doit nightly``, with the night's exit code
    (0 passed, 1 failed requirements or regressions, 2 infrastructure only; 64 bad arguments)."""
    import subprocess

    from kiln.artifacts import ROOT, new_run_id

    args = parser().parse_args(argv)
    run_id = os.environ.get("KILN_RUN_ID") or new_run_id()
    env = dict(os.environ, KILN_RUN_ID=run_id, KILN_NIGHTLY_BUSY=args.busy)
    if args.freeze:
        env["KILN_NIGHTLY_FREEZE"] = args.freeze
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT), "nightly"],
                          env=env)
    latest = nightly_root() / run_id / "nightly.json"
    if latest.is_file():
        return int(read_json(latest)["exit_code"])
    return EXIT_INFRA if proc.returncode else EXIT_PASSED


if __name__ == "__main__":
    raise SystemExit(main())
