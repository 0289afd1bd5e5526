"""hil.history: nightly results in a real SQLite file (two real writer processes, one killed
with -9) and regressions over synthetic histories made with seeded numpy.

The noise model of the synthetic nights (the same as bench/regressions.py's default row):
  latency   each inference lognormal with a CV drawn per board from 3-5 %; a night measures 5
            windows of 40 back-to-back inferences and reports the median of the window medians
            (MLPerf Tiny's way); on top, the board's state that night (clock, temperature, memory
            layout) scales the whole night by a lognormal of CV 1 %; on 1 night in 50 an
            interference burst (a cron job, thermal throttling) makes 1 or 2 consecutive
            windows +30 % slower.
  accuracy  1000 test samples, the number right jitters by -3..+3 samples.
  auc       jitters uniformly by +-0.002.
  size      constant.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from hil import history as H
from kiln.errors import KilnError, ValidationError

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2025, 1, 1, 2, 0, tzinfo=dt.timezone.utc)


def job(app="kws", board="rpi4-1", btype="rpi4", status="pass", latency=None, windows=None,
        accuracy=None, auc=None, model_bytes=None, emulated=False, p50=None):
    lat = None if p50 is None else {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.3, "mean": p50,
                                      "min": p50 * 0.9, "max": p50 * 1.5}
    return {"app": app, "board": board, "type": btype, "status": status, "flaky": False,
            "attempts": [{"board": board, "outcome": status if status != "skipped" else "pass",
                          "error": None, "seconds": 1.0}],
            "requirements": [{"name": "accuracy", "measured": accuracy or 0.0, "op": ">=", "limit": 0.5,
                              "verdict": "pass" if status == "pass" else "fail"}],
            "metrics": {"accuracy": accuracy, "auc": auc, "latency_ms": lat, "latency_windows_ms": windows,
                        "latency_ms_median_of_windows": latency, "model_bytes": model_bytes,
                        "memory_kb": 100.0, "emulated": emulated},
            "error": None if status != "infra" else {"step": "upload", "message": "link down"},
            "reason": None}


def nightly(i: int, jobs: list[dict], regressions=(), boards=None) -> dict:
    start = T0 + dt.timedelta(days=i)
    boards = boards or {j["board"]: {"type": j.get("type"), "health": "good",
                                     "check": {"passed": True, "seconds": 2.0, "error": None}} for j in jobs}
    return {"schema": "kiln-nightly/1", "run_id": f"n{i:04d}", "started": start.isoformat(),
            "finished": (start + dt.timedelta(minutes=20)).isoformat(), "wall_s": 1200.0, "lab": "desk",
            "host": "ci-1", "boards": boards, "jobs": jobs, "regressions": list(regressions), "exit_code": 0}


# -- the noise model -------------------------------------------------------------------------
class Board:
    """One board's nights under the noise model of this module's docstring."""

    def __init__(self, seed: int, latency_ms=4.0, correct=953, auc=0.93, size=61_440):
        self.rng = np.random.default_rng(seed)
        self.cv = self.rng.uniform(0.03, 0.05)
        self.latency_ms, self.correct, self.auc, self.size = latency_ms, correct, auc, size
        self.outliers = 0

    def latency(self, slowdown=1.0) -> tuple[float, list[float]]:
        s = np.sqrt(np.log1p(self.cv ** 2))
        runs = self.latency_ms * slowdown * self.rng.lognormal(-s * s / 2, s, size=(5, 40))
        runs *= self.rng.lognormal(0.0, 0.01)
        if self.rng.random() < 1 / 50:
            self.outliers += 1
            first, n = self.rng.integers(0, 4), self.rng.integers(1, 3)
            runs[first:first + n] *= 1.30
        windows = np.median(runs, axis=1)
        return float(np.median(windows)), [float(w) for w in windows]

    def accuracy(self, drop=0.0) -> float:
        return (self.correct + int(self.rng.integers(-3, 4))) / 1000 - drop

    def auc_value(self) -> float:
        return self.auc + float(self.rng.uniform(-0.002, 0.002))

    def night(self, app="kws", board="rpi4-1", slowdown=1.0, drop=0.0, grow=0, status="pass", emulated=False):
        lat, win = self.latency(slowdown)
        return job(app, board, "rpi4" if not emulated else "rpi4-qemu", status, latency=lat * (20 if emulated else 1),
                   windows=win, accuracy=self.accuracy(drop), auc=self.auc_value(), model_bytes=self.size + grow,
                   emulated=emulated)


def run_nights(hist: H.History, first: int, nights: list[list[dict]], **kw) -> list[list[dict]]:
    """Judge each night against the history before it, then record it with its regressions."""
    flagged = []
    for i, jobs in enumerate(nights, start=first):
        n = nightly(i, jobs)
        n["regressions"] = H.regressions(hist, n, **kw)
        hist.record(n)
        flagged.append(n["regressions"])
    return flagged


@pytest.fixture
def hist(tmp_path):
    with H.History(tmp_path / "history.sqlite") as h:
        yield h


# -- storage ---------------------------------------------------------------------------------
def test_record_then_read_back_series_status_runs_and_health(hist, tmp_path):
    for i, (lat, status) in enumerate([(4.0, "pass"), (4.1, "fail"), (None, "infra"), (4.2, "pass")]):
        j = job(latency=lat, accuracy=0.9 + i / 100, model_bytes=1000, status=status)
        other = job(board="rpi4-2", latency=9.0 + i, accuracy=0.5, model_bytes=1000)
        boards = {"rpi4-1": {"type": "rpi4", "health": ["good", "good", "bad", "good"][i], "check": None},
                  "rpi4-2": {"type": "rpi4", "health": "good", "check": None}}
        hist.record(nightly(i, [j, other], boards=boards))
    assert hist.series("kws", "rpi4-1", "latency_ms") == [4.0, 4.1, 4.2]  # oldest first; infra: no value
    assert hist.series("kws", "rpi4-1", "latency_ms", last=2) == [4.1, 4.2]
    assert hist.series("kws", "rpi4-1", "latency_ms", before="n0003") == [4.0, 4.1]
    assert hist.series("kws", "rpi4", "latency_ms", by="type") == [4.0, 9.0, 4.1, 10.0, 11.0, 4.2, 12.0]
    assert hist.series("kws", "rpi4-1", "passed") == [1.0, 0.0, 1.0]
    assert hist.last_status("kws", "rpi4-1") == "pass"
    assert hist.last_status("kws", "rpi4-1", before="n0003") == "fail"  # the infra night is passed over
    assert hist.last_status("kws", "rpi4-1", before="n0000") is None
    assert hist.last_status("kws", "nowhere") is None
    pts = hist.history("kws", "rpi4-1", "accuracy", last=2)
    assert [(r, v) for r, _, v in pts] == [("n0001", 0.91), ("n0003", 0.93)]
    assert pts[0][1] == "2025-01-02T02:00:00.000000Z"
    assert [r["run_id"] for r in hist.runs(last=3)] == ["n0001", "n0002", "n0003"]
    assert [s for _, s in hist.health_history("rpi4-1")] == ["good", "good", "bad", "good"]
    # a run not recorded yet is tonight's: everything recorded is before it
    assert hist.series("kws", "rpi4-1", "latency_ms", before="tonight") == [4.0, 4.1, 4.2]
    assert hist.last_status("kws", "rpi4-1", before="tonight") == "pass"


def test_recording_a_run_again_replaces_it(hist):
    hist.record(nightly(0, [job(latency=4.0, p50=3.0)]))
    hist.record(nightly(0, [job(latency=None, p50=5.0)]))  # no median of windows: the p50 stands in
    assert hist.series("kws", "rpi4-1", "latency_ms") == [5.0]
    hist.record(nightly(0, []))  # the run's old jobs go with it
    assert hist.series("kws", "rpi4-1", "latency_ms") == [] and hist.last_status("kws", "rpi4-1") is None
    assert len(hist.runs()) == 1


def test_a_malformed_nightly_is_refused_naming_the_key(hist):
    with pytest.raises(ValidationError, match="schema is 'kiln-nightly/0'"):
        hist.record({**nightly(0, []), "schema": "kiln-nightly/0"})
    with pytest.raises(ValidationError, match="started is not an ISO 8601 time"):
        hist.record({**nightly(0, []), "started": "yesterday"})
    bad = job()
    del bad["type"]
    with pytest.raises(ValidationError, match=r"jobs\[0\] lacks 'type'"):
        hist.record(nightly(0, [bad]))
    assert hist.runs() == []  # nothing half-written


WRITER = textwrap.dedent("""
    import sys, time, datetime as dt, os
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from test_history import nightly, job
    from hil.history import History
    path, tag, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    open(go + "." + tag, "w").close()  # ready: imported, waiting for the start
    while not os.path.exists(go):
        time.sleep(0.001)
    with History(path) as h:
        for i in range(count if count > 0 else 10**9):
            n = nightly(i, [job(app=f"app{{a}}", board=f"b{{b}}", latency=1.0 + i, accuracy=0.9,
                                model_bytes=100) for a in range(6) for b in range(6)])
            n["run_id"] = f"{{tag}}-{{i:05d}}"
            h.record(n)
            time.sleep(0.002)  # a nightly writes now and then, not back to back
            if count <= 0:
                print(i, flush=True)
""")


def _writer(tmp_path, db, tag, count, go):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT), tests=str(Path(__file__).parent)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(db), tag, str(count), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nightly_processes_record_at_once(tmp_path):
    db, go = tmp_path / "fresh.sqlite", tmp_path / "go"  # a new file: both also race to create it
    procs = [_writer(tmp_path, db, tag, 60, go) for tag in ("a", "b")]
    deadline = time.monotonic() + 60  # both imported and waiting, however loaded the machine is
    while not all(Path(f"{go}.{t}").exists() for t in ("a", "b")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    con = sqlite3.connect(db)
    assert con.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
    assert con.execute("select count(*) from runs").fetchone()[0] == 120
    assert con.execute("select count(*) from jobs").fetchone()[0] == 120 * 36
    assert con.execute("select count(*) from metrics").fetchone()[0] == 120 * 36 * 5  # latency, accuracy, bytes, memory, passed
    assert con.execute("select count(*) from schema_version").fetchone()[0] == 1
    # they really wrote at the same time: in commit order, the two writers' nights interleave
    order = [r[0][0] for r in con.execute("select run_id from runs order by recorded")]
    switches = sum(a != b for a, b in zip(order, order[1:]))
    print(f"two writers, 120 nights: {switches} switches between writers in commit order")
    assert switches >= 5


def test_a_writer_killed_with_minus_9_leaves_only_whole_nights(tmp_path):
    db, go = tmp_path / "h.sqlite", tmp_path / "go"
    go.touch()
    p = _writer(tmp_path, db, "k", 0, go)
    for _ in range(5):  # let it commit a few nights, then kill it in the middle of the next ones
        p.stdout.readline()
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    with H.History(db) as h:
        con = h._db
        assert con.execute("pragma integrity_check").fetchone()[0] == "ok"
        per_run = con.execute("select r.run_id, count(j.app) from runs r left join jobs j using (run_id) "
                              "group by r.run_id").fetchall()
        assert len(per_run) >= 5
        assert {n for _, n in per_run} == {36}, per_run  # every recorded night has all its jobs
        h.record(nightly(0, [job(latency=1.0)]))  # and the file takes new nights
        assert h.series("kws", "rpi4-1", "latency_ms") == [1.0]


def test_a_history_of_another_schema_is_refused_or_migrated(tmp_path, monkeypatch):
    newer = tmp_path / "newer.sqlite"
    H.History(newer).close()
    con = sqlite3.connect(newer)
    con.execute("update schema_version set version = 7")
    con.commit()
    con.close()
    with pytest.raises(KilnError, match=r"newer.sqlite: written by a newer Kiln \(schema 7"):
        H.History(newer)

    old = tmp_path / "old.sqlite"
    H.History(old).close()
    con = sqlite3.connect(old)
    con.execute("update schema_version set version = 0")
    con.commit()
    con.close()
    with pytest.raises(KilnError, match="schema 0 is older than 1 and has no migration"):
        H.History(old)

    foreign = tmp_path / "foreign.sqlite"
    con = sqlite3.connect(foreign)
    con.execute("create table results (x)")
    con.commit()
    con.close()
    with pytest.raises(KilnError, match=r"not a Kiln history \(tables \['results'\]"):
        H.History(foreign)

    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KilnError, match="junk.sqlite: cannot open it as SQLite"):
        H.History(junk)

    # a later schema's migration step runs on an older file, in place, keeping its nights
    v1 = tmp_path / "v1.sqlite"
    with H.History(v1) as h:
        h.record(nightly(0, [job(latency=4.0)]))
    monkeypatch.setattr(H, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(H.MIGRATIONS, 1, lambda db: db.execute("alter table runs add column commit_sha text"))
    with H.History(v1) as h:
        assert h._db.execute("select version from schema_version").fetchone()[0] == 2
        assert "commit_sha" in [r[1] for r in h._db.execute("pragma table_info(runs)")]
        assert h.series("kws", "rpi4-1", "latency_ms") == [4.0]


# -- regressions over synthetic histories ------------------------------------------------------
def test_unchanged_code_with_realistic_noise_raises_no_flag_in_100_nights(hist):
    boards = {name: Board(seed) for seed, name in enumerate(["rpi4-1", "rpi4-2", "qemu-1"])}
    nights, flagged, compared = [], [], 0
    for i in range(100):
        jobs = [boards["rpi4-1"].night("kws", "rpi4-1"), boards["rpi4-2"].night("kws", "rpi4-2"),
                boards["qemu-1"].night("kws", "qemu-1", emulated=True)]
        n = nightly(i, jobs)
        checks = H.assess(hist, n)
        compared += sum(1 for c in checks if c["kind"] == "metric" and c["baseline"] is not None)
        n["regressions"] = [c for c in checks if c["flagged"]]
        flagged += n["regressions"]
        hist.record(n)
        nights.append(jobs)
    assert flagged == []
    # not vacuous: 95 nights x (4 metrics x 2 boards + 3 on the emulated one) were compared,
    # and the noise had outlier nights and spread in it
    assert compared == 95 * 11
    assert sum(b.outliers for b in boards.values()) >= 3
    lat = np.array(hist.series("kws", "rpi4-1", "latency_ms", last=100))
    assert 0.005 < np.std(lat) / np.mean(lat) < 0.03
    assert len(set(hist.series("kws", "rpi4-1", "accuracy", last=100))) >= 5


@pytest.mark.parametrize("seed", range(5))
def test_a_10_percent_slowdown_is_flagged_the_first_night(hist, seed):
    b = Board(100 + seed)
    flagged = run_nights(hist, 0, [[b.night()] for _ in range(30)] + [[b.night(slowdown=1.10)] for _ in range(3)])
    assert all(f == [] for f in flagged[:30])
    first = flagged[30]
    assert [(r["metric"], r["kind"]) for r in first] == [("latency_ms", "metric")]
    assert first[0]["value"] > first[0]["baseline"] + first[0]["tolerance"]
    assert "flagged since" not in first[0]["message"]
    assert [r["metric"] for r in flagged[31]] == ["latency_ms"]
    assert "flagged since run n0030 (2 nights)" in flagged[31][0]["message"]


def test_an_accuracy_drop_of_3_points_is_flagged(hist):
    b = Board(7)
    flagged = run_nights(hist, 0, [[b.night()] for _ in range(20)] + [[b.night(drop=0.03)]])
    assert all(f == [] for f in flagged[:20])
    assert [r["metric"] for r in flagged[20]] == ["accuracy"]
    r = flagged[20][0]
    assert r["baseline"] - r["value"] > r["tolerance"] and "higher is better" in r["message"]


def test_an_accuracy_rise_and_a_speedup_are_not_regressions(hist):
    b = Board(8)
    flagged = run_nights(hist, 0, [[b.night()] for _ in range(20)] + [[b.night(drop=-0.03, slowdown=0.8)]])
    assert flagged[20] == []


def test_library_growth_is_flagged_and_a_shrink_is_not(hist):
    b = Board(9)
    flagged = run_nights(hist, 0, [[b.night()] for _ in range(10)] + [[b.night(grow=-512)], [b.night(grow=16)]])
    assert flagged[10] == []
    assert [(r["metric"], r["value"] - r["baseline"], r["tolerance"]) for r in flagged[11]] == [("model_bytes", 16.0, 0.0)]


def test_pass_to_fail_is_flagged_at_once_but_fail_to_fail_is_not(hist):
    b = Board(10)
    nights = [[b.night()], [b.night(status="fail")], [b.night(status="fail")], [b.night()],
              [job(status="infra")], [b.night(status="fail")]]
    n = nightly(1, nights[1])
    hist.record(nightly(0, nights[0]))
    checks = H.assess(hist, n)
    # one night of history: no metric compared (and it says so), but the flip is flagged
    assert all(c["note"] == "insufficient history: 1 of 5 nights, not compared"
               for c in checks if c["kind"] == "metric")
    assert [(c["metric"], c["kind"]) for c in checks if c["flagged"]] == [("passed", "flip")]
    flagged = run_nights(hist, 1, nights[1:])
    assert [[r["kind"] for r in f] for f in flagged] == [["flip"], [], [], [], ["flip"]]
    assert "passed on the previous night, fails now" in flagged[0][0]["message"]
    # (the infra night in between says nothing about the code: pass -> infra -> fail is a flip)


def test_few_nights_compare_no_metric(hist):
    b = Board(11)
    flagged = run_nights(hist, 0, [[b.night()] for _ in range(4)] + [[b.night(slowdown=2.0, drop=0.2, grow=999)]])
    assert flagged == [[]] * 5
    flagged = run_nights(hist, 5, [[b.night(slowdown=2.0)]], min_history=3)  # now 5 nights: compared
    assert [r["metric"] for r in flagged[0]] == ["latency_ms"]


def test_emulated_latency_is_never_compared_but_its_accuracy_is(hist):
    b = Board(12)
    flagged = run_nights(hist, 0, [[b.night(board="q", emulated=True)] for _ in range(10)]
                         + [[b.night(board="q", emulated=True, slowdown=3.0)],
                            [b.night(board="q", emulated=True, drop=0.05)]])
    assert flagged[10] == []
    assert [r["metric"] for r in flagged[11]] == ["accuracy"]
    notes = [c["note"] for c in H.assess(hist, nightly(99, [b.night(board="q", emulated=True)]))
             if c["metric"] == "latency_ms"]
    assert notes == ["emulated board: latency is the host's, not compared"]


def test_by_type_compares_across_instances_of_a_board_type(hist):
    b = Board(13)
    run_nights(hist, 0, [[b.night(board=f"rpi4-{i % 3}")] for i in range(12)])
    n = nightly(12, [b.night(board="rpi4-new", slowdown=1.2)])
    assert H.regressions(hist, n) == []  # a new instance has no history of its own
    assert [r["metric"] for r in H.regressions(hist, n, by="type")] == ["latency_ms"]
