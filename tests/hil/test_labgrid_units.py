"""Units of the labgrid backend that need no coordinator: the lab file's checks, the serial
module check, the serial URL of a place, and which module implements a labgrid lab. The real
coordinator, exporters and runners are in tests/hil/test_labgrid_lab.py."""

from __future__ import annotations

from importlib import metadata

import pytest

from kiln import config
from kiln.errors import ManifestError, TransportError

LAB = """backend: labgrid
name: lg
coordinator: 10.0.0.1:20408
boards:
  - {name: a, type: rpi4, transport: {kind: ssh}}
  - {name: b, type: rpi3, transport: {kind: serial}}
"""


def test_a_labgrid_lab_file_is_checked_with_its_field_named(tmp_path):
    f = tmp_path / "lab.yaml"
    f.write_text(LAB)
    lab = config.load_lab(f)
    assert lab.backend == "labgrid" and lab.lease_ttl_s == 15 and [b.name for b in lab.boards] == ["a", "b"]
    f.write_text(LAB.replace("10.0.0.1:20408", "10.0.0.1"))
    with pytest.raises(ManifestError, match=r"lab\.yaml: invalid 'labgrid' lab:\n  field 'coordinator'"):
        config.load_lab(f)
    f.write_text(LAB + "emulate: {exporters: {e1: [a, a]}}\n")
    with pytest.raises(ManifestError, match=r"each board of 'boards' exactly once \(not exported: \['b'\]"):
        config.load_lab(f)
    f.write_text(LAB + "emulate: {exporters: {E1: [a, b]}}\n")
    with pytest.raises(ManifestError, match="field 'emulate.exporters'.*'E1': a host name"):
        config.load_lab(f)


def test_an_emulated_labgrid_lab_is_implemented_by_its_emulator():
    from kiln.registry import module_name

    lab = config.load_lab(config.ROOT / "hil" / "emulator" / "multihost.yaml")
    assert module_name(lab) == "hil.emulator.multihost"
    assert module_name(lab.model_copy(update={"emulate": None})) == "hil.lab.labgrid"


def test_the_serial_module_must_be_labgrids_fork_alone(monkeypatch):
    from hil.transport import console as st

    st.check_serial_module()  # this venv: pyserial-labgrid alone
    real = metadata.version

    def both(name):
        return "3.5" if name == "pyserial" else real(name)

    monkeypatch.setattr(metadata, "version", both)
    with pytest.raises(TransportError, match="both pyserial and pyserial-labgrid are installed.*pip uninstall -y pyserial"):
        st.check_serial_module()

    def plain(name):
        if name == "pyserial-labgrid":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", plain)
    with pytest.raises(TransportError, match="not pyserial-labgrid 3.5.0.2"):
        st.check_serial_module()


def test_a_place_serial_port_is_known_only_while_held():
    from hil.lab.labgrid import serial_url
    from hil.transport.serial import SerialTransport
    from kiln.schema import SerialTransport as Spec

    assert serial_url({"host": "10.0.0.2", "port": None}) is None
    assert serial_url({"host": "10.0.0.2", "port": 40123}) == "rfc2217://10.0.0.2:40123?ign_set_control"
    assert serial_url({"host": "h", "port": "7", "protocol": "raw"}) == "socket://h:7"
    with pytest.raises(TransportError, match="board 'b'.*filled in when the place is acquired"):
        SerialTransport("b", Spec(kind="serial", port="labgrid://10.0.0.1:20408/b"), ".")
    t = SerialTransport("b", Spec(kind="serial", port="rfc2217://10.0.0.2:1?ign_set_control"), "/somewhere")
    assert t.port == "rfc2217://10.0.0.2:1?ign_set_control"  # a URL is not a path under the lab dir


def test_a_job_whose_lease_was_lost_keeps_no_result():
    """hil.lab.fenced, as deploy and nightly use it (a fake lease: the real ones are lost by the
    faults of tests/hil/test_labgrid_lab.py)."""
    from types import SimpleNamespace

    from hil.lab import fenced
    from hil.nightly import infra_failure

    rec = {"instance": "rpi4", "runner": {"predictions": [1, 2]}, "checks": {"model": "ok"}, "timings_s": {}}
    assert fenced(rec, None, "rpi4") is rec
    assert fenced(rec, SimpleNamespace(lost=False), "rpi4") is rec
    out = fenced(rec, SimpleNamespace(lost=True, lost_reason="no renewal confirmed for 7.5 s"), "rpi4")
    assert "runner" not in out and "checks" not in out and out["instance"] == "rpi4"
    assert out["error"]["step"] == "lease" and "no renewal confirmed for 7.5 s" in out["error"]["message"]
    assert infra_failure(out["error"])  # retried on another board of the type, never a verdict on the model
    local = fenced(rec, SimpleNamespace(lost=True), "rpi4")  # hil/lab/leases.py's lease has no reason
    assert "another holder took the board" in local["error"]["message"]
