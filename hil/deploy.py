"""Deploy: upload the runner bundle, kernel library and inputs to a per-run directory on a
board, verify their sha256 on the board, run the runner with a timeout, fetch its JSON, clean
up. Uses only hil.protocol interfaces, so it works over any transport.

A run directory is ``runs/<host>-<pid>-<time>-<n>``: a run that is killed (kill -9, a crash)
cannot remove it, so each deploy, once connected, removes the run dirs of this host whose
process is gone (never a live run's, never another host's)."""

from __future__ import annotations

import itertools
import math
import json
import logging
import os
import re
import socket
import time
from pathlib import Path

from hil import upload_codec
from hil.protocol import CommandProtocol, FileTransferProtocol
from kiln.artifacts import sha256_file
from kiln.errors import KilnError, TransportError, ValidationError


SIGNALS = {
    4: " (SIGILL: the kernel library uses an instruction this board's CPU lacks; check its tvm_target mcpu/mattr)",
    9: " (SIGKILL: out of memory?)",
    11: " (SIGSEGV)",
}


CONSOLE_LINES = 30  # the last lines of a failed board's console kept in its record, as LAVA keeps a job's log


class DeployError(KilnError):
    """A deploy step failed on one board; carries which step, for the report, and ``console``:
    the last lines of the board's console (``{"source", "lines"}``) or None."""

    def __init__(self, step: str, cause: KilnError):
        super().__init__(f"{step}: {cause}")
        self.step = step
        self.cause = cause
        self.console: dict | None = None

    def as_error(self) -> dict:
        """The record's ``error``: the step, the message and, when there is one, the console."""
        return {"step": self.step, "message": str(self.cause), **({"console": self.console} if self.console else {})}


def console_tail(transport, cause: BaseException | None, n: int = CONSOLE_LINES) -> dict | None:
    """The last ``n`` lines of a failed board's console: what its serial console printed outside
    Kiln's own protocol (a board reached over one: hil/transport/console_shell.py), then the
    runner's stderr (or stdout) when a command it ran failed (every board; the only console an
    SSH board has). None when there is none."""
    lines, sources = [], []
    seen = list(getattr(transport, "console_lines", None) or [])
    if seen:
        lines += seen
        sources.append("serial console")
    out = getattr(cause, "output", None)
    if out and out.strip():
        lines += out.rstrip("\n").splitlines()
        sources.append("runner stderr")
    if not lines:
        return None
    return {"source": " + ".join(sources), "lines": [ln[:300] for ln in lines[-n:]]}


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
RUNS = "runs"    # on the board: one directory per deploy, runs/<host>-<pid>-<time>-<n>
_seq = itertools.count()  # several deploys from one process (apps, threads) never share a name


def host_id() -> str:
    """This host as it appears in run directory names (the hostname, filename-safe)."""
    return re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"


def run_dir_name(pid: int | None = None) -> str:
    """``runs/<host>-<pid>-<time>-<n>``: the name says which host and process own the run, so a
    later deploy can tell a run whose process died (kill -9, a crash, a power cut) from a live one."""
    return (f"{RUNS}/{host_id()}-{os.getpid() if pid is None else pid}-"
            f"{time.strftime('%Y%m%d-%H%M%S')}-{next(_seq)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stale_run_dirs(names: list[str]) -> list[str]:
    """Of the names under runs/ on a board, those left by a run of *this* host whose process is
    no longer alive. Another host's runs, live runs and names in any other form are kept."""
    mine = re.compile(rf"^{re.escape(host_id())}-(\d+)-\d{{8}}-\d{{6}}-\d+$")
    out = []
    for n in names:
        m = mine.match(n)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            out.append(n)
    return out


def _remove_stale_runs(t: Board, log) -> None:
    """Remove what killed runs of this host left under runs/ (best effort: never fails a deploy)."""
    try:
        r = t.run(["ls", "-1", "-A", RUNS], timeout=30)
        if r.returncode != 0:
            return  # no runs/ yet
        stale = stale_run_dirs(r.stdout.split())
        if stale:
            log.info("removing %d run dir(s) left on the board by dead runs of this host: %s",
                     len(stale), ", ".join(stale))
            r = t.run(["rm", "-rf", "--", *[f"{RUNS}/{n}" for n in stale]], timeout=120)
            if r.returncode != 0:
                log.warning("removing stale run dirs failed: %s", r.stderr.strip()[:300])
    except KilnError as e:
        log.warning("looking for stale run dirs failed: %s", e)


def deploy(transport: Board, files: dict[str, Path], runner_argv: list[str], timeout: float,
           board: str, checks: dict[str, list[str]] | None = None) -> dict:
    """Run one validation on a board. ``files`` maps on-board names to host paths;
    ``runner_argv`` is the command to run in the run directory; ``checks`` more runner commands
    run after it in the same directory (the front end's library on a few samples), their JSON
    under ``checks``. Returns the runner's JSON, per-step timings and upload figures; raises
    DeployError naming the failed step."""
    log = logging.getLogger(f"kiln.board.{board}")
    timings: dict[str, float] = {}
    run_dir = run_dir_name()
    try:
        _step("connect", timings, transport.open)
    except DeployError as e:
        e.console = console_tail(transport, e.cause)
        raise
    try:
        _remove_stale_runs(transport, log)
        sent = _step("upload", timings, _upload, transport, files, run_dir, log)
        _step("verify", timings, _verify, transport, files, run_dir)
        out = _step("run", timings, _run, transport, runner_argv, run_dir, timeout)
        extra = {name: _step(f"run {name}", timings, _run, transport, argv, run_dir, timeout)
                 for name, argv in (checks or {}).items()}
    except DeployError as e:  # the console as it was when the step failed (before the cleanup's commands)
        e.console = console_tail(transport, e.cause)
        raise
    finally:
        try:
            transport.run(["rm", "-rf", run_dir], timeout=60)
        except KilnError as e:  # cleanup failure must not hide the real outcome
            log.warning("cleanup of %s failed: %s", run_dir, e)
        transport.close()
    total = sum(p.stat().st_size for p in files.values())
    log.info("uploaded %d of %d bytes (rest cached on the board) in %.2f s, ran in %.2f s",
             sent, total, timings["upload"], timings["run"])
    result = {"runner": out, "timings_s": timings, "uploaded_bytes": sent, "cached_bytes": total - sent}
    if extra:
        result["checks"] = extra
    return result


def _upload(t: Board, files: dict[str, Path], run_dir: str, log) -> int:
    """Send what the board's cache lacks, then link every file into the run directory. Over a
    slow link (hil/upload_codec.py: a transport with a ``line_rate`` under SLOW_LINK_BPS, a
    serial console) each file is sent compressed when that pays and unpacked on the board into
    its cache name; _verify then checks its sha256 as for any file. Returns the raw bytes sent."""
    hashes = {name: sha256_file(path) for name, path in files.items()}
    t.run(["mkdir", "-p", CACHE, run_dir], timeout=30)
    r = t.run(["sha256sum", "--", *sorted({f"{CACHE}/{h}" for h in hashes.values()})], timeout=300)
    cached = set()
    for line in r.stdout.splitlines():  # missing files only print errors: they are not cached
        digest, _, name = line.partition("  ")
        if name.strip() == f"{CACHE}/{digest}":
            cached.add(digest)
    codecs = upload_codec.board_codecs(t, log) if upload_codec.slow_link(t) and set(hashes.values()) - cached else None
    sent = 0
    for name, path in files.items():
        h = hashes[name]
        size = path.stat().st_size
        if h in cached:
            log.info("%s: already on the board (sha256 %s), not sent again", name, h[:12],
                     extra={"kiln_upload": {"file": name, "raw_bytes": size, "codec": "cached",
                                            "compressed_bytes": 0, "sent_bytes": 0, "wire_bytes": 0,
                                            "compress_s": 0.0, "upload_s": 0.0, "unpack_s": 0.0}})
        else:
            _send_one(t, name, path, h, size, codecs, log)
            cached.add(h)
            sent += size
        r = t.run(["ln", "-f", f"{CACHE}/{h}", f"{run_dir}/{name}"], timeout=30)
        if r.returncode != 0:
            raise TransportError(f"cannot place {name} in {run_dir}: {r.stderr.strip()[:200]}")
    t.run(["chmod", "+x", *[n for n in files if n == "kiln-runner"]], timeout=30, cwd=run_dir)
    return sent


def _send_one(t: Board, name: str, path: Path, sha: str, size: int, codecs: dict | None, log) -> None:
    """Put one file into the board's cache as ``cache/<sha>``: compressed when ``codecs`` (a
    slow link) and that pays, then unpacked there; else as it is."""
    packed, codec, comp_s = upload_codec.compress(path, sha, codecs, log) if codecs else (None, "raw", 0.0)
    psize = packed.stat().st_size if packed else size
    if packed is not None and psize > upload_codec.MIN_GAIN * size:
        log.info("%s: %s packs %d bytes only to %d: sent as it is", name, codec, size, psize)
        packed, codec, psize = None, "raw", size
    t0 = time.perf_counter()
    if packed is None:
        log.info("%s: uploading %d bytes", name, size)
        t.put(path, f"{CACHE}/{sha}")
        unpack_s = 0.0
    else:
        remote = f"{CACHE}/{packed.name}"
        log.info("%s: uploading %d bytes as %d (%s, ratio %.2f%s)", name, size, psize, codec, size / max(psize, 1),
                 f", compressed in {comp_s:.1f} s" if comp_s else ", compressed copy cached on the host")
        t.put(packed, remote)
        up = time.perf_counter()
        # unpack beside the cache name and rename: a half-unpacked file never looks cached
        unpack = ('"$1" -dc -- "$2" > "$3.unpack" && mv -f -- "$3.unpack" "$3"; r=$?; '
                  'rm -f -- "$2" "$3.unpack"; exit $r')
        r = t.run(["sh", "-c", unpack, "sh", "xz" if codec == "xz" else "gzip", remote, f"{CACHE}/{sha}"],
                  timeout=max(60.0, size / 2e6))
        if r.returncode != 0:
            raise TransportError(f"{name}: unpacking {remote} ({codec}) on the board failed "
                                 f"(exit {r.returncode}): {r.stderr.strip()[:300]}")
        unpack_s = time.perf_counter() - up
    secs = time.perf_counter() - t0
    wire = (getattr(t, "last_put", None) or {}).get("wire_bytes")
    log.info("%s: %d bytes in %.1f s (%.0f B/s of the file's bytes)", name, size, secs, size / secs if secs else 0,
             extra={"kiln_upload": {"file": name, "raw_bytes": size, "codec": codec, "compressed_bytes": psize,
                                    "sent_bytes": psize, "wire_bytes": wire, "compress_s": round(comp_s, 3),
                                    "upload_s": round(secs - unpack_s, 3), "unpack_s": round(unpack_s, 3)}})


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


def _with_output(err: KilnError, r) -> KilnError:
    err.output = r.stderr if r.stderr.strip() else r.stdout  # console_tail's runner lines
    return err


def _run(t: Board, argv: list[str], run_dir: str, timeout: float) -> dict:
    r = t.run(argv, timeout=timeout, cwd=run_dir)
    if r.returncode < 0 or r.returncode > 128:  # killed by a signal (directly, or via qemu/shell)
        sig = -r.returncode if r.returncode < 0 else r.returncode - 128
        why = SIGNALS.get(sig, "")
        raise _with_output(TransportError(f"runner killed by signal {sig}{why}: {r.stderr.strip()[-300:]}"), r)
    if r.returncode != 0:
        raise _with_output(TransportError(f"runner exited {r.returncode}: "
                                          f"{r.stderr.strip()[-500:] or r.stdout.strip()[-500:]}"), r)
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError as e:
        raise _with_output(ValidationError(f"runner printed no valid JSON ({e}); output began "
                                           f"{r.stdout[:200]!r}"), r) from e
    for key, kind in (("predictions", list), ("latencies_us", list), ("count", int)):
        if not isinstance(out.get(key), kind):
            raise ValidationError(f"runner JSON lacks '{key}' ({kind.__name__}); got keys {sorted(out)[:10]}")
    if not (len(out["predictions"]) == len(out["latencies_us"]) == out["count"]):
        raise ValidationError(
            f"runner JSON is inconsistent: count {out['count']}, {len(out['predictions'])} predictions, "
            f"{len(out['latencies_us'])} latencies"
        )
    return out


# -- the hil stage: one app on one lab board ---------------------------------------------------

DTYPE_BYTES = {"float32": 4, "int16": 2, "uint8": 1, "int8": 1}
FRONT_END_SAMPLES = 8  # raw test samples the front end's own library is run on, per board
# at most this many feature values come back as JSON (about 12 bytes each): over a serial line
# at 115200 baud, 8 samples of a 32x32x3 image's features took 39 s; one takes 5
FRONT_END_VALUES = 4096


def _inputs_for(layout, samples: int | None, dest: Path) -> tuple[Path, list[int], int]:
    """The runner's input file, cut to ``samples`` when set (never beyond the test set), the
    shape of one sample and how many samples it holds."""
    from kiln.artifacts import read_json

    full = layout.test_inputs
    info = read_json(layout.data_json)["test_inputs"]
    shape = info["shape"][1:]
    size = DTYPE_BYTES[info.get("dtype", "float32")]
    for s in shape:
        size *= s
    available = full.stat().st_size // size
    if samples is None or samples >= available:
        return full, shape, available
    with open(full, "rb") as f:
        dest.write_bytes(f.read(samples * size))
    return dest, shape, samples


INFRA_STEPS = {"prepare", "connect", "upload", "verify", "lease"}
INFRA_WORDS = ("timed out", "timeout", "connection", "link", "unreachable", "broken pipe", "no route")


def infra_failure(error: dict | None) -> bool:
    """Whether a run's error is the infrastructure's (link, upload, timeout, board gone), not
    the model's: the connect/upload/verify steps, and a run that timed out or lost its link."""
    if not error:
        return False
    if error.get("step") in INFRA_STEPS:
        return True
    msg = str(error.get("message", "")).lower()
    return any(w in msg for w in INFRA_WORDS)


def write_record(layout, instance: str, run_id: str, record: dict) -> None:
    """The run's record, then the instance's last run (the doit target: the run is complete)."""
    from kiln.artifacts import write_json

    write_json(layout.run_json(run_id, instance), record)
    write_json(layout.last_run(instance), record)


def _record_head(board, instance, run_id: str) -> dict:
    return {"instance": instance.name, "type": board.name, "emulated": instance.emulated, "run_id": run_id,
            "transport": instance.link}


def job(project, board, live, layout, lab_dir: Path, run_id: str, latency_windows: int = 0) -> dict:
    """One app on one live lab instance (its transport given in full): upload, run, and the
    record of what the board returned; a board failure is in the record (``error``), not
    raised. ``latency_windows``: with N > 0 the runner times N windows of back-to-back
    inferences besides each inference (the nightly's comparable latency)."""
    import tempfile

    from hil.qemu import launcher
    from hil.transport import open_transport
    from kiln.artifacts import build_root, read_json, runner_dir

    blog = logging.getLogger(f"kiln.board.{live.name}")
    record = _record_head(board, live, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rdir = runner_dir(board.arch)
            files = {n: rdir / n for n in ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")}
            cuda = board.tvm_target.get("kind") == "cuda"  # an x86-cuda board: kernels on its GPU
            if cuda:
                have = [n for n in ("libtvm_runtime_cuda.so", "libcudart.so.13") if (rdir / n).is_file()]
                if "libtvm_runtime_cuda.so" not in have:
                    raise KilnError(f"board '{live.name}' (type {board.name}): the runner bundle {rdir} has no "
                                    "libtvm_runtime_cuda.so (this machine's TVM lacks its CUDA runtime)")
                files.update({n: rdir / n for n in have})
            files["model.so"] = layout.library(board.name)
            samples = requested = project.validation.samples
            cap = board.emulation.max_samples if live.emulated and board.emulation else None
            if cap and (samples is None or samples > cap):
                blog.info("emulated board: validating on the first %d test samples (emulation.max_samples)", cap)
                samples = cap
            files["inputs.bin"], shape, sent = _inputs_for(layout, samples, Path(tmp) / "inputs.bin")
            record.update(samples_requested=requested, samples_sent=sent)
            if samples is not None and samples > sent:  # the test set, not emulation.max_samples, is the limit
                blog.warning("app '%s': validation.samples is %d but its test set has only %d samples: "
                             "sending %d", project.name, requested, sent, sent)
            dtype = read_json(layout.data_json)["test_inputs"].get("dtype", "float32")
            runner = [*(launcher(board) if live.emulated else []), "./kiln-runner"]
            common = ["--shape", ",".join(map(str, shape)), "--dtype", dtype, "--threads", str(board.cores)]
            common += ["--device", "cuda"] if cuda else []
            argv = [*runner, "--model", "model.so", "--input", "inputs.bin", *common, "--warmup",
                    str(project.validation.warmup), "--outputs", project.task.scoring.RUNNER_OUTPUTS]  # the task's
            if latency_windows:
                argv += ["--windows", str(latency_windows)]
            checks = {}
            fe_lib = layout.front_end_library(board.name)
            if (layout.front_end_json).is_file() and fe_lib.is_file():
                # the front end alone, on a few raw samples: its features against the host's
                files["front_end.so"] = fe_lib
                per_sample = math.prod(read_json(layout.front_end_json)["output_shape"])
                n_fe = max(1, min(FRONT_END_SAMPLES, sent, FRONT_END_VALUES // per_sample))
                files["front_end_inputs.bin"], _, n_fe = _inputs_for(layout, n_fe,
                                                                      Path(tmp) / "front_end_inputs.bin")
                checks["front_end"] = [*runner, "--model", "front_end.so", "--input", "front_end_inputs.bin", *common,
                                       "--warmup", "0", "--outputs", "1"]
            blog.info("deploying %s to %s (%s over %s%s)", project.name, live.name, board.name, live.link,
                      ", emulated" if live.emulated else "")
            transport = open_transport(live, lab_dir, build_root() / "lab" / "local")
            record.update(deploy(transport, files, argv, project.validation.timeout_s, live.name, checks))
        except DeployError as e:
            blog.error("%s", e)
            record["error"] = e.as_error()
            if "no CUDA device" in record["error"]["message"]:  # say which board lacks the GPU
                record["error"]["message"] = f"board '{live.name}' (type {board.name}): {record['error']['message']}"
            for line in (e.console or {}).get("lines", [])[-5:]:
                blog.error("console: %s", line)
        except KilnError as e:
            blog.error("%s", e)
            record["error"] = {"step": "prepare", "message": str(e)}
    return record
