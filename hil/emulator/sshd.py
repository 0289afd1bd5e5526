"""A real OpenSSH sshd as an emulated board: its own host key, client key, work dir and, when
root can create network namespaces, its own network namespace and address.

Everything lives under ``state_dir/<name>/``: host_key, client_key (+ .pub), authorized_keys,
known_hosts, sshd_config, sshd.log, sshd.pid, board.json and work/. In a namespace the board is
``kiln-<lab>-<name>`` (``netns_name``: <lab> is a hash of the state dir, so two labs of two
build dirs never share a namespace, while a lab restarted in the same dir finds what a crashed
run of it left) with a veth pair in one private /30 of NETNS_BLOCK (host side .1, board side
.2, port 22); otherwise sshd listens on 127.0.0.1 on a free port. Stopping a board deletes its
own namespace, and the veth only when its peer is still in that namespace: never another
lab's. Only addresses this module
creates are ever used: the host gets an ``unreachable`` route for the whole block (left in
place; the boards' /30s are more specific), so a stopped board's address fails at once
instead of leaving by the default route. As root the sshd also runs in a private mount
namespace where the user's home is the board's own (state/<name>/home).

    python -m hil.emulator.sshd up NAME --state DIR [--port N] [--no-netns]   # prints board.json
    python -m hil.emulator.sshd down NAME --state DIR
"""

from __future__ import annotations

import argparse
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from kiln.errors import TransportError

SSHD = "/usr/sbin/sshd"
NETNS_BLOCK = ipaddress.ip_network("10.213.0.0/16")  # board i gets 10.213.<i>.0/30
START_TIMEOUT_S = 10.0
log = logging.getLogger("kiln.emulator.sshd")
_procs: dict[int, subprocess.Popen] = {}  # started here: reaped by stop_sshd


@dataclass
class SSHBoard:
    name: str
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    workdir: Path
    pid: int
    netns: str | None = None
    veth: str | None = None  # host side of the veth pair (deleting it deletes both ends)
    state: Path = field(default=Path())
    host_key: str = ""  # "ssh-ed25519 AAAA...", for known_hosts lines
    home: Path | None = None  # the board's own home, mounted over the user's for its sshd
    own_netns: bool = True  # False: netns is someone else's (start_sshd(netns=...)); stop leaves it

    def known_hosts_entry(self, host: str | None = None, port: int | None = None) -> str:
        """A known_hosts line for this board's host key, as reached at host:port (e.g. via a
        proxy). OpenSSH and paramiko write port 22 as a bare host, others as [host]:port."""
        host, port = host or self.host, port or self.port
        pattern = host if port == 22 else f"[{host}]:{port}"
        return f"{pattern} {self.host_key}\n"

    def transport_spec(self, **overrides) -> dict:
        """The inventory entry (kiln.schema.SSHTransport fields) that reaches this board."""
        spec = {"kind": "ssh", "host": self.host, "port": self.port, "user": self.user,
                "key": str(self.key), "known_hosts": str(self.known_hosts),
                "workdir": str(self.workdir), "connect_timeout_s": 5, "retries": 2}
        spec.update(overrides)
        return spec


def start_sshd(name: str, state_dir: Path, port: int | None = None,
               use_netns: bool | None = None, netns: tuple[str, str] | None = None) -> SSHBoard:
    """Start sshd for board ``name``; returns once its port accepts connections.

    use_netns: None = a namespace when root and ``ip netns add`` works, else loopback.
    netns: (an existing namespace, an address of it): run sshd there, on that address and
    ``port`` (default 22), e.g. several boards on one emulated host (hil/emulator/multihost.py);
    the namespace stays the caller's: stop_sshd leaves it.
    """
    if netns is not None:
        return _start_in(name, Path(state_dir), port or 22, *netns)
    d = Path(state_dir).resolve() / name
    host_key = _prepare(d, name)

    netns = veth = None
    if use_netns is None:
        use_netns = os.geteuid() == 0 and shutil.which("ip") is not None
        if use_netns:
            try:
                netns, veth, host = _netns_up(netns_name(state_dir, name), name)
            except TransportError as e:
                log.info("board %s: no network namespace (%s); using loopback", name, e)
                use_netns = False
    elif use_netns:
        netns, veth, host = _netns_up(netns_name(state_dir, name), name)
    tries = 1 if use_netns or port else 3  # a free loopback port can be taken before sshd binds
    for attempt in range(tries):
        if not use_netns:
            host = "127.0.0.1"
        p = port or (22 if use_netns else _free_port())
        board = SSHBoard(name, host, p, _user(), d / "client_key", d / "known_hosts", d / "work", 0,
                         netns, veth, d, host_key, _own_home(d))
        (d / "known_hosts").write_text(board.known_hosts_entry())
        try:
            board.pid = _launch(board)
            break
        except TransportError:
            if netns:
                _netns_down(netns, veth)
            if attempt + 1 == tries or "Address already in use" not in _tail(d / "sshd.log"):
                raise
    (d / "board.json").write_text(json.dumps(asdict(board), default=str, indent=1))
    log.info("board %s: sshd pid %d on %s:%d%s", name, board.pid, board.host, board.port,
             f" in netns {netns}" if netns else "")
    return board


def _prepare(d: Path, name: str) -> str:
    """The board's dirs and keys (authorized_keys: its own client key); its host key line."""
    (d / "work").mkdir(parents=True, exist_ok=True)
    _keygen(d / "host_key", f"kiln-{name}-host")
    _keygen(d / "client_key", f"kiln-{name}-client")
    shutil.copyfile(d / "client_key.pub", d / "authorized_keys")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation dir
    return " ".join((d / "host_key.pub").read_text().split()[:2])


def _start_in(name: str, state_dir: Path, port: int, ns: str, address: str) -> SSHBoard:
    d = state_dir.resolve() / name
    host_key = _prepare(d, name)
    board = SSHBoard(name, address, port, _user(), d / "client_key", d / "known_hosts", d / "work", 0,
                     ns, None, d, host_key, _own_home(d), own_netns=False)
    (d / "known_hosts").write_text(board.known_hosts_entry())
    board.pid = _launch(board)
    (d / "board.json").write_text(json.dumps(asdict(board), default=str, indent=1))
    log.info("board %s: sshd pid %d on %s:%d in netns %s", name, board.pid, address, port, ns)
    return board


def stop_sshd(board: SSHBoard) -> None:
    """Stop the board's sshd and its sessions, remove its namespace and veth (not a namespace
    that was the caller's). Idempotent."""
    procs = []
    try:
        main = psutil.Process(board.pid)
        if str(Path(board.state) / "sshd_config") in main.cmdline():  # still our sshd, not a reused pid
            procs = main.children(recursive=True) + [main]
    except psutil.Error:
        pass
    _terminate(procs)
    popen = _procs.pop(board.pid, None)
    if popen is not None:
        popen.wait(timeout=5)
    if board.netns and board.own_netns:
        _netns_down(board.netns, board.veth)


# -- sshd ------------------------------------------------------------------------------------

def _launch(board: SSHBoard) -> int:
    d = board.state
    cfg = d / "sshd_config"
    cfg.write_text("\n".join([
        f"ListenAddress {board.host}",
        f"Port {board.port}",
        f"HostKey {d / 'host_key'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"PidFile {d / 'sshd.pid'}",
        "UsePAM no",
        "StrictModes no",  # keys live in a temp dir whose modes sshd would otherwise reject
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UseDNS no",
        "PrintMotd no",
        "Subsystem sftp internal-sftp",  # without it SFTP fails with "Channel closed"
        "LogLevel ERROR",
        "",
    ]))
    logfile = d / "sshd.log"
    logfile.write_text("")
    argv = [SSHD, "-D", "-f", str(cfg), "-E", str(logfile)]
    if board.home:  # a private mount namespace where the user's home is the board's
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$1" "$2" && shift 2 && exec "$@"', "kiln-home",
                str(board.home), str(Path.home()), *argv]
    if board.netns:
        argv = ["ip", "netns", "exec", board.netns, *argv]  # each of these execs the next: same pid
    with open(logfile, "ab") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                start_new_session=True)  # ^C in a test run must not kill it first
    _procs[proc.pid] = proc
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _procs.pop(proc.pid, None)
            raise TransportError(f"emulated board '{board.name}': sshd exited with {proc.returncode} "
                                 f"before listening on {board.host}:{board.port}; {logfile}: {_tail(logfile)}")
        try:
            socket.create_connection((board.host, board.port), timeout=0.5).close()
            return proc.pid
        except OSError:
            time.sleep(0.05)
    _terminate([psutil.Process(proc.pid)])
    _procs.pop(proc.pid, None)
    proc.wait(timeout=5)
    raise TransportError(f"emulated board '{board.name}': sshd did not accept connections on "
                         f"{board.host}:{board.port} within {START_TIMEOUT_S:g} s; {logfile}: {_tail(logfile)}")


def _keygen(path: Path, comment: str) -> None:
    if path.exists() and path.with_suffix(".pub").exists():
        return  # keep keys across restarts so known_hosts stays valid
    path.unlink(missing_ok=True)
    _sh(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])


def _own_home(d: Path) -> Path | None:
    """The board's home (state/<name>/home) when root can mount it over the user's home, so
    that the host's ~/.bashrc (which sshd's bash sources for every command) and dotfiles stay
    off the board; None otherwise (then the board shares the user's home)."""
    home = Path.home().resolve()
    if os.geteuid() != 0 or shutil.which("unshare") is None or d == home or home in d.parents:
        return None
    (d / "home").mkdir(exist_ok=True)
    return d / "home"


def _terminate(procs: list[psutil.Process]) -> None:
    """SIGTERM, then SIGKILL what is left after 2 s. A zombie counts as gone: orphaned
    sessions are reaped by pid 1, not by us, and some pid 1s take their time."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + 2
        while procs and time.monotonic() < deadline:
            procs = [p for p in procs if _alive(p)]
            time.sleep(0.02)
        if not procs:
            return


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# -- network namespace -----------------------------------------------------------------------

def netns_name(state_dir: Path, name: str) -> str:
    """The namespace of board ``name`` of the lab kept in ``state_dir``: ``kiln-<lab>-<name>``,
    <lab> the first 8 hex digits of the sha1 of the resolved state dir. Namespace names are
    machine-wide: with the board's name alone, a second lab (another build dir) with a board of
    the same name deleted the first's namespace as a "leftover" and its stop deleted the
    second's. The same dir gives the same name, so a lab killed with -9 is still cleaned up by
    its next start. (Namespace names may be long; interface names, at most 15 characters, are
    the kernel-allocated kiln-h<i>.)"""
    lab = hashlib.sha1(str(Path(state_dir).resolve()).encode()).hexdigest()[:8]
    return f"kiln-{lab}-{name}"


def _netns_up(ns: str, name: str) -> tuple[str, str, str]:
    """Create netns ``ns`` for board ``name`` with a veth pair in a free /30; returns (netns,
    veth, board ip)."""
    # Addresses of the block that no board holds must fail here, not leave by the default route.
    _sh(["ip", "route", "replace", "unreachable", str(NETNS_BLOCK)])
    if ns in _sh(["ip", "netns", "list"]).split():
        _netns_down(ns, None)  # left over from a run that crashed
    _sh(["ip", "netns", "add", ns])
    veth = None
    try:
        for i in range(256):
            # The kernel allocates interface names atomically: a taken index means a taken /30.
            try:
                _sh(["ip", "link", "add", f"kiln-h{i}", "type", "veth", "peer", "name", f"kiln-b{i}"])
            except TransportError:
                continue
            veth = f"kiln-h{i}"  # ours (just created): deleted below if the rest fails
            net = NETNS_BLOCK.network_address + 256 * i  # 10.213.<i>.0/30
            hostside, boardside = net + 1, net + 2
            _sh(["ip", "link", "set", f"kiln-b{i}", "netns", ns])
            _sh(["ip", "-n", ns, "link", "set", f"kiln-b{i}", "name", "eth0"])
            _sh(["ip", "addr", "add", f"{hostside}/30", "dev", veth])
            _sh(["ip", "-n", ns, "addr", "add", f"{boardside}/30", "dev", "eth0"])
            _sh(["ip", "link", "set", veth, "up"])
            _sh(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _sh(["ip", "-n", ns, "link", "set", "lo", "up"])
            return ns, veth, str(boardside)
        raise TransportError(f"no free /30 left in {NETNS_BLOCK} for board '{name}'")
    except TransportError:
        if veth:
            subprocess.run(["ip", "link", "del", veth], capture_output=True)
        _netns_down(ns, None)
        raise


def _ifindex(*argv: str) -> tuple[int | None, int | None]:
    """``ip -j ARGV`` (a ``link show`` of one link): (its ifindex, its peer's ifindex)."""
    try:
        links = json.loads(_sh(["ip", "-j", *argv]) or "[]")
        return (links[0].get("ifindex"), links[0].get("link_index")) if links else (None, None)
    except (TransportError, ValueError, IndexError, AttributeError):
        return None, None


def _veth_ours(ns: str, veth: str) -> bool:
    """Whether host link ``veth`` is the peer of eth0 in namespace ``ns``. The kiln-h<i> names
    are reused: once our namespace is gone (and its veth with it), a link of that name may be
    another lab's board."""
    host, _ = _ifindex("link", "show", "dev", veth)
    _, peer = _ifindex("-n", ns, "link", "show", "dev", "eth0")
    return host is not None and host == peer


def _netns_down(ns: str, veth: str | None) -> None:
    if veth and not _veth_ours(ns, veth):
        veth = None  # gone with its namespace, or the name is someone else's now: leave it
    try:
        pids = [int(p) for p in _sh(["ip", "netns", "pids", ns]).split()]
    except TransportError:
        pids = []  # no such namespace: already gone
    procs = []
    for pid in pids:  # only processes inside our own namespace (sshd and its sessions)
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    _terminate(procs)
    for argv in (["ip", "link", "del", veth] if veth else None, ["ip", "netns", "del", ns]):
        if argv:
            subprocess.run(argv, capture_output=True)  # absent already is fine


# -- helpers ---------------------------------------------------------------------------------

def _sh(argv: list[str]) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TransportError(f"emulated board: {' '.join(argv)} failed: {e}") from e
    if p.returncode != 0:
        raise TransportError(f"emulated board: {' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _tail(path: Path, n: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip() or "(empty)"
    except OSError:
        return "(no log)"


def _load(state_dir: Path, name: str) -> SSHBoard:
    data = json.loads((Path(state_dir).resolve() / name / "board.json").read_text())
    for k in ("key", "known_hosts", "workdir", "state", "home"):
        data[k] = Path(data[k]) if data[k] else None
    return SSHBoard(**data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hil.emulator.sshd", description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("name")
    ap.add_argument("--state", type=Path, required=True, help="state directory (keys, config, logs)")
    ap.add_argument("--port", type=int)
    ap.add_argument("--no-netns", action="store_true", help="listen on 127.0.0.1 even as root")
    a = ap.parse_args(argv)
    try:
        if a.action == "up":
            board = start_sshd(a.name, a.state, a.port, False if a.no_netns else None)
            _procs.clear()  # leave it running after we exit
            print(json.dumps(asdict(board), default=str, indent=1))
        else:
            stop_sshd(_load(a.state, a.name))
    except (TransportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
