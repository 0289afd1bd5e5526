"""Nightly history in SQLite, and the regressions flagged against it.

``History(path)`` keeps every nightly.json (schema "kiln-nightly/1") in one SQLite file
(``build/nightly/history.sqlite`` by default): a row per run, a row per job (app x board
instance) with its status, a row per job x metric, the requirement verdicts, the boards'
health that night and the regressions the run reported. The file is in WAL mode and every write
is one short ``BEGIN IMMEDIATE`` transaction: two nightly processes recording at once take turns
on the write lock (the busy timeout waits for it) and a reader never blocks them; a writer
killed mid-record leaves no half night (the transaction rolls back when the file is next opened).

Metrics, one value per job and night (the contract's names):
  accuracy, auc, f1      higher is better (f1: a detector's, of object centres)
  latency_ms             lower is better; latency_ms_median_of_windows, else the p50
  model_bytes            lower is better
  mae                    a regressor's, lower is better (floor: 1 % of its baseline)
  passed                 1 / 0 for a job that passed / failed (infra, skipped: no row)
  memory_kb              stored for the report, never compared

``regressions(history, nightly)`` compares each job of a night with the same app on the same
board *instance* (``by="type"`` compares across the instances of a board type): the baseline is
the median of the last ``window`` nights, the tolerance ``max(k * 1.4826 * MAD, floor *
|baseline|)`` (1.4826 * MAD estimates one standard deviation of normal noise, and the median and
MAD ignore the odd outlier night that a mean and standard deviation would chase), and a metric is
flagged only when it moves the *wrong* way beyond it. ``model_bytes`` has floor 0: a library's
size is deterministic for one build, so its MAD is 0 over unchanged nights and any growth, even
one byte, is flagged (a shrink never is). With fewer than ``min_history`` nights no metric is
compared (``assess`` says so per metric), but a pass -> fail flip against the previous night is
flagged from the second night on, as KernelCI and SQUAD do; fail -> fail is not a new regression.
Latency on an emulated board is never compared (qemu's timings are the host's, not the board's).

A flagged metric stays flagged each night until the baseline (a median) has absorbed the change,
about ``window / 2`` nights later: a regression nobody fixes becomes the new normal by itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import sqlite3
import statistics
from pathlib import Path
from typing import Callable, Iterable

from kiln.artifacts import file_lock
from kiln.errors import KilnError, ValidationError

SCHEMA_VERSION = 1
NIGHTLY_SCHEMA = "kiln-nightly/1"
HIGHER_IS_BETTER = ("accuracy", "auc", "f1")
LOWER_IS_BETTER = ("latency_ms", "model_bytes", "mae")
COMPARED = HIGHER_IS_BETTER + LOWER_IS_BETTER
FLOORS = {"latency_ms": 0.05, "accuracy": 0.01, "auc": 0.01, "model_bytes": 0.0, "mae": 0.01, "f1": 0.01}
MAD_TO_SIGMA = 1.4826  # MAD x this = the standard deviation, for normal noise
BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another nightly's transaction

_TABLES = """
create table schema_version (version integer not null);
create table runs (run_id text primary key, started text not null, finished text, wall_s real,
                   lab text, host text, exit_code integer, recorded text not null);
create table jobs (run_id text not null references runs on delete cascade, app text not null,
                   board text not null, type text not null, status text not null,
                   flaky integer not null, emulated integer not null, error_step text,
                   error_message text, reason text, primary key (run_id, app, board));
create table metrics (run_id text not null references runs on delete cascade, app text not null,
                      board text not null, type text not null, metric text not null,
                      value real not null, primary key (run_id, app, board, metric));
create table verdicts (run_id text not null references runs on delete cascade, app text not null,
                       board text not null, requirement text not null, measured real, op text,
                       "limit" real, verdict text not null,
                       primary key (run_id, app, board, requirement));
create table boards (run_id text not null references runs on delete cascade, board text not null,
                     type text, health text, check_passed integer, check_seconds real,
                     check_error text, primary key (run_id, board));
create table regressions (run_id text not null references runs on delete cascade,
                          app text not null, board text not null, metric text not null,
                          kind text not null, value real, baseline real, tolerance real,
                          message text, primary key (run_id, app, board, metric));
create index metrics_series on metrics (app, board, metric);
create index metrics_series_type on metrics (app, type, metric);
create index runs_order on runs (started, run_id);
"""

# from-version -> function bringing a connection to from-version + 1 (inside the open transaction).
# Schema 1 is the first; a later schema adds its step here so an older file is migrated in place.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


def default_path() -> Path:
    """``build/nightly/history.sqlite`` under the build root."""
    from kiln.artifacts import build_root

    return build_root() / "nightly" / "history.sqlite"


def utc(stamp: str, where: str = "started") -> str:
    """An ISO 8601 time as a fixed-width UTC string, so that text order is time order."""
    try:
        t = dt.datetime.fromisoformat(stamp)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"nightly.json: {where} is not an ISO 8601 time: {stamp!r}") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)  # the contract's times are UTC
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_metrics(job: dict) -> dict[str, float]:
    """The compared and stored metrics of one job, by the contract's names (None left out).
    Only a job that ran to a verdict (pass or fail) has any: what an infrastructure failure
    measured before the link dropped is not a night of the code's history."""
    if job.get("status") not in ("pass", "fail"):
        return {}
    m = job.get("metrics") or {}
    lat = m.get("latency_ms_median_of_windows")
    if lat is None and isinstance(m.get("latency_ms"), dict):
        lat = m["latency_ms"].get("p50")
    out = {"accuracy": m.get("accuracy"), "auc": m.get("auc"), "mae": m.get("mae"), "f1": m.get("f1"), "latency_ms": lat,
           "model_bytes": m.get("model_bytes"), "memory_kb": m.get("memory_kb")}
    out["passed"] = 1.0 if job["status"] == "pass" else 0.0
    return {k: float(v) for k, v in out.items() if v is not None}


class History:
    """Every night's results in one SQLite file (WAL); a context manager."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        memory = str(path) == ":memory:"
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # opening (WAL switch, tables) under a file lock: two nightlies creating the file at
        # once otherwise get "database is locked" at once (kiln.artifacts.file_lock)
        with contextlib.nullcontext() if memory else file_lock(self.path.with_name(self.path.name + ".lock")):
            try:
                # autocommit mode: each write below opens its own BEGIN IMMEDIATE transaction
                self._db = sqlite3.connect(str(path) if memory else self.path, timeout=BUSY_TIMEOUT_S,
                                           isolation_level=None)
                self._db.execute(f"pragma busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                if not memory:
                    self._db.execute("pragma journal_mode = wal")
                self._db.execute("pragma foreign_keys = on")
            except sqlite3.DatabaseError as e:
                raise KilnError(f"history {self.path}: cannot open it as SQLite: {e}") from e
            try:
                self._prepare()
            except sqlite3.DatabaseError as e:
                self._db.close()
                raise KilnError(f"history {self.path}: cannot open it as SQLite: {e}") from e
            except KilnError:
                self._db.close()
                raise

    # -- schema -----------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Create the tables in a new file, migrate an older one, refuse what this code can't read."""
        with self._write():
            names = {r[0] for r in self._db.execute("select name from sqlite_master where type='table'")}
            if not names:
                for stmt in filter(str.strip, _TABLES.split(";")):
                    self._db.execute(stmt)
                self._db.execute("insert into schema_version values (?)", (SCHEMA_VERSION,))
                return
            if "schema_version" not in names:
                raise KilnError(f"history {self.path}: not a Kiln history (tables {sorted(names)}, "
                                "no schema_version): move it away or pass another path")
            row = self._db.execute("select max(version) from schema_version").fetchone()
            version = row[0] if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise KilnError(f"history {self.path}: written by a newer Kiln (schema {version}, this "
                                f"code reads up to {SCHEMA_VERSION}): update Kiln")
            while version < SCHEMA_VERSION:
                if version not in MIGRATIONS:
                    raise KilnError(f"history {self.path}: schema {version} is older than {SCHEMA_VERSION} "
                                    "and has no migration: move the file away to start a new history")
                MIGRATIONS[version](self._db)
                version += 1
                self._db.execute("update schema_version set version = ?", (version,))

    def _write(self):
        return _Transaction(self._db, self.path)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def record(self, nightly: dict) -> None:
        """Store one nightly.json; recording a run id again replaces that run (one transaction)."""
        run = _run_row(nightly)
        jobs = [_job_rows(j, i) for i, j in enumerate(nightly.get("jobs") or [])]
        with self._write():
            self._db.execute("delete from runs where run_id = ?", (run[0],))  # cascades
            self._db.execute("insert into runs values (?,?,?,?,?,?,?,?)", run)
            rid = run[0]
            for job, metrics, verdicts in jobs:
                self._db.execute("insert or replace into jobs values (?,?,?,?,?,?,?,?,?,?)", (rid, *job))
                app, board, btype = job[0], job[1], job[2]
                self._db.executemany("insert or replace into metrics values (?,?,?,?,?,?)",
                                     [(rid, app, board, btype, k, v) for k, v in metrics.items()])
                self._db.executemany("insert or replace into verdicts values (?,?,?,?,?,?,?,?)",
                                     [(rid, app, board, *v) for v in verdicts])
            for name, b in (nightly.get("boards") or {}).items():
                c = b.get("check") or {}
                self._db.execute("insert into boards values (?,?,?,?,?,?,?)",
                                 (rid, name, b.get("type"), b.get("health"),
                                  None if not c else int(bool(c.get("passed"))), c.get("seconds"), c.get("error")))
            for r in nightly.get("regressions") or []:
                self._db.execute("insert or replace into regressions values (?,?,?,?,?,?,?,?,?)",
                                 (rid, r["app"], r["board"], r["metric"], r["kind"], r.get("value"),
                                  r.get("baseline"), r.get("tolerance"), r.get("message")))

    # -- reading ----------------------------------------------------------------------------
    def _cutoff(self, before: str | None) -> tuple[str, str] | None:
        """(started, run id) of run ``before``: rows strictly older than it are history. A run
        not recorded (yet) is tonight's: every recorded run counts as before it."""
        if before is None:
            return None
        return self._db.execute("select started, run_id from runs where run_id = ?", (before,)).fetchone()

    def _points(self, app: str, board: str, metric: str, last: int, cutoff: tuple[str, str] | None,
                by: str = "instance") -> list[tuple[str, str, float]]:
        """(run id, started, value), oldest first, of the ``last`` nights before ``cutoff``."""
        col = {"instance": "m.board", "type": "m.type"}.get(by)
        if col is None:
            raise KilnError(f"history: by must be 'instance' or 'type', not {by!r}")
        sql = (f"select r.run_id, r.started, m.value from metrics m join runs r using (run_id) "
               f"where m.app = ? and {col} = ? and m.metric = ?")
        args: list = [app, board, metric]
        if cutoff is not None:
            sql += " and (r.started < ? or (r.started = ? and r.run_id < ?))"
            args += [cutoff[0], cutoff[0], cutoff[1]]
        sql += " order by r.started desc, r.run_id desc, m.board desc limit ?"  # by type: several a night
        rows = self._db.execute(sql, (*args, int(last))).fetchall()
        return rows[::-1]

    def series(self, app: str, board: str, metric: str, last: int = 14, before: str | None = None,
               by: str = "instance") -> list[float]:
        """The metric's values on the last ``last`` nights (before run ``before``), oldest first.
        ``board`` is an instance name, or a board type with ``by="type"``."""
        return [v for _, _, v in self._points(app, board, metric, last, self._cutoff(before), by)]

    def history(self, app: str, board: str, metric: str, last: int = 30,
                by: str = "instance") -> list[tuple[str, str, float]]:
        """[(run id, started, value)], oldest first: what the HTML report plots."""
        return self._points(app, board, metric, last, None, by)

    def last_status(self, app: str, board: str, before: str | None = None,
                    by: str = "instance") -> str | None:
        """"pass" or "fail" of the latest night before ``before`` that gave a verdict (nights
        of infra errors, skips and compile-only say nothing about the code, so they are passed
        over); None if there was none."""
        return self._last_status(app, board, self._cutoff(before), by)

    def _last_status(self, app, board, cutoff, by="instance") -> str | None:
        pts = self._points(app, board, "passed", 1, cutoff, by)
        return None if not pts else ("pass" if pts[0][2] >= 0.5 else "fail")

    def runs(self, last: int = 30) -> list[dict]:
        """The last ``last`` runs, oldest first."""
        cols = ("run_id", "started", "finished", "wall_s", "lab", "host", "exit_code")
        rows = self._db.execute(f"select {', '.join(cols)} from runs order by started desc, run_id desc "
                                "limit ?", (int(last),)).fetchall()
        return [dict(zip(cols, r)) for r in rows[::-1]]

    def health_history(self, board: str, last: int = 30) -> list[tuple[str, str]]:
        """[(started, health state)] of a board instance over the last ``last`` runs, oldest first."""
        rows = self._db.execute("select r.started, b.health from boards b join runs r using (run_id) "
                                "where b.board = ? order by r.started desc, r.run_id desc limit ?",
                                (board, int(last))).fetchall()
        return rows[::-1]

    def flagged_since(self, app: str, board: str, metric: str,
                      before: str | None = None) -> tuple[str, int] | None:
        """(first run id, nights) of the unbroken streak of runs before ``before`` (or up to the
        latest) that recorded a regression of ``metric`` for this job; None if the latest did not:
        "since when" for the report."""
        return self._open_since(app, board, metric, self._cutoff(before))

    def _open_since(self, app: str, board: str, metric: str, cutoff) -> tuple[str, int] | None:
        sql = ("select j.run_id, g.run_id is not null from jobs j join runs r using (run_id) "
               "left join regressions g on g.run_id = j.run_id and g.app = j.app and g.board = j.board "
               "and g.metric = ? where j.app = ? and j.board = ?")
        args: list = [metric, app, board]
        if cutoff is not None:
            sql += " and (r.started < ? or (r.started = ? and r.run_id < ?))"
            args += [cutoff[0], cutoff[0], cutoff[1]]
        rows = self._db.execute(sql + " order by r.started desc, r.run_id desc limit 400", args).fetchall()
        streak = []
        for rid, hit in rows:
            if not hit:
                break
            streak.append(rid)
        return (streak[-1], len(streak)) if streak else None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error. IMMEDIATE takes the write lock at
    the start, so two writers never both read and then deadlock upgrading to write."""

    def __init__(self, db: sqlite3.Connection, path: Path):
        self.db, self.path = db, path

    def __enter__(self):
        try:
            self.db.execute("begin immediate")
        except sqlite3.OperationalError as e:
            raise KilnError(f"history {self.path}: could not take the write lock within "
                            f"{BUSY_TIMEOUT_S:g} s (another nightly writing?): {e}") from e

    def __exit__(self, kind, exc, tb):
        if kind is None:
            try:
                self.db.execute("commit")
                return False
            except sqlite3.Error as e:
                self.db.execute("rollback")
                raise KilnError(f"history {self.path}: commit failed: {e}") from e
        if self.db.in_transaction:
            self.db.execute("rollback")
        if isinstance(exc, sqlite3.Error):
            raise KilnError(f"history {self.path}: write failed: {exc}") from exc
        return False


def _run_row(nightly: dict) -> tuple:
    if not isinstance(nightly, dict):
        raise ValidationError("nightly.json: not an object")
    if nightly.get("schema") != NIGHTLY_SCHEMA:
        raise ValidationError(f"nightly.json: schema is {nightly.get('schema')!r}, history reads {NIGHTLY_SCHEMA!r}")
    for key in ("run_id", "started"):
        if not nightly.get(key):
            raise ValidationError(f"nightly.json: {key} is missing")
    finished = nightly.get("finished")
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return (str(nightly["run_id"]), utc(nightly["started"]), utc(finished, "finished") if finished else None,
            nightly.get("wall_s"), nightly.get("lab"), nightly.get("host"), nightly.get("exit_code"), utc(now))


def _job_rows(job: dict, i: int) -> tuple[tuple, dict[str, float], list[tuple]]:
    """(jobs row without run id, metrics, verdict rows without run id/app/board) of jobs[i]."""
    try:
        app, board, btype, status = job["app"], job["board"], job["type"], job["status"]
    except (KeyError, TypeError) as e:
        raise ValidationError(f"nightly.json: jobs[{i}] lacks {e}") from e
    err = job.get("error") or {}
    emulated = bool((job.get("metrics") or {}).get("emulated"))
    row = (app, board, btype, status, int(bool(job.get("flaky"))), int(emulated),
           err.get("step"), err.get("message"), job.get("reason"))
    try:
        metrics = job_metrics(job)
    except (TypeError, ValueError) as e:
        raise ValidationError(f"nightly.json: jobs[{i}] ({app} on {board}): a metric is not a number: {e}") from e
    verdicts = [(r["name"], r.get("measured"), r.get("op"), r.get("limit"), r["verdict"])
                for r in job.get("requirements") or []]
    return row, metrics, verdicts


# -- regressions ------------------------------------------------------------------------------
def judge(metric: str, value: float, past: Iterable[float], k: float = 3.0, floor: float | None = None,
          min_history: int = 5) -> dict:
    """The rule for one metric of one job: {"flagged", "baseline", "tolerance", "nights", "note"}.
    ``past``: the same job's values on the previous nights (the window). Pure, so that
    bench/regressions.py measures exactly what the nightly applies."""
    past = list(past)
    floor = FLOORS.get(metric, 0.0) if floor is None else floor
    if len(past) < min_history:
        return {"flagged": False, "baseline": None, "tolerance": None, "nights": len(past),
                "note": f"insufficient history: {len(past)} of {min_history} nights, not compared"}
    base = statistics.median(past)
    mad = statistics.median(abs(v - base) for v in past)
    tol = max(k * MAD_TO_SIGMA * mad, floor * abs(base))
    worse = (base - value) if metric in HIGHER_IS_BETTER else (value - base)
    return {"flagged": worse > tol and not math.isclose(worse, tol), "baseline": base, "tolerance": tol,
            "nights": len(past), "note": None}


def assess(history: History, nightly: dict, window: int = 14, k: float = 3.0, floors: dict | None = None,
           min_history: int = 5, by: str = "instance") -> list[dict]:
    """Every comparison made for a night, flagged or not: the contract's regression keys plus
    "flagged", "nights" and "note" (why a metric was not compared: too little history, an
    emulated board's latency)."""
    floors = {**FLOORS, **(floors or {})}
    cutoff = (utc(nightly["started"]), str(nightly["run_id"]))  # this run, recorded or not, is excluded
    out = []
    for job in nightly.get("jobs") or []:
        if job.get("status") not in ("pass", "fail"):
            continue  # infra, skipped, not validated: no verdict on the code, nothing to compare
        key = (job["app"], job["board"] if by == "instance" else job["type"])
        out.append(_flip(history, job, key, cutoff, by))
        values = job_metrics(job)
        for metric in COMPARED:
            if metric not in values:
                continue
            if metric == "latency_ms" and (job.get("metrics") or {}).get("emulated"):
                out.append(_item(job, metric, values[metric], None, None, "metric", False, None, None,
                                 "emulated board: latency is the host's, not compared"))
                continue
            past = [v for _, _, v in history._points(*key, metric, window, cutoff, by)]
            j = judge(metric, values[metric], past, k, floors.get(metric, 0.0), min_history)
            msg = _message(history, job, metric, values[metric], j, cutoff) if j["flagged"] else None
            out.append(_item(job, metric, values[metric], j["baseline"], j["tolerance"], "metric",
                             j["flagged"], j["nights"], msg, j["note"]))
    return out


def regressions(history: History, nightly: dict, window: int = 14, k: float = 3.0,
                floors: dict | None = None, min_history: int = 5, by: str = "instance") -> list[dict]:
    """The night's regressions, in the contract's "regressions" item format."""
    keys = ("app", "board", "metric", "value", "baseline", "tolerance", "kind", "message")
    return [{k_: a[k_] for k_ in keys}
            for a in assess(history, nightly, window, k, floors, min_history, by) if a["flagged"]]


def _flip(history: History, job: dict, key: tuple[str, str], cutoff, by: str) -> dict:
    """pass -> fail against the previous night with a verdict: flagged however short the history."""
    prev = history._last_status(*key, cutoff, by)
    now = 1.0 if job["status"] == "pass" else 0.0
    flagged = prev == "pass" and job["status"] == "fail"
    msg = f"{job['app']} on {job['board']}: passed on the previous night, fails now" if flagged else None
    note = {None: "no previous verdict", "fail": "failed on the previous night too: not a new regression"
            if job["status"] == "fail" else "fixed: failed on the previous night"}.get(prev)
    return _item(job, "passed", now, None if prev is None else float(prev == "pass"), 0.0, "flip",
                 flagged, None, msg, note)


def _message(history: History, job: dict, metric: str, value: float, j: dict, cutoff) -> str:
    better = "higher" if metric in HIGHER_IS_BETTER else "lower"
    rel = (value - j["baseline"]) / j["baseline"] * 100 if j["baseline"] else float("inf")
    msg = (f"{job['app']} on {job['board']}: {metric} {value:.6g} against a baseline of {j['baseline']:.6g} "
           f"({rel:+.1f}%; tolerance {j['tolerance']:.3g}, median of {j['nights']} nights; {better} is better)")
    since = history._open_since(job["app"], job["board"], metric, cutoff)
    if since:
        msg += f"; flagged since run {since[0]} ({since[1] + 1} nights)"
    return msg


def _item(job, metric, value, baseline, tolerance, kind, flagged, nights, message, note) -> dict:
    return {"app": job["app"], "board": job["board"], "metric": metric, "value": value,
            "baseline": baseline, "tolerance": tolerance, "kind": kind, "message": message,
            "flagged": bool(flagged), "nights": nights, "note": note}
