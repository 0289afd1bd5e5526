"""Serial transport: a board reached only through its console (a UART, a pty when emulated, a
labgrid place's network console).

The wiring, as labgrid splits SerialDriver and ShellDriver: console.py's :class:`SerialConsole`
carries the bytes (hil.protocol.ConsoleProtocol), console_shell.py's :class:`ConsoleShell` runs
commands and uploads over it (its docstring has the protocol; the board needs nothing but a
POSIX shell and coreutils).
"""

from __future__ import annotations

from pathlib import Path

from hil.transport.console import SerialConsole
from hil.transport.console_shell import ConsoleShell
from kiln import schema
from kiln.errors import TransportError


class SerialTransport(ConsoleShell):
    """The shell over the console on ``spec.port`` (a path relative to the lab file's folder, an
    absolute one, or a URL)."""

    def __init__(self, board: str, spec: schema.SerialTransport, base_dir: Path):
        if not spec.port or spec.port.startswith("labgrid://"):  # known once its place is held
            raise TransportError(f"board '{board}': its serial transport names no port (a labgrid place's port "
                                 "is filled in when the place is acquired: acquire it first)")
        self.port = spec.port if spec.port.startswith("/") or "://" in spec.port \
            else str((Path(base_dir) / spec.port).resolve())
        console = SerialConsole(board, self.port, spec.baud, write_timeout_s=max(spec.timeout_s, 1.0))
        super().__init__(board, console, spec, where=self.port)

    @property
    def line_rate(self) -> float:
        """The line's raw rate in bytes/s (8N1: 10 bits a byte). A slow link: hil.deploy
        compresses what it uploads over it."""
        return self.console.line_rate


def open_transport(instance: schema.Instance, lab_dir: Path, local_root: Path) -> SerialTransport:
    """The transport-registry entry point (hil.transport.open_transport)."""
    return SerialTransport(instance.name, instance.transport, lab_dir)
