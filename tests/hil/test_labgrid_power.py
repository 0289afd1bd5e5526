"""Power through labgrid's own drivers (hil/lab/labgrid/power.py): labgrid's "simplerest" PDU
backend against a tiny HTTP PDU this test runs, whose outlet is an emulated board's power switch
(a real sshd, frozen with SIGSTOP). For a static lab (``power: {kind: labgrid}``) and for a
labgrid lab whose place exports a ``NetworkPowerPort`` (a real coordinator and exporter)."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kiln.schema import StaticLab

pytest.importorskip("labgrid")
BIN = Path(sys.executable).parent


def _answers(t) -> bool:
    try:
        with socket.create_connection((t.host, t.port), timeout=1.0) as s:
            s.settimeout(1.0)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def board(kiln_env):
    """One emulated SSH board (a real sshd) and an HTTP PDU whose outlet 0 is its power switch:
    GET /relay/0/0 cuts it, /relay/0/1 restores it (the emulated lab's own switch)."""
    from hil.emulator import lab as emlab

    spec = kiln_env["root"] / "lab.yaml"
    spec.write_text(yaml.safe_dump({"backend": "emulated", "boards": [
        {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    inv = StaticLab.model_validate(yaml.safe_load(emlab.up(spec).read_text()))
    s1 = inv.boards[0]
    hits: list[str] = []

    class PDU(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            parts = self.path.strip("/").split("/")
            if len(parts) == 3 and parts[2] in ("0", "1"):
                emlab.power(s1, "on" if parts[2] == "1" else "off", s1.power)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"1")

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PDU)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"s1": s1, "hits": hits, "url": f"http://127.0.0.1:{srv.server_port}/relay/{{index}}/{{value}}",
           "root": kiln_env["root"], "emlab": emlab}
    srv.shutdown()
    emlab.down()


def _freeze(emlab) -> int:
    pid = emlab._read_state()["boards"]["s1"]["pids"][0]
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_labgrid_power_kind_refuses_a_model_labgrid_lacks():
    with pytest.raises(ValidationError, match="nosuchpdu.*not one of labgrid's power backends.*simplerest"):
        StaticLab.model_validate({"boards": [{"name": "b1", "type": "x86-host", "power": {
            "kind": "labgrid", "model": "nosuchpdu", "host": "pdu1"}}]})


def test_a_static_board_is_cycled_through_labgrids_pdu_backend(board):
    """A frozen sshd, cycled through labgrid's NetworkPowerDriver (model simplerest): the PDU
    sees off then on, and the board answers again."""
    from hil import health_check

    s1 = type(board["s1"]).model_validate({**board["s1"].model_dump(exclude={"power"}), "power": {
        "kind": "labgrid", "model": "simplerest", "host": board["url"], "index": 0, "delay_s": 0.1}})
    pid = _freeze(board["emlab"])
    assert not _answers(s1.transport)
    cycle = health_check.power_cycle(s1, board["root"], "test", answer_timeout_s=20)
    assert cycle["passed"], cycle
    assert board["hits"][:2] == ["/relay/0/0", "/relay/0/1"]
    assert _answers(s1.transport) and board["emlab"]._read_state()["boards"]["s1"]["pids"][0] != pid


@pytest.fixture
def coordinator(tmp_path):
    """A real labgrid coordinator on loopback; its address."""
    addr = f"127.0.0.1:{_free_port()}"
    d = tmp_path / "coord"
    d.mkdir()
    p = subprocess.Popen([str(BIN / "labgrid-coordinator"), "-l", addr], cwd=d,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(addr.split(":"), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline and p.poll() is None, "labgrid-coordinator did not listen"
            time.sleep(0.1)
    yield addr
    p.terminate()
    p.wait(10)


def test_a_labgrid_place_is_cycled_through_its_own_power_resource(board, coordinator, tmp_path):
    """A labgrid lab whose place exports the board's NetworkService and a NetworkPowerPort (the
    HTTP PDU): the live inventory gives the board ``labgrid-place`` power, and a cycle (the place
    acquired for it, then released) goes through labgrid's driver to the board's switch."""
    from hil import health_check
    from hil.lab import labgrid
    from kiln.config import load_lab

    s1 = board["s1"]
    t = s1.transport
    cfg = tmp_path / "exporter.yaml"
    cfg.write_text(yaml.safe_dump({"s1": {
        "NetworkService": {"address": t.host, "port": t.port, "username": t.user},
        "NetworkPowerPort": {"model": "simplerest", "host": board["url"], "index": 0}}}))
    exporter = subprocess.Popen([str(BIN / "labgrid-exporter"), "-c", coordinator, "-n", "exp1",
                                 "--hostname", "127.0.0.1", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = [str(BIN / "labgrid-client"), "-x", coordinator, "-p", "s1"]
        for args in (["create"], ["add-match", "exp1/s1/*"], ["set-tags", "kiln_type=x86-host"]):
            subprocess.run(client + args, check=True, capture_output=True, timeout=30)
        lab_file = tmp_path / "lg.yaml"
        lab_file.write_text(yaml.safe_dump({"backend": "labgrid", "coordinator": coordinator, "ssh": {
            "user": t.user, "key": t.key, "known_hosts": t.known_hosts}, "boards": [
            {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}}]}))
        lab = load_lab(lab_file)
        deadline = time.monotonic() + 20
        while True:  # the exporter publishes its resources
            p = labgrid.client_for(lab).places().get("s1", {})
            if len(p.get("resources", [])) == 2 and all(r["avail"] for r in p["resources"]):
                break
            assert time.monotonic() < deadline and exporter.poll() is None, f"exporter published {p}"
            time.sleep(0.2)
        live = StaticLab.model_validate(yaml.safe_load(labgrid.open_lab(lab, lab_file).read_text())).boards[0]
        assert live.power.kind == "labgrid-place" and live.power.place == "s1"
        live = live.model_copy(update={"power": live.power.model_copy(update={"delay_s": 0.1})})
        _freeze(board["emlab"])
        cycle = health_check.power_cycle(live, board["root"], "test", answer_timeout_s=20)
        assert cycle["passed"], cycle
        assert board["hits"][:2] == ["/relay/0/0", "/relay/0/1"] and _answers(t)
        assert labgrid.client_for(lab).places()["s1"]["acquired"] is None  # held for the switch only
    finally:
        labgrid.close_clients()
        exporter.terminate()
        exporter.wait(10)


def test_hil_lab_power_drives_labgrid_power_by_hand(board, tmp_path):
    """``python -m hil.lab power`` on a static board with ``kind: labgrid``."""
    lab = tmp_path / "static.yaml"
    s1 = board["s1"]
    lab.write_text(yaml.safe_dump({"boards": [{**s1.model_dump(exclude={"power"}), "power": {
        "kind": "labgrid", "model": "simplerest", "host": board["url"], "index": 0, "delay_s": 0.1}}]}))
    r = subprocess.run([sys.executable, "-m", "hil.lab", "--lab", str(lab), "power", "s1", "off"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert r.returncode == 0, r.stderr
    assert board["hits"] == ["/relay/0/0"] and not _answers(s1.transport)
