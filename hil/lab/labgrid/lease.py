"""Kiln's leases on labgrid places, and the reaper that frees what a lease left behind (the
package's docstring tells why labgrid needs them). A :class:`Lease` is hil.protocol's Lease: a
place this runner acquired and renews through its :class:`~hil.lab.labgrid.client.Client`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

from hil import protocol
from hil.lab.labgrid.client import Client, LabgridError, is_kiln
from hil.protocol import LeaseLost
from kiln.errors import ManifestError

log = logging.getLogger("kiln.labgrid")
LEASE_TAG = "kiln_lease"  # <identity>#<n> on a place its holder renews
RESTART_GRACE_S = 10.0  # an exporter gone this long: the job on its board is lost
POLL_S = 0.2            # a waiter's look at the places
REAP_EVERY_S = 1.0


# -- leases ------------------------------------------------------------------------------------

class Lease(protocol.Lease):
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


# -- the reaper --------------------------------------------------------------------------------

class Reaper:
    """Frees what lapsed, through ``client``, once a second until the client closes (every Kiln
    process that talks to the coordinator runs one: hil.lab.labgrid.client_for)."""

    def __init__(self, client: Client):
        self.client = client
        self._seen: dict[str, tuple[str, str, float]] = {}  # place -> (holder, tag, since)
        self._allocated: dict[str, float] = {}              # reservation token -> since
        self.reaped: list[dict] = []

    def start(self) -> "Reaper":
        threading.Thread(target=self.run, name="labgrid-reaper", daemon=True).start()
        return self

    def run(self) -> None:
        c = self.client
        while not c.closed.wait(REAP_EVERY_S):
            if c.up:
                try:
                    self.reap_once()
                except (LabgridError, RuntimeError, TimeoutError) as e:
                    log.debug("labgrid reaper: %s", e)

    def reap_once(self) -> list[str]:
        """Free what lapsed: places of dead or cut-off Kiln holders, stale lease tags on free
        places, reservations allocated and left unused; the places freed."""
        c, now, freed = self.client, time.monotonic(), []
        places = c.places()
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
            if now - was[2] < c.ttl_s:
                continue
            if holder:
                log.warning("labgrid: lease of %s on place %s lapsed (no renewal for %.0f s): freeing it",
                            holder, name, now - was[2])
                c.call("ReleasePlace", placename=name, fromuser=holder)
                self.reaped.append({"place": name, "holder": holder, "at": time.time()})
                freed.append(name)
            if not holder or not is_kiln(c.places().get(name, {}).get("acquired")):
                c.set_tags(name, **{LEASE_TAG: ""})
            self._seen.pop(name, None)
        live = set()
        for res in c.reservations():
            if res.state.name != "allocated":
                continue
            live.add(res.token)
            since = self._allocated.setdefault(res.token, now)
            if now - since >= c.ttl_s:
                log.warning("labgrid: reservation %s of %s allocated for %.0f s and not used: cancelled",
                            res.token, res.owner, now - since)
                with contextlib.suppress(LabgridError):
                    c.call("CancelReservation", token=res.token)
        for t in set(self._allocated) - live:
            del self._allocated[t]
        return freed
