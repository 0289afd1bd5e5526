"""Deploy: upload the runner bundle, kernel library and inputs to a per-run directory on a
board, verify their sha256 on the board, run the runner with a timeout, fetch its JSON, clean
up. Uses only hil.protocol interfaces, so it works over any transport."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from hil.protocol import CommandProtocol, FileTransferProtocol
from kiln.artifacts import sha256_file
from kiln.errors import KilnError, TransportError, ValidationError


SIGNALS = {
    4: " (SIGILL: the kernel library uses an instruction this board's CPU lacks; check its tvm_target mcpu/mattr)",
    9: " (SIGKILL: out of memory?)",
    11: " (SIGSEGV)",
}


class DeployError(KilnError):
    """A deploy step failed on one board; carries which step, for the report."""

    def __init__(self, step: str, cause: KilnError):
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause


class Board(CommandProtocol, FileTransferProtocol):  # for type checkers: what deploy needs
    pass


def _step(name: str, timings: dict, fn, *args):
    t0 = time.perf_counter()
    try:
        return fn(*args)
    except KilnError as e:
        raise DeployError(name, e) from e
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


CACHE = "cache"  # on the board: artifacts by sha256, so an unchanged file is never sent twice


def deploy(transport: Board, files: dict[str, Path], runner_argv: list[str], timeout: float,
           board: str) -> dict:
    """Run one validation on a board. ``files`` maps on-board names to host paths;
    ``runner_argv`` is the command to run in the run directory. Returns the runner's JSON,
    per-step timings and upload figures; raises DeployError naming the failed step."""
    log = logging.getLogger(f"kiln.board.{board}")
    timings: dict[str, float] = {}
    run_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    _step("connect", timings, transport.open)
    try:
        sent = _step("upload", timings, _upload, transport, files, run_dir, log)
        _step("verify", timings, _verify, transport, files, run_dir)
        out = _step("run", timings, _run, transport, runner_argv, run_dir, timeout)
    finally:
        try:
            transport.run(["rm", "-rf", run_dir], timeout=60)
        except KilnError as e:  # cleanup failure must not hide the real outcome
            log.warning("cleanup of %s failed: %s", run_dir, e)
        transport.close()
    total = sum(p.stat().st_size for p in files.values())
    log.info("uploaded %d of %d bytes (rest cached on the board) in %.2f s, ran in %.2f s",
             sent, total, timings["upload"], timings["run"])
    return {"runner": out, "timings_s": timings, "uploaded_bytes": sent, "cached_bytes": total - sent}


def _upload(t: Board, files: dict[str, Path], run_dir: str, log) -> int:
    """Send what the board's cache lacks, then link every file into the run directory."""
    hashes = {name: sha256_file(path) for name, path in files.items()}
    t.run(["mkdir", "-p", CACHE, run_dir], timeout=30)
    r = t.run(["sha256sum", "--", *sorted({f"{CACHE}/{h}" for h in hashes.values()})], timeout=300)
    cached = set()
    for line in r.stdout.splitlines():  # missing files only print errors: they are not cached
        digest, _, name = line.partition("  ")
        if name.strip() == f"{CACHE}/{digest}":
            cached.add(digest)
    sent = 0
    for name, path in files.items():
        h = hashes[name]
        if h in cached:
            log.info("%s: already on the board (sha256 %s), not sent again", name, h[:12])
        else:
            log.info("%s: uploading %d bytes", name, path.stat().st_size)
            t.put(path, f"{CACHE}/{h}")
            cached.add(h)
            sent += path.stat().st_size
        r = t.run(["ln", "-f", f"{CACHE}/{h}", f"{run_dir}/{name}"], timeout=30)
        if r.returncode != 0:
            raise TransportError(f"cannot place {name} in {run_dir}: {r.stderr.strip()[:200]}")
    t.run(["chmod", "+x", *[n for n in files if n == "kiln-runner"]], timeout=30, cwd=run_dir)
    return sent


def _verify(t: Board, files: dict[str, Path], run_dir: str) -> None:
    r = t.run(["sha256sum", "--", *files], timeout=120, cwd=run_dir)
    if r.returncode != 0:
        raise TransportError(f"sha256sum failed on the board (exit {r.returncode}): {r.stderr.strip()[:300]}")
    seen = {}
    for line in r.stdout.splitlines():
        digest, _, name = line.partition("  ")
        seen[name.strip()] = digest
    bad = {name: sha256_file(path) for name, path in files.items()}
    bad = {name: want for name, want in bad.items() if seen.get(name) != want}
    if bad:
        # drop the bad cached copies so the next deploy sends them again
        t.run(["rm", "-f", *[f"{CACHE}/{want}" for want in bad.values()]], timeout=30)
        name, want = next(iter(bad.items()))
        raise TransportError(f"{name}: sha256 on the board {seen.get(name)} != host {want}"
                             + (f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""))


def _run(t: Board, argv: list[str], run_dir: str, timeout: float) -> dict:
    r = t.run(argv, timeout=timeout, cwd=run_dir)
    if r.returncode < 0 or r.returncode > 128:  # killed by a signal (directly, or via qemu/shell)
        sig = -r.returncode if r.returncode < 0 else r.returncode - 128
        why = SIGNALS.get(sig, "")
        raise TransportError(f"runner killed by signal {sig}{why}: {r.stderr.strip()[-300:]}")
    if r.returncode != 0:
        raise TransportError(f"runner exited {r.returncode}: {r.stderr.strip()[-500:] or r.stdout.strip()[-500:]}")
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise ValidationError(f"runner printed no valid JSON ({e}); output began {r.stdout[:200]!r}") from e
    for key, kind in (("predictions", list), ("latencies_us", list), ("count", int)):
        if not isinstance(out.get(key), kind):
            raise ValidationError(f"runner JSON lacks '{key}' ({kind.__name__}); got keys {sorted(out)[:10]}")
    if not (len(out["predictions"]) == len(out["latencies_us"]) == out["count"]):
        raise ValidationError(
            f"runner JSON is inconsistent: count {out['count']}, {len(out['predictions'])} predictions, "
            f"{len(out['latencies_us'])} latencies"
        )
    return out
