"""The SSH transport against a real OpenSSH sshd (in its own network namespace when root),
with link faults injected by a loopback TCP proxy in front of it."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

from hil import deploy
from hil.emulator.faults import Fault, TCPProxy, closed_port
from hil.emulator.sshd import NETNS_BLOCK, netns_name, start_sshd, stop_sshd
from hil.transport.ssh import SSHTransport
from kiln import schema
from kiln.errors import TransportError

pytestmark = pytest.mark.slow
PER_TEST_S = 30


@pytest.fixture(autouse=True)
def bounded():
    """No test here may hang: every step has its own timeout, and this is the backstop."""
    def expire(*_):
        raise TimeoutError(f"test exceeded {PER_TEST_S} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(PER_TEST_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    b = start_sshd("kiln-t1", tmp_path_factory.mktemp("sshd"))
    yield b
    stop_sshd(b)


def transport(board, name="kiln-t1", base_dir=Path("/"), **overrides) -> SSHTransport:
    return SSHTransport(name, schema.SSHTransport(**board.transport_spec(**overrides)), base_dir)


@pytest.fixture
def ssh(board):
    with transport(board) as t:
        yield t


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def via_proxy(board, proxy: TCPProxy, tmp_path: Path, **overrides) -> SSHTransport:
    """A transport that reaches the board through ``proxy`` (known_hosts lists the proxy address)."""
    kh = tmp_path / "known_hosts.proxy"
    kh.write_text(board.known_hosts_entry(proxy.host, proxy.port))
    return transport(board, host=proxy.host, port=proxy.port, known_hosts=str(kh), **overrides)


# -- commands -------------------------------------------------------------------------------

def test_run_returns_stdout_stderr_and_exit_code(ssh):
    r = ssh.run(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=10)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert r.argv == ("sh", "-c", "echo out; echo err >&2; exit 3")
    assert ssh.run(["true"], timeout=10).returncode == 0


def test_argv_is_passed_literally_never_through_a_shell(ssh):
    pwned = Path(f"/tmp/pwned-{uuid.uuid4()}")
    args = ["a b", "it's", 'say "hi"', f"; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`",
            "rpi4; rm -rf /", "*", "$HOME", "-n", "back\\slash", "new\nline", ""]
    r = ssh.run(["printf", "%s\\0", *args], timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\0")[:-1] == args
    assert not pwned.exists()


def test_cwd_with_spaces_and_quotes_and_missing_cwd(ssh):
    odd = "dir with 'quote' and $(x)"
    ssh.run(["mkdir", "-p", odd], timeout=10)
    r = ssh.run(["pwd"], timeout=10, cwd=odd)
    assert r.stdout.strip() == f"{ssh.workdir()}/{odd}"
    with pytest.raises(TransportError, match="kiln-t1.*cannot run 'pwd'.*no directory"):
        ssh.run(["pwd"], timeout=10, cwd="no/such/dir")


def test_command_not_found_is_a_transport_error_like_local(ssh):
    with pytest.raises(TransportError, match="kiln-t1.*cannot run 'no-such-program-kiln'"):
        ssh.run(["no-such-program-kiln"], timeout=10)


def test_hung_command_times_out_and_is_killed_on_the_board(ssh, board):
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"kiln-t1.*'sh' timed out after 1 s"):
        ssh.run(["sh", "-c", "echo $$ > hung.pid; exec sleep 60"], timeout=1)
    assert time.monotonic() - t0 < 4
    pid = int((board.workdir / "hung.pid").read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert ssh.run(["true"], timeout=10).returncode == 0  # the link is still usable


def test_open_close_are_idempotent_and_use_before_open_fails(board):
    t = transport(board)
    with pytest.raises(TransportError, match="kiln-t1.*before open"):
        t.run(["true"], timeout=5)
    t.open()
    t.open()
    assert t.workdir() == str(board.workdir)
    t.close()
    t.close()
    with t:  # and it opens again after a close
        assert t.run(["true"], timeout=5).returncode == 0


def test_relative_key_and_known_hosts_resolve_against_the_inventory_dir(board):
    t = transport(board, base_dir=board.state, key="client_key", known_hosts="known_hosts")
    with t:
        assert t.run(["true"], timeout=5).returncode == 0


# -- uploads --------------------------------------------------------------------------------

def test_put_small_and_3mb_files_and_sha256_matches_on_the_board(ssh, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("hello board\n")
    big = random_file(tmp_path / "big.bin", 3 * 1024 * 1024)
    ssh.put(small, "runs/r1/small.txt")
    ssh.put(big, "runs/r1/model.so")
    ssh.put(small, "runs/r1/small.txt")  # overwriting an existing file works too
    r = ssh.run(["sha256sum", "--", "small.txt", "model.so"], timeout=30, cwd="runs/r1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [sha256(small), "small.txt", sha256(big), "model.so"]
    assert not ssh.run(["ls", "runs/r1"], timeout=10).stdout.count(".part")


def test_deploy_runs_end_to_end_over_ssh(board, tmp_path):
    good = json.dumps({"count": 2, "predictions": [1, 2], "latencies_us": [10.0, 11.0]})
    runner = tmp_path / "kiln-runner"
    runner.write_text(f"#!/bin/sh\ntest -f model.so && echo '{good}'\n")
    model = random_file(tmp_path / "model.so", 100_000)
    out = deploy.deploy(transport(board), {"kiln-runner": runner, "model.so": model}, ["./kiln-runner"],
                        timeout=30, board="kiln-t1")
    assert out["runner"]["predictions"] == [1, 2]


def test_deploy_over_ssh_removes_run_dirs_of_dead_runs_of_this_host_only(board, tmp_path):
    runner = tmp_path / "kiln-runner"
    runner.write_text("#!/bin/sh\necho '{\"count\": 0, \"predictions\": [], \"latencies_us\": []}'\n")
    gone = subprocess.Popen(["true"])
    gone.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        stale = deploy.run_dir_name(gone.pid).split("/")[1]
        keep = [deploy.run_dir_name(live.pid).split("/")[1], f"otherhost-{gone.pid}-20240101-120000-0"]
        with transport(board) as t:
            for n in (stale, *keep):
                t.run(["mkdir", "-p", f"runs/{n}/sub"], timeout=10)
        deploy.deploy(transport(board), {"kiln-runner": runner}, ["./kiln-runner"], timeout=30, board="kiln-t1")
        assert sorted(p.name for p in (board.workdir / "runs").iterdir() if p.name in (stale, *keep)) == sorted(keep)
    finally:
        live.kill()
        live.wait()


def test_garbage_private_key_fails_at_once_naming_board_and_key(board, tmp_path, caplog):
    for i, junk in enumerate([b"not a key at all\n",
                              b"-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----\n",
                              b"-----BEGIN OPENSSH PRIVATE KEY-----\nAAAAnotbase64!!\n-----END OPENSSH PRIVATE KEY-----\n"]):
        key = tmp_path / f"garbage{i}"
        key.write_bytes(junk)
        t = transport(board, key=str(key), retries=3)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="kiln.board.kiln-t1"):
            with pytest.raises(TransportError) as e:
                t.open()
        msg = str(e.value)
        assert "board 'kiln-t1'" in msg and str(key) in msg and "not a valid private key" in msg, msg
        assert "attempts" not in msg and time.monotonic() - t0 < 1.0
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # not retried


def test_refused_connection_with_a_good_key_is_still_retried(board, caplog):
    port = closed_port()
    t = transport(board, host="127.0.0.1", port=port, retries=1, connect_timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="kiln.board.kiln-t1"):
        with pytest.raises(TransportError, match="after 2 attempts"):
            t.open()
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1


def test_upload_of_a_missing_host_file_names_it(ssh, tmp_path):
    with pytest.raises(TransportError, match="kiln-t1.*nothere.bin.*no such file"):
        ssh.put(tmp_path / "nothere.bin", "x.bin")


# -- host keys ------------------------------------------------------------------------------

def test_unknown_host_key_is_rejected_with_a_clear_message(board, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = transport(board, known_hosts=str(empty))
    t0 = time.monotonic()
    with pytest.raises(TransportError) as e:
        t.open()
    msg = str(e.value)
    assert "kiln-t1" in msg and f"{board.host}:{board.port}" in msg and f"is not in {empty}" in msg
    assert time.monotonic() - t0 < 3  # not retried: trying again cannot help


def test_changed_host_key_is_rejected(board, tmp_path):
    wrong = tmp_path / "known_hosts"  # the client key's public half, posing as the host key
    pub = " ".join((board.state / "client_key.pub").read_text().split()[:2])
    wrong.write_text(board.known_hosts_entry().split(" ")[0] + " " + pub + "\n")
    with pytest.raises(TransportError, match=rf"kiln-t1.*{board.host}:{board.port} changed"):
        transport(board, known_hosts=str(wrong)).open()


def test_unknown_host_key_accepted_when_the_inventory_allows_it(board, tmp_path, caplog):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with caplog.at_level(logging.WARNING, logger="kiln.board.kiln-t1"):
        with transport(board, known_hosts=str(empty), accept_unknown_host_key=True) as t:
            assert t.run(["true"], timeout=5).returncode == 0
    assert any("accepting unknown" in r.getMessage() and r.name == "kiln.board.kiln-t1" for r in caplog.records)
    assert empty.read_text() == ""  # the lab's file is never rewritten


# -- link faults ----------------------------------------------------------------------------

def test_unreachable_board_fails_after_the_configured_retries(board, caplog):
    port = closed_port()
    t = transport(board, host="127.0.0.1", port=port, retries=2, connect_timeout_s=2)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="kiln.board.kiln-t1"):
        with pytest.raises(TransportError) as e:
            t.open()
    msg = str(e.value)
    assert "kiln-t1" in msg and f"127.0.0.1:{port}" in msg and "after 3 attempts" in msg, msg
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2
    assert time.monotonic() - t0 < 5


def test_board_that_accepts_but_never_answers_times_out(board, tmp_path):
    with TCPProxy((board.host, board.port), Fault("stall")) as proxy:
        t = via_proxy(board, proxy, tmp_path, retries=0, connect_timeout_s=1)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=rf"kiln-t1.*connect to 127.0.0.1:{proxy.port}.*after 1 attempt"):
            t.open()
        assert time.monotonic() - t0 < 4


def test_link_dropped_mid_upload_fails_and_leaves_no_complete_file(board, tmp_path):
    big = random_file(tmp_path / "model.so", 3 * 1024 * 1024)
    with TCPProxy((board.host, board.port), Fault("drop", after_bytes=512 * 1024)) as proxy:
        t = via_proxy(board, proxy, tmp_path, retries=1)
        t.open()
        with pytest.raises(TransportError) as e:
            t.put(big, "drop/model.so")
        t.close()
    msg = str(e.value)
    assert "kiln-t1" in msg and "upload of" in msg and "model.so" in msg and "after 2 attempts" in msg, msg
    assert proxy.accepted == 2  # the retry reconnected
    assert not (board.workdir / "drop" / "model.so").exists()


def test_upload_retried_after_one_dropped_link_succeeds(board, tmp_path):
    big = random_file(tmp_path / "model.so", 3 * 1024 * 1024)
    with TCPProxy((board.host, board.port), Fault("drop", 512 * 1024, connections=1)) as proxy:
        with via_proxy(board, proxy, tmp_path, retries=1) as t:
            t.put(big, "retry/model.so")
            r = t.run(["sha256sum", "model.so"], timeout=30, cwd="retry")
    assert r.stdout.split()[0] == sha256(big)
    assert proxy.accepted == 2


def test_link_stalled_mid_upload_times_out(board, tmp_path):
    big = random_file(tmp_path / "model.so", 3 * 1024 * 1024)
    with TCPProxy((board.host, board.port), Fault("stall", after_bytes=512 * 1024)) as proxy:
        t = via_proxy(board, proxy, tmp_path, retries=0, connect_timeout_s=1)
        t.open()
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="kiln-t1.*upload of.*model.so.*after 1 attempt"):
            t.put(big, "stall/model.so")
        assert time.monotonic() - t0 < 5
        t.close()
    assert not (board.workdir / "stall" / "model.so").exists()


# -- the emulated board itself --------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_board_lives_in_its_own_network_namespace(board):
    assert board.netns == netns_name(board.state.parent, "kiln-t1")  # kiln-<lab>-<name>: see test_two_labs
    assert ipaddress.ip_address(board.host) in NETNS_BLOCK and board.port == 22
    pids = subprocess.run(["ip", "netns", "pids", board.netns], capture_output=True, text=True).stdout.split()
    assert str(board.pid) in pids


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")
def test_stop_removes_namespace_veth_and_processes(tmp_path):
    b = start_sshd("kiln-t2", tmp_path, use_netns=True)
    with transport(b, name="kiln-t2") as t:
        assert t.run(["true"], timeout=5).returncode == 0
        stop_sshd(b)  # with a session still open: its process goes too
    stop_sshd(b)  # idempotent
    assert b.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", b.veth], capture_output=True).returncode != 0
    assert not psutil.pid_exists(b.pid)


def test_loopback_mode_when_asked(tmp_path):
    b = start_sshd("kiln-t3", tmp_path, use_netns=False)
    try:
        assert (b.host, b.netns) == ("127.0.0.1", None) and b.port != 22
        with transport(b, name="kiln-t3") as t:
            assert t.run(["echo", "hi"], timeout=5).stdout == "hi\n"
    finally:
        stop_sshd(b)
    assert not psutil.pid_exists(b.pid)
