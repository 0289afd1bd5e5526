"""Board leases that expire: one holder per board instance at a time, and a board whose holder
died (kill -9, a crash, its machine gone) or hung is usable again without anyone's help.

labgrid's reservations show what goes wrong without expiry: an acquired place stays acquired
when its holder dies (labgrid issue #1739), until an admin frees it. A lease here is two
things in the lease directory (``build/lab/leases`` unless given), per board:

``<board>.lock`` — an ``fcntl.flock`` the holder keeps for as long as it holds the board. The
    kernel drops it the moment the holder's process ends, however it ends (kill -9 included),
    so on one machine a waiter takes a dead holder's board at once (its next poll, ~0.1 s),
    with no doubt about a reused pid. It is the fast local path only: flock does not reliably
    span machines (NFS may or may not forward it), and a *hung* holder (stopped, deadlocked)
    keeps it for ever.
``<board>.json`` — the record ``{board, holder, acquired, renewed, expires, flock}`` that a
    heartbeat thread of the holder renews every ``ttl_s / 4`` seconds (TTL 20 s by default).
    The record is the truth, across hosts too: a lease is held while its record names a holder
    and ``expires`` has not passed. A holder on another machine that shares the directory, or
    a hung holder, stops renewing; once ``expires`` passes a waiter breaks the lease by
    writing its own record, even while the hung holder still has the flock. A holder whose
    heartbeat later finds someone else's record knows it lost the board (``Lease.lost``) and
    drops its flock. Expiry compares wall clocks, so hosts sharing a lease directory need NTP
    (the TTL tolerates small skew).

When is a record stale (the board free)? When there is none, when it has expired, or when its
holder is on this host and provably gone: the record says it held the flock and the waiter
now has the flock (the kernel's word), or its process (pid and start time) no longer exists
(the one case where a holder lacks the flock: it broke a hung holder's lease).

Read-decide-write is done under ``<board>.guard``, a second flock held for the milliseconds of
one decision, so that on one host two waiters never both take a board. Across hosts that is as
good as the shared filesystem's locks; a read-back after each write narrows what remains. A
lab spread over hosts should have its coordinator (labgrid) own reservations; leases then
guard each runner's own use of a board.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
from pathlib import Path

import psutil

from hil import protocol
from hil.protocol import LeaseLost
from kiln.artifacts import build_root, write_json
from kiln.errors import KilnError

log = logging.getLogger("kiln.lease")
TTL_S = 20.0       # a lease not renewed for this long has expired
POLL_S = 0.1       # how often a waiter looks again
GUARD_WAIT_S = 10.0  # a decision takes milliseconds; longer means the guard holder is hung


class LeaseBusy(KilnError):
    """The board is leased by someone else (``wait=False``, or ``timeout_s`` passed)."""

    def __init__(self, board: str, holder: "Holder | None", waited_s: float | None = None):
        who = holder.describe() if holder else "another holder"
        when = f" after waiting {waited_s:.1f} s" if waited_s is not None else ""
        super().__init__(f"board '{board}' is leased by {who}{when}")
        self.board, self.holder = board, holder


def lease_dir() -> Path:
    """Default lease directory: ``<build>/lab/leases`` (shared by every process of a checkout)."""
    return build_root() / "lab" / "leases"


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease: host, pid and that process's start time (a reused pid is not it), a
    random token (this very lease), and a label for people (the run id, the app)."""

    host: str
    pid: int
    started: float
    token: str
    label: str = ""

    @classmethod
    def current(cls, label: str = "") -> "Holder":
        return cls(socket.gethostname(), os.getpid(), _started(os.getpid()) or 0.0, secrets.token_hex(8), label)

    def describe(self) -> str:
        label = f"'{self.label}' " if self.label else ""
        return f"{label}(pid {self.pid} on {self.host})"

    def is_local(self) -> bool:
        return self.host == socket.gethostname()

    def gone(self) -> bool:
        """This holder's process no longer exists (only knowable for a holder on this host)."""
        started = _started(self.pid)
        return started is None or abs(started - self.started) > 0.5


def _started(pid: int) -> float | None:
    """Start time of process ``pid``; None when it is gone (a zombie counts as gone)."""
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return None


# -- the record ----------------------------------------------------------------------------

def _paths(root: Path, board: str) -> tuple[Path, Path, Path]:
    return root / f"{board}.lock", root / f"{board}.json", root / f"{board}.guard"


def _read(record: Path) -> dict | None:
    """The record, or None when there is none or it cannot be read (writes are atomic, so an
    unreadable one was not written by a lease)."""
    try:
        rec = json.loads(record.read_text())
        rec["holder"] = Holder(**rec["holder"])
        float(rec["expires"])
        return rec
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(record: Path, board: str, holder: Holder, acquired: float, ttl_s: float, flocked: bool) -> None:
    now = time.time()
    write_json(record, {"board": board, "holder": dataclasses.asdict(holder), "acquired": acquired,
                        "renewed": now, "expires": now + ttl_s, "flock": flocked})


def _stale(rec: dict | None, got_flock: bool) -> bool:
    """The record no longer holds the board (see the module docstring)."""
    if rec is None or time.time() > float(rec["expires"]):
        return True
    holder = rec["holder"]
    if not holder.is_local():
        return False  # another host's holder is known only by its renewals
    if got_flock and rec.get("flock"):
        return True  # it held the flock and the kernel gave the flock to us: it is gone
    return holder.gone()


@contextlib.contextmanager
def _guard(path: Path):
    """Hold ``path``'s flock for one read-decide-write (see the module docstring)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + GUARD_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:  # its holder is stopped inside a decision
                    log.warning("%s held for over %.0f s (a hung process?): deciding without it", path, GUARD_WAIT_S)
                    break
                time.sleep(0.005)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


# -- the lease -----------------------------------------------------------------------------

class Lease(protocol.Lease):
    """A held lease (from :func:`acquire`): a context manager; ``release()`` is idempotent.
    ``lost`` turns true when the heartbeat finds the lease was broken by another holder."""

    def __init__(self, board: str, holder: Holder, root: Path, fd: int, flocked: bool, ttl_s: float,
                 heartbeat_s: float, acquired: float):
        self.board, self.holder, self.root, self.ttl_s = board, holder, root, ttl_s
        self.acquired = acquired
        self._fd, self._flocked = fd, flocked
        self._lock = threading.Lock()  # release() vs the heartbeat
        self._stop = threading.Event()
        self._released = False
        self.lost = False
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"lease-{board}")
        self._thread.start()

    def __repr__(self) -> str:
        return f"Lease({self.board!r}, {self.holder.describe()}{', lost' if self.lost else ''})"

    def check(self) -> None:
        """Raise LeaseLost if another holder has taken the board (call between long steps)."""
        if self.lost:
            raise LeaseLost(f"lease on board '{self.board}' held by {self.holder.describe()} was broken "
                            "(not renewed within its TTL) and taken by another holder")

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.renew()
            except OSError as e:  # the directory is unreachable for now: try again next beat
                log.warning("lease on %s: renewing failed: %s", self.board, e)
            if self.lost:
                return

    def renew(self) -> None:
        """Push ``expires`` forward, or find that the lease was lost (then let go of the flock)."""
        lock, record, guard = _paths(self.root, self.board)
        with self._lock:
            if self._released or self.lost:
                return
            if not self._flocked:  # a broken hung holder may have died since: regain the fast path
                self._flocked = _try_flock(self._fd)
            with _guard(guard):
                rec = _read(record)
                if rec is None or rec["holder"].token != self.holder.token:
                    self._lose(rec)
                    return
                _write(record, self.board, self.holder, self.acquired, self.ttl_s, self._flocked)

    def _lose(self, rec: dict | None) -> None:
        self.lost = True
        who = rec["holder"].describe() if rec else "nobody (released)"
        log.error("lease on board '%s' lost: it was not renewed within %.0f s and is now held by %s",
                  self.board, self.ttl_s, who)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # drops the flock
            self._fd = -1

    def release(self) -> None:
        """Give the board back (idempotent): remove our record, then drop the flock."""
        self._stop.set()
        with self._lock:
            if self._released:
                return
            self._released = True
            lock, record, guard = _paths(self.root, self.board)
            try:
                if not self.lost:
                    with _guard(guard):
                        rec = _read(record)
                        if rec is not None and rec["holder"].token == self.holder.token:
                            record.unlink()
            finally:
                self._close_fd()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        log.info("board '%s' released by %s", self.board, self.holder.describe())


def _attempt(board: str, holder: Holder, root: Path, ttl_s: float, heartbeat_s: float) -> Lease | Holder | None:
    """One try: a Lease when taken, else the current holder (None if unknown)."""
    lock, record, guard = _paths(root, board)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        with _guard(guard):
            got = _try_flock(fd)
            rec = _read(record)
            if not _stale(rec, got):
                os.close(fd)
                return rec["holder"]
            if rec is not None:
                why = "expired" if time.time() > float(rec["expires"]) else "its holder is gone"
                log.warning("board '%s': breaking the lease of %s (%s)", board, rec["holder"].describe(), why)
            now = time.time()
            _write(record, board, holder, now, ttl_s, got)
        after = _read(record)  # read-back: another host writing at the same moment wins or loses here
        if after is None or after["holder"].token != holder.token:
            os.close(fd)
            return after["holder"] if after else None
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return Lease(board, holder, root, fd, got, ttl_s, heartbeat_s, now)


def acquire(board: str, holder: Holder | str = "", wait: bool = True, timeout_s: float | None = None,
            ttl_s: float = TTL_S, heartbeat_s: float | None = None, root: Path | None = None) -> Lease:
    """Lease ``board`` for ``holder`` (a Holder, or a label such as the run id for this process).

    ``wait=False``: raise LeaseBusy naming the holder if the board is taken. ``wait=True``: wait
    until it is free, or until ``timeout_s`` (None: for ever), then LeaseBusy. The lease is
    renewed every ``heartbeat_s`` (``ttl_s / 4``) until released."""
    holder = holder if isinstance(holder, Holder) else Holder.current(holder)
    root = Path(root) if root is not None else lease_dir()
    beat = heartbeat_s if heartbeat_s is not None else ttl_s / 4
    t0 = time.monotonic()
    said = None
    while True:
        got = _attempt(board, holder, root, ttl_s, beat)
        if isinstance(got, Lease):
            log.info("board '%s' leased by %s%s", board, holder.describe(),
                     f" after waiting {time.monotonic() - t0:.1f} s" if said else "")
            return got
        waited = time.monotonic() - t0
        if not wait or (timeout_s is not None and waited >= timeout_s):
            raise LeaseBusy(board, got, waited if wait else None)
        if got != said:  # say once per holder who we are waiting for
            log.info("board '%s' is leased by %s: waiting", board, got.describe() if got else "another holder")
            said = got
        time.sleep(POLL_S * random.uniform(0.5, 1.0))  # jitter: waiters do not poll in lockstep


def try_acquire(board: str, holder: Holder | str = "", **kw) -> Lease | None:
    """``acquire(board, holder, wait=False)``, but None instead of LeaseBusy."""
    try:
        return acquire(board, holder, wait=False, **kw)
    except LeaseBusy:
        return None


def holder_of(board: str, root: Path | None = None) -> Holder | None:
    """Who holds ``board`` now (None when free), without taking it."""
    root = Path(root) if root is not None else lease_dir()
    rec = _read(_paths(root, board)[1])
    if rec is None:
        return None
    got = False
    if rec.get("flock") and rec["holder"].is_local() and _paths(root, board)[0].exists():
        fd = os.open(_paths(root, board)[0], os.O_RDWR)
        try:
            got = _try_flock(fd)  # a probe: closing the fd gives it straight back
        finally:
            os.close(fd)
    return None if _stale(rec, got) else rec["holder"]
