"""The acceptance of issue 29, small: ``python -m hil.nightly --freeze BOARD`` over an emulated lab
(one real sshd board, the tiny app) hangs the board on purpose (SIGSTOP to its sshd) before the
night; the night recovers it by a power cycle and ends with every job passed, exit 0, the cycle
in the board's health history and in the night's JSON and JUnit. (The full default lab: README's
"Power control and recovery".)"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import yaml

from kiln.artifacts import ROOT
from tests.conftest import TINY, write_project

pytestmark = pytest.mark.slow


def test_a_night_with_a_frozen_board_recovers_it_by_a_power_cycle_and_passes(tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"backend": "emulated", "boards": [
        {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    write_project(tmp_path / "projects", {**copy.deepcopy(TINY), "tuning": {"trials": 0}})
    build = tmp_path / "build"
    env = dict(os.environ, KILN_LAB=str(lab), KILN_PROJECTS=str(tmp_path / "projects"), KILN_BUILD=str(build),
               KILN_RUN_ID="frozen-1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "hil.nightly", "--freeze", "s1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert "board s1 frozen on purpose" in out, out[-3000:]
    assert p.returncode == 0, out[-3000:]
    night = json.loads((build / "nightly" / "frozen-1" / "nightly.json").read_text())
    assert night["exit_code"] == 0 and night["jobs"] and all(j["status"] == "pass" for j in night["jobs"]), night["jobs"]
    s1 = night["boards"]["s1"]
    assert s1["health"] == "good" and [c["passed"] for c in s1["power_cycles"]] == [True], s1
    from hil.lab import health

    events = [row for row in health.history("s1", db=build / "lab" / "health.sqlite")]
    text = " | ".join(map(str, events))
    assert "check failed" in text and "power cycle" in text, text
    assert events[-1][1] == "good", text
    cycles = [tc for tc in ET.parse(build / "nightly" / "frozen-1" / "junit.xml").getroot().iter("testcase")
              if tc.get("classname") == "lab.s1" and tc.get("name").startswith("power_cycle")]
    assert cycles and cycles[0].find("error") is None
