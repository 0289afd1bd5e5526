"""The health check a board gets before its first job of a night: the board is reachable and
the runner, deployed the way every job deploys it (hil.deploy.deploy), runs a known model and
prints the known output. Its outcome goes to the health store (hil/lab/health.py: states,
history, the command), which knows nothing of deploys.

The model is tiny and fixed (a 4->3 matmul plus bias, numpy-made weights), built with TVM for
the board type once and cached under ``<build>/health/<type>/``; its expected output is
computed with numpy. It is compiled here with TVM directly because hil never imports passes/.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import threading
import time
from pathlib import Path

from hil.lab.health import BY_COMMAND_ONLY, HealthError, record_check, record_event, state
from kiln.artifacts import (atomic_path, build_root, read_json, runner_dir, runtime_cache, sha256_file, write_bytes,
                            write_json)
from kiln.errors import KilnError
from kiln.schema import Board, Instance

CHECK_TIMEOUT_S = 60.0
TOLERANCE = 1e-5
MODEL_VERSION = 1  # bump when the known model or its input changes: the caches rebuild
RUNNER_FILES = ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")


# -- the known model ---------------------------------------------------------------------

def _known():
    """The fixed model and input: weights (4x3), bias (3) and two input samples (2x4)."""
    import numpy as np

    rng = np.random.default_rng(14)
    w = rng.uniform(-1, 1, (4, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, 3).astype(np.float32)
    x = rng.uniform(-1, 1, (2, 4)).astype(np.float32)
    return w, b, x


def _onnx(w, b) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "kiln_health", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _target(board: Board) -> dict:
    """The board's TVM target, but ``mcpu: host`` dropped (LLVM's generic CPU of the host's
    triple): resolving it is the compile stage's (passes/), and the check is about the runner
    and the runtime, not the CPU's vector extensions."""
    return {k: v for k, v in board.tvm_target.items() if not (k == "mcpu" and v == "host")}


def _cache_key(board: Board) -> str:
    import tvm

    spec = {"v": MODEL_VERSION, "target": _target(board), "cc": board.cc, "tvm": tvm.__version__}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


_BUILD_LOCK = threading.Lock()


def health_model(board: Board) -> Path:
    """``<build>/health/<type>/``, holding model.so, inputs.bin and expected.json (the numpy
    output), built once per board type and TVM version (a file lock keeps concurrent checks of
    one type from building it twice)."""
    import numpy as np

    out = build_root() / "health" / board.name
    out.mkdir(parents=True, exist_ok=True)
    # the file lock keeps processes apart; the thread lock the nightly's board workers (TVM's
    # build is not safe to run in two threads of one process at once)
    with _BUILD_LOCK, open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = _cache_key(board)
        info = out / "expected.json"
        if _built(out, key):
            return out
        # the same model for the same key in another build directory (the runtime cache is the
        # machine's): copied, not compiled again
        shared = runtime_cache() / "health" / f"{board.name}-{key}"
        if _built(shared, key):
            for name in _FILES:
                write_bytes(out / name, (shared / name).read_bytes())
            write_json(info, read_json(shared / "expected.json"))  # last: it vouches for the files
            return out
        w, b, x = _known()
        write_bytes(out / "model.onnx", _onnx(w, b))
        _compile(board, out / "model.onnx", out / "model.so")
        write_bytes(out / "inputs.bin", x.tobytes())
        expected = (x.astype(np.float64) @ w.astype(np.float64) + b).tolist()
        # written last: it vouches for the files next to it
        write_json(info, {"key": key, "target": _target(board), "shape": [4], "samples": len(x),
                          "expected": expected, "model_sha256": sha256_file(out / "model.so")})
        try:
            shared.mkdir(parents=True, exist_ok=True)
            for name in _FILES:
                write_bytes(shared / name, (out / name).read_bytes())
            write_json(shared / "expected.json", read_json(info))
        except OSError:
            pass  # a read-only cache only costs another build directory a compile
    return out


_FILES = ("model.onnx", "model.so", "inputs.bin")


def _built(folder: Path, key: str) -> bool:
    """``folder`` holds the health model of ``key``, its library the one its record vouches for."""
    info = folder / "expected.json"
    try:
        record = read_json(info)
        return (record.get("key") == key and (folder / "inputs.bin").is_file()
                and sha256_file(folder / "model.so") == record.get("model_sha256"))
    except (OSError, ValueError):
        return False


def _compile(board: Board, onnx_path: Path, out_so: Path) -> None:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    try:
        mod = from_onnx(onnx.load(str(onnx_path)), shape_dict={"x": [1, 4]}, keep_params_in_input=False)
        ex = relax.build(mod, target=tvm.target.Target(_target(board)))
        with atomic_path(out_so) as tmp:
            so_tmp = tmp.with_suffix(".so")  # export_library picks the compiler by the suffix
            ex.export_library(str(so_tmp), cc=board.cc)
            so_tmp.replace(tmp)
    except Exception as e:  # TVM's and the linker's errors have their own types
        raise HealthError(f"health model for board type '{board.name}' (target {_target(board)}, cc "
                          f"{board.cc}) did not build: {e}") from e


# -- the check ---------------------------------------------------------------------------

def _compare(outputs, expected: list[list[float]]) -> str | None:
    """None when the runner's outputs match numpy's, else what differs."""
    import numpy as np

    got = np.asarray(outputs if outputs is not None else [], dtype=np.float64)
    want = np.asarray(expected, dtype=np.float64)
    if got.size != want.size:
        return f"runner gave {got.size} output values, expected {want.size} ({want.shape})"
    diff = np.abs(got.reshape(want.shape) - want)
    if not np.all(diff <= TOLERANCE + TOLERANCE * np.abs(want)):
        i = np.unravel_index(int(np.argmax(diff)), want.shape)
        return (f"runner output {got.reshape(want.shape)[i]:.7g} at sample {i[0]} value {i[1]} != known "
                f"{want[i]:.7g} (|diff| {diff[i]:.2g} > {TOLERANCE:g})")
    return None


def _bundle(board: Board) -> dict[str, Path]:
    rdir = runner_dir(board.arch)
    missing = [n for n in RUNNER_FILES if not (rdir / n).is_file()]
    if missing:
        raise HealthError(f"runner bundle {rdir} lacks {', '.join(missing)} (build it: "
                          f"python -m hil.runner.build --arch {board.arch} --out {rdir})")
    return {n: rdir / n for n in RUNNER_FILES}


def health_check(instance: Instance, board_type: Board, lab_dir: Path, timeout_s: float = CHECK_TIMEOUT_S) -> dict:
    """Check one board: deploy the runner and the known model, compare its outputs.
    Returns ``{"passed", "seconds", "error"}``; ``error`` names the step that failed
    (``prepare``, deploy's ``connect``/``upload``/``verify``/``run``, or ``outputs``)."""
    from hil.deploy import DeployError, deploy
    from hil.qemu import launcher
    from hil.transport import open_transport

    t0 = time.perf_counter()
    error = console = None
    try:
        try:
            model = health_model(board_type)
            files = {**_bundle(board_type), "model.so": model / "model.so", "inputs.bin": model / "inputs.bin"}
            runner = [*(launcher(board_type) if instance.emulated else []), "./kiln-runner"]
            transport = open_transport(instance, Path(lab_dir), build_root() / "lab" / "local")
        except KilnError as e:
            raise DeployError("prepare", e) from e
        argv = [*runner, "--model", "model.so", "--input", "inputs.bin", "--shape", "4", "--dtype", "float32",
                "--threads", "1", "--warmup", "0", "--outputs", "1"]
        out = deploy(transport, files, argv, timeout_s, instance.name)
        wrong = _compare(out["runner"].get("outputs"), read_json(model / "expected.json")["expected"])
        if wrong:
            error = f"outputs: {wrong}"
    except DeployError as e:
        error, console = f"{e.step}: {e.cause}", e.console
    out = {"passed": error is None, "seconds": round(time.perf_counter() - t0, 3), "error": error}
    return {**out, "console": console} if console else out


def check_board(instance: Instance, board_type: Board, lab_dir: Path, db: Path | None = None,
                timeout_s: float = CHECK_TIMEOUT_S) -> tuple[str, dict | None]:
    """A board's check before its first job, recorded: ``(state after, check or None)``. A board
    in maintenance or retired is not checked (None); jobs run only where the state is ``good``."""
    now = state(instance.name, db)
    if now in BY_COMMAND_ONLY:
        return now, None
    check = health_check(instance, board_type, lab_dir, timeout_s)
    return record_check(instance.name, check["passed"], check["error"] or "", db), check


# -- recovery: a power cycle before a board is marked bad ----------------------------------

def power_cycle(instance: Instance, lab_dir: Path, reason: str, db: Path | None = None,
                answer_timeout_s: float | None = None) -> dict:
    """Cycle the board's power and wait (bounded) for its transport to answer; recorded in its
    health history. ``{"action": "cycle", "reason", "passed", "seconds", "answered_s", "error", "at"}``."""
    from hil.lab import power

    t0, at = time.perf_counter(), time.time()
    out = {"action": "cycle", "reason": reason, "passed": False, "seconds": 0.0, "answered_s": None,
           "error": None, "at": at}
    try:
        power.switch(instance, "cycle")
        out["answered_s"] = power.wait_answering(instance, lab_dir, answer_timeout_s or power.ANSWER_TIMEOUT_S)
        out["passed"] = True
    except KilnError as e:
        out["error"] = str(e)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    record_event(instance.name, f"power cycle ({reason}): " + (
        f"answered after {out['answered_s']:.2f} s" if out["passed"] else f"failed: {out['error']}"), db=db)
    return out


def check_and_recover(instance: Instance, board_type: Board, lab_dir: Path, db: Path | None = None,
                      timeout_s: float = CHECK_TIMEOUT_S, answer_timeout_s: float | None = None
                      ) -> tuple[str, dict | None, list[dict]]:
    """``check_board`` with recovery: a board that fails its check and has power control is
    power-cycled, waited for, and checked again; only a failure after the cycle marks it bad.
    ``(state after, the last check or None, the power cycles)``; the last check carries
    ``first`` (the check before the cycle) when there was one."""
    now = state(instance.name, db)
    if now in BY_COMMAND_ONLY:
        return now, None, []
    check = health_check(instance, board_type, lab_dir, timeout_s)
    if check["passed"] or instance.power is None:
        return record_check(instance.name, check["passed"], check["error"] or "", db), check, []
    record_event(instance.name, f"check failed: {check['error']} (power-cycling before judging it)",
                 by="health check", db=db)
    cycle = power_cycle(instance, lab_dir, f"failed its health check: {check['error']}", db, answer_timeout_s)
    first = check
    if cycle["passed"]:
        check = health_check(instance, board_type, lab_dir, timeout_s)
    else:
        check = {"passed": False, "seconds": 0.0, "error": f"power: {cycle['error']}"}
    check["first"] = first
    detail = (check["error"] or "") + ("" if check["passed"] else " (after a power cycle)")
    return record_check(instance.name, check["passed"], detail, db), check, [cycle]
