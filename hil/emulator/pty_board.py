"""An emulated serial board: an interactive shell on a real pty, as on a UART console.

    socat PTY,link=<state>/<name>/tty,raw,echo=0 EXEC:"/bin/sh -i",pty,setsid,ctty,stderr

The shell's side is a normal cooked terminal (echo on, ^C interrupts, a "# " prompt) with
the shell as session leader and the pty as its controlling tty, so job control works: the
transport has to cope with exactly what a real console gives it. The host's side is the
``tty`` link, which pyserial opens like /dev/ttyUSB0.

With ``fault`` a relay process (``python -m hil.emulator.pty_board relay``) sits between
the host's pty and the board's and impairs the bytes, with a seeded RNG so that runs repeat:

    corrupt: p       each byte is replaced by another with probability p
    drop: p          each byte is lost with probability p
    after: n         impair only after n bytes have gone towards the board
    stall_after: n   after n bytes towards the board the line goes dead (both ways) ...
    stall_s: s       ... for s seconds (default: for good)
    baud: b          pace both directions at b/10 bytes/s (a pty has no line rate)
    direction:       "both" (default), "to_board" or "to_host": where corrupt/drop apply
    seed: n          RNG seed (default 0)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

from kiln.errors import TransportError

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class SerialBoard:
    name: str
    tty: str           # the host's end, for kiln.schema.SerialTransport.port
    workdir: str
    pids: list[int]    # socat, the board's shell, and the relay if any
    state_dir: str
    fault: dict | None = None

    def transport_spec(self, **overrides) -> dict:
        """The inventory's ``transport:`` entry (kiln.schema.SerialTransport) for this board."""
        spec = {"kind": "serial", "port": self.tty, "baud": 115200, "workdir": self.workdir}
        spec.update(overrides)
        return spec


def start_serial_board(name: str, state_dir: Path, fault: dict | None = None, *,
                       shell: str = "/bin/sh") -> SerialBoard:
    """Start a board's console on ``state_dir/<name>/tty`` (stopping a stale one first)."""
    if shutil.which("socat") is None:
        raise TransportError(f"board '{name}': socat is not installed (Debian package socat)")
    d = Path(state_dir).resolve() / name
    work, home = d / "work", d / "home"
    for p in (work, home):
        p.mkdir(parents=True, exist_ok=True)
    stale = d / "board.json"
    if stale.exists():
        try:
            stop_serial_board(SerialBoard(**json.loads(stale.read_text())))
        except (ValueError, TypeError, OSError):
            pass
    host_tty = d / "tty"
    board_tty = d / "board-tty" if fault else host_tty
    for link in (host_tty, board_tty):
        link.unlink(missing_ok=True)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home),
           "LANG": "C", "TERM": "vt100", "SHELL": shell}
    with open(d / "socat.log", "ab") as log:
        # raw,echo=0 on the host's end only; the shell's end stays a cooked console.
        socat = subprocess.Popen(
            ["socat", f"PTY,link={board_tty},raw,echo=0", f"EXEC:{shell} -i,pty,setsid,ctty,stderr"],
            cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    pids = [socat.pid]
    board = SerialBoard(name, str(host_tty), str(work), pids, str(d), fault)
    try:
        _wait_for(board_tty, socat, name)
        # socat makes the pty first, then forks the shell. A ^C that reaches the shell before it
        # is ready kills it (and the board), so wait for its first prompt.
        _wait_for_prompt(board_tty, socat, name)
        pids += _children(socat.pid)
        if fault:
            (d / "relay.json").unlink(missing_ok=True)
            with open(d / "relay.log", "ab") as log:
                relay = subprocess.Popen(
                    [sys.executable, "-m", "hil.emulator.pty_board", "relay", str(host_tty), str(board_tty),
                     json.dumps(fault), str(d / "relay.json")],
                    cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, start_new_session=True)
            pids.append(relay.pid)
            _wait_for(host_tty, relay, name)
    except BaseException:
        stop_serial_board(board)
        raise
    stale.write_text(json.dumps(dataclasses.asdict(board)))
    return board


def stop_serial_board(b: SerialBoard) -> None:
    """Stop the board's processes (the shell's whole session too); safe to call twice."""
    mine = [p for p in b.pids if _alive(p) and _ours(p, b.state_dir)]  # pids may be reused by now
    jobs = _session_members(set(mine))  # what the shell left running (its own session)
    for pid in mine:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 1
    while any(_alive(p) for p in mine) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in {*mine, *jobs}:
        _kill(pid, signal.SIGKILL)
    for pid in mine:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        except ChildProcessError:
            pass
    d = Path(b.state_dir)
    for f in ("tty", "board-tty", "board.json"):
        (d / f).unlink(missing_ok=True)


def relay_stats(b: SerialBoard) -> dict:
    """What the relay did so far (bytes passed, corrupted, dropped); {} without a fault."""
    if not b.fault:
        return {}
    try:
        return json.loads((Path(b.state_dir) / "relay.json").read_text())
    except (OSError, ValueError):
        return {}


# -- helpers ----------------------------------------------------------------------------------


def _wait_for(link: Path, proc: subprocess.Popen, name: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not link.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise TransportError(f"board '{name}': {proc.args[0]} did not create {link} "
                                 f"(exit {proc.poll()}; see {link.parent}/*.log)")
        time.sleep(0.01)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _wait_for_prompt(link: Path, proc: subprocess.Popen, name: str, within: float = 5.0) -> None:
    """Read (and drop) what the shell prints until it pauses after printing something."""
    fd = os.open(link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        seen, deadline = b"", time.monotonic() + within
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([fd], [], [], 0.1 if seen else 0.5)[0]:
                seen += os.read(fd, 4096)
            elif seen:
                return
    finally:
        os.close(fd)
    raise TransportError(f"board '{name}': the shell printed no prompt within {within:g} s "
                         f"(exit {proc.poll()}; see {link.parent}/socat.log)")


def _session_members(sids: set[int]) -> list[int]:
    """Processes whose session is one of ``sids`` (the shell is a session leader: its jobs)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) in sids:
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _ours(pid: int, state_dir: str) -> bool:
    """Is pid one of this board's processes? (its command line or environment names the board's dir)"""
    for what in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                if state_dir.encode() in f.read():
                    return True
        except OSError:
            pass
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


# -- the fault relay --------------------------------------------------------------------------


class _Impair:
    """Byte impairments of one direction, drawn from a seeded RNG (geometric gaps: fast)."""

    def __init__(self, rng: random.Random, corrupt: float, drop: float):
        self.rng, self.corrupt, self.drop = rng, corrupt, drop
        self.pos = 0  # bytes seen so far
        self.next_corrupt = self._after(0, corrupt)
        self.next_drop = self._after(0, drop)
        self.corrupted = self.dropped = 0

    def _after(self, start: int, p: float) -> float:
        """Position of the next impaired byte at or after ``start``."""
        if p <= 0:
            return math.inf
        if p >= 1:
            return start
        return start + int(math.log(1.0 - self.rng.random()) / math.log(1.0 - p))

    def __call__(self, data: bytes) -> bytes:
        end = self.pos + len(data)
        if self.next_corrupt >= end and self.next_drop >= end:
            self.pos = end
            return data
        out = bytearray()
        for b in data:
            here, self.pos = self.pos, self.pos + 1
            if here == self.next_drop:
                self.dropped += 1
                self.next_drop = self._after(self.pos, self.drop)
                if here == self.next_corrupt:
                    self.next_corrupt = self._after(self.pos, self.corrupt)
                continue
            if here == self.next_corrupt:
                b ^= self.rng.randrange(1, 256)
                self.corrupted += 1
                self.next_corrupt = self._after(self.pos, self.corrupt)
            out.append(b)
        return bytes(out)


def _relay(host_link: str, board_link: str, fault: dict, stats_path: str) -> None:
    rng = random.Random(fault.get("seed", 0))
    where = fault.get("direction", "both")
    after = int(fault.get("after", 0))
    stall_after = fault.get("stall_after")
    stall_s = fault.get("stall_s")
    rate = fault["baud"] / 10.0 if fault.get("baud") else None

    def impair(active: bool) -> _Impair:
        return _Impair(rng, fault.get("corrupt", 0.0) if active else 0.0, fault.get("drop", 0.0) if active else 0.0)

    down, up = impair(where in ("both", "to_board")), impair(where in ("both", "to_host"))
    board = os.open(board_link, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    tty.setraw(board)
    host, host_slave = os.openpty()  # keep the slave open: the host closing it is no hangup
    os.set_blocking(host, False)
    tty.setraw(host_slave)
    attrs = termios.tcgetattr(host_slave)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(host_slave, termios.TCSANOW, attrs)
    tmp = host_link + ".new"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.ttyname(host_slave), tmp)
    os.rename(tmp, host_link)

    sent = {"to_board": 0, "to_host": 0}
    queues = {board: bytearray(), host: bytearray()}  # keyed by destination fd
    tokens = {board: 0.0, host: 0.0}
    stalled_at = None
    last, last_dump = time.monotonic(), 0.0

    def dump() -> None:
        st = {"bytes_to_board": sent["to_board"], "bytes_to_host": sent["to_host"],
              "corrupted": down.corrupted + up.corrupted, "dropped": down.dropped + up.dropped,
              "stalled": stalled_at is not None}
        with open(stats_path + ".new", "w") as f:
            json.dump(st, f)
        os.replace(stats_path + ".new", stats_path)

    signal.signal(signal.SIGTERM, lambda *_: (dump(), os._exit(0)))
    while True:
        now = time.monotonic()
        if rate:
            for fd in tokens:  # token bucket, at most 64 bytes of burst
                tokens[fd] = min(64.0, tokens[fd] + (now - last) * rate)
        last = now
        if now - last_dump > 0.2:
            dump()
            last_dump = now
        rl = [fd for fd, dst in ((host, board), (board, host)) if len(queues[dst]) < 4096]
        wl = [fd for fd, q in queues.items() if q and (not rate or tokens[fd] >= 1)]
        wait = None
        if rate and any(queues.values()) and not wl:
            wait = max(0.0005, min((1 - tokens[fd]) / rate for fd, q in queues.items() if q))
        r, w, _ = select.select(rl, wl, [], 0.5 if wait is None else min(wait, 0.5))
        for fd in r:
            try:
                data = os.read(fd, 4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # only the board's side can hang up (we hold the host's slave open)
                dump()
                return
            toward = "to_board" if fd == host else "to_host"
            start = sent[toward]
            sent[toward] += len(data)
            if stall_after is not None and stalled_at is None and sent["to_board"] > stall_after:
                stalled_at = time.monotonic()
            if stalled_at is not None and (stall_s is None or time.monotonic() - stalled_at < stall_s):
                continue  # a dead line: the bytes go nowhere
            if toward == "to_board" and start + len(data) > after:
                keep = max(0, after - start)
                data = data[:keep] + down(data[keep:])
            elif toward == "to_host" and sent["to_board"] > after:
                data = up(data)
            queues[board if fd == host else host] += data
        for fd in w:
            q = queues[fd]
            n = len(q) if not rate else min(len(q), int(tokens[fd]))
            try:
                n = os.write(fd, bytes(q[:n]))
            except BlockingIOError:
                n = 0
            del q[:n]
            if rate:
                tokens[fd] -= n


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "relay":
        _relay(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5])
    else:
        print("usage: python -m hil.emulator.pty_board relay HOST_LINK BOARD_LINK FAULT_JSON STATS", file=sys.stderr)
        sys.exit(2)
