"""SSH transport: a Linux board on a network, reached with fabric (paramiko underneath).

Host keys come only from the lab's known_hosts file: an unknown or changed key is rejected
unless the inventory says ``accept_unknown_host_key`` (first contact), and even then the lab's
file is never rewritten. Commands are built with shlex.quote on every argument, run under the
board's ``timeout -s KILL`` so a hung runner dies on the board too, and never retried. Uploads
go over SFTP to ``<name>.part`` and are renamed into place, so a dropped link never leaves a
complete-looking file; a whole upload is safe to repeat, so it is retried after a reconnect.
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
import select
import shlex
import socket
import time
from pathlib import Path

import fabric
import paramiko

from hil.protocol import CommandProtocol, CommandResult, FileTransferProtocol
from hil.transport.retry import Retrying
from kiln import schema
from kiln.errors import TransportError

# Seconds the host waits past the board's own timeout before it gives up on a silent link.
GRACE_S = 5.0
# Marker the remote shell prints when the cwd is missing, so that case reads like local.py's.
_NO_DIR = "kiln-ssh: no such directory:"
# paramiko's words for a key file it cannot parse ("not a valid RSA private key file",
# "encountered RSA key, expected OPENSSH key", "Invalid key", "Unknown ... key type")
_KEY_FILE_ERROR = re.compile(r"not a valid .*private key|encountered .* key|invalid key|unknown .*key type", re.I)


class UnknownHostKey(paramiko.SSHException):
    """The board offered a host key that the lab's known_hosts does not list."""

    def __init__(self, hostname: str, key: paramiko.PKey):
        super().__init__(f"{hostname} offered unknown {key.get_name()} host key {key.fingerprint}")
        self.hostname, self.key = hostname, key


class _Reject(paramiko.RejectPolicy):
    def missing_host_key(self, client, hostname, key):
        raise UnknownHostKey(hostname, key)


class _AcceptAndWarn(paramiko.MissingHostKeyPolicy):
    """Trust an unknown key for this connection only (the lab's file is not rewritten)."""

    def __init__(self, log: logging.Logger, known_hosts: Path):
        self.log, self.known_hosts = log, known_hosts

    def missing_host_key(self, client, hostname, key):
        self.log.warning("accepting unknown %s host key %s of %s (not in %s): "
                         "accept_unknown_host_key is set", key.get_name(), key.fingerprint,
                         hostname, self.known_hosts)
        client.get_host_keys().add(hostname, key.get_name(), key)


class SSHTransport(Retrying, CommandProtocol, FileTransferProtocol):
    retry_on = (OSError, EOFError, paramiko.SSHException)

    def __init__(self, board: str, spec: schema.SSHTransport, base_dir: Path):
        self.board = board
        self.spec = spec
        self.key = (Path(base_dir) / spec.key).resolve()
        self.known_hosts = (Path(base_dir) / spec.known_hosts).resolve()
        self.where = f"{spec.host}:{spec.port}"
        self.log = logging.getLogger(f"kiln.board.{board}")
        self._conn: fabric.Connection | None = None
        self._pkey: paramiko.PKey | None = None
        self._workdir: str | None = None
        self._dirs: set[str] = set()  # remote dirs known to exist on this connection

    # -- Resource ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._workdir is not None:
            return
        self._reconnect_if_dropped()
        wd = self.spec.workdir if self.spec.workdir.startswith("/") else "./" + self.spec.workdir
        q = shlex.quote(wd)
        r = self._command(f"mkdir -p -- {q} && cd {q} && pwd -P",
                          self.spec.connect_timeout_s + GRACE_S, ("mkdir", wd))
        if r.returncode != 0:
            self.close()
            raise TransportError(f"board '{self.board}': cannot create work dir {wd!r} on {self.where} "
                                 f"(exit {r.returncode}): {r.stderr.strip()[:300]}")
        self._workdir = r.stdout.strip()
        self.log.debug("connected to %s, work dir %s", self.where, self._workdir)

    def close(self) -> None:
        self._drop()
        self._workdir = None

    def workdir(self) -> str:
        self._require_open()
        return self._workdir

    # -- CommandProtocol --------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float, cwd: str | None = None) -> CommandResult:
        """Run argv in the work dir (or cwd under it). Never retried: only the reconnect before
        it is, since nothing has run on the board yet at that point."""
        self._require_open()
        where = posixpath.join(self._workdir, cwd) if cwd else self._workdir
        secs = max(1, math.ceil(timeout))
        # `; exit $?` keeps the shell as the parent, so a signal death reads as 128+N (paramiko
        # drops OpenSSH's exit-signal message and would report -1).
        command = (f"cd {shlex.quote(where)} 2>/dev/null || {{ echo {shlex.quote(_NO_DIR)} "
                   f"{shlex.quote(where)} >&2; exit 126; }}; "
                   f"timeout -s KILL {secs} {shlex.join(argv)}; exit $?")
        self.log.debug("run %s in %s", argv, where)
        self._reconnect_if_dropped()
        r = self._command(command, secs + GRACE_S, tuple(argv))
        if r.returncode == 137 and r.seconds >= secs * 0.95:  # timeout's KILL, not the runner's own
            raise TransportError(f"board '{self.board}': command {argv[0]!r} timed out after {timeout:g} s "
                                 "(killed on the board)")
        if r.returncode == 126 and r.stderr.startswith(_NO_DIR):
            raise TransportError(f"board '{self.board}': cannot run {argv[0]!r}: no directory {where} on the board")
        if r.returncode in (126, 127) and "timeout: failed to run command" in r.stderr:
            raise TransportError(f"board '{self.board}': cannot run {argv[0]!r}: {r.stderr.strip()[:300]}")
        return r

    # -- FileTransferProtocol ---------------------------------------------------------------

    def put(self, local: Path, remote: str) -> None:
        self._require_open()
        local = Path(local)
        if not local.is_file():
            raise TransportError(f"board '{self.board}': upload of {local} failed: no such file on the host")
        dest = posixpath.join(self._workdir, remote)
        self._retry(f"upload of {local} to {dest} on {self.where}", lambda: self._put_once(local, dest),
                    attempts=self.spec.retries + 1)

    def _put_once(self, local: Path, dest: str) -> None:
        part = dest + ".part"
        try:
            self._reconnect_if_dropped()
            parent = posixpath.dirname(dest)
            if parent not in self._dirs:
                r = self._exec(f"mkdir -p -- {shlex.quote(parent)}", self.spec.connect_timeout_s + GRACE_S,
                               ("mkdir", parent))
                if r.returncode != 0:
                    raise TransportError(f"board '{self.board}': cannot create {parent} on the board: "
                                         f"{r.stderr.strip()[:300]}")
                self._dirs.add(parent)
            sftp = self._conn.sftp()
            # Without a channel timeout a stalled link blocks SFTP forever: no progress for
            # connect_timeout_s means the link is gone.
            sftp.get_channel().settimeout(self.spec.connect_timeout_s)
            sftp.put(str(local), part, confirm=True)  # confirm: stat and compare the size
            sftp.posix_rename(part, dest)  # atomic; plain SFTP rename refuses an existing target
        except self.retry_on:
            self._drop()  # the next attempt starts from a fresh connection
            raise

    # -- connection -------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._workdir is None:  # _conn may be None after a lost link: run/put reconnect
            raise TransportError(f"board '{self.board}': transport used before open()")

    def _connect(self) -> None:
        if not self.key.is_file():
            raise TransportError(f"board '{self.board}': private key {self.key} does not exist")
        if not self.known_hosts.is_file() and not self.spec.accept_unknown_host_key:
            raise TransportError(f"board '{self.board}': known_hosts file {self.known_hosts} does not exist")
        self._pkey = self._pkey or self._load_key()
        self._conn = self._retry(f"connect to {self.where}", self._connect_once,
                                 attempts=self.spec.retries + 1)

    def _load_key(self) -> paramiko.PKey:
        """The private key, read once before connecting. A file that cannot be read or is no
        private key fails at once: paramiko would raise it as an SSHException on every
        connect, which reads like a link failure, yet no retry can make the file valid."""
        try:
            return paramiko.PKey.from_path(self.key)
        except paramiko.PasswordRequiredException as e:
            raise TransportError(f"board '{self.board}': private key {self.key} is encrypted; Kiln needs "
                                 "a key without a passphrase (no agent is used)") from e
        except OSError as e:
            raise TransportError(f"board '{self.board}': cannot read private key {self.key}: "
                                 f"{e.strerror or e}") from e
        except (paramiko.SSHException, ValueError, TypeError, IndexError) as e:
            # paramiko: 'not a valid ... private key file', 'encountered RSA key, expected
            # OPENSSH key', UnknownKeyType; cryptography: ValueError 'Unable to load PEM file'
            why = str(e).split(" See https://")[0]  # cryptography appends a FAQ link
            raise TransportError(f"board '{self.board}': private key file {self.key} is not a valid private "
                                 f"key ({type(e).__name__}: {why}); not retried: fix or replace the file") from e

    def _fatal(self, e: BaseException) -> bool:
        """An SSHException about the key file itself (should one get past _load_key, e.g. from a
        certificate next to the key) is not a link hiccup: never retried."""
        return isinstance(e, paramiko.SSHException) and bool(_KEY_FILE_ERROR.search(str(e)))

    def _connect_once(self) -> fabric.Connection:
        t = self.spec.connect_timeout_s
        # lazy + no ssh configs: only the inventory decides (no ~/.ssh/config, agent or ~/.ssh keys).
        config = fabric.Config(lazy=True, overrides={"load_ssh_configs": False})
        conn = fabric.Connection(
            self.spec.host, user=self.spec.user, port=self.spec.port, config=config,
            # timeouts go in connect_kwargs: fabric's connect_timeout is int()-truncated.
            connect_kwargs={"pkey": self._pkey, "look_for_keys": False, "allow_agent": False,
                            "timeout": t, "banner_timeout": t, "auth_timeout": t, "channel_timeout": t},
        )
        # fabric installs AutoAddPolicy; replace it. get_host_keys().load() (not load_host_keys)
        # so that paramiko never saves a key back into the lab's file.
        if self.known_hosts.is_file():
            conn.client.get_host_keys().load(str(self.known_hosts))
        if self.spec.accept_unknown_host_key:
            conn.client.set_missing_host_key_policy(_AcceptAndWarn(self.log, self.known_hosts))
        else:
            conn.client.set_missing_host_key_policy(_Reject())
        try:
            conn.open()
        except UnknownHostKey as e:
            conn.close()
            raise TransportError(
                f"board '{self.board}': host key of {self.where} ({e.key.get_name()} {e.key.fingerprint}) "
                f"is not in {self.known_hosts}; add it to that file, or set accept_unknown_host_key "
                "for a first contact") from e
        except paramiko.BadHostKeyException as e:
            conn.close()
            raise TransportError(
                f"board '{self.board}': host key of {self.where} changed: it offered "
                f"{e.key.get_name()} {e.key.fingerprint}, {self.known_hosts} lists {e.expected_key.fingerprint}; "
                "the board was reinstalled, or this is not the board") from e
        except paramiko.AuthenticationException as e:
            conn.close()
            raise TransportError(f"board '{self.board}': {self.where} refused login as "
                                 f"{self.spec.user!r} with key {self.key}: {e}") from e
        except BaseException:
            conn.close()
            raise
        # paramiko leaves Nagle on: every channel open then waits ~40 ms for a delayed ACK.
        sock = conn.transport.sock
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _reconnect_if_dropped(self) -> None:
        if self._conn is not None and not self._conn.is_connected:
            self.log.warning("link to %s was lost; reconnecting", self.where)
            self._drop()
        if self._conn is None:
            self._connect()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._dirs.clear()
        if conn is not None:
            try:
                conn.close()
            except (OSError, EOFError, paramiko.SSHException) as e:  # already dead: nothing to tidy
                self.log.debug("closing %s: %s", self.where, e)

    def _command(self, command: str, limit: float, argv: tuple[str, ...]) -> CommandResult:
        """``_exec`` with its failures as TransportErrors naming the board and the command."""
        try:
            return self._exec(command, limit, argv)
        except _HostTimeout as e:
            self._drop()  # a silent link: do not reuse it
            raise TransportError(f"board '{self.board}': command {argv[0]!r} timed out after {limit:g} s "
                                 f"(no answer from {self.where})") from e
        except (OSError, EOFError, paramiko.SSHException) as e:
            self._drop()
            raise TransportError(f"board '{self.board}': link to {self.where} failed while running "
                                 f"{argv[0]!r}: {type(e).__name__}: {e}") from e

    def _exec(self, command: str, limit: float, argv: tuple[str, ...]) -> CommandResult:
        """Run one shell command line; give up (closing the channel) after ``limit`` s.
        Link failures come out as they are (OSError, EOFError, SSHException)."""
        t0 = time.perf_counter()
        out, err = bytearray(), bytearray()
        chan = self._conn.create_session()
        try:
            chan.exec_command(command)
            chan.shutdown_write()  # no stdin: a command that reads it sees EOF, not a hang
            deadline = time.monotonic() + limit
            while not (chan.eof_received or chan.closed):
                if not _wait_readable(chan, deadline):
                    raise _HostTimeout()
                _drain(chan, out, err)
            _drain(chan, out, err)
            if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                raise _HostTimeout()
            if chan.exit_status == -1 and not self._conn.is_connected:
                raise EOFError("connection lost before the exit status arrived")
            rc = chan.exit_status
        finally:
            chan.close()
        return CommandResult(argv, rc, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.perf_counter() - t0)


class _HostTimeout(TimeoutError):
    """Internal: the host-side deadline of one command passed (an OSError, so put retries it)."""


def _wait_readable(chan: paramiko.Channel, deadline: float) -> bool:
    """Block until the channel has output or EOF; False when the deadline passed first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return False
    select.select([chan], [], [], remaining)
    return (time.monotonic() < deadline or chan.recv_ready() or chan.recv_stderr_ready()
            or chan.eof_received or chan.closed)


def _drain(chan: paramiko.Channel, out: bytearray, err: bytearray) -> None:
    while chan.recv_ready():
        out += chan.recv(65536)
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(65536)



def open_transport(instance: schema.Instance, lab_dir: Path, local_root: Path) -> SSHTransport:
    """The transport-registry entry point (hil.transport.open_transport)."""
    return SSHTransport(instance.name, instance.transport, lab_dir)
