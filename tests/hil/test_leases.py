"""Board leases with real processes: a holder killed with -9, a holder stopped (SIGSTOP) so its
heartbeat stops, contenders that must never overlap, and a busy board that names its holder.
Only the "holder on another host" record is written by hand (a second machine is not here)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.lab import leases
from hil.lab.leases import LeaseBusy, acquire, holder_of, try_acquire

ROOT = Path(__file__).resolve().parents[2]

# A holder process: "hold" takes the board and keeps it (printing "lost" if its lease is broken);
# "rounds" takes it N times, writing each held interval to a file.
CHILD = r"""
import sys, time
from pathlib import Path
from hil.lab.leases import acquire
root, board, label, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
if mode == "hold":
    ttl = float(sys.argv[5])
    lease = acquire(board, label, root=root, ttl_s=ttl)
    print("acquired", flush=True)
    while not lease.lost:
        time.sleep(0.05)
    print("lost", flush=True)
    sys.exit(3)
rounds, hold, out = int(sys.argv[5]), float(sys.argv[6]), Path(sys.argv[7])
for _ in range(rounds):
    with acquire(board, label, root=root, timeout_s=60):
        start = time.time()
        time.sleep(hold)
        end = time.time()
    with open(out, "a") as f:
        f.write(f"{start} {end} {label}\n")
print("done", flush=True)
"""


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def expect_line(p: subprocess.Popen, want: str, timeout: float) -> float:
    """Wait for ``want`` on the child's stdout; return when it came (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = p.stdout.readline()
            if line.strip() == want:
                return time.monotonic()
            if not line:
                break
    err = p.stderr.read() if p.poll() is not None else ""
    raise AssertionError(f"child never printed {want!r} (rc {p.poll()}): {err}")


@pytest.fixture
def holders():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:  # only the processes this test started, by their id
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(timeout=10)


def test_holder_killed_with_9_frees_the_board_at_once(tmp_path, holders):
    p = spawn(tmp_path, "b1", "run-killed", "hold", leases.TTL_S)
    holders.append(p)
    expect_line(p, "acquired", 30)
    assert holder_of("b1", root=tmp_path).pid == p.pid
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGKILL)  # not reaped yet: the zombie holds nothing
    with acquire("b1", "run-next", timeout_s=30, root=tmp_path) as lease:
        dt = time.monotonic() - t0
        print(f"\nre-acquired {dt:.3f} s after kill -9 of the holder (TTL {leases.TTL_S:.0f} s)")
        assert holder_of("b1", root=tmp_path).token == lease.holder.token
    assert dt < 5, "the flock, not the TTL, should free a dead local holder's board"


def test_stopped_holder_expires_after_its_ttl_and_learns_it_lost(tmp_path, holders):
    p = spawn(tmp_path, "b2", "run-hung", "hold", leases.TTL_S)  # the default TTL, 20 s
    holders.append(p)
    expect_line(p, "acquired", 30)
    with pytest.raises(LeaseBusy):
        acquire("b2", "run-waiter", wait=False, root=tmp_path)
    os.kill(p.pid, signal.SIGSTOP)  # alive, holding the flock, no more heartbeats
    t0 = time.monotonic()
    lease = acquire("b2", "run-waiter", timeout_s=40, root=tmp_path)
    dt = time.monotonic() - t0
    print(f"\nre-acquired {dt:.2f} s after SIGSTOP of the holder (TTL {leases.TTL_S:.0f} s, "
          f"heartbeat {leases.TTL_S / 4:.0f} s)")
    try:
        # expires = its last renewal + TTL, and it renewed at most a heartbeat before the stop
        assert leases.TTL_S - leases.TTL_S / 4 - 1 <= dt <= leases.TTL_S + 2
        assert dt < 30
        os.kill(p.pid, signal.SIGCONT)
        t1 = time.monotonic()
        expect_line(p, "lost", leases.TTL_S / 4 + 5)  # its next heartbeat finds our record
        print(f"the resumed holder knew it had lost the board {time.monotonic() - t1:.2f} s after SIGCONT")
        assert p.wait(timeout=10) == 3
        assert holder_of("b2", root=tmp_path).token == lease.holder.token  # it took nothing back
        renewed = json.loads((tmp_path / "b2.json").read_text())["renewed"]
        lease.renew()
        assert json.loads((tmp_path / "b2.json").read_text())["renewed"] > renewed
    finally:
        lease.release()


def test_contenders_all_run_and_never_overlap(tmp_path, holders):
    out = tmp_path / "intervals.txt"
    procs = [spawn(tmp_path, "b3", f"run-{i}", "rounds", 3, 0.25, out) for i in range(3)]
    holders.extend(procs)
    for p in procs:
        expect_line(p, "done", 60)
    spans = sorted((float(a), float(b), who) for a, b, who in (line.split() for line in out.read_text().splitlines()))
    assert sorted({who for _, _, who in spans}) == ["run-0", "run-1", "run-2"] and len(spans) == 9
    for (s0, e0, w0), (s1, e1, w1) in zip(spans, spans[1:]):
        assert s1 >= e0, f"{w0} held b3 until {e0} but {w1} had it from {s1}"
    assert holder_of("b3", root=tmp_path) is None  # all released


def test_busy_board_names_its_holder(tmp_path, holders):
    p = spawn(tmp_path, "b4", "nightly-20250101", "hold", leases.TTL_S)
    holders.append(p)
    expect_line(p, "acquired", 30)
    with pytest.raises(LeaseBusy) as e:
        acquire("b4", "nightly-other", wait=False, root=tmp_path)
    assert "board 'b4'" in str(e.value) and "'nightly-20250101'" in str(e.value) and f"pid {p.pid}" in str(e.value)
    assert e.value.holder.label == "nightly-20250101"
    assert try_acquire("b4", "nightly-other", root=tmp_path) is None
    t0 = time.monotonic()
    with pytest.raises(LeaseBusy, match=r"after waiting 0\.[5-9]"):
        acquire("b4", "nightly-other", timeout_s=0.5, root=tmp_path)
    assert time.monotonic() - t0 < 2
    assert holder_of("b4", root=tmp_path).pid == p.pid


def test_a_holder_on_another_host_is_known_only_by_its_renewals(tmp_path):
    # a fault injected by hand: the record of a holder on a machine that is not here
    other = {"host": "exporter-7", "pid": os.getpid(), "started": 0.0, "token": "f" * 16, "label": "ci-runner-2"}
    now = time.time()
    (tmp_path / "b5.json").write_text(json.dumps({"board": "b5", "holder": other, "acquired": now,
                                                  "renewed": now, "expires": now + 2.0, "flock": True}))
    assert socket.gethostname() != "exporter-7"
    with pytest.raises(LeaseBusy, match="ci-runner-2.*exporter-7"):
        acquire("b5", "local", wait=False, root=tmp_path)  # the flock is free, the record is not
    t0 = time.monotonic()
    with acquire("b5", "local", timeout_s=10, root=tmp_path):
        dt = time.monotonic() - t0
    assert 1.0 <= dt <= 3.5


def test_release_is_idempotent_and_frees_at_once(tmp_path):
    lease = acquire("b6", "first", root=tmp_path)
    assert try_acquire("b6", "second", root=tmp_path) is None  # another lease in this process too
    lease.release()
    lease.release()
    assert holder_of("b6", root=tmp_path) is None and not (tmp_path / "b6.json").exists()
    with acquire("b6", "second", wait=False, root=tmp_path) as again:
        assert holder_of("b6", root=tmp_path).label == "second"
    assert not again.lost


def test_holder_that_broke_a_hung_lease_frees_it_at_once_when_killed(tmp_path, holders):
    hung = spawn(tmp_path, "b7", "run-hung", "hold", 3.0)
    holders.append(hung)
    expect_line(hung, "acquired", 30)
    os.kill(hung.pid, signal.SIGSTOP)  # keeps the flock for as long as it is stopped
    breaker = spawn(tmp_path, "b7", "run-breaker", "hold", 3.0)
    holders.append(breaker)
    expect_line(breaker, "acquired", 30)  # after the TTL, without the flock
    rec = json.loads((tmp_path / "b7.json").read_text())
    assert rec["holder"]["label"] == "run-breaker" and rec["flock"] is False
    t0 = time.monotonic()
    os.kill(breaker.pid, signal.SIGKILL)
    with acquire("b7", "run-next", timeout_s=10, root=tmp_path):
        dt = time.monotonic() - t0
    assert dt < 1.5, "its process is gone: no need to wait out its 3 s TTL"
