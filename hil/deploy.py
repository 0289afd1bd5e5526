"""Deploy: upload the runner bundle, kernel library and inputs to a per-run directory on a
board, verify their sha256 on the board, run the runner with a timeout, fetch its JSON, clean
up. Uses only hil.protocol interfaces, so it works over any transport.

A run directory is ``runs/<host>-<pid>-<time>-<n>``: a run that is killed (kill -9, a crash)
cannot remove it, so each deploy, once connected, removes the run dirs of this host whose
process is gone (never a live run's, never another host's)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import socket
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
    _step("connect", timings, transport.open)
    try:
        _remove_stale_runs(transport, log)
        sent = _step("upload", timings, _upload, transport, files, run_dir, log)
        _step("verify", timings, _verify, transport, files, run_dir)
        out = _step("run", timings, _run, transport, runner_argv, run_dir, timeout)
        extra = {name: _step(f"run {name}", timings, _run, transport, argv, run_dir, timeout)
                 for name, argv in (checks or {}).items()}
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


# -- the hil stage: one app on one lab board ---------------------------------------------------

DTYPE_BYTES = {"float32": 4, "int16": 2, "uint8": 1, "int8": 1}
FRONT_END_SAMPLES = 8  # raw test samples the front end's own library is run on, per board


def _inputs_for(layout, samples: int | None, dest: Path) -> tuple[Path, list[int], int]:
    """The runner's input file, cut to ``samples`` when set (never beyond the test set), the
    shape of one sample and how many samples it holds."""
    from kiln.artifacts import read_json

    full = layout.data / "test_inputs.bin"
    info = read_json(layout.data / "data.json")["test_inputs"]
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


def run(project, board, instance, layout, lab_path: Path, run_id: str) -> dict:
    """The hil stage: deploy ``project``'s kernel library for ``board`` to lab instance
    ``instance`` (as the lab describes it), run the runner and record its raw output (or its
    failure) in runs/<run id>/<instance>/run.json and last/<instance>.json. A board failure is
    recorded, not raised: the other boards and the report go on."""
    import tempfile

    from hil.emulation import launcher
    from hil.lab import open_lab
    from hil.transport import open_transport
    from kiln.artifacts import build_root, read_json, runner_dir, write_json
    from kiln.config import load_inventory
    from kiln.errors import ManifestError

    blog = logging.getLogger(f"kiln.board.{instance.name}")
    record = {"instance": instance.name, "type": board.name, "emulated": instance.emulated, "run_id": run_id,
              "transport": instance.link}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rdir = runner_dir(board.arch)
            files = {n: rdir / n for n in ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")}
            files["model.so"] = layout.library(board.name)
            samples = requested = project.validation.samples
            cap = board.emulation.max_samples if instance.emulated and board.emulation else None
            if cap and (samples is None or samples > cap):
                blog.info("emulated board: validating on the first %d test samples (emulation.max_samples)", cap)
                samples = cap
            files["inputs.bin"], shape, sent = _inputs_for(layout, samples, Path(tmp) / "inputs.bin")
            record.update(samples_requested=requested, samples_sent=sent)
            if samples is not None and samples > sent:  # the test set, not emulation.max_samples, is the limit
                blog.warning("app '%s': validation.samples is %d but its test set has only %d samples: "
                             "sending %d", project.name, requested, sent, sent)
            dtype = read_json(layout.data / "data.json")["test_inputs"].get("dtype", "float32")
            runner = [*(launcher(board) if instance.emulated else []), "./kiln-runner"]
            common = ["--shape", ",".join(map(str, shape)), "--dtype", dtype, "--threads", str(board.cores)]
            objective = getattr(project.architecture, "objective", "classification")
            argv = [*runner, "--model", "model.so", "--input", "inputs.bin", *common,
                    "--warmup", str(project.validation.warmup), "--outputs", "1" if objective == "reconstruction" else "0"]
            checks = {}
            fe_lib = layout.board_type(board.name) / "front_end.so"
            if (layout.data / "front_end.json").is_file() and fe_lib.is_file():
                # the front end alone, on a few raw samples: its features against the host's
                files["front_end.so"] = fe_lib
                files["front_end_inputs.bin"], _, n_fe = _inputs_for(layout, min(FRONT_END_SAMPLES, sent),
                                                                      Path(tmp) / "front_end_inputs.bin")
                checks["front_end"] = [*runner, "--model", "front_end.so", "--input", "front_end_inputs.bin", *common,
                                       "--warmup", "0", "--outputs", "1"]
            inv_path = open_lab(lab_path)  # the emulated lab starts on demand
            live = next((b for b in load_inventory(inv_path).boards if b.name == instance.name), None)
            if live is None:
                raise ManifestError(f"{inv_path}: no board instance '{instance.name}' (the lab changed since "
                                    "the task list was made; run doit again)")
            blog.info("deploying %s to %s (%s over %s%s)", project.name, live.name, board.name, live.link,
                      ", emulated" if instance.emulated else "")
            transport = open_transport(live, inv_path.parent, build_root() / "lab" / "local")
            record.update(deploy(transport, files, argv, project.validation.timeout_s, live.name, checks))
        except DeployError as e:
            blog.error("%s", e)
            record["error"] = {"step": e.step, "message": str(e.cause)}
        except KilnError as e:
            blog.error("%s", e)
            record["error"] = {"step": "prepare", "message": str(e)}
    write_json(layout.run_json(run_id, instance.name), record)
    write_json(layout.last_run(instance.name), record)  # last: the doit target says the run is complete
    return record
