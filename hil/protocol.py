"""The lab's interfaces. deploy/validate use only these; transports and lab backends implement
them.

Transports: CommandProtocol and FileTransferProtocol (ssh, local, serial), ConsoleProtocol (a
board's console: hil/transport/console.py; hil/transport/console_shell.py runs commands and
uploads over any console). open/close are idempotent, and every transport is a context manager.

Leases: a Leasing hands out a Lease on a board (hil/lab/leases.py on this machine's lease
directory, hil/lab/labgrid/lease.py through a labgrid coordinator); a lease that may no longer
be trusted is ``lost`` and its ``check()`` raises LeaseLost.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from kiln.errors import KilnError


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Resource(abc.ABC):
    """Something that is opened before use and closed after, any number of times."""

    @abc.abstractmethod
    def open(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CommandProtocol(Resource):
    @abc.abstractmethod
    def run(self, argv: list[str], timeout: float, cwd: str | None = None) -> CommandResult:
        """Run argv on the board (no shell); raise TransportError on timeout or link failure."""


class FileTransferProtocol(Resource):
    @abc.abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Copy a host file to a path on the board (relative to the board's work dir)."""

    @abc.abstractmethod
    def workdir(self) -> str:
        """The board's work directory, where relative remote paths live."""


class ConsoleProtocol(Resource):
    """A board's console: the bytes typed to it and the bytes it prints (labgrid's
    ConsoleProtocol, which its SerialDriver implements and its ShellDriver runs over)."""

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Send ``data``; TimeoutError when the line takes none of it within the console's write
        timeout, OSError when the link failed."""

    @abc.abstractmethod
    def read_until(self, marker: bytes, timeout: float) -> bytes | None:
        """The bytes up to and including the next ``marker``; None when it did not arrive within
        ``timeout`` seconds (what did arrive stays buffered for the next read); EOFError or
        OSError when the link failed."""


# -- leases ------------------------------------------------------------------------------------

class LeaseLost(KilnError):
    """This holder no longer holds the board: its lease lapsed or another holder took it."""


class Lease(abc.ABC):
    """A board held by one holder; a context manager whose exit releases it. ``lost`` turns true
    once the holder may no longer trust it is the board's only user."""

    board: str
    lost: bool

    @abc.abstractmethod
    def check(self) -> None:
        """Raise LeaseLost when the lease was lost (call between long steps)."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the board back (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Leasing(abc.ABC):
    """Who leases a lab's boards and shares their health (hil.lab.leasing picks the lab's)."""

    deploy_lease = True  # a lone deploy takes a lease too (a shared lab); False: only nightly jobs do

    @abc.abstractmethod
    def acquire(self, board: str, holder: str = "", wait: bool = True, timeout_s: float | None = None) -> Lease | None:
        """A lease on ``board``; waits for it when ``wait`` (up to ``timeout_s``)."""

    @abc.abstractmethod
    def bind(self, inst, lease: Lease):
        """The instance as reached while ``lease`` holds its board."""

    @abc.abstractmethod
    def shared_health(self, board: str) -> str | None:
        """The board's health as every runner of the lab sees it; None when the lab keeps none."""

    @abc.abstractmethod
    def publish_health(self, board: str, state: str) -> None:
        """Tell every runner of the lab the board's health (a lab that keeps none ignores it)."""
