"""Two emulated labs from two build dirs on one machine, with the same board names (issue 30,
item 3): neither may kill the other's boards. Each SSH board's network namespace is named
after its lab's state dir (hil.emulator.sshd.netns_name), so the second lab's start no longer
deletes the first's namespace as a "leftover", and a stop of one leaves the other up. A lab of
the *same* build that crashed is still cleaned up by its next start.

Real sshds in real namespaces (root only: without root the boards listen on loopback ports,
which never collide), started and stopped as by hand (``python -m hil.emulator.lab``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from hil.emulator import sshd
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


@pytest.fixture
def labs(tmp_path):
    """Two labs, A and B, in two build dirs, from one lab file (same board names)."""
    name = f"tl{uuid.uuid4().hex[:6]}"  # off any other lab's board names, whatever its Kiln
    spec = tmp_path / "lab.yaml"
    spec.write_text(yaml.safe_dump({"backend": "emulated", "name": "two", "boards": [
        {"name": name, "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    labs = {}
    for x in "AB":
        build = tmp_path / x / "build"
        labs[x] = {"x": x, "spec": spec, "board": name, "build": build, "state": build / "lab",
                   "env": dict(os.environ, KILN_BUILD=str(build), PYTHONPATH=str(ROOT))}
    yield labs
    for lab in labs.values():
        lab_cmd(lab, "down")
        assert not owned_namespaces(lab), f"lab {lab['x']}: namespaces left after down"


def lab_cmd(lab: dict, *args: str) -> subprocess.CompletedProcess:
    extra = [str(lab["spec"])] if args == ("up",) else []
    return subprocess.run([sys.executable, "-m", "hil.emulator.lab", *args, *extra], env=lab["env"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def up(lab: dict) -> dict:
    p = lab_cmd(lab, "up")
    assert p.returncode == 0, p.stderr
    return yaml.safe_load((lab["state"] / "inventory.yaml").read_text())["boards"][0]["transport"]


def answers(t: dict) -> bool:
    """The board at the inventory's address runs a command over real ssh, and it is this lab's
    board (its host key is the one in this lab's known_hosts)."""
    p = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5",
                        "-o", f"UserKnownHostsFile={t['known_hosts']}", "-i", t["key"], "-p", str(t["port"]),
                        f"{t['user']}@{t['host']}", "echo", "alive"], capture_output=True, text=True, timeout=30)
    return p.returncode == 0 and p.stdout.strip() == "alive"


def sshd_pid(lab: dict) -> int:
    return yaml.safe_load((lab["state"] / lab["board"] / "board.json").read_text())["pid"]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def owned_namespaces(lab: dict) -> set[str]:
    return namespaces() & {sshd.netns_name(lab["state"], lab["board"])}


def test_second_lab_leaves_the_first_running_and_each_stop_leaves_the_other(labs):
    a, b = labs["A"], labs["B"]
    ta = up(a)
    assert answers(ta)
    pid_a = sshd_pid(a)
    tb = up(b)  # same board name, another build: used to delete A's namespace, killing its sshd
    assert answers(tb)
    assert running(pid_a), "A's sshd died when B started"
    assert answers(ta), "A's board no longer answers (or B's answers at A's address) after B started"
    assert ta["host"] != tb["host"]
    assert lab_cmd(a, "status").stdout.strip().startswith("up")
    assert owned_namespaces(a) and owned_namespaces(b) and owned_namespaces(a) != owned_namespaces(b)

    assert lab_cmd(a, "down").returncode == 0  # used to stop B's sshd and delete B's namespace
    assert answers(tb), "stopping A took B's board down"
    assert lab_cmd(b, "status").stdout.strip().startswith("up")
    assert not owned_namespaces(a) and not running(pid_a)
    assert lab_cmd(a, "status").stdout.strip() == "down"


def test_a_crashed_lab_is_cleaned_by_its_own_build_only(labs):
    """A's sshd killed with -9 and its state lost (a start killed half-way): A's next start
    removes the leftover namespace (same name) and comes up; B, running meanwhile, is untouched."""
    a, b = labs["A"], labs["B"]
    up(a)
    tb = up(b)
    pid_b = sshd_pid(b)
    os.kill(sshd_pid(a), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while running(sshd_pid(a)) and time.monotonic() < deadline:
        time.sleep(0.05)
    # its sshd is dead (maybe a zombie no one reaps yet: dead all the same), so A is down
    assert lab_cmd(a, "status").stdout.strip() == "down"
    (a["state"] / "state.json").unlink()
    left = owned_namespaces(a)
    assert left  # the leftover
    ta = up(a)
    assert answers(ta) and owned_namespaces(a) == left  # the leftover replaced, not doubled
    assert running(pid_b) and answers(tb)


def test_stop_leaves_a_veth_that_is_no_longer_its_own(tmp_path):
    """A board's record names its veth (kiln-h<i>); once its namespace is gone, the kernel may
    give that name to another lab's board. Stopping the first must not delete it."""
    name = f"tv{uuid.uuid4().hex[:6]}"
    first = sshd.start_sshd(name, tmp_path / "A", use_netns=True)
    second = sshd.start_sshd(name, tmp_path / "B", use_netns=True)
    try:
        assert first.netns != second.netns
        stale = dataclasses.replace(first, veth=second.veth)  # a record whose veth is now B's
        sshd.stop_sshd(stale)
        assert first.netns not in namespaces() and not running(first.pid)
        assert subprocess.run(["ip", "link", "show", second.veth], capture_output=True).returncode == 0, \
            "B's veth was deleted by A's stop"
        assert running(second.pid) and second.netns in namespaces()
        t = second.transport_spec()
        assert answers({**t, "key": str(t["key"])})
    finally:
        sshd.stop_sshd(first)
        sshd.stop_sshd(second)
    assert first.netns not in namespaces() and second.netns not in namespaces()
