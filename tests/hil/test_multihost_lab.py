"""The multi-host labgrid lab on one machine (hil/emulator/multihost.py), all real: a
labgrid-coordinator on the bridge, two labgrid-exporters in their own network namespaces
(ser2net for the serial board), real sshds, and Kiln's side run from the runner namespaces.

One lab for the module (machine-wide names: kiln-lgbr, kiln-lg-*), in a build dir of its own.
The tests run in order: the last one takes the lab down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ser2net") is None or shutil.which("socat") is None,
    reason="the multi-host lab needs root (network namespaces), ser2net and socat")

SSH_BOARDS = ("x86-host", "rpi4", "x86-avx2")
CONNECT_S = 3


@pytest.fixture(scope="module")
def mh(tmp_path_factory):
    from hil.emulator import multihost
    from kiln.config import load_lab

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_BUILD", str(tmp_path_factory.mktemp("multihost") / "build"))
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            multihost.up(load_lab(multihost.SPEC), multihost.SPEC)
            yield multihost
        finally:
            multihost.down(forget=True)


def wait_for(mh, pred, within: float = 30.0) -> float:
    """Seconds until ``pred(view)`` holds on the coordinator; fails after ``within``."""
    t0, last = time.monotonic(), None
    while time.monotonic() - t0 < within:
        try:
            last = mh.view()
            if pred(last):
                return time.monotonic() - t0
        except mh.MultihostError as e:
            last = e
        time.sleep(0.2)
    pytest.fail(f"not within {within} s; last view: {last}")


def service(mh, board: str) -> dict:
    """The NetworkService the coordinator publishes for an SSH board (what Kiln connects to)."""
    exp = mh.status()["boards"][board]["exporter"]
    return mh.view()["resources"][exp][board]["NetworkService"]["params"]


def ssh(mh, runner: str, params: dict) -> tuple[int, str, float]:
    key, known = mh.ssh_files()
    t0 = time.monotonic()
    opts = [f"UserKnownHostsFile={known}", "StrictHostKeyChecking=yes", "BatchMode=yes", f"ConnectTimeout={CONNECT_S}"]
    p = mh.run_in(runner, ["ssh", "-F", "/dev/null", "-i", str(key), *(x for o in opts for x in ("-o", o)),
                           "-p", str(params["port"]), f"{params['username']}@{params['address']}", "echo", "ok"],
                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = p.communicate(timeout=30)[0]
    return p.returncode, out.strip(), time.monotonic() - t0


def all_available(v: dict, exporters=("exp1", "exp2")) -> bool:
    return all(v["resources"].get(e) and all(r["avail"] for g in v["resources"][e].values() for r in g.values())
               for e in exporters)


def test_places_tags_and_resources(mh):
    v = mh.view()
    assert set(v["places"]) == {"x86-host", "rpi3", "rpi4", "x86-avx2"}
    st = mh.status()
    assert st["up"] and mh.is_up()
    for name, b in st["boards"].items():
        p = v["places"][name]
        assert p["tags"]["kiln_type"] == b["type"]
        assert p["tags"]["kiln_emulated"] == ("1" if b["emulated"] else "0")
        assert p["matches"] == [f"{b['exporter']}/{name}/*"]
        exp, group, _ = p["matches"][0].split("/")
        resources = list(v["resources"][exp][group].values())
        assert [r["cls"] for r in resources] == ["NetworkSerialPort" if name == "rpi3" else "NetworkService"]
        assert all(r["avail"] for r in resources)
    assert v["places"]["x86-host"]["tags"]["kiln_tags"] == "native"
    assert "kiln_tags" not in v["places"]["rpi4"]["tags"]
    assert service(mh, "x86-host") | {"extra": None} == {"address": mh.address("exp1"), "port": 2201,
                                                         "username": "root", "extra": None}


def test_ssh_from_a_runner(mh):
    for board in SSH_BOARDS:
        rc, out, _ = ssh(mh, "run1", service(mh, board))
        assert (rc, out) == (0, "ok"), board
    cli = subprocess.run([sys.executable, "-m", "hil.emulator.multihost", "exec", "run1", "--", "sh", "-c",
                          "echo $KILN_RUNNER; ip -4 -o addr show eth0"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert cli.returncode == 0 and cli.stdout.startswith("run1\n") and mh.address("run1") in cli.stdout, cli


def test_serial_console_over_rfc2217(mh):
    """ser2net runs only while the place is acquired; pyserial's RFC2217 client needs
    ``ign_set_control`` (as labgrid's own SerialDriver passes): ser2net 4.3 on a pty never
    acknowledges SET_CONTROL (DTR), so a plain ``rfc2217://`` open times out."""
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb

    def place(req, cls):
        mh.with_client(lambda s: getattr(s.stub, req)(cls(placename="rpi3")))

    place("AcquirePlace", pb.AcquirePlaceRequest)
    try:
        wait_for(mh, lambda v: v["resources"]["exp1"]["rpi3"]["RawSerialPort"]["params"]["port"], 15)
        r = mh.view()["resources"]["exp1"]["rpi3"]["RawSerialPort"]
        assert r["cls"] == "NetworkSerialPort" and r["params"]["host"] == mh.address("exp1")
        code = (f"import os, serial, time\n"
                f"s = serial.serial_for_url('rfc2217://{r['params']['host']}:{r['params']['port']}?ign_set_control',"
                f" 115200, timeout=2)\n"
                "s.write(b'echo k1ln\\n'); buf, t = b'', time.monotonic()\n"
                "while b'\\nk1ln' not in buf and time.monotonic() - t < 10: buf += s.read(64)\n"
                "print(os.environ['KILN_RUNNER'], repr(buf))\n")
        p = mh.run_in("run2", [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = p.communicate(timeout=60)[0]
        assert p.returncode == 0 and out.startswith("run2 ") and "\\nk1ln" in out, out
    finally:
        place("ReleasePlace", pb.ReleasePlaceRequest)
    wait_for(mh, lambda v: v["resources"]["exp1"]["rpi3"]["RawSerialPort"]["params"]["port"] is None, 15)


def test_partition_and_heal(mh):
    params = service(mh, "x86-host")
    mh.partition("exp1")
    try:
        assert mh.status()["hosts"]["exp1"]["partitioned"]
        rc, out, took = ssh(mh, "run1", params)
        assert rc != 0 and took < CONNECT_S + 2, (rc, out, took)
    finally:
        mh.heal("exp1")
    deadline = time.monotonic() + 15
    while ssh(mh, "run1", params)[:2] != (0, "ok"):
        assert time.monotonic() < deadline, "ssh to x86-host still fails after heal"
        time.sleep(0.5)


def test_exporter_killed_and_started(mh):
    mh.kill_exporter("exp2")
    assert not mh.is_up()
    wait_for(mh, lambda v: not all_available(v, ["exp2"]))
    mh.start_exporter("exp2")
    wait_for(mh, lambda v: all_available(v, ["exp2"]))
    assert mh.is_up()


def test_coordinator_restart_keeps_places(mh):
    before = {n: p["tags"] for n, p in mh.view()["places"].items()}
    mh.kill_coordinator()
    with pytest.raises(mh.MultihostError):
        mh.view()
    mh.start_coordinator()
    took = wait_for(mh, all_available)
    assert {n: p["tags"] for n, p in mh.view()["places"].items()} == before
    print(f"exporters back {took:.1f} s after the coordinator restarted")


def test_up_restarts_a_dead_board(mh):
    """up() is a no-op on a live lab; a dead serial board comes back on a new pty, and its
    exporter with it (the RawSerialPort's path changed)."""
    t0 = time.monotonic()
    mh.up(lab_path=mh.SPEC)
    assert time.monotonic() - t0 < 5
    st = json.loads((mh.state_dir() / "state.json").read_text())
    old_exp1, old_tty = st["exporters"]["exp1"], os.path.realpath(mh.state_dir() / "rpi3" / "tty")
    for pid in st["boards"]["rpi3"]["pids"]:
        os.kill(pid, 9)
    assert not mh.is_up()
    mh.up(lab_path=mh.SPEC)
    assert mh.is_up()
    st = json.loads((mh.state_dir() / "state.json").read_text())
    assert st["exporters"]["exp1"] != old_exp1
    path = mh.view()["resources"]["exp1"]["rpi3"]["RawSerialPort"]["params"]["extra"]["path"]
    assert path == os.path.realpath(mh.state_dir() / "rpi3" / "tty") and path.startswith("/dev/pts/"), (path, old_tty)


def test_down_leaves_nothing(mh):
    state = str(mh.state_dir())
    mh.down()
    mh.down()  # idempotent
    assert not any(n.startswith("kiln-lg-") for n in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                                       text=True).stdout.split())
    assert subprocess.run(["ip", "link", "show", "dev", "kiln-lgbr"], capture_output=True).returncode != 0
    import psutil

    left = []
    for p in psutil.process_iter():  # the coordinator runs in the state dir, the rest names it
        try:
            if p.status() != psutil.STATUS_ZOMBIE and (state in " ".join(p.cmdline()) or p.cwd().startswith(state)):
                left.append(p.cmdline())
        except psutil.Error:
            pass
    assert not left
    assert (mh.state_dir() / "coordinator" / "places.yaml").exists()  # places survive a down/up
    assert not mh.is_up() and mh.status() == {"up": False}
