"""Local transport: the board is this machine; commands are subprocesses, files are copies.

Each board instance gets its own work directory, so several local boards never share files.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

from hil.protocol import CommandProtocol, CommandResult, FileTransferProtocol
from kiln.errors import TransportError


class LocalTransport(CommandProtocol, FileTransferProtocol):
    def __init__(self, board: str, workroot: Path):
        self.board = board
        self._root = Path(workroot) / board
        self._open = False
        self.log = logging.getLogger(f"kiln.board.{board}")

    def open(self) -> None:
        if not self._open:
            self._root.mkdir(parents=True, exist_ok=True)
            self._open = True

    def close(self) -> None:
        self._open = False

    def workdir(self) -> str:
        return str(self._root)

    def _require_open(self) -> None:
        if not self._open:
            raise TransportError(f"board '{self.board}': transport used before open()")

    def put(self, local: Path, remote: str) -> None:
        self._require_open()
        dest = self._root / remote
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local, dest)
        except OSError as e:
            raise TransportError(f"board '{self.board}': upload of {local} to {dest} failed: {e}") from e

    def run(self, argv: list[str], timeout: float, cwd: str | None = None) -> CommandResult:
        self._require_open()
        where = self._root / cwd if cwd else self._root
        self.log.debug("run %s in %s", argv, where)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(argv, cwd=where, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise TransportError(f"board '{self.board}': command {argv[0]!r} timed out after {timeout:.0f} s") from e
        except OSError as e:
            raise TransportError(f"board '{self.board}': cannot run {argv[0]!r}: {e}") from e
        return CommandResult(tuple(argv), p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def open_transport(instance, lab_dir: Path, local_root: Path) -> LocalTransport:
    """The transport-registry entry point (hil.transport.open_transport)."""
    return LocalTransport(instance.name, local_root)
