"""labgrid's client API as Kiln uses it: a ClientSession on a TCP connection of its own, one
long-lived :class:`Client` per process and coordinator (on a thread of its own, reconnected
whenever its stream breaks), and :func:`with_session` for one call in a session of its own
(the multi-host emulator's set-up, hil/emulator/multihost.py). Leases and the reaper are
lease.py's; the lab backend is the package's ``__init__``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import secrets
import socket
import threading
import time

from kiln.errors import KilnError

log = logging.getLogger("kiln.labgrid")
CALL_TIMEOUT_S = 5.0


class LabgridError(KilnError):
    """The coordinator is unreachable, or refused a call."""


def runner_name() -> str:
    """This runner's name: $KILN_RUNNER, else the host name (labgrid's 'host' half)."""
    return os.environ.get("KILN_RUNNER") or socket.gethostname()


def is_kiln(acquired: str | None) -> bool:
    return bool(acquired) and acquired.split("/", 1)[-1].startswith("kiln-")


def session_class(host: str | None = None, user: str | None = None):
    """labgrid's ClientSession on a TCP connection of its own, as ``host``/``user`` when given
    (Kiln's identity, not the login's). gRPC shares one TCP connection between a process's
    channels to one address, and the coordinator refuses (asserts) a second client stream from
    a peer it knows: a reconnect, or two clients in one process."""
    import grpc
    from labgrid.remote.client import ClientSession
    from labgrid.remote.generated import labgrid_coordinator_pb2_grpc

    class Session(ClientSession):
        def __attrs_post_init__(self):
            super().__attrs_post_init__()  # its channel has not connected yet: replace it
            asyncio.get_running_loop().create_task(self.channel.close())
            self.channel = grpc.aio.insecure_channel(self.address, options=[
                ("grpc.keepalive_time_ms", 7500), ("grpc.keepalive_timeout_ms", 10000),
                ("grpc.http2.ping_timeout_ms", 10000), ("grpc.http2.max_pings_without_data", 0),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.enable_http_proxy", 0)])  # a lab's coordinator is never behind $http_proxy
            self.stub = labgrid_coordinator_pb2_grpc.CoordinatorStub(self.channel)

        def gethostname(self):
            return host if host is not None else super().gethostname()

        def getuser(self):
            return user if user is not None else super().getuser()

    return Session


# -- one call in a session of its own ------------------------------------------------------------

_loop: tuple[int, asyncio.AbstractEventLoop] | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """One event loop for every :func:`with_session` call of this process, run by a daemon
    thread. (A loop per call would do, but gRPC's poller calls into a closed loop afterwards
    and says so.)"""
    global _loop
    if _loop is None or _loop[0] != os.getpid():  # a forked child has no such thread
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="kiln-labgrid-session", daemon=True).start()
        _loop = (os.getpid(), loop)
    return _loop[1]


def with_session(address: str, fn, within: float = 20.0):
    """``await fn(session)`` (or its plain result) with a labgrid ClientSession of its own, on
    :func:`event_loop`'s thread (a caller's loop, or one labgrid stashed, is left alone);
    LabgridError naming the coordinator when it fails or takes over ``within`` seconds."""
    async def go():
        s = session_class()(address=address, loop=asyncio.get_running_loop())
        try:
            await s.start()
            out = fn(s)
            return (await out) if inspect.isawaitable(out) else out
        finally:
            with contextlib.suppress(Exception):
                await s.stop()
            await s.close()

    try:
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(go(), within), event_loop()).result(within + 1)
    except Exception as e:  # grpc's, labgrid's ServerError, a timeout
        raise LabgridError(f"labgrid coordinator {address}: {type(e).__name__}: {e or 'no answer'}") from e


# -- the client: labgrid's ClientSession on its own event loop ------------------------------

class Client:
    """One labgrid client session per process and coordinator, on a thread of its own (Kiln's
    workers are threads), reconnected whenever its stream to the coordinator breaks. Places
    and resources are labgrid's own view, kept current by the coordinator's updates."""

    def __init__(self, address: str, ttl_s: float, connect_timeout_s: float = 10.0):
        self.address, self.ttl_s = address, ttl_s
        self.user = f"kiln-{os.getpid()}-{secrets.token_hex(2)}"
        self.identity = f"{runner_name()}/{self.user}"
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="labgrid-loop", daemon=True).start()
        self.session = None
        self.connects = 0
        self.reconnected_at: float | None = None  # monotonic: the last reconnect (not the first connect)
        self.wakers: list[threading.Event] = []   # leases to renew at once after a reconnect
        self.closed = threading.Event()
        self.renewals = itertools.count(1)  # lease tags' numbers (lease.Lease._renew)
        self._connect(connect_timeout_s)
        threading.Thread(target=self._watch, name="labgrid-watch", daemon=True).start()

    # plumbing
    def _run(self, coro, timeout: float = CALL_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result(timeout + 1)

    def _connect(self, timeout: float) -> None:
        session = session_class(runner_name(), self.user)

        async def start():
            s = session(address=self.address, loop=self.loop)
            try:
                await s.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await s.close()
                raise
            return s

        old = self.session
        if old is not None:  # its stream broke: let its channel go
            with contextlib.suppress(Exception):
                self._run(old.close(), 2)
        try:
            self.session = self._run(start(), timeout)
        except Exception as e:  # grpc, timeout, labgrid's ServerError
            raise LabgridError(f"labgrid coordinator {self.address}: cannot connect within {timeout:g} s "
                               f"({type(e).__name__}: {e or 'no answer'})") from e
        self.connects += 1
        if self.connects > 1:
            self.reconnected_at = time.monotonic()
            for w in list(self.wakers):
                w.set()

    @property
    def up(self) -> bool:
        return self.session is not None and not self.session.stopping.is_set()

    def _watch(self) -> None:
        """Reconnect after the stream broke (a coordinator restart, a partition)."""
        while not self.closed.is_set():
            if not self.up:
                try:
                    self._connect(2.0)
                    log.info("labgrid: reconnected to %s", self.address)
                except LabgridError:
                    pass
            time.sleep(0.25)

    def broken(self) -> None:
        """A call timed out: the stream may be stuck (keepalive takes ~18 s to see a partition)."""
        s = self.session
        if s is not None and s.stream_call is not None:
            self.loop.call_soon_threadsafe(s.stream_call.cancel)

    def call(self, name: str, **fields):
        """One of the coordinator's calls (labgrid_coordinator.proto), then a sync so that this
        client's view includes its effect; LabgridError when refused or unanswered."""
        import grpc
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb

        s = self.session
        if s is None or s.stopping.is_set():
            raise LabgridError(f"labgrid coordinator {self.address}: not connected")

        async def go():
            await getattr(s.stub, name)(getattr(pb, f"{name}Request")(**fields))
            await s.sync_with_coordinator()

        try:
            self._run(go())
        except grpc.aio.AioRpcError as e:
            raise LabgridError(f"labgrid coordinator {self.address}: {name}: {e.details()}") from e
        except Exception as e:  # TimeoutError, a stream torn down under the call
            self.broken()
            raise LabgridError(f"labgrid coordinator {self.address}: {name}: no answer ({type(e).__name__})") from e

    def places(self) -> dict:
        """{name: {acquired, tags, reservation, resources: [ResourceEntry, ...]}} as labgrid sees it."""
        s = self.session
        if s is None:
            return {}

        async def snap():
            out = {}
            for name, p in s.places.items():
                res = []
                for exp, groups in s.resources.items():
                    for group, entries in groups.items():
                        for rname, r in entries.items():
                            if "cls" in r.data and p.hasmatch((exp, group, r.cls, rname)):
                                res.append({"cls": r.cls, "params": dict(r.params), "avail": r.avail,
                                            "path": f"{exp}/{group}/{r.cls}/{rname}"})
                out[name] = {"acquired": p.acquired, "tags": dict(p.tags), "reservation": p.reservation,
                             "resources": res}
            return out

        return self._run(snap())

    def reservations(self) -> list:
        from labgrid.remote.common import Reservation
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb

        s = self.session

        async def go():
            r = await s.stub.GetReservations(pb.GetReservationsRequest())
            return [Reservation.from_pb2(x) for x in r.reservations]

        return self._run(go())

    def set_tags(self, place: str, **tags: str) -> None:
        self.call("SetPlaceTags", placename=place, tags=tags)

    def close(self) -> None:
        self.closed.set()
        s = self.session
        if s is not None:
            with contextlib.suppress(Exception):
                self._run(s.stop(), 3)
                self._run(s.close(), 3)
        self.loop.call_soon_threadsafe(self.loop.stop)
