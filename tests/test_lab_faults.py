"""A lab with a dead board: the deploy reports that board's failure (which board, which step,
what was seen), keeps the other boards' results, and leaves the build intact."""

from __future__ import annotations

import copy
import json
import os
import subprocess

import pytest
import yaml

from hil.emulator.faults import closed_port
from kiln.artifacts import sha256_file
from tests.conftest import TINY, run_doit, write_project

pytestmark = pytest.mark.slow


def test_unreachable_board_fails_alone_and_is_retried(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "id")], check=True)
    port = closed_port()
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"name": "half-broken", "boards": [
        {"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}},
        {"name": "pi-down", "type": "rpi4", "emulated": True,
         "transport": {"kind": "ssh", "host": "127.0.0.1", "port": port, "user": "root", "key": "id",
                       "known_hosts": str(kh), "connect_timeout_s": 1, "retries": 1}}]}))
    data = copy.deepcopy(TINY)
    data["targets"] = ["x86-host", "rpi4"]
    write_project(tmp_path / "projects", data)
    env = dict(os.environ, KILN_PROJECTS=str(tmp_path / "projects"), KILN_BUILD=str(tmp_path / "build"),
               KILN_LAB=str(lab))
    p = run_doit(env, "deploy:tiny")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out
    assert "board 'pi-down': connect failed" in out and f"127.0.0.1:{port}" in out

    build = tmp_path / "build" / "tiny"
    report = json.loads((build / "report.json").read_text())
    assert report["boards"]["x86-host"]["passed"]  # the good board's result is kept
    err = report["boards"]["pi-down"]["error"]
    assert err["step"] == "connect" and "2 attempts" in err["message"]
    # the build is intact, and the failed board is retried (only it) on the next run
    libs = {b: sha256_file(build / "type" / b / "model.so") for b in ("x86-host", "rpi4")}
    again = run_doit(env, "deploy:tiny")
    ran = {line.split()[1] for line in again.stdout.splitlines() if line.startswith(".  ")}
    assert ran == {"hil:tiny@pi-down", "deploy:tiny"}, again.stdout
    assert libs == {b: sha256_file(build / "type" / b / "model.so") for b in ("x86-host", "rpi4")}
