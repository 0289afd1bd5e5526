"""A console log with every failure (issue 29, item 5): a board that fails a step leaves the
last lines of its console in the job's error -- its serial console (what the board printed
outside Kiln's protocol) where it has one, the runner's stderr -- and the reports show them.
Real emulated boards: a real sshd and a real pty console, with a runner that fails."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET

import pytest
import yaml

from hil import deploy
from kiln.schema import StaticLab

RUNNER = """#!/bin/sh
echo "board: oom-killer invoked for kiln-runner" > /dev/tty 2>/dev/null
echo "runner: loading model.so" >&2
echo "runner: cannot allocate 4194304 bytes" >&2
exit 3
"""


@pytest.fixture(scope="module")
def boards(tmp_path_factory):
    """An emulated lab of one SSH and one serial board (module-wide: its start costs seconds)."""
    from hil.emulator import lab as emlab

    root = tmp_path_factory.mktemp("console")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_BUILD", str(root / "build"))
        spec = root / "lab.yaml"
        spec.write_text(yaml.safe_dump({"backend": "emulated", "boards": [
            {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}},
            {"name": "c1", "type": "x86-host", "transport": {"kind": "serial", "timeout_s": 3, "retries": 1}}]}))
        inv = StaticLab.model_validate(yaml.safe_load(emlab.up(spec).read_text()))
        runner = root / "kiln-runner"
        runner.write_text(RUNNER)
        runner.chmod(0o755)
        try:
            yield {"boards": {b.name: b for b in inv.boards}, "root": root, "runner": runner}
        finally:
            emlab.down()


def _fail(boards, name: str) -> dict:
    from hil.transport import open_transport

    b = boards["boards"][name]
    t = open_transport(b, boards["root"], boards["root"] / "local")
    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(t, {"kiln-runner": boards["runner"]}, ["./kiln-runner"], 30, name)
    return e.value.as_error()


def test_an_ssh_boards_failure_keeps_the_runners_stderr(boards):
    err = _fail(boards, "s1")
    assert err["step"] == "run" and err["console"]["source"] == "runner stderr"
    assert err["console"]["lines"][-2:] == ["runner: loading model.so", "runner: cannot allocate 4194304 bytes"]


def test_a_serial_boards_failure_keeps_its_console_and_the_runners_stderr(boards):
    """What the board printed on its console (here the runner writing to the tty, as a kernel's
    OOM killer would) comes first, with none of Kiln's own protocol lines, then the stderr."""
    err = _fail(boards, "c1")
    lines = err["console"]["lines"]
    assert err["console"]["source"] == "serial console + runner stderr"
    assert lines == ["board: oom-killer invoked for kiln-runner", "runner: loading model.so",
                     "runner: cannot allocate 4194304 bytes"]


def test_a_connect_failure_has_no_console_to_invent(boards):
    b = boards["boards"]["s1"]
    dead = b.model_copy(update={"transport": b.transport.model_copy(update={"port": 1, "retries": 0,
                                                                             "connect_timeout_s": 1})})
    from hil.transport import open_transport

    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(open_transport(dead, boards["root"], boards["root"] / "local"), {}, ["true"], 5, "s1")
    assert e.value.step == "connect" and "console" not in e.value.as_error()


def test_the_console_reaches_the_deploy_report_and_the_nightly_reports(boards, tmp_path):
    """The serial board's error, as deploy recorded it, in report.json's table, the nightly's
    JSON check, its HTML and its JUnit."""
    from hil.reports import deploy as report, html, junit, schema
    from tests.hil.test_reports import make_night

    err = _fail(boards, "c1")
    rep = report.build("tiny", "emulated", {"c1": {"instance": "c1", "type": "x86-host", "transport": "serial",
                                                  "error": err}})
    text = report.table(rep)
    assert "c1: its console (serial console + runner stderr), last lines:" in text
    assert "  | board: oom-killer invoked for kiln-runner" in text

    night = copy.deepcopy(make_night(20))
    job = next(j for j in night["jobs"] if j["status"] == "pass")
    job.update(status="fail", error=err, metrics={**job["metrics"]})
    schema.validate(night, "test")
    broken = copy.deepcopy(night)
    next(j for j in broken["jobs"] if j["error"] is err or j["error"] == err)["error"]["console"]["lines"] = "x"
    with pytest.raises(Exception, match="console.lines"):
        schema.validate(broken, "test")
    page = html.render(night)
    assert "the board's console (serial console + runner stderr)" in page
    assert "board: oom-killer invoked for kiln-runner" in page
    path = tmp_path / "junit.xml"
    junit.write_junit(night, path)
    outs = [tc.findtext("system-out") or "" for tc in ET.parse(path).getroot().iter("testcase")
            if tc.get("classname") == f"{job['app']}.{job['board']}"]
    assert any("runner: cannot allocate 4194304 bytes" in o for o in outs)

