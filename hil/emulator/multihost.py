"""A labgrid lab on many hosts, started on this machine: the provider behind a ``LabgridLab``
whose ``emulate`` is set (hil/emulator/multihost.yaml).

What runs where. A Linux bridge ``kiln-lgbr`` (10.214.0.1/24) in the root namespace joins one
network namespace per "host": ``kiln-lg-<exporter>`` (10.214.0.11, .12, ...) and
``kiln-lg-<runner>`` (10.214.0.21, .22, ...), each through a veth pair (``kiln-lgv-<host>`` on
the bridge, ``eth0`` inside). The real ``labgrid-coordinator`` listens on the bridge address
in the root namespace (its places.yaml in ``<build>/lab/multihost/coordinator``, so places and
their tags outlive its restarts and ``down()``). Each exporter host runs a real sshd per SSH
board on its own address (ports 2201, 2202, ...) and the real ``labgrid-exporter``, which
publishes each board as a group named after it (a ``NetworkService``; for a serial board, a pty
on this machine, a ``NetworkSerialPort`` that the exporter's own ser2net serves over RFC2217
while the place is acquired). Every board is a place tagged ``kiln_type``/``kiln_emulated``/
``kiln_tags``. Kiln runs from the runner namespaces (``run_in``), so every byte between Kiln,
the coordinator and the boards crosses the bridge: a partition (``partition``), a dead exporter
or coordinator are real ones, and the traffic stays on addresses this module creates.

labgrid's exporter exits (code 100) when it loses the coordinator and expects a service
manager to start it again; here a small supervisor (``supervise``) does, one second later.
The coordinator writes places.yaml only every 15 s, so ``up()`` waits for that after changing
a place. ``state.json`` lists every pid, namespace and link as it is started, so the next
``up()`` or ``down()`` cleans what a crashed start left. The names and addresses are
machine-wide: one such lab per machine (the bridge's alias names the build that holds it).

    python -m hil.emulator.multihost up [LAB.yaml]|down [--forget]|status|exec HOST -- CMD...|
        partition HOST|heal HOST|kill-exporter EXP|start-exporter EXP|kill-coordinator|start-coordinator
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from hil.emulator import read_state
from kiln.artifacts import ROOT, build_root, file_lock, write_json
from kiln.errors import KilnError

log = logging.getLogger("kiln.multihost")
SPEC = ROOT / "hil" / "emulator" / "multihost.yaml"
NET = ipaddress.ip_network("10.214.0.0/24")
BRIDGE, BRIDGE_ADDR = "kiln-lgbr", "10.214.0.1"
SSH_PORT0, EXPORTER_IP0, RUNNER_IP0 = 2201, 11, 21
BIN = Path(sys.executable).parent  # the venv's bin: labgrid-coordinator, labgrid-exporter
SER2NET = "/usr/sbin/ser2net"  # where labgrid's exporter looks when it is not on PATH
WAIT_S = 30.0
_procs: dict[int, subprocess.Popen] = {}  # started here: reaped when they die


class MultihostError(KilnError):
    """The multi-host lab could not be started, reached or changed (names the part)."""


def state_dir() -> Path:
    return build_root() / "lab" / "multihost"


def namespace(host: str) -> str:
    return f"kiln-lg-{host}"


def _veth(host: str) -> str:
    name = f"kiln-lgv-{host}"  # an interface name has at most 15 characters
    return name if len(name) <= 15 else "kiln-lgv-" + hashlib.sha1(host.encode()).hexdigest()[:6]


def address(host: str) -> str:
    """The address of exporter or runner ``host`` (of the running lab, else of multihost.yaml)."""
    hosts = _read_state().get("plan", {}).get("hosts") or _plan(load_spec(SPEC))["hosts"]
    if host not in hosts:
        raise MultihostError(f"host '{host}': not a host of the multi-host lab (hosts: {', '.join(hosts)})")
    return hosts[host]["address"]


def load_spec(path: Path = SPEC):
    from kiln.config import load_lab
    from kiln.schema import LabgridLab

    lab = load_lab(path)
    if not isinstance(lab, LabgridLab) or lab.emulate is None:
        raise MultihostError(f"{path}: expected a 'labgrid' lab with an 'emulate' section (what this machine starts)")
    return lab


def _plan(lab) -> dict:
    """What the lab file asks for, as plain data (a changed plan restarts the whole lab)."""
    host, _, port = lab.coordinator.rpartition(":")
    if host != BRIDGE_ADDR:
        raise MultihostError(f"coordinator '{lab.coordinator}': an emulated lab's coordinator listens on the "
                             f"bridge address {BRIDGE_ADDR} (this module creates it), not '{host}'")
    if lab.emulate is None:
        raise MultihostError(f"lab '{lab.name}': it has no 'emulate' section: there is nothing to start here")
    if any(b.link == "serial" for b in lab.boards) and not (shutil.which("ser2net") or os.path.exists(SER2NET)):
        raise MultihostError("a serial board needs ser2net (Debian package ser2net): labgrid's exporter runs it")
    ex, runners = list(lab.emulate.exporters), list(lab.emulate.runners)
    if len(ex) > RUNNER_IP0 - EXPORTER_IP0 or set(ex) & set(runners):
        raise MultihostError(f"emulate: at most {RUNNER_IP0 - EXPORTER_IP0} exporters, and no name both "
                             f"an exporter and a runner (exporters {ex}, runners {runners})")
    hosts = {h: {"role": "exporter", "address": str(NET[EXPORTER_IP0 + i])} for i, h in enumerate(ex)}
    hosts.update({h: {"role": "runner", "address": str(NET[RUNNER_IP0 + i])} for i, h in enumerate(runners)})
    by_name, boards = {b.name: b for b in lab.boards}, {}
    for exp, names in lab.emulate.exporters.items():
        ssh = [n for n in names if by_name[n].link == "ssh"]
        for n in names:
            b = by_name[n]
            boards[n] = {"exporter": exp, "link": b.link, "type": b.type, "emulated": b.emulated,
                         "tags": list(b.tags), "port": SSH_PORT0 + ssh.index(n) if n in ssh else None}
    return {"coordinator": lab.coordinator, "hosts": hosts, "boards": boards}


# -- state ------------------------------------------------------------------------------------

def _locked():
    return file_lock(state_dir() / ".lock")


def _read_state() -> dict:
    return read_state(state_dir())


def _save(st: dict) -> None:
    write_json(state_dir() / "state.json", st)


def _alive(pid: int | None, marker: str = "") -> bool:
    """Is ``pid`` alive (a zombie is not) and still ours (``marker`` in its command line)?"""
    if pid in _procs:
        _procs[pid].poll()  # reap it if it died
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and marker in " ".join(p.cmdline())
    except (psutil.Error, TypeError, ValueError):
        return False


def _cfg(exp: str) -> str:
    """Exporter ``exp``'s config file: its supervisor's command line names it."""
    return str(state_dir() / f"{exp}.yaml")


def _kill_session(pid: int | None, marker: str, sig: int = signal.SIGKILL) -> None:
    """Signal every process of the session that ``pid`` leads (a supervisor, the exporter and
    its ser2net; the coordinator); SIGKILL what is left after 3 s. Without its leader (pid
    reused?), only the members that name ``marker``."""
    if pid is None:
        return
    ours = _alive(pid, marker)
    _signal([p for p in psutil.process_iter() if _sid(p.pid) == pid and (ours or _alive(p.pid, marker))], sig)
    if pid in _procs:
        _procs.pop(pid).wait(timeout=5)


def _signal(procs: list[psutil.Process], sig: int) -> None:
    """``sig``, then SIGKILL what is left after 3 s. A zombie counts as gone (orphans are
    reaped by pid 1, which may take its time)."""
    for s in (sig, signal.SIGKILL):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(s)
        deadline = time.monotonic() + 3
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if _alive(p.pid)]
            time.sleep(0.02)
        if not procs:
            return


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _spawn(argv: list[str], logfile: Path, cwd: Path = ROOT) -> int:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # gRPC would use a proxy
    env.update(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    with open(logfile, "ab") as out:
        p = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                             start_new_session=True)  # its own session: killed as one, not by a ^C
    _procs[p.pid] = p
    return p.pid


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        raise MultihostError(f"{name} not found in {BIN} nor on PATH: install labgrid (pyproject.toml pins it)")
    return str(found)


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(empty)"
    except OSError:
        return "(no log)"


def _ip(*args: str, check: bool = True) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise MultihostError(f"ip {' '.join(args)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


# -- network ------------------------------------------------------------------------------------

def _net_up(st: dict) -> None:
    _ip("link", "add", BRIDGE, "type", "bridge")
    st["links"].append(BRIDGE)
    _save(st)
    _ip("link", "set", "dev", BRIDGE, "alias", f"kiln-multihost {state_dir()}")  # see _foreign()
    _ip("addr", "add", f"{BRIDGE_ADDR}/{NET.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for host, h in st["plan"]["hosts"].items():
        ns, veth = namespace(host), _veth(host)
        _ip("netns", "add", ns)
        st["namespaces"].append(ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        st["links"].append(veth)
        _save(st)
        _ip("link", "set", veth, "master", BRIDGE)
        _ip("link", "set", veth, "up")
        _ip("-n", ns, "addr", "add", f"{h['address']}/{NET.prefixlen}", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")


def _links() -> dict[str, bool]:
    """The root namespace's links: name -> administratively up."""
    return {x["ifname"]: "UP" in x.get("flags", []) for x in json.loads(_ip("-j", "link", "show") or "[]")}


def _namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()}


def _foreign() -> str | None:
    """The state dir of another build's lab that holds the bridge (and so the machine-wide
    names and addresses) while its state is still there: it may be running, leave it alone."""
    links = json.loads(_ip("-j", "link", "show", "dev", BRIDGE, check=False) or "[]")
    other = (links[0].get("ifalias", "") if links else "").removeprefix("kiln-multihost ")
    return other if other and other != str(state_dir()) and (Path(other) / "state.json").exists() else None


def _net_ok(st: dict) -> bool:
    links, have = _links(), _namespaces()
    return (all(namespace(h) in have for h in st["plan"]["hosts"])
            and all(x in links for x in [BRIDGE, *map(_veth, st["plan"]["hosts"])]))


def _known(host: str, role: str | None = None) -> str:
    hosts = [h for h, x in _read_state().get("plan", {}).get("hosts", {}).items() if role in (None, x["role"])]
    if host not in hosts:
        raise MultihostError(f"host '{host}': not {'an ' + role if role else 'a'} host of the running multi-host lab "
                             f"(those: {', '.join(hosts) or 'none: it is not up'})")
    return host


def partition(host: str) -> None:
    """Cut ``host``'s namespace off the bridge (its veth down): from everything, and back."""
    _ip("link", "set", _veth(_known(host)), "down")


def heal(host: str) -> None:
    _ip("link", "set", _veth(_known(host)), "up")


def run_in(host: str, argv: list[str], env: dict | None = None, **popen_kw) -> subprocess.Popen:
    """Run ``argv`` inside runner (or exporter) namespace ``host``, with KILN_RUNNER=<host>."""
    env = {**(os.environ if env is None else env), "KILN_RUNNER": _known(host)}
    return subprocess.Popen(["ip", "netns", "exec", namespace(host), *argv], env=env, **popen_kw)


# -- coordinator and exporters -------------------------------------------------------------------

def _coordinator_alive(st: dict) -> bool:
    return _alive(st.get("coordinator"), "labgrid-coordinator")


def _port_open(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


def _start_coordinator(st: dict) -> None:
    addr, d = st["plan"]["coordinator"], state_dir() / "coordinator"
    if _port_open(addr):
        raise MultihostError(f"coordinator {addr}: the port is taken by another process")
    d.mkdir(parents=True, exist_ok=True)
    st["coordinator"] = _spawn([_tool("labgrid-coordinator"), "-l", addr], d / "coordinator.log", cwd=d)
    _save(st)
    deadline = time.monotonic() + WAIT_S
    while not _port_open(addr):
        if not _coordinator_alive(st) or time.monotonic() > deadline:
            raise MultihostError(f"labgrid-coordinator did not listen on {addr} within {WAIT_S:g} s; "
                                 f"{d / 'coordinator.log'}: {_tail(d / 'coordinator.log')}")
        time.sleep(0.1)


def _exporter_config(st: dict, exp: str) -> Path:
    groups = {}
    for name, b in st["plan"]["boards"].items():
        if b["exporter"] == exp:
            h = st["boards"][name]["handle"]
            groups[name] = ({"NetworkService": {"address": h["host"], "port": h["port"], "username": h["user"]}}
                            if b["link"] == "ssh" else  # the exporter wants the /dev path, not our symlink
                            {"RawSerialPort": {"port": os.path.realpath(h["tty"]), "speed": 115200}})
    cfg = state_dir() / f"{exp}.yaml"
    cfg.write_text(yaml.safe_dump(groups, sort_keys=False))
    return cfg


def _start_exporter(st: dict, exp: str) -> None:
    """Start exporter ``exp`` under its supervisor; with the coordinator up, wait until it lists
    every board of ``exp`` as available."""
    cfg, logfile = _exporter_config(st, exp), state_dir() / f"{exp}.log"
    argv = [_tool("labgrid-exporter"), "-c", st["plan"]["coordinator"], "-n", exp,
            "--hostname", st["plan"]["hosts"][exp]["address"], str(cfg)]
    st["exporters"][exp] = _spawn(["ip", "netns", "exec", namespace(exp), sys.executable, "-m",
                                   "hil.emulator.multihost", "supervise", "--", *argv], logfile)
    _save(st)
    mine, deadline = [n for n, b in st["plan"]["boards"].items() if b["exporter"] == exp], time.monotonic() + WAIT_S
    while _coordinator_alive(st):
        with contextlib.suppress(MultihostError):
            res = view()["resources"].get(exp, {})
            if all(res.get(n) and all(r["avail"] for r in res[n].values()) for n in mine):
                return
        if not _alive(st["exporters"][exp], str(cfg)) or time.monotonic() > deadline:
            raise MultihostError(f"exporter {exp}: its boards are not available on the coordinator within "
                                 f"{WAIT_S:g} s; {logfile}: {_tail(logfile)}")
        time.sleep(0.3)


def supervise(argv: list[str]) -> None:
    """Run the exporter and start it again a second after it exits (as systemd's unit for it
    does); what it leaves behind in its process group (ser2net) goes with it."""
    while True:
        p = subprocess.Popen(argv, process_group=0)
        rc = p.wait()
        with contextlib.suppress(OSError):
            os.killpg(p.pid, signal.SIGKILL)
        print(f"kiln supervisor: {Path(argv[0]).name} exited {rc}; starting it again in 1 s", flush=True)
        time.sleep(1)


def kill_exporter(exp: str, sig: int = signal.SIGKILL) -> None:
    """Kill exporter host ``exp``'s exporter (its supervisor and ser2net with it); it stays down."""
    with _locked():
        _kill_session(_read_state()["exporters"].get(_known(exp, "exporter")), _cfg(exp), sig)


def start_exporter(exp: str) -> None:
    with _locked():
        st = _read_state()
        if not _alive(st["exporters"].get(_known(exp, "exporter")), _cfg(exp)):
            _start_exporter(st, exp)


def kill_coordinator(sig: int = signal.SIGKILL) -> None:
    with _locked():
        _kill_session(_read_state().get("coordinator"), "labgrid-coordinator", sig)


def start_coordinator() -> None:
    """Start the coordinator again (it reloads its places); the exporters' supervisors reconnect."""
    with _locked():
        st = _read_state()
        if not st:
            raise MultihostError("the multi-host lab is not up (python -m hil.emulator.multihost up)")
        if not _coordinator_alive(st):
            _start_coordinator(st)


# -- the coordinator's view, and places ------------------------------------------------------------

def with_client(fn, address: str | None = None, within: float = 20.0):
    """``await fn(session)`` (or its plain result) with a labgrid ClientSession of its own
    (hil.lab.labgrid.client.with_session, the lab's own client code)."""
    from hil.lab.labgrid.client import LabgridError, with_session

    addr = address or _read_state().get("plan", {}).get("coordinator")
    if not addr or not _port_open(addr):
        raise MultihostError(f"labgrid coordinator {addr or '(lab not up)'}: not reachable")
    try:
        return with_session(addr, fn, within)
    except LabgridError as e:
        raise MultihostError(str(e)) from e


def view() -> dict:
    """{"places": {name: {tags, matches, acquired}}, "resources": {exporter: {group: {name:
    {cls, params, acquired, avail}}}}} as the coordinator has them now."""
    def read(s):
        return {"places": {n: {"tags": dict(p.tags), "matches": [repr(m) for m in p.matches], "acquired": p.acquired}
                           for n, p in s.places.items()},
                "resources": {e: {g: {r: dict(x.asdict()) for r, x in rs.items() if "cls" in x.data}  # not deleted
                                  for g, rs in gs.items()} for e, gs in s.resources.items()}}
    return with_client(read)


def _want_tags(b: dict) -> dict:
    return {"kiln_type": b["type"], "kiln_emulated": "1" if b["emulated"] else "0", "kiln_tags": ",".join(b["tags"])}


def _ensure_places(st: dict) -> bool:
    """Each board a place matching ``<exp>/<board>/*`` with its kiln_* tags; True if any changed.
    Other tags (kiln_health) are left as they are (SetPlaceTags merges)."""
    from labgrid.remote.generated import labgrid_coordinator_pb2 as pb

    boards, exporters = st["plan"]["boards"], [h for h, x in st["plan"]["hosts"].items() if x["role"] == "exporter"]

    async def ensure(s):
        changed = False
        for name, b in boards.items():
            if name not in s.places:
                await s.stub.AddPlace(pb.AddPlaceRequest(name=name))
                await s.sync_with_coordinator()
                changed = True
            place, pattern = s.places[name], f"{b['exporter']}/{name}/*"
            for m in place.matches:  # a board that moved to another exporter host
                if m.exporter in exporters and m.group == name and repr(m) != pattern:
                    await s.stub.DeletePlaceMatch(pb.DeletePlaceMatchRequest(placename=name, pattern=repr(m)))
                    changed = True
            if pattern not in [repr(m) for m in place.matches]:
                await s.stub.AddPlaceMatch(pb.AddPlaceMatchRequest(placename=name, pattern=pattern))
                changed = True
            tags = {k: v for k, v in _want_tags(b).items() if place.tags.get(k, "") != v}
            if tags:  # an empty value deletes the tag (kiln_tags of a board with none)
                await s.stub.SetPlaceTags(pb.SetPlaceTagsRequest(placename=name, tags=tags))
                changed = True
        await s.sync_with_coordinator()
        return changed
    return with_client(ensure)


def _wait_saved(st: dict) -> float:
    """Wait until the coordinator has written the places to places.yaml: it saves every 15 s,
    not on a change nor on SIGTERM, so a restart sooner would forget them."""
    path, t0 = state_dir() / "coordinator" / "places.yaml", time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            saved = yaml.load(path.read_text(), Loader=yaml.Loader) or {}
            if all(name in saved and {k: v for k, v in _want_tags(b).items() if v}.items()
                   <= dict(saved[name].get("tags", {})).items() for name, b in st["plan"]["boards"].items()):
                return time.monotonic() - t0
        except (OSError, yaml.YAMLError, AttributeError):
            pass
        time.sleep(0.5)
    raise MultihostError(f"labgrid-coordinator did not save its places to {path} within 20 s")


# -- up, down, status ---------------------------------------------------------------------------

def _board_alive(st: dict, name: str) -> bool:
    b = st.get("boards", {}).get(name)
    if not b:
        return False
    marker = str(Path(b["handle"]["state"]) / "sshd_config") if b["link"] == "ssh" else ""
    return all(_alive(p, marker) for p in b["pids"])


def _start_board(st: dict, name: str) -> None:
    from hil.emulator import pty_board, sshd
    from hil.emulator.lab import _plain

    b = st["plan"]["boards"][name]
    if b["link"] == "ssh":
        h = sshd.start_sshd(name, state_dir(), b["port"], netns=(namespace(b["exporter"]),
                                                                 st["plan"]["hosts"][b["exporter"]]["address"]))
        pub = (state_dir() / "client_key.pub").read_text()
        (h.state / "authorized_keys").write_text((h.state / "client_key.pub").read_text() + pub)
        st["boards"][name] = {"link": "ssh", "handle": _plain(h), "pids": [h.pid]}
    else:
        h = pty_board.start_serial_board(name, state_dir())
        st["boards"][name] = {"link": "serial", "handle": _plain(h), "pids": list(h.pids)}
    _save(st)


def _stop_board(b: dict) -> None:
    from hil.emulator import pty_board, sshd
    from hil.emulator.lab import _ssh_handle

    try:
        if b["link"] == "ssh":
            sshd.stop_sshd(_ssh_handle(b["handle"]))
        else:
            pty_board.stop_serial_board(pty_board.SerialBoard(**b["handle"]))
    except (KilnError, OSError, TypeError) as e:  # keep stopping the others
        log.warning("multihost: stopping board %s failed: %s", b["handle"].get("name"), e)


def in_host_namespace() -> bool:
    """Whether this process runs outside every lab host's network namespace (named ones are
    bind mounts under /run/netns: the same inode as /proc/self/ns/net when inside)."""
    try:
        me = os.stat("/proc/self/ns/net")
    except OSError:
        return True
    for f in Path("/run/netns").glob("kiln-lg-*"):
        with contextlib.suppress(OSError):
            st = f.stat()
            if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
                return False
    return True


def _from_host(what: str) -> None:
    if not in_host_namespace():  # inside, the bridge and the other namespaces cannot be seen
        raise MultihostError(f"multihost {what}: run it from this machine's own network namespace, not a lab "
                             "host's (a runner there only uses the lab)")


def up(lab=None, lab_path: Path = SPEC) -> None:
    """Start the lab (or what of it is dead); a no-op when every part is alive. A fresh start
    that fails stops what it started (its logs stay in state_dir())."""
    _from_host("up")
    lab = lab or load_spec(Path(lab_path))
    plan = _plan(lab)
    with _locked():
        st = _read_state()
        why = st and ("the lab file changed" if st.get("plan") != plan else "its last start did not finish"
                      if not st.get("complete") else None if _net_ok(st) else "a part of its network is gone")
        if why:
            log.info("multihost: starting the lab afresh: %s", why)
            _teardown(st)
            st = {}
        fresh = not st
        if fresh:
            other = _foreign()
            if other:
                raise MultihostError(f"another multi-host lab (state {other}) holds {BRIDGE} and the kiln-lg-* "
                                     "namespaces; there is one per machine: stop it first (KILN_BUILD="
                                     f"{Path(other).parents[1]} python -m hil.emulator.multihost down)")
            _teardown({})  # what a start whose state was lost left
            st = {"plan": plan, "lab": str(lab_path), "complete": False, "links": [], "namespaces": [],
                  "coordinator": None, "exporters": {}, "boards": {}}
            _save(st)
        try:
            if fresh:
                _net_up(st)
            _start_parts(st)
        except KilnError:
            if fresh:
                _teardown(st)
                (state_dir() / "state.json").unlink(missing_ok=True)
            raise
        st["complete"] = True
        _save(st)


def _start_parts(st: dict) -> None:
    """Start the coordinator, boards and exporters that are not alive; then the places."""
    from hil.emulator import sshd
    from hil.emulator.lab import _ssh_handle

    plan = st["plan"]
    sshd._keygen(state_dir() / "client_key", "kiln-multihost-client")
    if not _coordinator_alive(st):
        _start_coordinator(st)
    restart = set()
    for name, b in plan["boards"].items():
        if not _board_alive(st, name):
            if name in st["boards"]:
                _stop_board(st["boards"][name])
            _start_board(st, name)
            restart |= {b["exporter"]} if b["link"] == "serial" else set()  # its pty's path changed
    (state_dir() / "known_hosts").write_text("".join(  # every board's host key, as the runners reach it
        _ssh_handle(st["boards"][n]["handle"]).known_hosts_entry() for n, b in plan["boards"].items()
        if b["link"] == "ssh"))
    for exp, h in plan["hosts"].items():
        if h["role"] == "exporter" and (exp in restart or not _alive(st["exporters"].get(exp), _cfg(exp))):
            _kill_session(st["exporters"].get(exp), _cfg(exp))
            _start_exporter(st, exp)
    if _ensure_places(st):
        log.info("multihost: places saved by the coordinator after %.1f s", _wait_saved(st))


def _teardown(st: dict) -> None:
    """Kill every process the lab started (and whatever runs in its namespaces), delete its
    namespaces and links: those in ``st`` and any other kiln-lg-* / kiln-lgv-* / kiln-lgbr
    (unless another build's lab holds them)."""
    _kill_session(st.get("coordinator"), "labgrid-coordinator")
    for exp, pid in st.get("exporters", {}).items():
        _kill_session(pid, _cfg(exp))
    for b in st.get("boards", {}).values():
        _stop_board(b)
    if _foreign():
        return  # the network is another lab's now
    nss = set(st.get("namespaces", [])) | {n for n in _namespaces() if n.startswith("kiln-lg-")}
    for ns in sorted(nss):
        procs = []  # what runs there still
        for pid in _ip("netns", "pids", ns, check=False).split():
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(int(pid)))
        _signal(procs, signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
    for link in set(st.get("links", [])) | {n for n in _links() if n.startswith("kiln-lgv-") or n == BRIDGE}:
        _ip("link", "del", link, check=False)


def down(forget: bool = False) -> None:
    """Stop the whole lab; places.yaml stays (places survive a down/up) unless ``forget``."""
    _from_host("down")
    with _locked():
        _teardown(_read_state())
        (state_dir() / "state.json").unlink(missing_ok=True)
        if forget:
            for f in ("places.yaml", "resources.yaml"):
                (state_dir() / "coordinator" / f).unlink(missing_ok=True)


def is_up() -> bool:
    st = _read_state()
    return (bool(st.get("complete")) and _net_ok(st) and _coordinator_alive(st)
            and all(_board_alive(st, n) for n in st["plan"]["boards"])
            and all(_alive(st["exporters"].get(e), _cfg(e)) for e, h in st["plan"]["hosts"].items()
                    if h["role"] == "exporter"))


def status() -> dict:
    st = _read_state()
    if not st:
        return {"up": False}
    links, hosts, boards = _links(), {}, {}
    for h, x in st["plan"]["hosts"].items():
        hosts[h] = {**x, "namespace": namespace(h), "partitioned": not links.get(_veth(h), False)}
        if x["role"] == "exporter":
            hosts[h]["exporter_alive"] = _alive(st["exporters"].get(h), _cfg(h))
    for n, b in st["plan"]["boards"].items():
        h = st["boards"].get(n, {}).get("handle", {})
        boards[n] = {**b, "alive": _board_alive(st, n), **(
            {"tty": h["tty"]} if "tty" in h else {"address": h["host"], "user": h["user"]} if h else {})}
    return {"up": is_up(), "state_dir": str(state_dir()), "hosts": hosts, "boards": boards,
            "coordinator": {"address": st["plan"]["coordinator"], "alive": _coordinator_alive(st)}}


def ssh_files() -> tuple[Path, Path]:
    """The client key every SSH board accepts, and the known_hosts holding each board's host key."""
    return state_dir() / "client_key", state_dir() / "known_hosts"


# -- the lab backend of a LabgridLab with ``emulate`` (kiln.registry.module_name) -------------
# hil.lab.labgrid does the work; this adds the start and the SSH files the lab created.

def _with_own_ssh(lab, where: Path | None = None):
    key, known = ssh_files() if where is None else (where / "client_key", where / "known_hosts")
    return lab.model_copy(update={"ssh": lab.ssh.model_copy(update={"key": str(key), "known_hosts": str(known)})})


def describe(lab, path: Path):
    from hil.lab import labgrid

    if lab.boards:
        return lab
    up(lab, Path(path))  # the boards are found on its coordinator
    return labgrid.describe(lab, path)


def open_lab(lab, path: Path) -> Path:
    """Start what of the lab is not running, then open it as any labgrid lab (the lab stays up
    for the other runners: ``doit lab_down`` stops it)."""
    from hil.lab import labgrid

    if not in_host_namespace():  # a runner host of the lab: it uses the lab, whoever started it
        return labgrid.open_lab(_with_own_ssh(lab), path)
    other = _foreign()
    if other:  # another build on this machine started it (a second runner's checkout): use that one
        log.info("multihost: using the lab started by %s", other)
        return labgrid.open_lab(_with_own_ssh(lab, Path(other)), path)
    up(lab, Path(path))
    return labgrid.open_lab(_with_own_ssh(lab), path)


def close_lab(lab, path: Path) -> None:
    from hil.lab import labgrid

    labgrid.close_lab(lab, path)


def Leasing(lab):  # noqa: N802 (the backend interface's name)
    from hil.lab import labgrid

    return labgrid.Leasing(lab)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cmd, args = (argv[0] if argv else "status"), argv[1:]
    try:
        if cmd == "supervise" and args[:1] == ["--"]:
            supervise(args[1:])
        elif cmd == "up" and len(args) <= 1:
            up(lab_path=Path(args[0]) if args else SPEC)
        elif cmd == "down" and args in ([], ["--forget"]):
            down(forget=bool(args))
        elif cmd == "status" and not args:
            print(json.dumps(status(), indent=1))
        elif cmd == "exec" and len(args) >= 3 and args[1] == "--":
            return run_in(args[0], args[2:]).wait()
        elif cmd in ("partition", "heal", "kill-exporter", "start-exporter") and len(args) == 1:
            {"partition": partition, "heal": heal, "kill-exporter": kill_exporter,
             "start-exporter": start_exporter}[cmd](args[0])
        elif cmd in ("kill-coordinator", "start-coordinator") and not args:
            (kill_coordinator if cmd == "kill-coordinator" else start_coordinator)()
        else:
            print(__doc__.rsplit("\n\n", 1)[1].rstrip(), file=sys.stderr)
            return 2
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
