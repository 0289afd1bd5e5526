"""MetaSchedule measuring on the board over TVM RPC (hil/rpc.py, passes/support/rpc_measure.py,
kiln-runner --rpc-serve).

On the real parts: the runner binary built by hil/runner/build.py serving on loopback (the
handshake, its -timeout, a crashing candidate), and a whole `doit deploy` whose tune stage
measures over TVM RPC on the emulated lab's x86-host board through its real sshd and an SSH port
forward, then compiles with those records and runs the library on that board.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY, run_doit, write_project

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="measures on an x86_64 board")

KEY = "kiln-test"


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """The real kiln-runner bundle for this machine, built as a deploy builds it."""
    from hil.runner.build import build_runner
    from kiln.artifacts import runtime_cache

    return build_runner("x86_64", tmp_path_factory.mktemp("bundle") / "x86_64", runtime_cache())


def start_server(runner: Path, cwd: Path):
    """The runner serving on a free loopback port: (port, the process, its stderr file)."""
    log = cwd / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(runner), "--rpc-serve", "0", "--rpc-key", KEY, "--threads", "1"], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()
    assert line.startswith("kiln-runner rpc listening on 127.0.0.1:"), line
    return int(line.rsplit(":", 1)[1]), proc, log


@pytest.fixture
def server(runner, tmp_path):
    port, proc, log = start_server(runner, tmp_path)
    yield port, proc, log
    proc.terminate()
    assert proc.wait(timeout=10) == 0  # SIGTERM: a clean stop
    assert not list(tmp_path.glob("rpc-session-*")), "session scratch dirs left behind"


def _alive(port: int) -> bool:
    from tvm import rpc

    sess = rpc.connect("127.0.0.1", port, key=KEY)
    return bool(sess.cpu().exist)


def test_wrong_key_is_refused_and_a_tracker_match_key_is_accepted(server):
    from tvm import rpc

    port, proc, log = server
    with pytest.raises(Exception, match="cannot find server that matches key"):
        rpc.connect("127.0.0.1", port, key="someone-else")
    with pytest.raises(Exception, match="cannot find server that matches key"):
        rpc.connect("127.0.0.1", port, key=KEY + "x")  # a longer key is not a match key
    assert bool(rpc.connect("127.0.0.1", port, key=f"{KEY}:0123").cpu().exist)  # as an RPC tracker hands out
    assert _alive(port) and proc.poll() is None
    assert "does not match server key 'kiln-test'" in log.read_text()


def test_a_session_past_its_timeout_is_killed_and_the_server_goes_on(server):
    from tvm import rpc

    port, proc, log = server
    sess = rpc.connect("127.0.0.1", port, key=KEY, session_timeout=1)
    sess.upload(bytearray(b"x"), "a.bin")  # the session works ...
    time.sleep(2.0)  # ... until past -timeout=1 (a hung candidate looks the same to the server)
    with pytest.raises(Exception, match="kReturn"):
        sess.upload(bytearray(b"x"), "b.bin")  # its process is gone
    assert "ran past its -timeout: killed" in log.read_text()
    assert _alive(port)


CRASH_C = r"""
#include <tvm/ffi/c_api.h>
#include <signal.h>
int __tvm_ffi_crash(void* self, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {
  raise(SIGSEGV);
  return 0;
}
"""


def test_a_crashing_candidate_takes_down_only_its_session(server, tmp_path):
    from tvm import rpc

    from hil.runner.build import runtime_libs

    inc = [a for d in runtime_libs("x86_64", tmp_path)["include_dirs"] for a in ("-isystem", str(d))]
    (tmp_path / "crash.c").write_text(CRASH_C)
    subprocess.run(["gcc", "-shared", "-fPIC", *inc, str(tmp_path / "crash.c"), "-o", str(tmp_path / "crash.so")],
                   check=True)
    port, proc, log = server
    sess = rpc.connect("127.0.0.1", port, key=KEY)
    sess.upload(str(tmp_path / "crash.so"), "crash.so")
    with pytest.raises(Exception):
        sess.load_module("crash.so")["crash"]()
    assert proc.poll() is None and _alive(port)
    assert "died of signal 11 (SIGSEGV); the server goes on" in log.read_text()


def test_bad_server_arguments_exit_2_naming_the_flag(runner):
    r = subprocess.run([str(runner), "--rpc-serve", "0"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "--rpc-key: required" in r.stderr and r.stdout == ""
    r = subprocess.run([str(runner), "--rpc-serve", "99999", "--rpc-key", "k"], capture_output=True, text=True)
    assert r.returncode == 2 and "--rpc-serve: expected an integer from 0 to 65535" in r.stderr


def test_a_dead_server_is_an_error_naming_the_board(runner, tmp_path):
    from hil.rpc import Endpoint
    from kiln.errors import TransportError

    port, proc, _ = start_server(runner, tmp_path)
    ep = Endpoint("bench-7", "127.0.0.1", port, KEY, "local")
    ep.check()  # alive: answers the probe's handshake
    proc.kill()
    proc.wait()
    with pytest.raises(TransportError, match=r"board 'bench-7': its TVM RPC server at 127\.0\.0\.1:\d+ .*does not answer"):
        ep.check(timeout=2)
    # an SSH board's forward that exited is named as such, with what ssh said
    (tmp_path / "ssh.log").write_text("Connection closed by 10.0.0.2 port 22")
    fwd = subprocess.Popen(["false"])
    fwd.wait()
    ep = Endpoint("bench-8", "127.0.0.1", port, KEY, "ssh", fwd, tmp_path / "ssh.log")
    with pytest.raises(TransportError, match=r"board 'bench-8': the SSH port forward .* exited \(1\): Connection closed"):
        ep.check()


def test_qemu_and_serial_boards_are_never_measured_and_the_report_says_why(tmp_path, monkeypatch):
    from kiln.config import load_board
    from passes import tune

    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"name": "l", "boards": [
        {"name": "avx2-emu", "type": "x86-avx2", "transport": {"kind": "local"}, "emulated": True},
        {"name": "avx2-tty", "type": "x86-avx2", "transport": {"kind": "serial", "port": "/dev/ttyS9"}}]}))
    board = load_board("x86-avx2")
    from hil.rpc import RpcLab

    mode, why = tune.where_to_measure(board, dict(board.tvm_target), "rpc", RpcLab(lab))
    assert mode is None and "compiled untuned" in why
    assert "avx2-emu: emulated under qemu-user: its timings are no cost signal" in why
    assert "avx2-tty: reached over a serial console" in why
    from hil.rpc import rpc_server
    from kiln.config import load_lab
    from kiln.errors import TransportError

    with pytest.raises(TransportError, match="board 'avx2-emu': no TVM RPC measuring on it: emulated under qemu-user"):
        with rpc_server(load_lab(lab).boards[0], board, tmp_path):
            pass
    info = tune.tune_onnx(board, tmp_path / "absent.onnx", [1, 1, 8, 8], tmp_path / "tune", 16, tmp_path / "t.json",
                          measure="rpc", lab=RpcLab(lab))
    assert info["measured"] is None and info["why"] == why and info["trials_run"] == 0
    # the env var overrides the manifest, and a bad value is refused naming it
    from kiln.errors import PassError
    from kiln.measure import measure_mode
    from kiln.schema import Project

    project = Project.model_validate({**copy.deepcopy(TINY), "tuning": {"measure": "native"}})
    monkeypatch.setenv("KILN_TUNE_MEASURE", "rpc")
    assert measure_mode(project) == "rpc"
    monkeypatch.setenv("KILN_TUNE_MEASURE", "ssh")
    with pytest.raises(PassError, match=r"\$KILN_TUNE_MEASURE: expected one of auto, native, rpc, got 'ssh'"):
        measure_mode(project)
    monkeypatch.delenv("KILN_TUNE_MEASURE")
    assert measure_mode(project) == "native"


@pytest.mark.slow
def test_deploy_tunes_over_rpc_on_the_ssh_board_and_runs_the_tuned_library_there(tmp_path):
    """doit deploy with tuning.measure rpc on an emulated lab whose x86-host board is a real sshd:
    the tune stage measures 16 trials on that board through the SSH forward, the database gains
    them, compile applies them, and the tuned library runs on the same board."""
    tag = uuid.uuid4().hex[:6]
    name = f"rpc{tag}"
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"backend": "emulated", "name": name, "boards": [
        {"name": name, "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    data = copy.deepcopy(TINY)
    data["tuning"] = {"trials": 16, "measure": "rpc"}
    write_project(tmp_path / "projects", data)
    build = tmp_path / "build"
    env = dict(os.environ, KILN_PROJECTS=str(tmp_path / "projects"), KILN_BUILD=str(build), KILN_LAB=str(lab),
               OMP_NUM_THREADS="1")
    env.pop("KILN_TUNE_MEASURE", None)
    started = time.time()
    r = run_doit(env, "deploy:tiny", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    tune_json = json.loads((build / "tiny" / "type" / "x86-host" / "tune.json").read_text())
    assert tune_json["measured"] == "rpc" and tune_json["boards"] == [name], tune_json
    assert tune_json["trials_run"] > 0 and tune_json["seconds"] > 0
    assert tune_json["sessions"][name] >= tune_json["trials_run"]  # every candidate was a session on the board
    records = Path(tune_json["database"]) / "database_tuning_record.json"
    assert len(records.read_text().splitlines()) >= tune_json["trials_run"]
    compiled = json.loads((build / "tiny" / "type" / "x86-host" / "compile.json").read_text())
    # each kernel took its records, or its untuned form where that measured faster on the board
    assert compiled["tuned_kernels"]["tuned"] + len(compiled["tuned_kernels"]["held"]) > 0, compiled
    run = json.loads((build / "tiny" / "last" / f"{name}.json").read_text())
    assert "error" not in run, run
    assert run["runner"]["count"] == data["validation"]["samples"]
    # no server or forward outlived the deploy
    import psutil

    left = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if (p.info["create_time"] or 0) >= started and ("--rpc-serve" in cmd or "ExitOnForwardFailure" in cmd):
            left.append((p.pid, cmd))
    assert not left, left


def test_several_boards_share_the_candidates_each_session_on_a_free_one(runner, tmp_path):
    """rpc_runner over two servers: a session takes a board whose lock is free, so with board 0
    held (as by a session still under way) every candidate goes to board 1, and the reverse."""
    import fcntl

    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from passes.support.rpc_measure import rpc_runner, so_builder

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    servers = [start_server(runner, a), start_server(runner, b)]
    try:
        x = te.placeholder((256,), name="x")
        func = te.create_prim_func([x, te.compute((256,), lambda i: x[i] * 2.0, name="y")])
        mod = tvm.IRModule({"main": func})
        built = so_builder("g++").build([ms.builder.BuilderInput(mod, tvm.target.Target("llvm"))] * 2)
        assert all(r.error_msg is None for r in built), built
        locks = tmp_path / "locks"
        locks.mkdir()
        r = rpc_runner([("127.0.0.1", port, KEY) for port, _, _ in servers], locks, session_timeout_s=30)
        args = ms.arg_info.ArgInfo.from_prim_func(func)
        for held, used in ((0, 1), (1, 0)):
            with open(locks / f"board-{held}.lock", "w") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                before = [log.read_text().count("started") for _, _, log in servers]
                results = [fut.result() for fut in r.run([ms.runner.RunnerInput(b.artifact_path, "cpu", args)
                                                          for b in built])]
                assert all(res.error_msg is None and res.run_secs for res in results), results
                after = [log.read_text().count("started") for _, _, log in servers]
            assert after[held] == before[held] and after[used] == before[used] + len(built)
    finally:
        for _, proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=10)
