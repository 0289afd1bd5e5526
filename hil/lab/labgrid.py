"""Lab backend ``labgrid``: a lab on many hosts, driven through a labgrid coordinator.

labgrid (26.x) is the distributed engine: exporters on each lab host publish a board's resources
(a ``NetworkService`` for an SSH board, a ``NetworkSerialPort`` that ser2net serves over RFC2217
for a serial one), places group them, and the coordinator hands a place to one client at a time
(``AcquirePlace``). Kiln finds the places tagged ``kiln_type=<board type>``, acquires them with
labgrid's client API, reads their resources and deploys over its own SSH and serial transports.

What labgrid lacks, and Kiln adds with labgrid's public calls only:

Leases. An acquired place stays acquired when its holder dies (labgrid issue #1739). Every Kiln
    runner has its own identity (``<runner>/kiln-<pid>-<random>``: labgrid's host/user), and a
    place it holds carries the tag ``kiln_lease=<identity>#<n>`` (n never repeats), which its holder rewrites
    every ``ttl/5`` seconds. Every Kiln process that talks to the coordinator runs a *reaper*:
    a place acquired by a Kiln identity whose lease tag it has watched stand still for ``ttl``
    seconds (by its own monotonic clock: no clock is compared across hosts) is released with
    ``ReleasePlace(fromuser=<that holder>)`` — a release that does nothing if the place changed
    hands meanwhile — and its tag cleared.
Fencing. A holder trusts its lease only until ``ttl/2`` after its last renewal that the
    coordinator confirmed; past that (cut off, the coordinator gone) the lease is *lost* and
    its job's result is never used. A reaper frees a place only ``ttl`` after it last saw the
    tag move, so the old holder has given up before anyone else can take the place.
Restarts. A coordinator restart drops every acquisition (places and tags survive, in its
    places.yaml). The holder reconnects and acquires its place again (re-leased); a place
    someone else took meanwhile is lost. To give holders that chance, a waiter does not take a
    free place whose lease tag names another identity until it has seen the tag stand still
    for ``ttl``. An exporter restart (its resources gone) that lasts over ``RESTART_GRACE_S``
    loses the lease: the board behind it is not the one the job started on.
Stale reservations. A reservation allocated to a place but not acquired for ``ttl`` seconds
    (its owner forgot it) is cancelled: it would keep every waiter out for ~60-90 s.
Health. A place's ``kiln_health`` tag (good / bad / maintenance / retired) is where every
    runner sees it; each runner's own health check writes it.

    python -m hil.lab.labgrid places [LAB.yaml]        # places, holders, leases, health
    python -m hil.lab.labgrid health PLACE STATE [LAB.yaml] --reason TEXT
    python -m hil.lab.labgrid hold PLACE [LAB.yaml] [--for S] [--wait S]   # by hand: maintenance
    python -m hil.lab.labgrid reap [LAB.yaml]          # a reaper that runs until stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import yaml

from kiln.artifacts import build_root, write_bytes
from kiln.errors import KilnError, ManifestError

log = logging.getLogger("kiln.labgrid")
TYPE_TAG, LEASE_TAG, HEALTH_TAG, EMULATED_TAG, TAGS_TAG = "kiln_type", "kiln_lease", "kiln_health", \
    "kiln_emulated", "kiln_tags"
HEALTH_AT_TAG = "kiln_health_at"  # when it was set (epoch seconds)
BAD_RECHECK_S = 3600.0  # a board marked bad is skipped by every runner for this long, then checked again
RESTART_GRACE_S = 10.0  # an exporter gone this long: the job on its board is lost
POLL_S = 0.2            # a waiter's look at the places
REAP_EVERY_S = 1.0
CALL_TIMEOUT_S = 5.0
UNBOUND = "labgrid://"  # a live inventory's serial port before its place is acquired: labgrid://COORD/PLACE


class LabgridError(KilnError):
    """The coordinator is unreachable, or refused a call."""


class LeaseLost(KilnError):
    """This runner no longer holds the place: its lease lapsed or the place changed hands."""


def runner_name() -> str:
    """This runner's name: $KILN_RUNNER, else the host name (labgrid's 'host' half)."""
    return os.environ.get("KILN_RUNNER") or socket.gethostname()


def is_kiln(acquired: str | None) -> bool:
    return bool(acquired) and acquired.split("/", 1)[-1].startswith("kiln-")


# -- the client: labgrid's ClientSession on its own event loop ------------------------------

class Client:
    """One labgrid client session per process and coordinator, on a thread of its own (Kiln's
    workers are threads), reconnected whenever its stream to the coordinator breaks. Places
    and resources are labgrid's own view, kept current by the coordinator's updates."""

    def __init__(self, address: str, ttl_s: float, connect_timeout_s: float = 10.0, reap: bool = True):
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
        self._seen: dict[str, tuple[str, str, float]] = {}      # reaper: place -> (holder, tag, since)
        self._allocated: dict[str, float] = {}                  # reaper: reservation token -> since
        self.reaped: list[dict] = []
        self.renewals = itertools.count(1)  # lease tags' numbers (Lease._renew)
        self._connect(connect_timeout_s)
        threading.Thread(target=self._watch, name="labgrid-watch", daemon=True).start()
        if reap:
            threading.Thread(target=self._reaper, name="labgrid-reaper", daemon=True).start()

    # plumbing
    def _run(self, coro, timeout: float = CALL_TIMEOUT_S):
        return asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop).result(timeout + 1)

    def _connect(self, timeout: float) -> None:
        from labgrid.remote.client import ClientSession

        runner, user = runner_name(), self.user

        class _Session(ClientSession):  # Kiln's identity, not the login's: one per runner process
            def __attrs_post_init__(self):
                import grpc
                from labgrid.remote.generated import labgrid_coordinator_pb2_grpc

                super().__attrs_post_init__()
                # A channel of its own: gRPC shares one TCP connection between a process's
                # channels to one address, and the coordinator refuses a second client
                # stream from a peer it knows (a reconnect, or two clients in one process).
                self.channel = grpc.aio.insecure_channel(self.address, options=[
                    ("grpc.keepalive_time_ms", 7500), ("grpc.keepalive_timeout_ms", 10000),
                    ("grpc.http2.ping_timeout_ms", 10000), ("grpc.http2.max_pings_without_data", 0),
                    ("grpc.use_local_subchannel_pool", 1),
                    ("grpc.enable_http_proxy", 0)])  # a lab's coordinator is never behind $http_proxy
                self.stub = labgrid_coordinator_pb2_grpc.CoordinatorStub(self.channel)

            def gethostname(self):
                return runner

            def getuser(self):
                return user

        async def start():
            s = _Session(address=self.address, loop=self.loop)
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

    # the reaper
    def _reaper(self) -> None:
        while not self.closed.wait(REAP_EVERY_S):
            if self.up:
                try:
                    self.reap_once()
                except (LabgridError, RuntimeError, TimeoutError) as e:
                    log.debug("labgrid reaper: %s", e)

    def reap_once(self) -> list[str]:
        """Free what lapsed: places of dead or cut-off Kiln holders, stale lease tags on free
        places, reservations allocated and left unused; the places freed."""
        now, freed = time.monotonic(), []
        places = self.places()
        for name, p in places.items():
            tag = p["tags"].get(LEASE_TAG, "")
            holder = p["acquired"] if is_kiln(p["acquired"]) else None
            if holder is None and not tag:
                self._seen.pop(name, None)
                continue
            key = (holder or "", tag)
            was = self._seen.get(name)
            if was is None or was[:2] != key:
                self._seen[name] = (*key, now)
                continue
            if now - was[2] < self.ttl_s:
                continue
            if holder:
                log.warning("labgrid: lease of %s on place %s lapsed (no renewal for %.0f s): freeing it",
                            holder, name, now - was[2])
                self.call("ReleasePlace", placename=name, fromuser=holder)
                self.reaped.append({"place": name, "holder": holder, "at": time.time()})
                freed.append(name)
            if not holder or not is_kiln(self.places().get(name, {}).get("acquired")):
                self.set_tags(name, **{LEASE_TAG: ""})
            self._seen.pop(name, None)
        live = set()
        for res in self.reservations():
            if res.state.name != "allocated":
                continue
            live.add(res.token)
            since = self._allocated.setdefault(res.token, now)
            if now - since >= self.ttl_s:
                log.warning("labgrid: reservation %s of %s allocated for %.0f s and not used: cancelled",
                            res.token, res.owner, now - since)
                with contextlib.suppress(LabgridError):
                    self.call("CancelReservation", token=res.token)
        for t in set(self._allocated) - live:
            del self._allocated[t]
        return freed

    def close(self) -> None:
        self.closed.set()
        s = self.session
        if s is not None:
            with contextlib.suppress(Exception):
                self._run(s.stop(), 3)
                self._run(s.close(), 3)
        self.loop.call_soon_threadsafe(self.loop.stop)


# -- leases ------------------------------------------------------------------------------------

class Lease:
    """A place this runner acquired and renews; ``lost`` once it may no longer trust it."""

    def __init__(self, client: Client, place: str):
        self.client, self.board = client, place
        self.ttl_s = client.ttl_s
        self.seq = 0
        self.acquired_at = time.time()
        self.valid_until = time.monotonic() + self.ttl_s / 2
        self.lost_reason: str | None = None
        self.released = False
        self.re_leased = 0
        self.ports_before: dict[str, object] = {}  # resource -> its port when acquired (a stale one, maybe)
        self.epoch = client.connects  # the client connection its last renewal went through
        self._gone_since: float | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        client.wakers.append(self._wake)
        self._renew()
        threading.Thread(target=self._beat, name=f"lease-{place}", daemon=True).start()

    @property
    def lost(self) -> bool:
        if self.lost_reason is None and not self.released and time.monotonic() > self.valid_until:
            self.lost_reason = f"no renewal confirmed by the coordinator for {self.ttl_s / 2:g} s"
        return self.lost_reason is not None

    @property
    def valid(self) -> bool:
        """Whether the holder may trust the place is its own right now: not lost, and its stream
        to the coordinator has not broken since the last renewal (a coordinator restart drops
        every acquisition at once; the next renewal acquires it again, or loses it)."""
        c = self.client
        return not self.lost and c.up and c.connects == self.epoch

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"place '{self.board}': lease lost: {self.lost_reason}")

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<labgrid lease {self.board} by {self.client.identity}>"

    def _renew(self) -> None:
        # Counted from when the renewal was sent, not answered: the coordinator applied it (and a
        # reaper saw it) after this, so the holder gives up before any reaper's ttl runs out,
        # however late the answer comes.
        sent, epoch = time.monotonic(), self.client.connects
        self.seq += 1
        # numbered across all of this client's leases: a new lease of one holder on one place must
        # never repeat an old tag, or a reaper that missed the place's free moment would take
        # the tag for one that stood still (seen in bench/lab_chaos.py: a double allocation)
        self.client.set_tags(self.board, **{LEASE_TAG: f"{self.client.identity}#{next(self.client.renewals)}"})
        self.valid_until = sent + self.ttl_s / 2
        self.epoch = epoch

    def _lose(self, why: str) -> None:
        if self.lost_reason is None:
            self.lost_reason = why
            log.warning("place %s: lease lost: %s", self.board, why)

    def _beat(self) -> None:
        every = self.ttl_s / 5
        while not self._stop.is_set():
            self._wake.wait(every)  # a reconnect wakes it at once: re-acquire before the exporters are back
            self._wake.clear()
            if self._stop.is_set() or self.lost:
                return
            try:
                self._keep()
            except (LabgridError, RuntimeError, TimeoutError) as e:
                log.info("place %s: renewal failed: %s", self.board, e)

    def _keep(self) -> None:
        """One heartbeat: still ours (or ours again after a coordinator restart), and its
        resources there; then the renewal."""
        c = self.client
        if c.connects != self.epoch and c.session is not None:  # a new stream: its view first
            c._run(c.session.sync_with_coordinator())
        p = c.places().get(self.board)
        if p is None:
            raise LabgridError(f"place {self.board} not (yet) known to the coordinator")
        if p["acquired"] is None and c.up:  # the coordinator restarted: acquire it again
            tag = p["tags"].get(LEASE_TAG, "")
            if tag and not tag.startswith(c.identity + "#"):
                return self._lose(f"after a coordinator restart the place's lease names {tag}")
            # No tag: the coordinator saved places.yaml (every ~15 s) before this lease began. A
            # waiter that saw the restart holds off ttl/2 (_free_for) and this renewal runs at
            # once on the reconnect, so the place is taken back before anyone else may try.
            try:
                c.call("AcquirePlace", placename=self.board)
            except LabgridError as e:
                return self._lose(f"could not acquire it again after a coordinator restart: {e}")
            self.re_leased += 1
            log.warning("place %s: re-leased after a coordinator restart", self.board)
        elif p["acquired"] != c.identity:
            return self._lose(f"the place is now acquired by {p['acquired']}")
        if any(not r["avail"] for r in p["resources"]) or not p["resources"]:
            self._gone_since = self._gone_since or time.monotonic()
            if time.monotonic() - self._gone_since > RESTART_GRACE_S:
                return self._lose(f"its resources have been unavailable for over {RESTART_GRACE_S:g} s "
                                  "(the exporter restarted or is cut off)")
        else:
            self._gone_since = None
        self._renew()

    def release(self) -> None:
        if self.released:
            return
        self._stop.set()
        self._wake.set()
        with contextlib.suppress(ValueError):
            self.client.wakers.remove(self._wake)
        was_lost = self.lost
        self.released = True
        if was_lost:
            return  # not ours any more: the reaper (or its new holder) owns it now
        c = self.client
        try:
            c.set_tags(self.board, **{LEASE_TAG: ""})
            c.call("ReleasePlace", placename=self.board, fromuser=c.identity)
        except LabgridError as e:  # the reaper frees it once the lease lapses
            log.warning("place %s: release failed (%s); it is freed when its lease lapses", self.board, e)


def _free_for(client: Client, p: dict) -> bool:
    """Whether a waiter may try to take the place now."""
    if p["acquired"] is not None or p["reservation"] is not None:
        return False
    if not p["resources"] or not all(r["avail"] for r in p["resources"]):
        return False  # its exporter is down: nothing to use it with
    tag = p["tags"].get(LEASE_TAG, "")
    if tag and not tag.startswith(client.identity + "#"):
        return False
    # Just after this client reconnected (a coordinator restart, likely) the holders of places are
    # acquiring theirs again, or giving up (ttl/2 at most): a place looks free meanwhile.
    return client.reconnected_at is None or time.monotonic() - client.reconnected_at > client.ttl_s / 2


def acquire_place(client: Client, place: str, wait: bool = True, timeout_s: float | None = None) -> Lease | None:
    """Acquire ``place`` and start its lease; None when busy and ``wait`` is False or
    ``timeout_s`` passed. A free place with another holder's lease tag (a coordinator restart:
    its holder may come back for it) is left until the reaper clears the tag."""
    t0 = time.monotonic()
    while True:
        p = client.places().get(place)
        if p is None:
            raise ManifestError(f"labgrid coordinator {client.address}: no place '{place}' "
                                f"(places: {', '.join(sorted(client.places())) or 'none'})")
        if _free_for(client, p):
            try:
                client.call("AcquirePlace", placename=place)
                try:
                    lease = Lease(client, place)
                    lease.ports_before = {r["path"]: r["params"].get("port") for r in p["resources"]}
                    return lease
                except LabgridError:
                    with contextlib.suppress(LabgridError):
                        client.call("ReleasePlace", placename=place, fromuser=client.identity)
                    raise
            except LabgridError as e:  # taken between our look and our call: look again
                log.debug("place %s: %s", place, e)
        if not wait or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
            return None
        time.sleep(POLL_S)


# -- the process's client per lab ---------------------------------------------------------------

_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def client_for(lab) -> Client:
    with _clients_lock:
        c = _clients.get(lab.coordinator)
        if c is None or c.closed.is_set():
            c = _clients[lab.coordinator] = Client(lab.coordinator, lab.lease_ttl_s, lab.connect_timeout_s)
        return c


def close_clients() -> None:
    with _clients_lock:
        while _clients:
            _clients.popitem()[1].close()


# -- the lab-backend interface (hil/lab) ---------------------------------------------------------

def _live_dir(lab) -> Path:
    return build_root() / "lab" / "labgrid" / lab.name


def _ssh_files(lab, lab_path: Path) -> tuple[str | None, str | None]:
    rel = lambda f: str((Path(lab_path).parent / f).resolve()) if f else None  # noqa: E731
    return rel(lab.ssh.key), rel(lab.ssh.known_hosts)


def _transport(lab, lab_path: Path, place: str, p: dict) -> dict:
    """The Kiln transport that reaches a place's board, from its labgrid resources."""
    by_cls = {r["cls"]: r for r in p["resources"]}
    if "NetworkService" in by_cls:
        r = by_cls["NetworkService"]["params"]
        key, known = _ssh_files(lab, lab_path)
        user = r.get("username") or lab.ssh.user
        if not user:
            raise ManifestError(f"place '{place}': its NetworkService names no username and the lab file's "
                                "ssh.user is not set")
        return {"kind": "ssh", "host": r["address"], "port": int(r.get("port") or 22), "user": user,
                "key": key, "known_hosts": known, "accept_unknown_host_key": lab.ssh.accept_unknown_host_key,
                "connect_timeout_s": lab.ssh.connect_timeout_s, "retries": lab.ssh.retries}
    if "NetworkSerialPort" in by_cls:
        r = by_cls["NetworkSerialPort"]["params"]
        # the port exists only while the place is held, and one published now is its holder's:
        # Leasing.bind fills in ours once we hold it
        return {"kind": "serial", "port": f"{UNBOUND}{lab.coordinator}/{place}", "baud": int(r.get("speed") or 115200)}
    raise ManifestError(f"place '{place}': no NetworkService or NetworkSerialPort among its resources "
                        f"({', '.join(r['path'] for r in p['resources']) or 'none'}): Kiln reaches a board over "
                        "SSH or a serial console")


def serial_url(params: dict) -> str | None:
    """A NetworkSerialPort's URL for pyserial; None while the place is not acquired (labgrid's
    exporter starts ser2net, on a new port, only when its place is acquired).
    ``ign_set_control``: ser2net does not answer RFC2217's SET_CONTROL (modem lines) for a pty,
    and pyserial would wait for that answer on open."""
    if params.get("port") is None:
        return None
    if params.get("protocol", "rfc2217") != "rfc2217":
        return f"socket://{params['host']}:{int(params['port'])}"
    return f"rfc2217://{params['host']}:{int(params['port'])}?ign_set_control"


def _listening(params: dict) -> bool:
    try:
        socket.create_connection((params["host"], int(params["port"])), timeout=1.0).close()
        return True
    except OSError:
        return False


def discover(lab, client: Client | None = None) -> list[dict]:
    """The boards of the lab as places tagged kiln_type (Instance fields, transports by kind)."""
    places = (client or client_for(lab)).places()
    out = []
    for name, p in sorted(places.items()):
        t = p["tags"].get(TYPE_TAG)
        if not t:
            continue
        kind = "ssh" if any(r["cls"] == "NetworkService" for r in p["resources"]) else "serial"
        tags = [x for x in p["tags"].get(TAGS_TAG, "").split(",") if x]
        out.append({"name": name, "type": t, "transport": {"kind": kind}, "tags": tags,
                    "emulated": p["tags"].get(EMULATED_TAG, "0") in ("1", "true", "yes")})
    return out


def describe(lab, path: Path):
    """The lab with its boards: as listed in the lab file, else found on the coordinator."""
    if lab.boards:
        return lab
    from kiln.schema import Instance

    boards = [Instance.model_validate(b) for b in discover(lab)]
    if not boards:
        raise ManifestError(f"{path}: labgrid coordinator {lab.coordinator} has no place tagged "
                            f"{TYPE_TAG}=<board type> (tag one: labgrid-client -p PLACE set-tags {TYPE_TAG}=rpi4)")
    return lab.model_copy(update={"boards": boards})


def open_lab(lab, path: Path) -> Path:
    """Reach the coordinator and write a live inventory of the lab's places: their transports from
    their resources. A place that is missing or has no resource now is left out (its deploy
    then says so); the others go on."""
    from kiln.schema import Inventory

    c = client_for(lab)
    lab = describe(lab, path)
    places, boards = c.places(), []
    for b in lab.boards:
        p = places.get(b.name)
        if p is None or not p["resources"]:
            log.warning("lab %s: place %s %s: board left out", lab.name, b.name,
                        "does not exist" if p is None else "has no resources (its exporter is down?)")
            continue
        entry = b.model_dump(exclude_unset=True)
        reached, given = _transport(lab, path, b.name, p), b.transport.model_dump(exclude_unset=True)
        if given.get("kind", reached["kind"]) != reached["kind"]:
            raise ManifestError(f"{path}: board '{b.name}' has transport kind '{given['kind']}', but its place's "
                                f"resources are reached over {reached['kind']}")
        entry["transport"] = {**reached, **given}  # the lab file's own settings (workdir, timeouts) win
        boards.append(entry)
    if not boards:
        raise LabgridError(f"lab '{lab.name}': no board reachable through coordinator {lab.coordinator}")
    inv = Inventory.model_validate({"name": lab.name, "boards": boards})
    out = _live_dir(lab) / f"inventory-{os.getpid()}.yaml"
    write_bytes(out, yaml.safe_dump(inv.model_dump(), sort_keys=False).encode())
    return out


def close_lab(lab, path: Path) -> None:
    """Leave the multi-host lab running (other runners share it: `doit lab_down` stops it)."""
    (_live_dir(lab) / f"inventory-{os.getpid()}.yaml").unlink(missing_ok=True)
    close_clients()


# -- what the nightly asks of a lab (hil/lab.leasing) -------------------------------------------

class Leasing:
    """Leases and shared health through the coordinator, for one lab."""

    def __init__(self, lab):
        self.lab, self.client = lab, client_for(lab)

    def acquire(self, board: str, holder: str = "", wait: bool = True, timeout_s: float | None = None):
        lease = acquire_place(self.client, board, wait=wait, timeout_s=timeout_s)
        if lease is None and wait:
            from hil.lab.leases import LeaseBusy

            raise LeaseBusy(board, None, timeout_s)
        return lease

    def bind(self, inst, lease, within_s: float = RESTART_GRACE_S):
        """The instance as reached while ``lease`` holds its place: a serial board's port, which
        the exporter's ser2net opens on acquire (it takes a moment to be published)."""
        if inst.transport.kind != "serial" or not inst.transport.port.startswith(UNBOUND):
            return inst
        t0 = time.monotonic()
        while True:
            p = self.client.places().get(inst.name, {})
            ports = [r for r in p.get("resources", []) if r["cls"] == "NetworkSerialPort"]
            # the port the previous holder's ser2net had may still be published: wait for ours
            url = serial_url(ports[0]["params"]) if ports and ports[0]["params"].get("port") != \
                lease.ports_before.get(ports[0]["path"]) else None
            if url and _listening(ports[0]["params"]):
                log.info("place %s: its console is at %s while held", inst.name, url)
                return inst.model_copy(update={"transport": inst.transport.model_copy(update={"port": url})})
            lease.check()
            if time.monotonic() - t0 > within_s:
                raise LabgridError(f"place '{inst.name}': acquired, but its exporter published no serial port "
                                   f"within {within_s:g} s (is ser2net installed on the exporter host?)")
            time.sleep(POLL_S)

    def shared_health(self, board: str) -> str | None:
        """The place's health as every runner sees it; a ``bad`` mark older than
        ``BAD_RECHECK_S`` no longer counts (the board gets its check again)."""
        tags = self.client.places().get(board, {}).get("tags", {})
        state = tags.get(HEALTH_TAG)
        if state == "bad" and time.time() - float(tags.get(HEALTH_AT_TAG) or 0) > BAD_RECHECK_S:
            return None
        return state

    def publish_health(self, board: str, state: str) -> None:
        try:
            self.client.set_tags(board, **{HEALTH_TAG: state, HEALTH_AT_TAG: str(int(time.time()))})
        except LabgridError as e:
            log.warning("place %s: could not tag its health %s: %s", board, state, e)


# -- the command ---------------------------------------------------------------------------------

def _hold(c: Client, place: str, for_s: float | None, wait_s: float) -> int:
    import json

    t0 = time.monotonic()
    lease = acquire_place(c, place, wait=wait_s > 0, timeout_s=wait_s)
    say = lambda **kw: print(json.dumps({"place": place, "identity": c.identity, "t": time.time(), **kw}), flush=True)  # noqa: E731
    if lease is None:
        say(state="busy", waited_s=round(time.monotonic() - t0, 3))
        return 3
    say(state="held", waited_s=round(time.monotonic() - t0, 3))
    with lease:
        while for_s is None or time.monotonic() - t0 < for_s:
            say(state="lost" if lease.lost else "held", reason=lease.lost_reason, re_leased=lease.re_leased,
                renewals=lease.seq)
            time.sleep(1.0)
    say(state="released" if not lease.lost_reason else "lost", reason=lease.lost_reason)
    return 0 if not lease.lost_reason else 4


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from kiln.config import load_lab

    default = os.environ.get("KILN_LAB") or str(Path(__file__).resolve().parents[1] / "emulator" / "multihost.yaml")
    ap = argparse.ArgumentParser(prog="python -m hil.lab.labgrid", description="Kiln's view of a labgrid lab.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("places", help="places, holders, leases and health")
    pl.add_argument("lab", nargs="?", default=default)
    h = sub.add_parser("health", help="set a place's health for every runner")
    h.add_argument("place")
    h.add_argument("state", choices=["good", "bad", "maintenance", "retired"])
    h.add_argument("--reason", required=True)
    h.add_argument("lab", nargs="?", default=default)
    r = sub.add_parser("reap", help="run a reaper until stopped")
    r.add_argument("lab", nargs="?", default=default)
    hd = sub.add_parser("hold", help="hold a place (by hand: maintenance, a debug session) until ^C or --for; "
                        "prints one JSON line a second: the lease's state")
    hd.add_argument("place")
    hd.add_argument("lab", nargs="?", default=default)
    hd.add_argument("--for", dest="for_s", type=float, default=None, help="seconds to hold it (default: until ^C)")
    hd.add_argument("--wait", type=float, default=0.0, help="seconds to wait for it when busy (default: none)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        lab = load_lab(Path(a.lab))
        if getattr(lab, "backend", None) != "labgrid":
            raise ManifestError(f"{a.lab}: field 'backend': '{lab.backend}', expected 'labgrid'")
        c = client_for(lab)
        if a.cmd == "places":
            for name, p in sorted(c.places().items()):
                t = p["tags"]
                print(f"{name:<16} type={t.get(TYPE_TAG, '-'):<10} health={t.get(HEALTH_TAG, '-'):<11} "
                      f"held by {p['acquired'] or '-'}  lease {t.get(LEASE_TAG) or '-'}")
        elif a.cmd == "health":
            c.set_tags(a.place, **{HEALTH_TAG: a.state, HEALTH_AT_TAG: str(int(time.time()))})
            from hil.lab import health

            health.set_state(a.place, a.state, a.reason)
            print(f"{a.place}: {a.state} ({a.reason})")
        elif a.cmd == "hold":
            return _hold(c, a.place, a.for_s, a.wait)
        else:
            print(f"reaping for {c.address} as {c.identity} (ttl {c.ttl_s:g} s); ^C stops", flush=True)
            while True:
                time.sleep(3600)
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        close_clients()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
