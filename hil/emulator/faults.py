"""Fault injection for link tests: a byte pipe that forwards, drops or stalls.

``Link`` is the generic part: it pumps bytes from a ``read(n)`` callable to a ``write(data)``
callable and applies the current ``Fault``, so it can sit between sockets today and between
ptys later. ``TCPProxy`` puts Links between a loopback listener and a target (an emulated
board's sshd): point a transport at ``proxy.port`` and change ``proxy.fault`` while it runs.

    with TCPProxy((board.host, board.port)) as proxy:
        proxy.fault = Fault("drop", after_bytes=256_000)   # cut every new connection there
        proxy.fault = Fault("drop", 256_000, connections=1)  # ... only the next one
        proxy.fault = Fault("stall")                         # accept, then never answer

"Board unreachable" needs no proxy: ``closed_port()`` is a loopback port nothing listens on.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Literal

# Where a proxy may connect: loopback and the emulated boards' namespace block, nothing else.
ALLOWED_TARGETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.213.0.0/16"))
CHUNK = 65536


@dataclass(frozen=True)
class Fault:
    """What a Link does once ``after_bytes`` bytes (both directions together) went through.

    mode: "forward" (nothing happens), "drop" (close both ends, mid-stream if need be) or
    "stall" (stop forwarding; the ends stay open and hear nothing more).
    connections: how many *new* connections get this fault (None: all); later ones forward.
    """

    mode: Literal["forward", "drop", "stall"] = "forward"
    after_bytes: int = 0
    connections: int | None = None


class Link:
    """One connection's two directions, sharing a byte budget and a fault."""

    def __init__(self, fault: Fault, close: Callable[[], None]):
        self.fault = fault
        self.passed = 0  # bytes forwarded, both directions
        self._close = close
        self._lock = threading.Lock()
        self._dropping = False
        self.closed = threading.Event()

    def pump(self, read: Callable[[int], bytes], write: Callable[[bytes], None]) -> None:
        """Copy read() to write() until EOF, an error, or the fault fires. Runs in a thread."""
        try:
            while not self.closed.is_set():
                data = read(CHUNK)
                if not data:
                    break
                data = self._admit(data)
                if data is None:  # stalled: swallow everything, answer nothing
                    continue
                if data:
                    write(data)
                if self._dropping:
                    break
        except OSError:
            pass
        finally:
            self.shut()

    def shut(self) -> None:
        """Close both ends (once, whichever direction gets here first)."""
        with self._lock:
            if self.closed.is_set():
                return
            self.closed.set()
        self._close()

    def _admit(self, data: bytes) -> bytes | None:
        """The part of ``data`` that may pass; None when stalled. Fires a drop when due."""
        with self._lock:
            f = self.fault
            room = f.after_bytes - self.passed
            if f.mode == "forward" or room >= len(data):
                self.passed += len(data)
                return data
            if f.mode == "stall":
                self.passed += max(0, room)
                return data[:room] if room > 0 else None
            self.passed += max(0, room)
            self._dropping = True  # drop: forward what fits, then the pump's finally closes both ends
            return data[:room] if room > 0 else b""


class TCPProxy:
    """A loopback TCP proxy to ``target`` with a changeable ``fault`` for new connections."""

    def __init__(self, target: tuple[str, int], fault: Fault = Fault()):
        if not any(ipaddress.ip_address(target[0]) in net for net in ALLOWED_TARGETS):
            raise ValueError(f"proxy target {target[0]} is outside {[str(n) for n in ALLOWED_TARGETS]}")
        self.target = target
        self.fault = fault
        self.accepted = 0  # connections accepted so far
        self._links: list[Link] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = self._server.getsockname()[:2]
        self._stop = threading.Event()

    @property
    def passed(self) -> int:
        """Bytes forwarded so far, all connections and both directions (the wire's traffic)."""
        return sum(link.passed for link in self._links)

    def start(self) -> "TCPProxy":
        self._spawn(self._accept_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        for link in list(self._links):
            link.shut()
        for t in self._threads:
            t.join(timeout=2)

    def __enter__(self) -> "TCPProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        self._server.settimeout(0.1)  # to notice stop()
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.accepted += 1
            self._serve(client)

    def _serve(self, client: socket.socket) -> None:
        fault = self.fault
        if fault.connections is not None:  # count this connection against the fault's quota
            left = fault.connections - 1
            self.fault = Fault(fault.mode, fault.after_bytes, left) if left > 0 else Fault()
        if fault.mode == "stall" and fault.after_bytes == 0:
            upstream = None  # like a board that accepts and then hangs: never even connect on
        else:
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # target down: the client sees the link close at once
                return
        client.settimeout(None)

        def close() -> None:
            for s in (client, upstream):
                if s is None:
                    continue
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

        link = Link(fault, close)
        self._links.append(link)
        if upstream is None:
            self._spawn(link.pump, client.recv, lambda data: None)
            return
        self._spawn(link.pump, client.recv, upstream.sendall)
        self._spawn(link.pump, upstream.recv, client.sendall)

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` that nothing listens on (connecting is refused), for 'board down'."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
