"""Issue 29: power as a board resource: the schema, the command and emulated switches, the
``python -m hil.lab power`` command, recovery by a power cycle (a real sshd frozen with SIGSTOP,
a real pty board), and the nightly JUnit's lab testcases."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import psutil
import pytest
import yaml
from pydantic import ValidationError

from hil.lab import health, power
from kiln.artifacts import ROOT
from kiln.schema import Instance, StaticLab


def _ssh_answers(t) -> bool:
    try:
        with socket.create_connection((t.host, t.port), timeout=1.0) as s:
            s.settimeout(1.0)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


# -- schema and the command kind -----------------------------------------------------------

def test_inventory_gives_a_board_a_power_control_and_refuses_a_bad_one():
    lab = StaticLab.model_validate({"boards": [
        {"name": "b1", "type": "x86-host", "power": {"kind": "command", "on": "pdu on 1", "off": "pdu off 1"}},
        {"name": "b2", "type": "x86-host"}]})
    assert lab.boards[0].power.kind == "command" and lab.boards[0].power.cycle is None
    assert lab.boards[1].power is None
    with pytest.raises(ValidationError, match="pdu"):
        StaticLab.model_validate({"boards": [{"name": "b1", "type": "x86-host", "power": {"kind": "pdu"}}]})
    with pytest.raises(ValidationError, match="off"):
        StaticLab.model_validate({"boards": [{"name": "b1", "type": "x86-host",
                                              "power": {"kind": "command", "on": "x"}}]})


def test_command_power_runs_on_off_and_cycle_naming_the_board(tmp_path):
    log = tmp_path / "log"
    inst = Instance(name="b1", type="x86-host", power={
        "kind": "command", "on": f'echo "on $KILN_BOARD" >> {log}', "off": f'echo "off $KILN_BOARD" >> {log}',
        "off_s": 0})
    for action in ("on", "off", "cycle"):
        power.switch(inst, action)
    assert log.read_text().split("\n") == ["on b1", "off b1", "off b1", "on b1", ""]
    broken = inst.model_copy(update={"power": inst.power.model_copy(update={"on": "echo no relay >&2; exit 3"})})
    with pytest.raises(power.PowerError, match="b1: power on command .* exited 3: no relay"):
        power.switch(broken, "on")
    with pytest.raises(power.PowerError, match="b2 has no power control"):
        power.switch(Instance(name="b2", type="x86-host"), "cycle")


def test_hil_lab_power_names_the_board_and_the_known_boards(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"boards": [
        {"name": "b1", "type": "x86-host", "power": {"kind": "command", "on": f"touch {tmp_path}/on", "off": "true"}},
        {"name": "b2", "type": "x86-host"}]}))
    run = lambda *a: subprocess.run([sys.executable, "-m", "hil.lab", "--lab", str(lab), "power", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=ROOT, timeout=60)
    r = run("b1", "on")
    assert r.returncode == 0 and "b1: power on" in r.stdout and (tmp_path / "on").exists()
    r = run("nope", "on")
    assert r.returncode == 1 and "no board 'nope'" in r.stderr and "b1, b2" in r.stderr
    r = run("b2", "cycle")
    assert r.returncode == 1 and "b2" in r.stderr and "no power control" in r.stderr and "b1" in r.stderr


# -- the emulated lab's switches on real processes -------------------------------------------

@pytest.fixture
def emu(kiln_env):
    """An emulated lab of one SSH board and one serial board, its live inventory; stopped after."""
    from hil.emulator import lab as emlab

    spec = kiln_env["root"] / "lab.yaml"
    spec.write_text(yaml.safe_dump({"backend": "emulated", "boards": [
        {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}},
        {"name": "c1", "type": "x86-host", "transport": {"kind": "serial", "timeout_s": 3, "retries": 1}}]}))
    inv = StaticLab.model_validate(yaml.safe_load(emlab.up(spec).read_text()))
    yield {"spec": spec, "boards": {b.name: b for b in inv.boards}, "root": kiln_env["root"]}
    emlab.down()


def _sshd_pid() -> int:
    from hil.emulator import lab as emlab

    return emlab._read_state()["boards"]["s1"]["pids"][0]


def test_emulated_power_cuts_and_restores_the_boards_real_processes(emu):
    from hil.emulator import lab as emlab

    s1, c1 = emu["boards"]["s1"], emu["boards"]["c1"]
    assert s1.power.kind == "emulated" and c1.power.kind == "emulated"  # the emulator gives them one
    pid = _sshd_pid()
    host_key = (emu["root"] / "build" / "lab" / "s1" / "host_key.pub").read_text()
    power.switch(s1, "off")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not _ssh_answers(s1.transport)
    assert emlab.is_up()  # a board switched off is not a dead lab: no deploy restarts it under us
    power.switch(s1, "on")
    assert _sshd_pid() != pid and _ssh_answers(s1.transport)  # same address and port
    assert (emu["root"] / "build" / "lab" / "s1" / "host_key.pub").read_text() == host_key
    from hil.transport import open_transport

    with open_transport(s1, emu["root"], emu["root"] / "local") as t:  # known_hosts still holds
        assert t.run(["echo", "back"], timeout=30).stdout.strip() == "back"

    old = emlab._read_state()["boards"]["c1"]["pids"]
    power.switch(c1, "off")
    assert not os.path.exists(c1.transport.port) and not any(psutil.pid_exists(p) for p in old[:1])
    power.switch(c1, "on")
    assert os.path.exists(c1.transport.port) and emlab._read_state()["boards"]["c1"]["pids"] != old


# -- recovery: a frozen board is cycled and checked again ------------------------------------

@pytest.fixture
def runner_bundle(kiln_env):
    import shutil

    from hil.runner.build import build_runner
    from kiln.artifacts import runner_dir, runtime_cache

    for arch in ("x86_64",):
        built = ROOT / "build" / "runner" / arch
        if (built / "runner.json").is_file():
            shutil.copytree(built, runner_dir(arch))
        else:
            build_runner(arch, runner_dir(arch), runtime_cache())


def test_a_frozen_sshd_is_recovered_by_a_power_cycle(emu, runner_bundle):
    from hil import health_check
    from kiln.config import load_board

    s1 = emu["boards"]["s1"]
    os.kill(_sshd_pid(), signal.SIGSTOP)  # wedged: the port still accepts, nothing answers
    t0 = time.perf_counter()
    state, check, cycles = health_check.check_and_recover(s1, load_board("x86-host"), emu["root"], timeout_s=20)
    print(f"\nfrozen -> recovered in {time.perf_counter() - t0:.1f} s: first {check['first']}, cycle {cycles}")
    assert not check["first"]["passed"] and check["passed"] and state == "good"
    assert len(cycles) == 1 and cycles[0]["passed"]
    rows = [r for _, _, r in health.history("s1")]
    assert rows[-3].startswith("check failed: ") and "power-cycling" in rows[-3]
    assert rows[-2].startswith("power cycle (failed its health check") and "answered after" in rows[-2]
    assert rows[-1].startswith("check passed")


def test_a_frozen_serial_board_is_recovered_by_a_power_cycle(emu, runner_bundle):
    from hil import health_check
    from hil.emulator import lab as emlab
    from kiln.config import load_board

    c1 = emu["boards"]["c1"]
    pids = emlab._read_state()["boards"]["c1"]["pids"]
    for p in pids:  # its console (socat) and its shell: wedged
        os.kill(p, signal.SIGSTOP)
    t0 = time.perf_counter()
    state, check, cycles = health_check.check_and_recover(c1, load_board("x86-host"), emu["root"], timeout_s=20)
    print(f"\nserial frozen -> recovered in {time.perf_counter() - t0:.1f} s: first {check['first']}, cycle {cycles}")
    assert not check["first"]["passed"] and check["passed"] and state == "good"
    assert cycles[0]["passed"] and not set(pids) & set(emlab._read_state()["boards"]["c1"]["pids"])
    rows = [r for _, _, r in health.history("c1")]
    assert rows[-3].startswith("check failed") and rows[-2].startswith("power cycle") and rows[-1].startswith("check passed")


def test_a_board_that_stays_dead_after_a_cycle_is_marked_bad_with_both_attempts(emu, runner_bundle):
    from hil import health_check
    from kiln.config import load_board

    # its power switch does nothing for it (a relay on the wrong port): it stays frozen
    from kiln.schema.lab import CommandPower

    s1 = emu["boards"]["s1"].model_copy(update={"power": CommandPower(kind="command", on="true", off="true", off_s=0)})
    os.kill(_sshd_pid(), signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        state, check, cycles = health_check.check_and_recover(s1, load_board("x86-host"), emu["root"],
                                                              timeout_s=20, answer_timeout_s=3)
        print(f"\nstays dead -> marked bad in {time.perf_counter() - t0:.1f} s: {check}")
    finally:
        os.kill(_sshd_pid(), signal.SIGCONT)
    assert state == "bad" == health.state("s1") and not check["passed"] and not check["first"]["passed"]
    assert not cycles[0]["passed"] and "did not answer within 3 s" in cycles[0]["error"]
    rows = [(s, r) for _, s, r in health.history("s1")]
    assert rows[-3][1].startswith("check failed") and rows[-2][1].startswith("power cycle") and "failed" in rows[-2][1]
    assert rows[-1][0] == "bad" and "after a power cycle" in rows[-1][1]


# -- the nightly: a board that goes silent mid-job, and the JUnit --------------------------

def test_nightly_cycles_a_board_that_goes_silent_mid_job_and_its_jobs_pass(emu, runner_bundle, monkeypatch):
    """The health check passes; the sshd is then frozen; the first job (a real command over the
    board's real SSH transport) fails for the infrastructure; the board is cycled, checked again,
    and the job is retried on it and passes. The cycle is in the night's board info and JUnit."""
    from hil import deploy, nightly
    from hil.reports import junit
    from hil.transport import open_transport
    from kiln.config import load_board
    from kiln.schema import Project
    from tests.conftest import TINY

    s1 = emu["boards"]["s1"]
    inv = StaticLab(name="emu", boards=[s1])
    project = Project.model_validate({**TINY, "targets": ["x86-host"]})
    frozen = []

    def job(project, board, live, layout, lab_dir, run_id, latency_windows=0):
        if not frozen:
            os.kill(_sshd_pid(), signal.SIGSTOP)
            frozen.append(time.perf_counter())
        try:
            with open_transport(live, lab_dir, emu["root"] / "local") as t:
                t.run(["true"], timeout=5)
        except Exception as e:  # noqa: BLE001 -- the transport's own error, as deploy records it
            return {"instance": live.name, "error": {"step": "connect", "message": str(e)}}
        return {"instance": live.name, "runner": {"windows_us": [10.0] * 5}, "emulated": False}

    monkeypatch.setattr(deploy, "job", job)
    monkeypatch.setattr(deploy, "write_record", lambda *a: None)
    night = nightly.Night({"tiny": project}, {"x86-host": load_board("x86-host")}, inv, emu["root"], "pw-1")
    night.run_jobs()
    (j,) = night.jobs
    print(f"\nattempts: {j.attempts}\ncycles: {night.board_info['s1'].get('power_cycles')}")
    assert [a["outcome"] for a in j.attempts] == ["infra", "ran"] and j.board == "s1"
    info = night.board_info["s1"]
    assert info["health"] == "good" and len(info["power_cycles"]) == 1 and info["power_cycles"][0]["check"]["passed"]
    entry = night.job_entry(j, {"passed": True, "requirements": []})
    assert entry["status"] == "pass" and entry["flaky"]
    xml = junit.build({"run_id": "pw-1", "started": "2026-01-01T00:00:00Z", "host": "h", "jobs": [entry],
                       "boards": night.board_info})
    lab = xml.find("testsuite[@name='lab']")
    assert [tc.get("name") for tc in lab] == ["power_cycle 1", "health_check after power_cycle 1", "health_check"]
    from hil.reports.html import _boards

    page = _boards({"boards": night.board_info}, None)
    assert "power cycles" in page and "ok in " in page and "went silent during tiny" in page


def test_a_dead_board_is_an_error_testcase_in_the_junit():
    """Before: a night whose only trouble is a dead board had no testcase about it."""
    from hil.reports import junit

    night = {"run_id": "r", "started": "2026-01-01T00:00:00Z", "host": "h", "jobs": [], "boards": {
        "good1": {"type": "x86-host", "health": "good", "check": {"passed": True, "seconds": 1.0, "error": None}},
        "dead1": {"type": "x86-host", "health": "bad", "check": {
            "passed": False, "seconds": 2.0, "error": "power: did not answer",
            "first": {"passed": False, "seconds": 5.0, "error": "connect: timed out"}},
            "power_cycles": [{"action": "cycle", "reason": "failed its health check", "passed": False,
                              "seconds": 3.0, "answered_s": None, "error": "did not answer within 3 s"}]},
        "bench": {"type": "x86-host", "health": "maintenance", "check": None}}}
    root = junit.build(night)
    lab = root.find("testsuite[@name='lab']")
    cases = {(tc.get("classname"), tc.get("name")): tc for tc in lab}
    assert cases[("lab.good1", "health_check")].find("error") is None
    dead = [k for k in cases if k[0] == "lab.dead1"]
    assert dead == [("lab.dead1", "health_check"), ("lab.dead1", "power_cycle 1"),
                    ("lab.dead1", "health_check after power_cycle 1")]
    assert all(cases[k].find("error") is not None for k in dead)
    assert "connect: timed out" in cases[("lab.dead1", "health_check")].find("error").get("message")
    assert cases[("lab.bench", "health_check")].find("skipped") is not None
    assert root.get("errors") == "3" and lab.get("errors") == "3" and root.get("tests") == "5"
    ET.tostring(root)


def test_deploy_cycles_a_board_that_goes_silent_and_runs_the_job_again(emu, runner_bundle, monkeypatch):
    """A lone deploy (hil.board_run.run, the hil stage) on a board whose sshd freezes during the
    job: the board is power-cycled, checked, the job runs again and its record carries the cycle."""
    from hil import board_run, deploy
    from hil.lab import close_opened
    from hil.transport import open_transport
    from kiln.artifacts import Layout
    from kiln.config import load_board
    from kiln.schema import Project
    from tests.conftest import TINY

    calls = []

    def job(project, board, live, layout, lab_dir, run_id, latency_windows=0):
        if not calls:
            os.kill(_sshd_pid(), signal.SIGSTOP)
        calls.append(live.name)
        try:
            with open_transport(live, lab_dir, emu["root"] / "local") as t:
                t.run(["true"], timeout=5)
        except Exception as e:  # noqa: BLE001
            return {"instance": live.name, "error": {"step": "connect", "message": str(e)}}
        return {"instance": live.name, "runner": {"windows_us": [10.0] * 5}, "emulated": False}

    monkeypatch.setattr(deploy, "job", job)
    written = []
    monkeypatch.setattr(deploy, "write_record", lambda layout, inst, run_id, rec: written.append(rec))
    project = Project.model_validate({**TINY, "targets": ["x86-host"]})
    try:
        rec = board_run.run(project, load_board("x86-host"), emu["boards"]["s1"], Layout("tiny"), emu["spec"], "d-1")
    finally:
        close_opened()
    assert calls == ["s1", "s1"] and "error" not in rec
    (cycle,) = rec["power_cycles"]
    assert cycle["passed"] and cycle["check"]["passed"] and "went silent during a deploy of tiny" in cycle["reason"]
    assert health.state("s1") == "good" and any(r.startswith("power cycle") for _, _, r in health.history("s1"))
def test_a_nightly_leaves_the_last_deploy_report_alone(tmp_path, monkeypatch):
    """Issue 29: the nightly's validation rewrote build/<app>/report.json, the last deploy's."""
    from hil import deploy, nightly
    from kiln.artifacts import Layout, write_json
    from kiln.config import load_board
    from kiln.schema import Project, StaticLab
    from tests.conftest import TINY

    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "build"))
    lay = Layout("tiny")
    write_json(lay.test_labels, [0, 1])
    write_json(lay.data_json, {"test_inputs": {"dtype": "float32", "shape": [2, 3, 16, 16]}})
    write_json(lay.report, {"app": "tiny", "from": "the last deploy"})
    monkeypatch.setattr(deploy, "job", lambda *a, **k: {"instance": "b1", "type": "x86-host", "run_id": "n1",
                                                         "error": {"step": "run", "message": "exit 1"}})
    monkeypatch.setattr(deploy, "write_record", lambda layout, inst, run_id, rec: write_json(layout.last_run(inst), rec))
    project = Project.model_validate({**TINY, "targets": ["x86-host"]})
    inv = StaticLab(name="one", boards=[{"name": "b1", "type": "x86-host", "transport": {"kind": "local"}}])
    from hil import health_check
    monkeypatch.setattr(health_check, "check_board", lambda i, b, d: ("good", {"passed": True, "seconds": 0.0, "error": None}))
    night = nightly.Night({"tiny": project}, {"x86-host": load_board("x86-host")}, inv, tmp_path, "n1")
    night.run_jobs()
    results = night._validate()
    assert results[("tiny", "b1")]["error"]["step"] == "run"
    assert lay.run_report("n1").is_file()  # the night's own report of the app
    import json
    assert json.loads(lay.report.read_text()) == {"app": "tiny", "from": "the last deploy"}


def test_a_lone_deploy_checks_a_silent_board_first_and_cycles_it_before_the_job(emu, runner_bundle, monkeypatch):
    """A lone deploy (hil.board_run.run) on a board whose sshd is frozen before it starts: the
    board is found silent, power-cycled and health-checked first; the job then runs once, on a
    board that answers (before: the job met the hang at its connect, and only then the cycle)."""
    from hil import board_run, deploy
    from hil.lab import close_opened
    from hil.transport import open_transport
    from kiln.artifacts import Layout
    from kiln.config import load_board
    from kiln.schema import Project
    from tests.conftest import TINY

    calls = []

    def job(project, board, live, layout, lab_dir, run_id, latency_windows=0):
        calls.append(_ssh_answers(live.transport))
        with open_transport(live, lab_dir, emu["root"] / "local") as t:
            t.run(["true"], timeout=5)
        return {"instance": live.name, "runner": {"windows_us": [10.0] * 5}, "emulated": False}

    monkeypatch.setattr(deploy, "job", job)
    monkeypatch.setattr(deploy, "write_record", lambda layout, inst, run_id, rec: None)
    os.kill(_sshd_pid(), signal.SIGSTOP)
    project = Project.model_validate({**TINY, "targets": ["x86-host"]})
    try:
        rec = board_run.run(project, load_board("x86-host"), emu["boards"]["s1"], Layout("tiny"), emu["spec"], "d-2")
    finally:
        close_opened()
    assert calls == [True] and "error" not in rec, rec  # one job, on a board that answered
    (cycle,) = rec["power_cycles"]
    assert cycle["passed"] and cycle["check"]["passed"] and "failed its health check" in cycle["reason"]
    rows = [r for _, _, r in health.history("s1")]
    assert any(r.startswith("power cycle") for r in rows) and rows[-1].startswith("check passed")
