"""TVM RPC servers on lab boards, so that MetaSchedule measures candidates on the board itself.

``rpc_server(instance, board, lab_dir)`` is a context manager for one live lab instance: it
uploads the runner bundle the way a deploy does (hil/deploy.py: the board's sha256 cache, a run
directory of this host and process, checked by sha256), starts ``kiln-runner --rpc-serve 0``
there in the background (its own session, so it outlives the command that started it), reads
the port it chose from its log, and for an SSH board opens a local port forward to it
(``ssh -L`` with the lab's key and known_hosts: its own process, so a tuning run busy in TVM
never starves it). It yields an :class:`Endpoint` (a local host and port) and, on exit, stops
the forward and the server and removes the run directory.

Which boards can serve (``measuring_instances``): an SSH or local instance that runs the board
type natively. An ``emulated`` instance runs under qemu-user, whose timings are no cost signal;
a serial console carries no TCP. Both are refused, with the reason.

A server whose process died, or a forward that broke, is found by :meth:`Endpoint.check` (a
handshake with a key the server must refuse: only a live server answers that way), which
raises a TransportError naming the board."""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.artifacts import build_root, read_json, runner_dir, sha256_file
from kiln.errors import KilnError, TransportError
from kiln.measure import MeasuringLab

BUNDLE = ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")
LOG = "rpc.log"  # in the run directory on the board: the server's stdout and stderr
PID = "rpc.pid"
READY = "kiln-runner rpc listening on "
START_TIMEOUT_S = 20.0
PROBE_KEY = "kiln-rpc-probe"  # never a server's key: a live server answers it with kRPCMismatch
_MAGIC, _MISMATCH = 0xFF271, 0xFF271 + 2


def lab_file() -> Path:
    """The lab a tuning run measures in: $KILN_LAB, else the emulated lab (as dodo.py's LAB_FILE)."""
    from kiln import config

    return config.lab_file()


def refusal(instance) -> str | None:
    """Why ``instance`` cannot serve as a measuring board over TVM RPC; None when it can."""
    if instance.emulated:
        return "emulated under qemu-user: its timings are no cost signal"
    if instance.link == "serial":
        return "reached over a serial console, which carries no TCP for TVM RPC"
    if instance.link not in ("ssh", "local"):
        return f"transport '{instance.link}' has no way to carry TVM RPC"
    return None


def measuring_instances(board, instances) -> tuple[list, dict[str, str]]:
    """(the instances of board type ``board`` that can serve TVM RPC, {name: why not} for the
    others of that type)."""
    ok, skipped = [], {}
    for inst in instances:
        if inst.type != board.name:
            continue
        why = refusal(inst)
        if why:
            skipped[inst.name] = why
        else:
            ok.append(inst)
    return ok, skipped


@dataclass
class Endpoint:
    """A board's TVM RPC server as this machine reaches it (through the forward, for SSH)."""

    board: str
    host: str
    port: int
    key: str
    link: str
    forward: subprocess.Popen | None = field(default=None, repr=False)
    forward_log: Path | None = None
    count_sessions: Callable[[], int | None] | None = field(default=None, repr=False)

    def sessions(self) -> int | None:
        """How many sessions (one per measured candidate) the server has served; None unknown."""
        return self.count_sessions() if self.count_sessions else None

    def check(self, timeout: float = 10.0) -> None:
        """Raise a TransportError naming the board unless its server answers a handshake."""
        if self.forward is not None and self.forward.poll() is not None:
            raise TransportError(f"board '{self.board}': the SSH port forward to its TVM RPC server exited "
                                 f"({self.forward.returncode}): {_tail(self.forward_log)}")
        why = probe(self.host, self.port, timeout)
        if why:
            raise TransportError(f"board '{self.board}': its TVM RPC server at {self.host}:{self.port} "
                                 f"({self.link}) does not answer: {why}")


def probe(host: str, port: int, timeout: float = 10.0) -> str | None:
    """None when a TVM RPC server answers at host:port (it refuses PROBE_KEY with kRPCMismatch,
    as TVM's handshake defines), else what went wrong."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            key = f"client:{PROBE_KEY}".encode()
            s.sendall(struct.pack("<ii", _MAGIC, len(key)) + key)
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                if not chunk:
                    return "the connection closed before the handshake's answer"
                got += chunk
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    code = struct.unpack("<i", got)[0]
    return None if code == _MISMATCH else f"unexpected handshake answer {code:#x}"


def ensure_bundle(arch: str) -> Path:
    """The runner bundle for ``arch`` (build/runner/<arch>), rebuilt when missing or older than
    the runner's sources (the tune task does not depend on the runner task)."""
    from hil.runner import build

    d = runner_dir(arch)
    try:
        info = read_json(d / "runner.json")
        fresh = (info.get("source_sha256") == sha256_file(build.RUNNER_SOURCE)
                 and info.get("rpc_source_sha256") == sha256_file(build.RPC_SOURCE)
                 and all((d / n).is_file() for n in BUNDLE))
    except (OSError, ValueError, KilnError):
        fresh = False
    if not fresh:
        build.bundle(arch)
    return d


@contextlib.contextmanager
def rpc_server(instance, board, lab_dir: Path, key: str | None = None):
    """Serve TVM RPC on live lab ``instance`` (of board type ``board``) for the duration of the
    block; yields its :class:`Endpoint`. Refuses an instance that cannot serve (see
    :func:`refusal`) with a TransportError naming it."""
    from hil import deploy
    from hil.transport import open_transport

    why = refusal(instance)
    if why:
        raise TransportError(f"board '{instance.name}': no TVM RPC measuring on it: {why}")
    log = logging.getLogger(f"kiln.board.{instance.name}")
    key = key or f"kiln-{board.name}"
    bundle = ensure_bundle(board.arch)
    files = {n: bundle / n for n in BUNDLE}
    t = open_transport(instance, Path(lab_dir), build_root() / "lab" / "local")
    run_dir = deploy.run_dir_name()
    pid = None
    forward = flog = None
    t.open()
    try:
        _kill_stale_servers(t, log)
        deploy._remove_stale_runs(t, log)
        deploy._upload(t, files, run_dir, log)
        deploy._verify(t, files, run_dir)
        pid, port = _start(t, instance.name, run_dir, key, board.cores)
        log.info("TVM RPC server up on the board (pid %s, port %d, key %s)", pid, port, key)
        if instance.link == "ssh":
            forward, flog, local_port = _forward(instance, Path(lab_dir), port)
            ep = Endpoint(instance.name, "127.0.0.1", local_port, key, "ssh", forward, flog)
        else:
            ep = Endpoint(instance.name, "127.0.0.1", port, key, instance.link)
        ep.count_sessions = lambda: _count_sessions(t, run_dir)
        _wait_answer(ep)
        yield ep
    finally:
        if forward is not None:
            _stop_forward(forward)
            shutil.rmtree(flog.parent, ignore_errors=True)
        if pid is not None:
            _stop_server(t, pid, run_dir, log)
        try:
            t.run(["rm", "-rf", run_dir], timeout=60)
        except KilnError as e:
            log.warning("cleanup of %s failed: %s", run_dir, e)
        t.close()


class RpcLab(MeasuringLab):
    """The lab in ``path`` ($KILN_LAB, else the emulated lab) as the tune stage measures in it
    (kiln.measure.MeasuringLab): dodo.py hands one to passes/tune.py."""

    def __init__(self, path: Path | None = None):
        self.path = Path(path or lab_file())

    def __repr__(self) -> str:
        return f"RpcLab({str(self.path)!r})"

    def instances(self, board) -> tuple[list, dict[str, str]]:
        from hil.lab import describe

        return measuring_instances(board, describe(self.path).boards)

    def endpoints(self, board):
        return board_endpoints(board, self.path)


@contextlib.contextmanager
def board_endpoints(board, lab_path: Path | None = None):
    """Every instance of board type ``board`` in the lab that can serve TVM RPC, served for the
    duration of the block (the emulated lab starts on demand; each board held by this job where
    the lab leases boards): yields (endpoints, {instance: why it was skipped})."""
    from hil.lab import deploy_lease, open_lab
    from kiln.config import load_inventory

    lab_path = Path(lab_path or lab_file())
    inv_path = open_lab(lab_path)
    usable, skipped = measuring_instances(board, load_inventory(inv_path).boards)
    with contextlib.ExitStack() as stack:
        eps = []
        for inst in usable:
            _lease, live = stack.enter_context(deploy_lease(lab_path, inst))
            eps.append(stack.enter_context(rpc_server(live, board, inv_path.parent)))
        yield eps, skipped


# -- on the board ------------------------------------------------------------------------------

def _start(t, board: str, run_dir: str, key: str, threads: int) -> tuple[str, int]:
    """Start the server in the background in ``run_dir``; (its pid, the port it listens on)."""
    serve = ["./kiln-runner", "--rpc-serve", "0", "--rpc-key", key, "--rpc-host", "127.0.0.1",
             "--threads", str(threads)]
    # setsid: its own session, so it survives the command starting it (ssh.py runs each command
    # under `timeout`, which signals its whole process group); every stream redirected, so that
    # command ends at once
    script = f"setsid {shlex.join(serve)} </dev/null >{LOG} 2>&1 & echo $! > {PID}; cat {PID}"
    r = t.run(["sh", "-c", script], timeout=30, cwd=run_dir)
    pid = r.stdout.strip()
    if r.returncode != 0 or not pid.isdigit():
        raise TransportError(f"board '{board}': cannot start the TVM RPC server (exit {r.returncode}): "
                             f"{(r.stderr or r.stdout).strip()[:300]}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        out = t.run(["sh", "-c", f"cat {LOG}; kill -0 {pid} 2>/dev/null && echo kiln-rpc-alive"],
                    timeout=30, cwd=run_dir).stdout
        for line in out.splitlines():
            if line.startswith(READY):
                return pid, int(line.rsplit(":", 1)[1])
        if "kiln-rpc-alive" not in out:
            raise TransportError(f"board '{board}': the TVM RPC server exited before listening: "
                                 f"{out.strip()[-500:] or '(no output)'}")
        if time.monotonic() > deadline:
            raise TransportError(f"board '{board}': the TVM RPC server did not listen within "
                                 f"{START_TIMEOUT_S:g} s; its log: {out.strip()[-300:]}")
        time.sleep(0.2)


def _count_sessions(t, run_dir: str) -> int | None:
    """Sessions the server's log records as started (each candidate measured is one)."""
    try:
        r = t.run(["sh", "-c", f"grep -c ' started' {LOG} || true"], timeout=30, cwd=run_dir)
        return int(r.stdout.strip() or 0)
    except (KilnError, ValueError):
        return None


def _stop_server(t, pid: str, run_dir: str, log) -> None:
    """SIGTERM (the server kills its sessions and removes their scratch dirs), SIGKILL if it lingers."""
    script = (f"kill {pid} 2>/dev/null || exit 0; i=0; while kill -0 {pid} 2>/dev/null; do "
              f"i=$((i+1)); [ $i -gt 50 ] && {{ kill -9 {pid}; break; }}; sleep 0.1; done")
    try:
        r = t.run(["sh", "-c", script], timeout=30, cwd=run_dir)
        if r.returncode != 0:
            log.warning("stopping the TVM RPC server (pid %s) failed: %s", pid, r.stderr.strip()[:200])
    except KilnError as e:
        log.warning("stopping the TVM RPC server (pid %s) failed: %s", pid, e)


def _kill_stale_servers(t, log) -> None:
    """Kill the servers left running by dead processes of this host (killed tuning runs) before
    their run directories are removed: a run dir's rpc.pid, if that pid still is a kiln-runner
    in --rpc-serve mode."""
    from hil import deploy

    try:
        r = t.run(["ls", "-1", "-A", deploy.RUNS], timeout=30)
        if r.returncode != 0:
            return
        for name in deploy.stale_run_dirs(r.stdout.split()):
            script = ('p=$(cat "$1/rpc.pid" 2>/dev/null) || exit 0; '
                      'tr "\\0" " " < /proc/$p/cmdline 2>/dev/null | grep -q -- "--rpc-serve" && kill -9 "$p" '
                      '&& echo killed; exit 0')
            if "killed" in t.run(["sh", "-c", script, "sh", f"{deploy.RUNS}/{name}"], timeout=30).stdout:
                log.info("killed the TVM RPC server a dead run of this host left in %s", name)
    except KilnError as e:
        log.warning("looking for stale TVM RPC servers failed: %s", e)


# -- the port forward (SSH boards) ---------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _forward(instance, lab_dir: Path, remote_port: int) -> tuple[subprocess.Popen, Path, int]:
    """``ssh -N -L`` from a free local port to the server's loopback port on the board, with the
    inventory's key and known_hosts only (no ~/.ssh config, agent or keys); (the ssh process,
    its log, the local port). Its temp dir (the log) goes when the forward fails here, else
    when the caller stops it."""
    tmp = Path(tempfile.mkdtemp(prefix="kiln-rpc-fwd-"))
    try:
        return _forward_in(instance, lab_dir, remote_port, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _forward_in(instance, lab_dir: Path, remote_port: int, tmp: Path) -> tuple[subprocess.Popen, Path, int]:
    spec = instance.transport
    if shutil.which("ssh") is None:
        raise TransportError(f"board '{instance.name}': TVM RPC over SSH needs OpenSSH's `ssh` on this machine "
                             "for the port forward (Debian package openssh-client)")
    keyfile = (lab_dir / spec.key).resolve()
    known = (lab_dir / spec.known_hosts).resolve() if spec.known_hosts else None
    flog = tmp / "ssh.log"
    # the lab's known_hosts is never written: an accepted unknown key goes to a copy
    kh = known
    if spec.accept_unknown_host_key:
        kh = tmp / "known_hosts"
        kh.write_text(known.read_text() if known and known.is_file() else "")
    elif known is None or not known.is_file():
        raise TransportError(f"board '{instance.name}': known_hosts file {known} does not exist")
    for _attempt in range(3):  # a free port can be taken before ssh binds it
        local = _free_port()
        argv = ["ssh", "-F", "/dev/null", "-N", "-T", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none", "-i", str(keyfile), "-o", f"UserKnownHostsFile={kh}",
                "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"StrictHostKeyChecking={'no' if spec.accept_unknown_host_key else 'yes'}",
                "-o", "ExitOnForwardFailure=yes", "-o", f"ConnectTimeout={max(1, int(spec.connect_timeout_s))}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                "-p", str(spec.port), "-L", f"127.0.0.1:{local}:127.0.0.1:{remote_port}",
                f"{spec.user}@{spec.host}"]
        with open(flog, "ab") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
        deadline = time.monotonic() + spec.connect_timeout_s + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", local), timeout=0.5).close()
                return proc, flog, local
            except OSError:
                time.sleep(0.1)
        if proc.poll() is None:
            _stop_forward(proc)
            raise TransportError(f"board '{instance.name}': the SSH port forward to {spec.host}:{spec.port} "
                                 f"did not listen within {spec.connect_timeout_s + 5:g} s: {_tail(flog)}")
        if "Address already in use" not in _tail(flog):
            break
    raise TransportError(f"board '{instance.name}': the SSH port forward to {spec.host}:{spec.port} failed "
                         f"(ssh exited {proc.returncode}): {_tail(flog)}")


def _stop_forward(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_answer(ep: Endpoint, timeout: float = 15.0) -> None:
    """The server answers through the forward (ssh listens locally before the remote side is
    known to work): raise naming the board when it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ep.check(timeout=5.0)
            return
        except TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _tail(path: Path | None, n: int = 400) -> str:
    try:
        text = Path(path).read_text(errors="replace").strip() if path else ""
    except OSError:
        return "(no log)"
    return text[-n:] or "(no output)"


def main(argv: list[str]) -> int:
    """``python -m hil.rpc BOARD_TYPE [LAB]``: serve TVM RPC on every measuring instance of a
    board type and print the local endpoints until interrupted (for trying it by hand)."""
    from kiln.config import load_board

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not argv:
        print("usage: python -m hil.rpc BOARD_TYPE [LAB.yaml]", file=sys.stderr)
        return 2
    try:
        with board_endpoints(load_board(argv[0]), Path(argv[1]) if len(argv) > 1 else None) as (eps, skipped):
            for name, why in skipped.items():
                print(f"{name}: skipped ({why})")
            for ep in eps:
                print(f"{ep.board}: {ep.host}:{ep.port} key {ep.key}")
            if not eps:
                return 1
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    finally:
        from hil.lab import close_opened

        close_opened()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
