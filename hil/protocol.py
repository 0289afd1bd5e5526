"""Abstract transport interfaces. deploy/validate use only these; transports implement them.

open/close are idempotent, and every transport is a context manager.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path


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
    @abc.abstractmethod
    def write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def read_until(self, marker: bytes, timeout: float) -> bytes: ...
