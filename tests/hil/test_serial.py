"""The serial transport against emulated serial boards: a real interactive shell on a real pty
(socat), and for the fault tests a relay that corrupts, drops or stalls bytes in between."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import psutil
import pytest
import serial

from hil.deploy import deploy
from hil.emulator.pty_board import _ours, relay_stats, start_serial_board, stop_serial_board
from hil.transport.console_shell import cksum
from hil.transport.serial import SerialTransport
from kiln.errors import TransportError
from kiln.schema import SerialTransport as Spec

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed"),
]


def transport(board, **spec) -> SerialTransport:
    return SerialTransport(board.name, Spec.model_validate(board.transport_spec(**spec)), Path("."))


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    b = start_serial_board("ttyboard", tmp_path_factory.mktemp("serial"))
    yield b
    stop_serial_board(b)


@pytest.fixture(scope="module")
def t(board):
    with transport(board, timeout_s=3) as tr:
        yield tr


@pytest.fixture
def fault_board(tmp_path):
    started = []

    def start(fault: dict, name: str = "noisy", **kw):
        b = start_serial_board(name, tmp_path, fault, **kw)
        started.append(b)
        return b

    yield start
    for b in started:
        stop_serial_board(b)


def sha256_on_board(tr: SerialTransport, remote: str) -> str:
    r = tr.run(["sha256sum", "--", remote], timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[0]


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_board_script_parses(shell):
    import subprocess

    from hil.transport.console_shell import BOARD_SH

    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    subprocess.run([shell, "-n"], input=BOARD_SH.encode(), check=True)


def test_cksum_matches_posix_cksum(tmp_path):
    import subprocess

    for data in (b"", b"a", bytes(range(256)) * 3, os.urandom(10_001)):
        out = subprocess.run(["cksum"], input=data, capture_output=True, check=True).stdout.split()
        assert cksum(data) == int(out[0])


def test_run_returns_stdout_stderr_and_exit_code(t):
    r = t.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert r.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    big = t.run(["sh", "-c", "seq 1 20000"], timeout=10)  # output longer than any tty buffer
    assert big.stdout.split() == [str(i) for i in range(1, 20001)]


def test_argv_is_passed_literally(t):
    marker = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    args = ["a b", "it's", 'say "hi"', f"; touch {marker}", f"$(touch {marker})", f"`touch {marker}`",
            "new\nline", "*", "$HOME", "back\\slash", "-n", "#kiln", "tab\there", "ünï"]
    r = t.run(["printf", "[%s]", *args], timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "".join(f"[{a}]" for a in args)
    assert not marker.exists()


def test_cwd_and_missing_things(t):
    assert t.run(["mkdir", "-p", "d i r;x"], timeout=10).returncode == 0
    r = t.run(["pwd"], timeout=10, cwd="d i r;x")
    assert r.stdout.strip() == f"{t.workdir()}/d i r;x"
    r = t.run(["no-such-program-kiln"], timeout=10)
    assert r.returncode == 127 and "not found" in r.stderr
    with pytest.raises(TransportError, match=r"board 'ttyboard'.*no directory"):
        t.run(["true"], timeout=10, cwd="no/such/dir")


def test_put_binary_file_all_byte_values(t, tmp_path):
    data = bytes(range(256)) * 50 + os.urandom(1234)  # 14034 bytes: not a multiple of the chunk
    src = tmp_path / "all.bin"
    src.write_bytes(data)
    t.put(src, "runs/x/we'ird name;$(x).bin")
    assert sha256_on_board(t, "runs/x/we'ird name;$(x).bin") == hashlib.sha256(data).hexdigest()
    assert t.run(["ls", "runs/x"], timeout=10).stdout.split("\n")[0] == "we'ird name;$(x).bin"  # no .part left
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    t.put(empty, "runs/x/empty")
    assert sha256_on_board(t, "runs/x/empty") == hashlib.sha256(b"").hexdigest()


def test_put_1mb_with_payload_efficiency_over_70_percent(t, tmp_path, caplog):
    data = os.urandom(1 << 20)
    src = tmp_path / "model.so"
    src.write_bytes(data)
    before = dict(t.stats)
    with caplog.at_level(logging.INFO, logger="kiln.board.ttyboard"):
        t.put(src, "runs/big/model.so")
    wire = (t.stats["wire_bytes_out"] - before["wire_bytes_out"]) + (t.stats["wire_bytes_in"] - before["wire_bytes_in"])
    efficiency = (t.stats["payload_bytes"] - before["payload_bytes"]) / wire
    print(f"1 MiB: {t.last_put['seconds']:.2f} s, {len(data) / t.last_put['seconds']:.0f} B/s, "
          f"efficiency {100 * efficiency:.1f}%")
    assert efficiency >= 0.70 and abs(efficiency - t.last_put["efficiency"]) < 1e-9
    assert t.stats["retransmissions"] == before["retransmissions"]
    assert sha256_on_board(t, "runs/big/model.so") == hashlib.sha256(data).hexdigest()
    progress = [r for r in caplog.records if "%" in r.getMessage() and "upload model.so" in r.getMessage()]
    assert len(progress) >= 9  # every ~10%


def test_hung_command_times_out_and_board_answers_next(t, board):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"board 'ttyboard': command 'sh' timed out after 1 s"):
        t.run(["sh", "-c", "trap '' TERM INT; sleep 30"], timeout=1)  # ignores TERM: needs the KILL
    assert time.monotonic() - t0 < 6
    assert t.run(["echo", "still here"], timeout=10).stdout == "still here\n"
    left = [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] == ["sleep", "30"] and _ours(p.pid, board.state_dir)]
    assert not left  # the board killed the command's whole process group


def test_deploy_over_serial(fault_board, tmp_path):
    board = fault_board({}, name="deployboard")
    runner = tmp_path / "kiln-runner"
    runner.write_text('#!/bin/sh\nset -e\nn=$(wc -c < input.bin)\necho "warming up" >&2\n'
                      'printf \'{"count": 2, "predictions": [1, 2], "latencies_us": [5, 6], "bytes": %s}\\n\' "$n"\n')
    inputs = tmp_path / "input.bin"
    inputs.write_bytes(os.urandom(5000))
    with transport(board, timeout_s=3) as tr:
        out = deploy(tr, {"kiln-runner": runner, "input.bin": inputs}, ["./kiln-runner"], 30, board.name)
    assert out["runner"]["bytes"] == 5000 and out["runner"]["count"] == 2
    with tr:  # deploy closed it; open again
        assert tr.run(["ls", "runs"], timeout=10).stdout == ""  # cleaned up


def test_open_close_idempotent_and_port_exclusive(fault_board):
    board = fault_board({}, name="ttyboard")
    a = transport(board, timeout_s=2)
    a.open()
    a.open()
    try:
        with pytest.raises(TransportError, match=r"board 'ttyboard': cannot open serial port"):
            transport(board, timeout_s=2).open()
        assert a.run(["true"], timeout=5).returncode == 0
    finally:
        a.close()
        a.close()
    with pytest.raises(TransportError, match="before open"):
        a.run(["true"], timeout=5)
    sent = a.stats["wire_bytes_out"]
    with a:  # the shell still has the functions: no second install
        assert a.run(["true"], timeout=5).returncode == 0
    assert a.stats["wire_bytes_out"] - sent < 1500


def test_board_gone_is_a_transport_error(fault_board):
    b = fault_board({}, name="unplugged")
    with transport(b, timeout_s=1, retries=1) as tr:
        stop_serial_board(b)  # the console's far end disappears (socat and the shell die)
        with pytest.raises(TransportError, match=r"board 'unplugged': command 'true'"):
            tr.run(["true"], timeout=5)


def test_garbage_on_the_console_before_open(fault_board):
    b = fault_board({}, name="messy")
    with serial.Serial(b.tty, 115200, timeout=0) as s:  # a person left half a command typed
        s.write(b"echo 'unterminated ; cat <<EOF\n\x00\xff junk")
        time.sleep(0.2)
    with transport(b, timeout_s=2) as tr:
        assert tr.run(["echo", "ok"], timeout=5).stdout == "ok\n"


def test_bash_console(fault_board, tmp_path):
    """bash's `read` reads past the line on a raw tty and it prints job notices: still works."""
    b = fault_board({}, name="bashboard", shell="/bin/bash")
    data = os.urandom(20_000)
    (tmp_path / "f").write_bytes(data)
    with transport(b, timeout_s=2) as tr:
        tr.put(tmp_path / "f", "f")
        assert sha256_on_board(tr, "f") == hashlib.sha256(data).hexdigest()
        r = tr.run(["sh", "-c", "echo a; exit 4"], timeout=5)
        assert (r.returncode, r.stdout, r.stderr) == (4, "a\n", "")


@pytest.mark.parametrize("impair", [{"corrupt": 1e-4, "seed": 3}, {"drop": 1e-4, "seed": 4}],
                         ids=["corrupt-1e-4", "drop-1e-4"])
def test_noisy_line_uploads_correctly_with_retransmissions(fault_board, tmp_path, impair):
    b = fault_board({**impair, "after": 8000})  # a clean set-up, then noise both ways
    data = os.urandom(200_000)
    (tmp_path / "f").write_bytes(data)
    with transport(b, timeout_s=1, retries=8) as tr:
        tr.put(tmp_path / "f", "f")
        assert tr.stats["retransmissions"] > 0
        assert sha256_on_board(tr, "f") == hashlib.sha256(data).hexdigest()
        assert tr.run(["echo", "x y"], timeout=5).stdout == "x y\n"
    st = relay_stats(b)
    assert st.get("corrupted", 0) + st.get("dropped", 0) > 0
    print(json.dumps({"impair": impair, **tr.last_put, **st}))


def test_dead_line_fails_clearly(fault_board, tmp_path):
    b = fault_board({"stall_after": 40_000})
    (tmp_path / "model.so").write_bytes(os.urandom(200_000))
    t0 = time.monotonic()
    with transport(b, timeout_s=0.5, retries=2) as tr:
        with pytest.raises(TransportError, match=r"board 'noisy': upload of .*model\.so.* frame \d+ .*"
                                                 r"failed after 3 attempts: .*no answer"):
            tr.put(tmp_path / "model.so", "model.so")
        with pytest.raises(TransportError, match="board 'noisy'"):
            tr.run(["true"], timeout=1)
    assert time.monotonic() - t0 < 15


def test_line_that_comes_back_is_resynchronised(fault_board, tmp_path):
    b = fault_board({"stall_after": 40_000, "stall_s": 2.0})
    data = os.urandom(100_000)
    (tmp_path / "f").write_bytes(data)
    with transport(b, timeout_s=0.3, retries=1) as tr:
        with pytest.raises(TransportError, match="frame"):
            tr.put(tmp_path / "f", "f")
        time.sleep(2.0)
        tr.put(tmp_path / "f", "f")  # resyncs the console (the old receiver is abandoned) first
        assert sha256_on_board(tr, "f") == hashlib.sha256(data).hexdigest()


def test_throttled_to_115200_baud(fault_board, tmp_path):
    b = fault_board({"baud": 115200}, name="uart")
    data = os.urandom(24_000)
    (tmp_path / "f").write_bytes(data)
    with transport(b, baud=115200, timeout_s=3) as tr:
        tr.put(tmp_path / "f", "f")
        rate = len(data) / tr.last_put["seconds"]
        print(f"115200 baud: {rate:.0f} B/s payload, efficiency {100 * tr.last_put['efficiency']:.1f}%")
        assert rate < 11_520 and tr.last_put["efficiency"] >= 0.70
        assert sha256_on_board(tr, "f") == hashlib.sha256(data).hexdigest()
