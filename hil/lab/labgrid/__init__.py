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

The package: client.py (labgrid's client session, one per process and coordinator), lease.py
(leases and the reaper), cli.py (the command below), and here the lab backend (``describe``,
``open_lab``, ``close_lab``, ``Leasing``: what hil/lab asks of a backend).

    python -m hil.lab.labgrid places [LAB.yaml]        # places, holders, leases, health
    python -m hil.lab.labgrid health PLACE STATE [LAB.yaml] --reason TEXT
    python -m hil.lab.labgrid hold PLACE [LAB.yaml] [--for S] [--wait S]   # by hand: maintenance
    python -m hil.lab.labgrid reap [LAB.yaml]          # a reaper that runs until stopped
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

import yaml

from hil import protocol
from hil.lab.labgrid.client import Client, LabgridError
from hil.lab.labgrid.lease import LEASE_TAG, POLL_S, RESTART_GRACE_S, Lease, Reaper, acquire_place
from hil.lab.labgrid.power import power_resources
from hil.lab.leases import LeaseBusy
from kiln.artifacts import build_root, write_bytes
from kiln.errors import ManifestError

__all__ = ["BAD_RECHECK_S", "Client", "EMULATED_TAG", "HEALTH_AT_TAG", "HEALTH_TAG", "LEASE_TAG", "LabgridError",
           "Lease", "Leasing", "RESTART_GRACE_S", "TAGS_TAG", "TYPE_TAG", "acquire_place", "client_for", "close_clients",
           "close_lab", "describe", "discover", "open_lab", "serial_url"]

log = logging.getLogger("kiln.labgrid")
TYPE_TAG, HEALTH_TAG, EMULATED_TAG, TAGS_TAG = "kiln_type", "kiln_health", "kiln_emulated", "kiln_tags"
HEALTH_AT_TAG = "kiln_health_at"  # when it was set (epoch seconds)
BAD_RECHECK_S = 3600.0  # a board marked bad is skipped by every runner for this long, then checked again
UNBOUND = "labgrid://"  # a live inventory's serial port before its place is acquired: labgrid://COORD/PLACE


# -- the process's client per lab ---------------------------------------------------------------

_clients: dict[str, Client] = {}
_clients_lock = threading.Lock()


def client_for(lab) -> Client:
    """This process's client of the lab's coordinator, with its reaper (lease.Reaper)."""
    with _clients_lock:
        c = _clients.get(lab.coordinator)
        if c is None or c.closed.is_set():
            c = _clients[lab.coordinator] = Client(lab.coordinator, lab.lease_ttl_s, lab.connect_timeout_s)
            Reaper(c).start()
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
        if b.power is None and power_resources(p):  # the place's own power, through labgrid's drivers
            entry["power"] = {"kind": "labgrid-place", "coordinator": lab.coordinator, "place": b.name,
                              "lease_ttl_s": lab.lease_ttl_s}
        boards.append(entry)
    if not boards:
        raise LabgridError(f"lab '{lab.name}': no board reachable through coordinator {lab.coordinator}")
    inv = Inventory.model_validate({"name": lab.name, "boards": boards})
    out = _live_dir(lab) / f"inventory-{os.getpid()}.yaml"
    write_bytes(out, yaml.safe_dump(inv.model_dump(), sort_keys=False).encode())
    return out


def default_power(instance, lab=None):
    """``python -m hil.lab power`` on a labgrid lab's board: its place's own power resource."""
    if instance.power is not None or lab is None:
        return instance.power
    from kiln.schema.lab import LabgridPlacePower

    if not power_resources(client_for(lab).places().get(instance.name, {})):
        return None
    return LabgridPlacePower(kind="labgrid-place", coordinator=lab.coordinator, place=instance.name,
                             lease_ttl_s=lab.lease_ttl_s)


def close_lab(lab, path: Path) -> None:
    """Leave the multi-host lab running (other runners share it: `doit lab_down` stops it)."""
    (_live_dir(lab) / f"inventory-{os.getpid()}.yaml").unlink(missing_ok=True)
    close_clients()


# -- what the nightly asks of a lab (hil/lab.leasing) -------------------------------------------

class Leasing(protocol.Leasing):
    """Leases and shared health through the coordinator, for one lab."""

    def __init__(self, lab):
        self.lab, self.client = lab, client_for(lab)

    def acquire(self, board: str, holder: str = "", wait: bool = True, timeout_s: float | None = None):
        lease = acquire_place(self.client, board, wait=wait, timeout_s=timeout_s)
        if lease is None and wait:
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
