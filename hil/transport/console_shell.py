"""A shell over any console (hil.protocol.ConsoleProtocol): commands and uploads to a board that is
reached only through its console, as labgrid's ShellDriver runs over any ConsoleProtocol. The
serial transport (serial.py) is this shell over a serial line's console (console.py).

The board needs nothing but a POSIX shell (dash, bash, busybox ash) and coreutils (base64,
cksum, sha256sum, head, cat, mv, stty). On open the shell interrupts whatever is half-typed
(^C), puts the console in a parseable state (``stty raw -echo isig``, no line editing, empty
PS1/PS2) and sends the shell a few functions (``BOARD_SH``, itself base64 with a cksum): the
board's half of the protocol. Every line the host sends the shell starts with ``kiln_`` and ends
in `` #kiln`` (a comment to the shell), so the board's receiver can tell it from frames. Markers
the board prints are built by printf, so the echo of a command line never looks like one.

Commands: ``kiln_do <nonce> <crc> <len> <base64 script> #kiln``. The board checks the script's
POSIX cksum, answers ``KILN ACK <nonce>`` (or ``KILN NAK``) and evals it; a repeated nonce is not
run again, only its result re-sent, so a command line may be re-sent safely. The script runs argv
(every word shlex-quoted) in the background, stdin from /dev/null, stdout and stderr into files,
under a watchdog that TERMs then KILLs its process group at the timeout. The result comes back
as ``KILN R <nonce> <rc> <flag> <crc> <len> <crc> <len>``, stdout in base64, ``KILN E <nonce>``,
stderr in base64, ``KILN Z <nonce>``; one that arrives damaged or stops is asked for again.

Uploads: ``kiln_rx`` sets the tty to ``-isig min 0 time N`` (a read returns empty after N/10 s
of silence, so nothing on the board waits forever) and reads frames

    header   ": F <nonce> <offset> <len> <crc> <b64len>", space-padded to 63 bytes, "\n"
    payload  base64 of <len> bytes on one line, "\n", then 4 more "\n" (see _PAD)

with ``head -c`` (never the shell's ``read``, which may read past a line on a raw tty: bash
does). <crc> is the POSIX cksum of the payload line; a good chunk is decoded onto
``<dest>.part``. Every frame is answered with the number of bytes stored so far,
``KILN A <nonce> <size>`` or ``KILN N <nonce> <size> <why>``, so a lost ACK or a repeated frame
resynchronises by offset; a header that is not one is answered (NAK) only once the line is quiet.
A rejected or unanswered frame is sent again, up to ``spec.retries`` times, each time half as
long (as ZMODEM does: on a noisy line a short frame gets through); after 4 clean frames the
length doubles back. ``: E <nonce>`` (a padded header too) asks for
``KILN D <nonce> ok <size> <sha256>``; the host compares the board's sha256 with its own and only
then renames the ``.part`` into place.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import logging
import math
import os
import posixpath
import re
import secrets
import shlex
import time
import zlib
from pathlib import Path

from hil.protocol import CommandProtocol, CommandResult, ConsoleProtocol, FileTransferProtocol
from hil.transport.retry import Retrying
from kiln.errors import TransportError

# The board's half of the protocol (comments and indentation are not sent).
DATA_FILES = ("serial_on_board.sh",)  # kiln.sources: editing it reruns the tasks that use this shell
BOARD_SH = "\n".join(
    line.strip() for line in (Path(__file__).with_name(DATA_FILES[0])).read_text().splitlines()
    if line.strip() and not line.strip().startswith("#"))

# Seconds the host waits past a command's own timeout (the board's watchdog kills it at the
# timeout, then KILLs it a second later) before it decides the board has gone silent.
GRACE_S = 3.0
# After each frame's payload line, a few newlines more. When the line lost a few bytes of the
# payload, the board's `head -c` completes on these at once (and the checksum fails) instead of
# waiting for the tty read timeout; the receiver skips newlines before a header.
_PAD = b"\n" * 4
_PIECE = 512  # base64 characters of the board's functions per line at install
_KILN_P = (b'kiln_p() { if [ "$1" = "$kiln_bi" ] && [ "$(printf %s "$4" | cksum)" = "$2 $3" ]; then '
           b'kiln_b=$kiln_b$4; kiln_bi=$(($1 + 1)); fi; printf "KILN P %s %s\\n" "$5" "$kiln_bi"; }')
_B64_LINE = re.compile(r"[A-Za-z0-9+/=]*")  # other lines in a result (a shell's job notices) are noise
_REVBITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def cksum(data: bytes) -> int:
    """POSIX ``cksum`` CRC of ``data`` (MSB-first CRC-32, length appended, complemented).

    It is zlib's (LSB-first) CRC-32 run over bit-reversed bytes, bit-reversed: far faster than
    a table loop in Python."""
    n, tail = len(data), bytearray()
    while n:
        tail.append(n & 0xFF)
        n >>= 8
    reg = ~zlib.crc32((bytes(data) + bytes(tail)).translate(_REVBITS), 0xFFFFFFFF) & 0xFFFFFFFF
    return ~int(f"{reg:032b}"[::-1], 2) & 0xFFFFFFFF


def _header(text: str) -> bytes:
    """A receiver header: always 64 bytes, because the board reads it with `head -c 64` (a
    shell's `read` may read past the line on a raw tty: bash does)."""
    assert len(text) < 64, text
    return text.ljust(63).encode() + b"\n"


class LinkGlitch(Exception):
    """One exchange with the board failed in a way that a repeat may fix (retried, then
    reported as a TransportError by the retry mixin)."""


# console lines that our own protocol causes (a command line's echo, the ^C before a re-sent
# line, the shell's notices about kiln_job's background jobs): left out of the console log
_OURS = re.compile(r"#kiln|KILN_S_|kiln_|^\^C$|^\[\d+\]\s*[+-]?\s*(Done|Killed|Terminated|Stopped|Running)\b")


class _Event:
    """A ``KILN <kind> <nonce> <args...>`` line from the board (junk before it is skipped)."""

    __slots__ = ("kind", "nonce", "args", "line")

    def __init__(self, kind: str, nonce: str, args: list[str], line: str):
        self.kind, self.nonce, self.args, self.line = kind, nonce, args, line

    @classmethod
    def parse(cls, line: str) -> _Event | None:
        i = line.find("KILN ")
        words = line[i:].split() if i >= 0 else []
        return cls(words[1], words[2], words[3:], line[i:]) if len(words) >= 3 else None


class ConsoleShell(Retrying, CommandProtocol, FileTransferProtocol):
    retry_on = (OSError, EOFError, LinkGlitch)

    def __init__(self, board: str, console: ConsoleProtocol, spec, where: str | None = None):
        """``spec``: the settings it runs by (timeout_s, retries, chunk_bytes, workdir; a
        kiln.schema.SerialTransport); ``where``: the console as messages name it."""
        self.board = board
        self.console = console
        self.spec = spec
        self.where = where or str(console)
        self.log = logging.getLogger(f"kiln.board.{board}")
        self._open = False
        self._workdir: str | None = None
        self._seen: collections.deque[str] = collections.deque(maxlen=3)
        # what the board printed on its console outside the protocol (a kernel's messages, a
        # runner writing to the tty): the console log a failed deploy keeps (hil/deploy.py)
        self.console_lines: collections.deque[str] = collections.deque(maxlen=200)
        self._stale = False  # a command went unanswered: resynchronise before the next one
        self._unanswered = False  # the last line for the shell got no answer yet
        # one dict: the console counts the bytes on the wire, the shell the payload, frames and
        # retransmissions
        self.stats = getattr(console, "stats", None) or {"wire_bytes_out": 0, "wire_bytes_in": 0}
        self.stats.update(payload_bytes=0, frames=0, retransmissions=0)
        self.last_put: dict = {}
        # The board's tty read timeout (stty time, 1/10 s) ends a frame that lost bytes before
        # the host's own timeout; a receiver the host abandoned gives up after ~3 timeouts.
        self._vtime = min(5, max(1, round(spec.timeout_s * 10 / 4)))
        self._idle_reads = math.ceil(max(30.0, 3 * spec.timeout_s) * 10 / self._vtime)

    # -- Resource ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        self.console.open()
        self._open = True
        try:
            self._sync()
            self._install()
        except BaseException:
            self.close()
            raise
        self.log.debug("console on %s ready, work dir %s", self.where, self._workdir)

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._workdir = None
        try:  # hand the console back as we found it (a person may use it next)
            self.console.write(b'kiln_x=; stty "$kiln_tty"; PS1=$kiln_ps1; PS2=$kiln_ps2 #kiln\n')
        except OSError as e:  # TimeoutError too
            self.log.debug("restoring the console on %s: %s", self.where, e)
        finally:
            self.console.close()

    def workdir(self) -> str:
        self._require_open()
        return self._workdir

    def _require_open(self) -> None:
        if not self._open or self._workdir is None:
            raise TransportError(f"board '{self.board}': transport used before open()")

    # -- CommandProtocol --------------------------------------------------------------------

    def run(self, argv: list[str], timeout: float, cwd: str | None = None) -> CommandResult:
        """Run argv (no shell: every word is quoted) in the work dir or cwd under it."""
        self._require_open()
        if not argv:
            raise TransportError(f"board '{self.board}': empty command")
        where = posixpath.join(self._workdir, cwd) if cwd else self._workdir
        secs = max(1, math.ceil(timeout))
        self.log.debug("run %s in %s", argv, where)
        t0 = time.perf_counter()
        if self._stale:
            self._resync(f"command {argv[0]!r}")
        nonce = secrets.token_hex(4)
        script = f"kiln_job {nonce} {secs} {shlex.quote(where)} {shlex.join(argv)}"
        rc, flag, out, err = self._job(nonce, script, secs + 1 + GRACE_S + self.spec.timeout_s,
                                       f"command {argv[0]!r}")
        if flag == "t":
            raise TransportError(f"board '{self.board}': command {argv[0]!r} timed out after {timeout:g} s "
                                 "(killed on the board)")
        if flag == "x":
            raise TransportError(f"board '{self.board}': cannot run {argv[0]!r}: no directory {where} on the board")
        return CommandResult(tuple(argv), rc, out.decode(errors="replace"), err.decode(errors="replace"),
                             time.perf_counter() - t0)

    # -- FileTransferProtocol ---------------------------------------------------------------

    def put(self, local: Path, remote: str) -> None:
        """Upload in checksummed frames to ``<remote>.part``; rename once its sha256 matches."""
        self._require_open()
        local = Path(local)
        dest = posixpath.join(self._workdir, remote)
        try:
            f = open(local, "rb")
        except OSError as e:
            raise TransportError(f"board '{self.board}': upload of {local} failed: {e}") from e
        if self._stale:
            self._resync(f"upload of {local}")
        with f:
            size = os.fstat(f.fileno()).st_size
            before = dict(self.stats)
            t0 = time.perf_counter()
            try:
                self._send_file(f, size, local, dest)
            except TransportError:
                self._stale = True  # the board may still sit in its receiver
                raise
        self._finish(local, dest)
        secs = time.perf_counter() - t0
        wire = sum(self.stats[k] - before[k] for k in ("wire_bytes_out", "wire_bytes_in"))
        self.last_put = {"bytes": size, "seconds": secs, "wire_bytes": wire,
                         "efficiency": size / wire if wire else 0.0,
                         "retransmissions": self.stats["retransmissions"] - before["retransmissions"]}
        level = logging.WARNING if self.last_put["retransmissions"] else \
            logging.INFO if size >= 512 * 1024 else logging.DEBUG  # a noisy line is news
        self.log.log(level, "uploaded %s (%d bytes) in %.2f s: %.0f B/s, %.1f%% payload on the wire, "
                     "%d retransmissions",
                     local.name, size, secs, size / secs if secs else 0, 100 * self.last_put["efficiency"],
                     self.last_put["retransmissions"])

    def _send_file(self, f, size: int, local: Path, dest: str) -> None:
        nonce = secrets.token_hex(4)
        what = f"upload of {local} to {dest}"
        script = f"kiln_rx {nonce} {shlex.quote(dest)} {self._vtime} {self._idle_reads}"
        self._retry(f"{what}: start", lambda: self._rx_start(nonce, script, dest), attempts=self.spec.retries + 1,
                    base_delay=0.0, max_delay=0.0)
        sha = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
        off, frame, chunk, good, rewinds = 0, 0, self.spec.chunk_bytes, 0, 0
        step, next_log = max(size // 10, 1), max(size // 10, 1)
        while off < size:
            state = {"chunk": chunk, "tries": 0}

            def attempt() -> int:
                state["tries"] += 1
                f.seek(off)
                data = f.read(state["chunk"])
                try:
                    return self._frame(nonce, off, data, size, dest)
                except LinkGlitch:
                    # halve the frame: on a noisy line a shorter frame is likelier to get through
                    state["chunk"] = max(64, state["chunk"] // 2)
                    raise

            end = self._retry(f"{what}: frame {frame} (bytes {off}..{min(size, off + chunk)} of {size})", attempt,
                              attempts=self.spec.retries + 1, base_delay=0.0, max_delay=0.0,
                              level=logging.DEBUG)  # each upload ends with one summary line
            self.stats["retransmissions"] += state["tries"] - 1 + (end < off)
            rewinds += end < off
            if rewinds > self.spec.retries:
                raise TransportError(f"board '{self.board}': {what}: the board's answers kept disagreeing with "
                                     f"the host's position ({rewinds} times; at byte {end} of {size})")
            self.stats["payload_bytes"] += max(0, end - off)
            self.stats["frames"] += 1
            off, frame = end, frame + 1
            # after a retransmission keep the shorter frame; after 4 clean frames double it again
            good = good + 1 if state["tries"] == 1 else 0
            chunk = state["chunk"]
            if good >= 4 and chunk < self.spec.chunk_bytes:
                chunk, good = min(self.spec.chunk_bytes, chunk * 2), 0
            if size >= 512 * 1024 and off >= next_log:
                self.log.info("upload %s: %d%% (%d of %d bytes)", local.name, 100 * off // size, off, size)
                next_log += step
        answers: set = set()
        self._retry(f"{what}: end (frames {frame}, {size} bytes)",
                    lambda: self._rx_end(nonce, size, sha.hexdigest(), dest, answers),
                    attempts=self.spec.retries + 1, base_delay=0.0, max_delay=0.0)

    def _finish(self, local: Path, dest: str) -> None:
        r = self.run(["mv", "-f", "--", dest + ".part", dest], timeout=max(30.0, self.spec.timeout_s))
        if r.returncode != 0:
            raise TransportError(f"board '{self.board}': upload of {local}: cannot rename {dest}.part into place "
                                 f"(exit {r.returncode}): {r.stderr.strip()[:300]}")

    def _rx_start(self, nonce: str, script: str, dest: str) -> None:
        self._shell(self._do_line(nonce, script))
        ev = self._expect(nonce, ("A", "N", "D", "NAK"), self.spec.timeout_s,
                          f"the start of the upload within {self.spec.timeout_s:g} s")
        if ev.kind == "NAK":
            raise LinkGlitch("the board saw a damaged command line (NAK)")
        if ev.kind == "D":  # the receiver could not create the file
            raise TransportError(f"board '{self.board}': cannot write {dest}.part on the board: "
                                 f"{' '.join(ev.args[1:])[:300]}")

    def _frame(self, nonce: str, off: int, data: bytes, size: int, dest: str) -> int:
        """Send one frame; return the board's stored size once it has the frame (or, when the
        board has less than ``off``, that size: the host goes back there)."""
        payload = base64.b64encode(data)
        line = payload + b"\n"
        # the check covers the header's offset and length too: a damaged one must not pass
        check = cksum(line) ^ ((off + len(data) * 65536) % 2**32)
        frame = _header(f": F {nonce} {off} {len(data)} {check} {len(payload)}") + line + _PAD
        self._write(frame)
        within = self.spec.timeout_s + self._wire_s(len(frame))
        deadline = time.monotonic() + within
        while True:
            ev = self._expect(nonce, ("A", "N", "D"), deadline - time.monotonic(),
                              f"the {len(data)}-byte frame at byte {off} within {within:.1f} s")
            if ev.kind == "D":
                raise TransportError(f"board '{self.board}': writing {dest}.part on the board failed: "
                                     f"{' '.join(ev.args[1:])[:300]}")
            stored = int(ev.args[0]) if ev.args and ev.args[0].isdigit() else -1
            if ev.kind == "A":
                if stored <= off:
                    continue  # a late answer to an earlier frame
                if stored <= size:
                    return stored  # (more than this frame: it had stored a longer try of it)
            elif ev.args[1:2] == ["offset"] and 0 <= stored < off:
                return stored  # the board has less than the host thought (a damaged ACK): go back
            elif stored < off:
                continue
            elif stored == off:
                raise LinkGlitch(f"the board rejected it ({ev.args[1] if len(ev.args) > 1 else '?'})")
            # a damaged number, or a board out of step: the answer to a repeat will tell
            raise LinkGlitch(f"odd answer {' '.join([ev.kind, *ev.args])[:100]!r} to {len(data)} bytes at {off}")

    def _rx_end(self, nonce: str, size: int, digest: str, dest: str, answers: set) -> None:
        self._write(_header(f": E {nonce}"))
        ev = self._expect(nonce, ("D",), self.spec.timeout_s + size / 50e6, "the end of the upload (sha256)")
        if ev.args[:1] == ["fail"]:
            raise TransportError(f"board '{self.board}': writing {dest}.part on the board failed: "
                                 f"{' '.join(ev.args[1:])[:300]}")
        if len(ev.args) != 3 or ev.args[0] != "ok":
            raise LinkGlitch(f"damaged answer {' '.join(ev.args)[:100]!r}")
        if ev.args[1:] != [str(size), digest]:
            if tuple(ev.args) not in answers:  # damaged on the way back? ask once more
                answers.add(tuple(ev.args))
                raise LinkGlitch(f"the board has {ev.args[1]} bytes with sha256 {ev.args[2]}")
            raise TransportError(f"board '{self.board}': after the upload {dest}.part has {ev.args[1]} bytes with "
                                 f"sha256 {ev.args[2]} on the board; the host sent {size} bytes with sha256 {digest}")

    # -- commands ---------------------------------------------------------------------------

    def _job(self, nonce: str, script: str, limit: float, what: str) -> tuple[int, str, bytes, bytes]:
        """Run a script that ends in ``kiln_get <nonce>``; return (rc, flag, stdout, stderr)."""
        line = self._do_line(nonce, script)
        state: dict = {}
        try:
            self._retry(what, lambda: self._send_command(line, nonce, state), attempts=self.spec.retries + 1,
                        base_delay=0.0, max_delay=0.0)
        except TransportError:
            self._stale = True
            raise
        deadline = time.monotonic() + limit
        asks = 0
        while True:
            try:
                return self._read_result(nonce, state, deadline)
            except LinkGlitch as e:
                asks += 1
                if asks > self.spec.retries:
                    raise TransportError(f"board '{self.board}': {what}: its result arrived damaged "
                                         f"{asks} times: {e}") from e
                self.log.warning("%s: result damaged (%s); asking again", what, e)
                self.stats["retransmissions"] += 1
                state.clear()
                state["asked"] = True  # (a pause from now on means: ask again)
                get = secrets.token_hex(4)
                self._shell(self._do_line(get, f"kiln_get {nonce}"))
                deadline = max(deadline, time.monotonic() + self.spec.timeout_s)
            except TimeoutError as e:
                self._stale = True
                raise TransportError(f"board '{self.board}': {what}: no answer from the board within {limit:g} s"
                                     f"{self._seen_text()}") from e
            except (OSError, EOFError) as e:  # the port went away (a USB adapter unplugged)
                self._stale = True
                raise TransportError(f"board '{self.board}': {what}: the serial link on {self.where} failed: "
                                     f"{type(e).__name__}: {e}") from e

    def _send_command(self, line: bytes, nonce: str, state: dict) -> None:
        """Write the command line; return once the board has taken it (ACK, or its result)."""
        self._shell(line)
        deadline = time.monotonic() + self.spec.timeout_s
        while True:
            text = self._readline(deadline)
            if text is None:
                raise LinkGlitch(f"no answer within {self.spec.timeout_s:g} s{self._seen_text()}")
            ev = _Event.parse(text)
            if ev is None or ev.nonce != nonce:
                self._note(text)
                continue
            if ev.kind == "ACK":
                self._unanswered = False
                return
            if ev.kind == "NAK":
                self._unanswered = False
                raise LinkGlitch("the board saw a damaged command line (NAK)")
            if ev.kind == "R":  # the ACK was lost but the command ran
                self._unanswered = False
                self._collect(ev, text, state)
                return

    def _read_result(self, nonce: str, state: dict, deadline: float) -> tuple[int, str, bytes, bytes]:
        while True:
            # once the result has begun, a pause means its end was lost: ask again
            until = time.monotonic() + self.spec.timeout_s if state else deadline
            text = self._readline(until)
            if text is None:
                if state:
                    raise LinkGlitch("the result stopped arriving")
                raise TimeoutError()
            ev = _Event.parse(text)
            if ev is not None and ev.nonce == nonce:
                done = self._collect(ev, text, state)
                if done is not None:
                    return done
            elif state.get("part") is not None and _B64_LINE.fullmatch(text):
                state["part"].append(text)
            else:
                self._note(text)

    def _collect(self, ev: _Event, text: str, state: dict):
        if ev.kind == "R":
            if ev.args == ["lost"]:
                raise TransportError(f"board '{self.board}': the board has no result for command {ev.nonce}")
            fields = " ".join(ev.args[:6]).encode()
            if len(ev.args) != 8 or f"{cksum(fields)} {len(fields)}" != " ".join(ev.args[6:]):
                raise LinkGlitch("damaged result header")
            state.clear()
            state.update(head=ev.args[:6], out=[], err=[], part=None)
            state["part"] = state["out"]
        elif ev.kind == "E" and "head" in state:
            state["part"] = state["err"]
        elif ev.kind == "Z" and "head" in state:
            head = state["head"]
            try:
                rc, flag = int(head[0]), head[1]
                out = base64.b64decode("".join(state["out"]), validate=True)
                err = base64.b64decode("".join(state["err"]), validate=True)
                ok = (len(head) == 6 and [cksum(out), len(out), cksum(err), len(err)] == [int(x) for x in head[2:]])
            except (ValueError, IndexError) as e:
                raise LinkGlitch(f"damaged result ({type(e).__name__})") from e
            if not ok:
                raise LinkGlitch("result checksum mismatch")
            return rc, flag, out, err
        elif ev.kind == "Z":
            raise LinkGlitch("result without its header")
        return None

    def _do_line(self, nonce: str, script: str) -> bytes:
        raw = script.encode()
        return f"kiln_do {nonce} {cksum(raw)} {len(raw)} {base64.b64encode(raw).decode()} #kiln\n".encode()

    # -- console state ----------------------------------------------------------------------

    def _sync(self) -> None:
        """Get an interactive shell to a known state: raw tty, no echo, no prompt."""
        def once() -> None:
            nonce = secrets.token_hex(4)
            self._write(b"\x03")  # drop a half-typed line (a receiver, isig off, ignores it)
            time.sleep(0.05)
            # printf 'KILN%s': the echo of this line (echo may still be on) is not the marker
            self._write(f"kiln_tty=${{kiln_tty-$(stty -g)}}; kiln_ps1=${{kiln_ps1-$PS1}}; kiln_ps2=${{kiln_ps2-$PS2}}; "
                        f"command set +o emacs +o vi 2>/dev/null; trap - INT; PS1=; PS2=; "
                        f"stty raw -echo isig && printf 'KILN%s\\n' _S_{nonce} #kiln\n".encode())
            deadline = time.monotonic() + self.spec.timeout_s
            while True:
                text = self._readline(deadline)
                if text is None:
                    raise LinkGlitch(f"no answer within {self.spec.timeout_s:g} s{self._seen_text()}")
                if text.endswith(f"KILN_S_{nonce}"):
                    self._unanswered = False
                    return
                self._note(text)

        self._retry(f"console on {self.where}: sync", once, attempts=self.spec.retries + 1)
        self._stale = False

    def _install(self) -> None:
        """Define the board's functions (unless this shell has them from an earlier session) and
        enter the work dir. They go in checksummed pieces, so that a noisy line can carry them."""
        version = hashlib.sha256(BOARD_SH.encode()).hexdigest()[:12]
        wd = f"{shlex.quote(self.spec.workdir)} '{cksum(self.spec.workdir.encode())} {len(self.spec.workdir.encode())}'"

        def probe() -> str | None:
            nonce = secrets.token_hex(4)
            self._shell(f"kiln_x=; [ \"${{kiln_ver-}}\" = {version} ] && kiln_init {wd} {nonce} "
                        f"|| printf 'KILN%s\\n' ' I {nonce} missing' #kiln\n".encode())
            return self._init_answer(nonce)

        where = f"console on {self.where}"
        path = self._retry(f"{where}: set-up", probe, attempts=self.spec.retries + 1)
        if path is None:
            path = self._retry(f"{where}: install", lambda: self._send_functions(version, wd),
                               attempts=self.spec.retries + 1)
        self._workdir = path

    def _send_functions(self, version: str, wd: str) -> str:
        raw = BOARD_SH.encode()
        blob = base64.b64encode(raw).decode()
        pieces = [blob[i:i + _PIECE] for i in range(0, len(blob), _PIECE)]
        nonce = secrets.token_hex(4)

        def put_piece(i: int, line: str) -> None:
            self._shell(line.encode())
            ev = self._expect(nonce, ("P",), self.spec.timeout_s, f"piece {i} of the functions")
            if ev.args != [str(i + 1)]:
                raise LinkGlitch(f"piece {i} of the functions: the board has {' '.join(ev.args)[:20]!r}")

        # kiln_p appends a piece whose cksum matches and which is the next one; it is one short
        # line (itself checked before it is defined), so it gets through where the blob would not
        boot = _KILN_P.decode()
        boot = (f"kiln_x='{boot}'; [ \"$(printf %s \"$kiln_x\" | cksum)\" = '{cksum(_KILN_P)} {len(_KILN_P)}' ] && "
                f"eval \"$kiln_x\" && kiln_b= && kiln_bi=0 && kiln_p - - - - {nonce} #kiln\n")
        self._retry(f"console on {self.where}: install", lambda: put_piece(-1, boot), attempts=self.spec.retries + 1)
        for i, piece in enumerate(pieces):
            line = f"kiln_p {i} {cksum(piece.encode())} {len(piece)} {piece} {nonce} #kiln\n"
            self._retry(f"console on {self.where}: install piece {i}", lambda: put_piece(i, line),
                        attempts=self.spec.retries + 1)
        done = secrets.token_hex(4)
        self._shell(f"kiln_x=; [ \"$(printf %s \"$kiln_b\" | base64 -d | cksum)\" = '{cksum(raw)} {len(raw)}' ] && "
                    f"eval \"$(printf %s \"$kiln_b\" | base64 -d)\" && kiln_ver={version} && kiln_init {wd} {done} "
                    f"|| printf 'KILN%s\\n' ' I {done} damaged' #kiln\n".encode())
        path = self._init_answer(done)
        if path is None:
            raise LinkGlitch("damaged answer")
        return path

    def _init_answer(self, nonce: str) -> str | None:
        """The work dir from ``KILN I <nonce> ok <crc> <len> <path>``; None if the board lacks the
        functions; TransportError if it cannot make the work dir."""
        ev = self._expect(nonce, ("I",), self.spec.timeout_s, f"the set-up within {self.spec.timeout_s:g} s")
        if ev.args[:1] == ["missing"]:
            return None
        if ev.args[:1] == ["damaged"]:
            raise LinkGlitch("the set-up line or the functions arrived damaged")
        if ev.args[:1] == ["fail"]:
            raise TransportError(f"board '{self.board}': cannot set up work dir {self.spec.workdir!r} on the board: "
                                 f"{' '.join(ev.args[1:])[:300]}")
        parts = ev.line.split(" ", 6)
        if len(parts) == 7 and parts[3] == "ok" and f"{cksum(parts[6].encode())} {len(parts[6].encode())}" == \
                f"{parts[4]} {parts[5]}":
            return parts[6]
        raise LinkGlitch(f"damaged answer {ev.line[:100]!r}")

    def _resync(self, what: str) -> None:
        self.log.warning("%s: the last command went unanswered; resynchronising the console", what)
        self._sync()
        self._install()  # a board that rebooted has lost the functions

    # -- the line ---------------------------------------------------------------------------

    def _expect(self, nonce: str, kinds: tuple[str, ...], within: float, what: str) -> _Event:
        deadline = time.monotonic() + max(0.0, within)
        while True:
            text = self._readline(deadline)
            if text is None:
                raise LinkGlitch(f"no answer to {what}{self._seen_text()}")
            ev = _Event.parse(text)
            if ev is not None and ev.nonce == nonce and ev.kind in kinds:
                self._unanswered = False
                return ev
            self._note(text)

    def _wire_s(self, nbytes: int) -> float:
        """Seconds that nbytes take on the line at its rate (a console that knows it: a serial
        line's baud rate, 8N1: 10 bits a byte)."""
        rate = getattr(self.console, "line_rate", None)
        return nbytes / rate if rate else 0.0

    def _shell(self, line: bytes) -> None:
        """Write one line for the shell. After a line that got no answer it follows a ^C: a damaged
        line may have left the shell inside an open quote or a here-document."""
        if self._unanswered:
            self._write(b"\x03")
            time.sleep(0.05)  # let the shell drop what it had read before the line comes
        self._unanswered = True
        self._write(line)

    def _write(self, data: bytes) -> None:
        self._seen.clear()  # a new exchange: what was seen before it is no news
        try:
            self.console.write(data)
        except TimeoutError as e:
            raise LinkGlitch(f"the line took no data for {self.spec.timeout_s:g} s") from e

    def _readline(self, deadline: float) -> str | None:
        """The next line from the board, or None at the deadline (a partial line stays buffered)."""
        line = self.console.read_until(b"\n", deadline - time.monotonic())
        if line is None:
            return None
        return line[:-1].rstrip(b"\r").decode("ascii", errors="replace")

    def _note(self, text: str) -> None:
        if text.strip():
            self._seen.append(text[:80])
            if not _OURS.search(text) and _Event.parse(text) is None:
                self.console_lines.append(text[:300])

    def _seen_text(self) -> str:
        if not self._seen:
            return "; nothing else received"
        seen = "; last seen: " + " | ".join(repr(s) for s in self._seen)
        self._seen.clear()
        return seen
