"""`doit nightly` end to end on a real lab: two tiny apps on x86-host (native, twice: one of
the two is broken on purpose) and rpi4 (qemu), all reached locally or over a closed SSH port.

* the broken board fails its health check, is reported bad and skipped, its type's jobs run on
  the other x86-host, every job passes, the run finishes and writes its three reports;
* the night's latency is the median of the runner's windows of back-to-back inferences;
* two nightly runs started together never use one board at once (leases);
* the night goes into the history: a second night compares against it.
"""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest
import yaml

from tests.conftest import DOIT, TINY, local_lab, write_project

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


@pytest.fixture
def night_lab(tmp_path):
    lab = local_lab(tmp_path, "night")
    inv = yaml.safe_load((tmp_path / "lab.yaml").read_text())
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (tmp_path / "known_hosts").write_text("")
    inv["boards"].append({"name": "x86-broken", "type": "x86-host", "transport": {
        "kind": "ssh", "host": "127.0.0.1", "port": _closed_port(), "user": "root", "key": str(key),
        "known_hosts": str(tmp_path / "known_hosts"), "retries": 0, "connect_timeout_s": 2}})
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump(inv))
    for name, targets in (("tiny", ["x86-host", "rpi4"]), ("tiny2", ["x86-host"])):
        d = copy.deepcopy(TINY)
        d.update(name=name, targets=targets, tuning={"trials": 0})
        write_project(lab["projects"], d)
    return lab


def _nightly(lab, *args, timeout=900):
    return subprocess.run([*DOIT, "nightly", *args], env=lab["env"], capture_output=True, text=True,
                          timeout=timeout)


def _night(lab, run_id: str) -> dict:
    return json.loads((lab["build"] / "nightly" / run_id / "nightly.json").read_text())


def test_a_broken_board_is_marked_bad_and_skipped_while_the_others_pass(night_lab):
    lab = night_lab
    env = dict(lab["env"], KILN_RUN_ID="night-1")
    p = subprocess.run([*DOIT, "nightly"], env=env, capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    assert (lab["build"] / "nightly" / "night-1" / "nightly.json").is_file(), out[-4000:]
    night = _night(lab, "night-1")
    assert night["schema"] == "kiln-nightly/1"
    assert night["boards"]["x86-broken"]["health"] == "bad", night["boards"]
    assert night["boards"]["x86-broken"]["check"]["error"].startswith("connect"), night["boards"]["x86-broken"]
    assert night["boards"]["x86-host"]["health"] == night["boards"]["rpi4"]["health"] == "good"
    jobs = {(j["app"], j["type"]): j for j in night["jobs"]}
    assert set(jobs) == {("tiny", "x86-host"), ("tiny", "rpi4"), ("tiny2", "x86-host")}
    assert all(j["status"] == "pass" and j["board"] != "x86-broken" for j in jobs.values()), jobs
    for j in jobs.values():  # comparable latency: the median of >= 5 windows
        m = j["metrics"]
        assert len(m["latency_windows_ms"]) >= 5 and m["latency_ms_median_of_windows"] > 0
    # the run finishes, says the infrastructure (a bad board) is what went wrong: exit code 2
    assert night["exit_code"] == 2 and p.returncode != 0, out[-3000:]
    d = lab["build"] / "nightly" / "night-1"
    suites = ET.parse(d / "junit.xml").getroot()
    assert {s.get("name") for s in suites.iter("testsuite")} == {"tiny", "tiny2", "lab"}
    # the dead board is in the JUnit (issue 29: before, every testcase passed and it was absent)
    broken = suites.find("testsuite[@name='lab']/testcase[@classname='lab.x86-broken']")
    assert broken.get("name") == "health_check" and broken.find("error").get("message").startswith("health check failed: connect")
    assert int(suites.get("errors")) >= 1
    html = (d / "report.html").read_text()
    assert "<svg" in html and "x86-broken" in html and "http://" not in html.replace("http://www.w3.org", "")
    # the health state outlives the night: the next one finds the board bad and checks it again
    from hil.lab import health

    assert health.history("x86-broken", db=lab["build"] / "lab" / "health.sqlite")[-1][1] == "bad"

    # a second night: the history has the first one, nothing regressed
    env = dict(lab["env"], KILN_RUN_ID="night-2")
    subprocess.run([*DOIT, "nightly"], env=env, capture_output=True, text=True, timeout=900)
    second = _night(lab, "night-2")
    assert second["regressions"] == [] and all(j["status"] == "pass" for j in second["jobs"])
    from hil.history import History

    runs = History(lab["build"] / "nightly" / "history.sqlite").runs(last=10)
    assert [r if isinstance(r, str) else r["run_id"] for r in runs][-2:] == ["night-1", "night-2"]


def test_two_nightly_runs_at_once_never_share_a_board(night_lab):
    lab = night_lab
    procs = [subprocess.Popen([*DOIT, "nightly", "boards=x86-host,rpi4"], env=dict(lab["env"], KILN_RUN_ID=f"pair-{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    logs = [p.communicate(timeout=1200)[0] for p in procs]
    nights = [_night(lab, f"pair-{i}") for i in (1, 2)]
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for night in nights:
        assert all(j["status"] == "pass" for j in night["jobs"]), (night["jobs"], logs)
        for j in night["jobs"]:
            for a in j["attempts"]:
                spans.setdefault(a["board"], []).append((a["start"], a["end"], night["run_id"]))
    for board, s in spans.items():
        s.sort()
        for (a0, a1, ra), (b0, b1, rb) in zip(s, s[1:]):
            assert b0 >= a1 or ra == rb, f"{board}: {ra} and {rb} used it at once"
    assert any("waiting" in log for log in logs)  # the later run said it waits for the board


def test_busy_skip_says_which_boards_it_skipped(night_lab):
    from hil.lab import leases

    lab = night_lab
    root = lab["build"] / "lab" / "leases"
    with leases.acquire("rpi4", "someone else", root=root):
        p = subprocess.run([*DOIT, "nightly", "busy=skip", "boards=x86-host,rpi4"],
                           env=dict(lab["env"], KILN_RUN_ID="skip-1"), capture_output=True, text=True, timeout=900)
    assert (lab["build"] / "nightly" / "skip-1" / "nightly.json").is_file(), p.stdout[-3000:]
    night = _night(lab, "skip-1")
    assert "skipped" in night["boards"]["rpi4"]["busy"]
    rpi4 = next(j for j in night["jobs"] if j["type"] == "rpi4")
    assert rpi4["status"] == "skipped" and night["exit_code"] == 2, (night, p.stdout[-2000:])
    assert all(j["status"] == "pass" for j in night["jobs"] if j["type"] == "x86-host")


def test_python_m_hil_nightly_exits_with_the_nights_code(night_lab):
    lab = night_lab
    p = subprocess.run([sys.executable, "-m", "hil.nightly", "--busy", "wait"], env=dict(lab["env"], KILN_RUN_ID="cli-1"),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == _night(lab, "cli-1")["exit_code"] == 2, p.stdout[-2000:] + p.stderr[-2000:]


def test_an_infrastructure_failure_is_retried_on_another_board_of_its_type_and_marked_flaky(tmp_path, monkeypatch):
    """Fault injection (a unit test): the first board's deploy loses its link; the job runs
    again on the other board of the type, passes there, and is recorded as flaky, not as a
    plain pass. A job whose every board failed for the infrastructure is an infra job."""
    from hil import deploy, health_check, nightly
    from kiln.config import load_board
    from kiln.schema import Project, StaticLab

    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "build"))
    project = Project.model_validate({**copy.deepcopy(TINY), "targets": ["x86-host"]})
    inv = StaticLab(name="two", boards=[{"name": n, "type": "x86-host", "transport": {"kind": "local"}}
                                        for n in ("bad-link", "good")])
    calls = []

    def fake_job(project, board, live, layout, lab_dir, run_id, latency_windows=0):
        calls.append(live.name)
        if live.name == "bad-link":
            return {"instance": live.name, "error": {"step": "upload", "message": "link dropped mid-upload"}}
        return {"instance": live.name, "runner": {"windows_us": [10.0] * 5}, "emulated": False}

    monkeypatch.setattr(deploy, "job", fake_job)
    monkeypatch.setattr(deploy, "write_record", lambda *a: None)
    def check(inst, b, d):  # the good board comes up later: the job meets the bad link first
        if inst.name == "good":
            time.sleep(0.5)
        return "good", {"passed": True, "seconds": 0.0, "error": None}

    monkeypatch.setattr(health_check, "check_board", check)
    night = nightly.Night({"tiny": project}, {"x86-host": load_board("x86-host")}, inv, tmp_path, "fault-1")
    night.run_jobs()
    (job,) = night.jobs
    assert calls == ["bad-link", "good"]
    assert [a["board"] for a in job.attempts] == ["bad-link", "good"] and job.board == "good"
    entry = night.job_entry(job, {"passed": True, "requirements": [], "accuracy": 1.0, "latency_ms": None})
    assert entry["status"] == "pass" and entry["flaky"] is True
    assert [a["outcome"] for a in entry["attempts"]] == ["infra", "pass"]

    # the same fault with no other board of the type: an infrastructure job, not a test failure
    inv1 = StaticLab(name="one", boards=[{"name": "bad-link", "type": "x86-host", "transport": {"kind": "local"}}])
    night = nightly.Night({"tiny": project}, {"x86-host": load_board("x86-host")}, inv1, tmp_path, "fault-2")
    night.run_jobs()
    entry = night.job_entry(night.jobs[0], None)
    assert entry["status"] == "infra" and entry["flaky"] is False
    assert nightly.exit_code({"jobs": [entry], "regressions": [], "boards": {}}) == nightly.EXIT_INFRA


def test_bad_arguments_exit_64_not_the_infrastructure_code(capsys):
    """A bad flag exited 2, the code cron reads as "only the infrastructure failed"."""
    from hil import nightly

    with pytest.raises(SystemExit) as e:
        nightly.main(["--bogus"])
    assert e.value.code == nightly.EXIT_USAGE == 64 and e.value.code not in (nightly.EXIT_FAILED, nightly.EXIT_INFRA)
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        nightly.main(["--busy", "maybe"])
    assert e.value.code == 64
    with pytest.raises(SystemExit) as e:
        nightly.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "exit codes" in out
    for code, words in ((0, "every job passed"), (1, "regression"), (2, "only the infrastructure"), (64, "bad command-line")):
        assert any(line.strip().startswith(f"{code} ") and words in line for line in out.splitlines()), out


def test_a_board_choice_from_kiln_boards_is_named_so(tmp_path):
    """The error of a board choice that came from $KILN_BOARDS said boards=."""
    from hil import nightly
    from kiln.schema import StaticLab

    inv = StaticLab(name="one", boards=[{"name": "b1", "type": "x86-host", "transport": {"kind": "local"}}])
    with pytest.raises(nightly.ValidationError, match=r"^nightly: KILN_BOARDS=b2: no board b2 in lab 'one' \(its boards: b1\)"):
        nightly.Night({}, {}, inv, tmp_path, "r1", only=["b2"], only_from="KILN_BOARDS")
    with pytest.raises(nightly.ValidationError, match=r"^nightly: boards=b2: "):
        nightly.Night({}, {}, inv, tmp_path, "r1", only=["b2"])
