"""Kiln on a lab of many hosts, through a real labgrid coordinator (hil/lab/labgrid/) on the
multi-host lab of this machine (hil/emulator/multihost.py): boards on two exporter hosts, Kiln
run from two runner hosts (network namespaces), SSH boards and a serial one over RFC2217.

* `doit deploy` and `doit nightly` pass there, every board reached through the coordinator;
* two nightly runs from two runners share the four boards, never one board at once;
* a board marked bad by one runner is skipped by the other;
* a runner killed with -9 frees its board within 30 s (Kiln's leases; labgrid alone never does);
* a runner cut off loses its lease before anyone else can take its board (fencing);
* an exporter killed and restarted, the coordinator restarted, an exporter cut off: each job
  is re-leased or lost, never reported from a board it no longer holds.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import DOIT, ROOT, TINY, write_project

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ser2net") is None or shutil.which("socat") is None,
    reason="the multi-host lab needs root (network namespaces), ser2net and socat")]

LAB = ROOT / "hil" / "emulator" / "multihost.yaml"
BOARDS = ("x86-host", "rpi3", "rpi4", "x86-avx2")


@pytest.fixture(scope="module")
def lg(tmp_path_factory):
    """The multi-host lab up, a Kiln client of its coordinator in this process, and the env
    for Kiln's commands (their own projects and build)."""
    from hil.emulator import multihost
    from hil.lab import labgrid
    from kiln.config import load_lab

    root = tmp_path_factory.mktemp("labgrid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_BUILD", str(root / "build"))
        mp.setenv("OMP_NUM_THREADS", "1")
        lab = load_lab(LAB)
        try:
            multihost.up(lab, LAB)
            env = dict(os.environ, KILN_LAB=str(LAB), KILN_PROJECTS=str(root / "projects"))
            yield {"mh": multihost, "lab": lab, "client": labgrid.client_for(lab), "env": env, "root": root,
                   "build": root / "build"}
        finally:
            labgrid.close_clients()
            multihost.down(forget=True)


def free(lg, within: float = 40.0) -> None:
    """Every place free (acquired by nobody) and usable (its exporter there), as the coordinator says."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        places = lg["client"].places()
        if set(BOARDS) <= set(places) and all(places[b]["acquired"] is None and places[b]["resources"]
                                              and all(r["avail"] for r in places[b]["resources"]) for b in BOARDS):
            return
        time.sleep(0.2)
    pytest.fail(f"places still held after {within} s: { {b: p['acquired'] for b, p in places.items()} }")


def hold(lg, runner: str, place: str, *args: str) -> subprocess.Popen:
    """`python -m hil.lab.labgrid hold PLACE` run on a runner host: one JSON line a second."""
    return lg["mh"].run_in(runner, [sys.executable, "-m", "hil.lab.labgrid", "hold", place, str(LAB), *args],
                           env=lg["env"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def lines(proc: subprocess.Popen, until, within: float) -> dict:
    """The holder's first status line for which ``until(line)`` holds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        raw = proc.stdout.readline()
        if not raw:
            break
        line = json.loads(raw)
        if until(line):
            return line
    pytest.fail(f"no such line from the holder within {within} s")


def doit(lg, runner: str, *args: str, run_id: str | None = None) -> subprocess.Popen:
    env = dict(lg["env"], **({"KILN_RUN_ID": run_id} if run_id else {}))
    return lg["mh"].run_in(runner, [*DOIT, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)


def night(lg, run_id: str, log: str = "") -> dict:
    path = lg["build"] / "nightly" / run_id / "nightly.json"
    assert path.is_file(), f"the nightly {run_id} wrote no {path.name}; its output ends:\n{log[-4000:]}"
    return json.loads(path.read_text())


def test_doit_deploy_then_two_nightlies_from_two_runners_never_share_a_board(lg):
    for name, targets in (("tiny", list(BOARDS)), ("tiny2", ["x86-host", "rpi4"])):
        d = copy.deepcopy(TINY)
        d.update(name=name, targets=targets, tuning={"trials": 0})
        write_project(lg["root"] / "projects", d)
    p = doit(lg, "run1", "deploy:tiny")
    out = p.communicate(timeout=1500)[0]
    assert p.returncode == 0, out[-4000:]
    report = json.loads((lg["build"] / "tiny" / "report.json").read_text())
    assert report["lab"] == "multihost" and report["passed"], report
    for b in BOARDS:  # each board through its place: rpi3's console over RFC2217 from ser2net
        run = json.loads((lg["build"] / "tiny" / "runs" / report["run_id"] / b / "run.json").read_text())
        assert "error" not in run, run
        assert run["transport"] == ("serial" if b == "rpi3" else "ssh"), run
    assert "place rpi3: its console is at rfc2217://10.214.0.11:" in out, out[-4000:]
    free(lg, 5)

    procs = {r: doit(lg, r, "nightly", run_id=f"pair-{r}") for r in ("run1", "run2")}
    logs = {r: p.communicate(timeout=900)[0] for r, p in procs.items()}
    spans: dict[str, list] = {}
    for r in procs:
        n = night(lg, f"pair-{r}", logs[r])
        assert n["exit_code"] == 0 and all(j["status"] == "pass" for j in n["jobs"]), (n["jobs"], logs[r][-3000:])
        assert len(n["jobs"]) == 6
        for j in n["jobs"]:
            for a in j["attempts"]:
                spans.setdefault(a["board"], []).append((a["start"], a["end"], r))
    assert set(spans) == set(BOARDS)
    for board, s in spans.items():
        s.sort()
        for (a0, a1, ra), (b0, b1, rb) in zip(s, s[1:]):
            assert b0 >= a1 or ra == rb, f"{board}: {ra} and {rb} used it at once"
        assert {r for *_, r in s} == {"run1", "run2"}, s
    free(lg, 5)

    # one runner marks a board bad: the other's night skips it
    from hil.lab import labgrid

    lg["client"].set_tags("rpi4", **{labgrid.HEALTH_TAG: "bad", labgrid.HEALTH_AT_TAG: str(int(time.time()))})
    try:
        p = doit(lg, "run2", "nightly", run_id="shared-bad")
        out = p.communicate(timeout=900)[0]
        n = night(lg, "shared-bad", out)
        assert n["boards"]["rpi4"]["health"] == "bad" and n["boards"]["rpi4"]["check"] is None, n["boards"]
        assert all(a["board"] != "rpi4" for j in n["jobs"] for a in j["attempts"]), out[-3000:]
        assert {j["status"] for j in n["jobs"] if j["type"] != "rpi4"} == {"pass"}
    finally:
        lg["client"].set_tags("rpi4", **{labgrid.HEALTH_TAG: "good"})


def test_a_runner_killed_with_9_frees_its_board_within_30_s(lg):
    free(lg)
    holder = hold(lg, "run1", "rpi4")
    lines(holder, lambda x: x["state"] == "held", 30)
    assert lg["client"].places()["rpi4"]["acquired"].startswith("run1/kiln-")
    holder.kill()  # SIGKILL: no release, no goodbye
    killed = time.time()
    holder.wait()
    waiter = hold(lg, "run2", "rpi4", "--wait", "60", "--for", "1")
    got = lines(waiter, lambda x: x["state"] in ("held", "busy"), 90)
    waiter.communicate(timeout=30)
    assert got["state"] == "held" and got["identity"].startswith("run2/"), got
    took = got["t"] - killed
    print(f"rpi4 free for run2 {took:.1f} s after its holder was killed with -9")
    assert took < 30


def test_a_runner_cut_off_gives_its_lease_up_before_anyone_can_take_its_board(lg):
    free(lg)
    ttl = lg["lab"].lease_ttl_s
    holder = hold(lg, "run1", "x86-host")
    lines(holder, lambda x: x["state"] == "held", 30)
    lg["mh"].partition("run1")
    cut = time.time()
    try:
        from hil.lab.labgrid import acquire_place

        lease = acquire_place(lg["client"], "x86-host", wait=True, timeout_s=3 * ttl)
        taken = time.time()
        assert lease is not None
        lease.release()
    finally:
        lg["mh"].heal("run1")
    lost = lines(holder, lambda x: x["state"] == "lost", 30)
    holder.kill()
    # the cut-off holder stopped trusting its lease (ttl/2 after its last renewal) before the
    # reaper freed the place (ttl after the last renewal it saw)
    assert lost["reason"].startswith("no renewal confirmed"), lost
    assert lost["t"] < taken, (lost, taken)  # (its line is printed within a second of the loss)
    assert cut < taken < cut + 2 * ttl + 5
    print(f"x86-host taken over {taken - cut:.1f} s after its holder was cut off")


def test_exporter_killed_and_restarted(lg):
    """A quick restart keeps the lease (its board is still there); an exporter that stays away
    loses it within its grace, and the job's result would be dropped."""
    from hil.lab.labgrid import RESTART_GRACE_S, acquire_place

    free(lg)
    c, mh = lg["client"], lg["mh"]
    quick = acquire_place(c, "x86-avx2", wait=True, timeout_s=30)   # on exp2
    gone = acquire_place(c, "rpi3", wait=True, timeout_s=30)        # on exp1
    try:
        mh.kill_exporter("exp2")
        mh.kill_exporter("exp1")
        killed = time.monotonic()
        time.sleep(2)
        mh.start_exporter("exp2")
        started = time.monotonic()
        while not all(r["avail"] for r in c.places()["x86-avx2"]["resources"] or [{"avail": False}]):
            assert time.monotonic() - started < 10, "exp2's resources not back within 10 s"
            time.sleep(0.2)
        while not gone.lost:
            # the coordinator sees the exporter gone (~2 s), the grace, then the next renewal
            assert time.monotonic() - killed < RESTART_GRACE_S + 10, "rpi3's lease not lost"
            time.sleep(0.2)
        print(f"rpi3's lease lost {time.monotonic() - killed:.1f} s after exp1 died")
        seq = quick.seq
        time.sleep(quick.ttl_s / 5 + 1)
        assert not quick.lost and quick.seq > seq and c.places()["x86-avx2"]["acquired"] == c.identity
        assert "resources have been unavailable" in gone.lost_reason
    finally:
        mh.start_exporter("exp1")
        quick.release()
        gone.release()
    free(lg)  # the lost lease's place: freed by the reaper


def test_coordinator_restarted_jobs_are_re_leased_within_10_s(lg):
    from hil.lab.labgrid import acquire_place

    free(lg)
    c, mh = lg["client"], lg["mh"]
    leases = [acquire_place(c, b, wait=True, timeout_s=30) for b in ("x86-host", "rpi4")]
    try:
        # a job's lease that the coordinator has saved (places.yaml, every ~15 s) is restored
        # with its tag; a younger one is taken back by its holder's renewal on the reconnect
        saved = mh.state_dir() / "coordinator" / "places.yaml"
        t0 = time.monotonic()
        while c.identity not in (saved.read_text() if saved.exists() else ""):
            assert time.monotonic() - t0 < 40, "the coordinator never saved the lease tags"
            time.sleep(0.5)
        mh.kill_coordinator()
        time.sleep(1)
        mh.start_coordinator()
        started = time.monotonic()
        while not all(x.re_leased for x in leases):
            assert not any(x.lost for x in leases), [x.lost_reason for x in leases]
            assert time.monotonic() - started < 10, "not re-leased within 10 s of the restart"
            time.sleep(0.1)
        print(f"re-leased {time.monotonic() - started:.1f} s after the coordinator restarted")
        places = c.places()
        assert all(places[x.board]["acquired"] == c.identity for x in leases)
    finally:
        for x in leases:
            x.release()
    free(lg)


def test_an_exporter_cut_off_loses_the_lease(lg):
    """A board behind a partitioned exporter: the coordinator sees the exporter gone (its
    keepalive), and after the grace the lease is lost (its job's result is then dropped)."""
    free(lg)
    holder = hold(lg, "run1", "x86-avx2", "--wait", "30")
    lines(holder, lambda x: x["state"] == "held", 40)
    lg["mh"].partition("exp2")
    cut = time.time()
    try:
        lost = lines(holder, lambda x: x["state"] == "lost", 60)
    finally:
        lg["mh"].heal("exp2")
        holder.kill()
    assert "unavailable" in lost["reason"], lost
    print(f"x86-avx2's lease lost {lost['t'] - cut:.1f} s after exp2 was cut off")
    free(lg)


def test_a_reservation_left_allocated_is_cancelled_after_the_ttl(lg):
    """A reservation allocated to a place and never used (its owner forgot it) keeps every
    waiter out for labgrid's own timeout (~60-90 s); Kiln's reaper cancels it after ttl."""
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb

    from hil.lab.labgrid import acquire_place

    free(lg)
    c, ttl = lg["client"], lg["lab"].lease_ttl_s
    c.call("CreateReservation", filters={"main": pb.Reservation.Filter(filter={"name": "rpi4"})}, prio=0.0)
    t0 = time.monotonic()
    while c.places()["rpi4"]["reservation"] is None:
        assert time.monotonic() - t0 < 10, "the coordinator did not allocate the reservation to rpi4"
        time.sleep(0.2)
    assert acquire_place(c, "rpi4", wait=False) is None  # reserved: not free for a waiter
    lease = acquire_place(c, "rpi4", wait=True, timeout_s=ttl + 20)
    took = time.monotonic() - t0
    assert lease is not None, "rpi4 still reserved"
    lease.release()
    assert not [r for r in c.reservations() if r.state.name == "allocated"]
    print(f"a forgotten reservation on rpi4 cancelled, the place taken {took:.1f} s after it was allocated")
    assert ttl <= took < ttl + 10
