"""A board's console over a serial line: a UART, a pty (an emulated board) or a network console
(``rfc2217://`` from ser2net, ``socket://``): hil.protocol's ConsoleProtocol, the bytes typed to
the board and the bytes it prints, and nothing more (labgrid's SerialDriver). Commands and
uploads over a console are console_shell.py's; serial.py wires the two into the transport."""

from __future__ import annotations

import os
import select
import time

import serial

from hil.protocol import ConsoleProtocol
from kiln.errors import TransportError

URL_READ_S = 0.02  # a network console's read timeout, set once (see check_serial_module)


class SerialConsole(ConsoleProtocol):
    """The console on ``port`` (a device path, or a URL pyserial opens) at ``baud``; a write
    that the line takes nothing of for ``write_timeout_s`` raises TimeoutError. ``stats``
    counts the bytes on the wire each way."""

    def __init__(self, board: str, port: str, baud: int, write_timeout_s: float):
        self.board, self.port, self.baud, self.write_timeout_s = board, port, baud, write_timeout_s
        self._ser: serial.Serial | None = None
        self._rbuf = bytearray()
        self.stats = {"wire_bytes_out": 0, "wire_bytes_in": 0}

    def __str__(self) -> str:
        return self.port

    @property
    def line_rate(self) -> float:
        """The line's raw rate in bytes/s (8N1: 10 bits a byte)."""
        return self.baud / 10.0

    def open(self) -> None:
        if self._ser is not None:
            return
        check_serial_module()
        try:
            if "://" in self.port:  # a console served over the network: rfc2217://host:port (ser2net)
                # The read timeout is set once: each change is a round trip on plain pyserial.
                # (pyserial's RFC2217 client has no write timeout: TCP's own send buffer stands in)
                self._ser = serial.serial_for_url(self.port, self.baud, timeout=URL_READ_S)
            else:
                # exclusive: two transports typing into one console would garble each other.
                self._ser = serial.Serial(self.port, self.baud, timeout=0, write_timeout=self.write_timeout_s,
                                          exclusive=True)
        except (serial.SerialException, OSError, ValueError) as e:
            raise TransportError(f"board '{self.board}': cannot open serial port {self.port}: {e}") from e
        self._rbuf.clear()
        try:
            self._ser.reset_input_buffer()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is None:
            return
        try:
            ser.flush()  # what was written goes out before the port closes
        except Exception:  # noqa: BLE001 - a port gone (termios.error, SerialException): closed anyway
            pass
        finally:
            ser.close()

    def write(self, data: bytes) -> None:
        self._require_open()
        try:
            self._ser.write(data)
        except serial.SerialTimeoutException as e:
            raise TimeoutError(f"serial port {self.port}: the line took no data for {self.write_timeout_s:g} s") from e
        self.stats["wire_bytes_out"] += len(data)

    def read_until(self, marker: bytes, timeout: float) -> bytes | None:
        self._require_open()
        deadline = time.monotonic() + timeout
        fd = None if "://" in self.port else self._ser.fileno()
        while True:
            i = self._rbuf.find(marker)
            if i >= 0:
                end = i + len(marker)
                data = bytes(self._rbuf[:end])
                del self._rbuf[:end]
                return data
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if fd is None:  # a URL port has no descriptor: reads wait up to URL_READ_S
                try:
                    data = self._ser.read(max(1, self._ser.in_waiting))
                except (serial.SerialException, OSError) as e:
                    raise EOFError(f"serial port {self.port}: {e}") from e
                if data:
                    self.stats["wire_bytes_in"] += len(data)
                    self._rbuf += data
            elif select.select([fd], [], [], remaining)[0]:
                data = os.read(fd, 65536)
                if not data:
                    raise EOFError(f"serial port {self.port} closed")
                self.stats["wire_bytes_in"] += len(data)
                self._rbuf += data

    def _require_open(self) -> None:
        if self._ser is None:
            raise TransportError(f"board '{self.board}': console {self.port} used before open()")


SERIAL_DIST = ("pyserial-labgrid", "3.5.0.2")  # pyproject.toml's pin


def check_serial_module() -> None:
    """The ``serial`` module must be labgrid's fork, alone. pyserial and pyserial-labgrid
    install the same files (whichever is installed last wins; pip says nothing), so a venv
    with both is broken in a way no import shows. Kiln uses the fork because labgrid needs
    it, and because its RFC2217 client does not renegotiate the line on every timeout change
    (~150 ms each with plain pyserial)."""
    from importlib import metadata

    try:
        metadata.version("pyserial")
        both = True
    except metadata.PackageNotFoundError:
        both = False
    try:
        have = metadata.version(SERIAL_DIST[0])
    except metadata.PackageNotFoundError:
        have = None
    fix = (f"pip uninstall -y pyserial && pip install --force-reinstall --no-deps "
           f"{SERIAL_DIST[0]}=={SERIAL_DIST[1]} (or: make setup)")
    if both:
        raise TransportError(f"both pyserial and {SERIAL_DIST[0]} are installed; they install the same "
                             f"'serial' module and the last one wins: {fix}")
    if have != SERIAL_DIST[1]:
        raise TransportError(f"the 'serial' module is not {SERIAL_DIST[0]} {SERIAL_DIST[1]} "
                             f"(found {have or 'another distribution'}): {fix}")
