"""Boards added by data alone: a new board type (one YAML file) plus one inventory entry is
listed, compiled for and validated on its emulated instance; compile-only boards are built
and reported as not validated; `doit check_targets` names what is wrong and where."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import yaml

from tests.conftest import ROOT, TINY, run_doit, write_project

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path):
    """A copy of the repo's board types and a lab inventory in tmp, plus an isolated build."""
    targets = tmp_path / "targets"
    shutil.copytree(ROOT / "targets", targets)
    inv = tmp_path / "lab.yaml"  # a lab of local boards: these tests are about board types, not links
    inv.write_text(yaml.safe_dump({"name": "desk", "boards": [
        {"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}},
        {"name": "rpi4", "type": "rpi4", "transport": {"kind": "local"}, "emulated": True},
        {"name": "rpi3", "type": "rpi3", "transport": {"kind": "local"}, "emulated": True},
        {"name": "x86-avx2", "type": "x86-avx2", "transport": {"kind": "local"}, "emulated": True}]}))
    env = dict(os.environ, KILN_TARGETS=str(targets), KILN_LAB=str(inv), KILN_PROJECTS=str(tmp_path / "projects"),
               KILN_BUILD=str(tmp_path / "build"))
    return {"targets": targets, "inv": inv, "env": env, "tmp": tmp_path}




def add_rock(lab):
    """A Cortex-A55 board nobody wrote code for: one YAML file and one inventory entry."""
    (lab["targets"] / "rock-a55.yaml").write_text(yaml.safe_dump({
        "name": "rock-a55", "arch": "aarch64", "cc": "aarch64-linux-gnu-g++", "cores": 4, "memory_mb": 2048,
        "tvm_target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "mattr": ["+neon"]},
        "emulation": {"kind": "qemu-user", "binary": "qemu-aarch64", "sysroot": "/usr/aarch64-linux-gnu", "cpu": "max"},
    }))
    inv = yaml.safe_load(lab["inv"].read_text())
    inv["boards"].append({"name": "rock-1", "type": "rock-a55", "transport": {"kind": "local"}, "emulated": True})
    lab["inv"].write_text(yaml.safe_dump(inv))


def test_board_added_as_yaml_alone_is_compiled_and_validated(lab):
    add_rock(lab)
    data = copy.deepcopy(TINY)
    data["targets"] = ["x86-host", "rock-a55", "jetson-nano"]
    write_project(lab["tmp"] / "projects", data)

    listed = run_doit(lab["env"], "list", "--all")
    assert "compile:tiny@rock-a55" in listed.stdout and "hil:tiny@rock-1" in listed.stdout, listed.stdout + listed.stderr
    assert "compile:tiny@jetson-nano" in listed.stdout and "hil:tiny@jetson" not in listed.stdout

    p = run_doit(lab["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads((lab["tmp"] / "build" / "tiny" / "report.json").read_text())
    assert report["passed"] and report["validated"] == ["x86-host", "rock-1"]
    rock = report["boards"]["rock-1"]
    assert rock["type"] == "rock-a55" and rock["latency_emulated"] and rock["agreement_with_reference"] >= 0.9
    # compile-only: its kernel library exists, and it is reported as not validated, never passed
    jet = report["boards"]["jetson-nano"]
    assert report["not_validated"] == ["jetson-nano"] and "passed" not in jet and "not_validated" in jet
    assert (lab["tmp"] / "build" / "tiny" / "type" / "jetson-nano" / "model.so").stat().st_size > 0
    assert "NOT VALIDATED" in p.stdout


def test_board_added_as_yaml_is_deployed_to_alone_with_check_digits(lab):
    """The per-app board choice: `doit deploy:check_digits boards=rock-1` deploys to that one
    board even though another app in the same checkout (tiny) does not target it."""
    add_rock(lab)
    digits = yaml.safe_load((ROOT / "projects" / "check_digits" / "project.yaml").read_text())
    digits["targets"].append("rock-a55")
    write_project(lab["tmp"] / "projects", digits)
    write_project(lab["tmp"] / "projects", copy.deepcopy(TINY))  # targets x86-host only
    p = run_doit(lab["env"], "deploy:check_digits", "boards=rock-1")
    assert p.returncode == 0, p.stdout + p.stderr
    ran = {line.split()[1] for line in p.stdout.splitlines() if line.startswith(".  ")}
    assert "hil:check_digits@rock-1" in ran and not any(t.startswith("hil:") and t != "hil:check_digits@rock-1" for t in ran)
    report = json.loads((lab["tmp"] / "build" / "check_digits" / "report.json").read_text())
    assert report["passed"] and report["validated"] == ["rock-1"] and report["boards"]["rock-1"]["accuracy"] >= 0.97


def test_check_targets_names_file_and_field(lab):
    ok = run_doit(lab["env"], "check_targets")
    assert ok.returncode == 0 and "board type x86-avx2" in ok.stdout, ok.stdout + ok.stderr
    # a board type no app targets needs no lab instance (rpi5: the tests run it under qemu)
    assert "board type rpi5: no instance in lab 'desk' and no app targets it" in ok.stdout
    tiny = copy.deepcopy(TINY)
    tiny["targets"] = ["x86-host", "rpi5"]
    write_project(lab["tmp"] / "projects", tiny)
    once = run_doit(lab["env"], "check_targets")
    assert once.returncode != 0 and "board type 'rpi5'" in once.stdout and "has no instance in lab 'desk'" in once.stdout
    assert "app(s) ['tiny'] target it" in once.stdout, once.stdout
    shutil.rmtree(lab["tmp"] / "projects")
    t = yaml.safe_load((lab["targets"] / "rpi3.yaml").read_text())
    t["emulation"]["cpu"] = "cortex-z9"
    (lab["targets"] / "rpi3.yaml").write_text(yaml.safe_dump(t))
    (lab["targets"] / "broken.yaml").write_text("name: broken\narch: riscv\ncc: gcc\nmemory_mb: 1\ntvm_target: {kind: llvm}\n")
    inv = yaml.safe_load(lab["inv"].read_text())
    inv["boards"].append({"name": "ghost", "type": "nonexistent"})
    lab["inv"].write_text(yaml.safe_dump(inv))
    bad = run_doit(lab["env"], "check_targets")
    out = bad.stdout + bad.stderr
    assert bad.returncode != 0 and "Traceback" not in out
    assert f"{lab['targets'] / 'broken.yaml'}" in out and "field 'arch'" in out
    assert "rpi3.yaml: field 'emulation.cpu'" in out and "no CPU model 'cortex-z9'" in out
    assert "boards.4.type" in out and "unknown type 'nonexistent'" in out
    # every other task refuses to start, and points at check_targets
    listed = run_doit(lab["env"], "list")
    assert listed.returncode != 0 and "check_targets" in listed.stderr and "Traceback" not in listed.stderr


def test_check_targets_checks_compilers_llvm_targets_keys_and_ports(lab):
    """A missing compiler, a CPU LLVM does not know, and a static inventory's unusable SSH key,
    known_hosts or serial port are each named with file, field and board, before any deploy."""
    import paramiko

    for name, field, value in (("x86-avx2", "cc", "no-such-g++"), ("rpi4", "tvm_target", None)):
        t = yaml.safe_load((lab["targets"] / f"{name}.yaml").read_text())
        if value is None:
            t["tvm_target"]["mcpu"] = "cortex-a7z"
        else:
            t[field] = value
        (lab["targets"] / f"{name}.yaml").write_text(yaml.safe_dump(t))
    # a static inventory in its own dir, keys given relative to it (doit runs from elsewhere)
    labdir = lab["tmp"] / "mylab"
    (labdir / "keys").mkdir(parents=True)
    good = paramiko.RSAKey.generate(1024)
    good.write_private_key_file(str(labdir / "keys" / "good"))
    good.write_private_key_file(str(labdir / "keys" / "locked"), password="secret")
    (labdir / "keys" / "junk").write_text("not a key\n")
    (labdir / "keys" / "known_hosts").write_text(f"[127.0.0.1]:2222 {good.get_name()} {good.get_base64()}\n")
    (labdir / "ttyFAKE0").write_text("")  # stands in for a serial device: it exists

    def ssh(name, key, known_hosts="keys/known_hosts"):
        return {"name": name, "type": "x86-host",
                "transport": {"kind": "ssh", "host": "127.0.0.1", "user": "kiln", "key": key, "known_hosts": known_hosts}}

    inv = labdir / "lab.yaml"
    inv.write_text(yaml.safe_dump({"name": "bench", "boards": [
        ssh("ok-ssh", "keys/good"),
        ssh("nokey", "keys/missing", known_hosts="keys/nowhere"),
        ssh("junkkey", "keys/junk", known_hosts="keys"),
        ssh("locked", "keys/locked"),
        {"name": "ok-uart", "type": "x86-host", "transport": {"kind": "serial", "port": "ttyFAKE0"}},
        {"name": "uart", "type": "x86-host", "transport": {"kind": "serial", "port": "/dev/ttyKILN-NONE"}},
    ]}))
    p = run_doit(dict(lab["env"], KILN_LAB=str(inv)), "check_targets")
    out = p.stdout + p.stderr
    problems = [ln for ln in p.stdout.splitlines() if ln.startswith("PROBLEM")]
    assert p.returncode != 0 and "Traceback" not in out, out
    assert f"{lab['targets'] / 'x86-avx2.yaml'}: field 'cc': compiler 'no-such-g++'" in out
    assert f"{lab['targets'] / 'rpi4.yaml'}: field 'tvm_target.mcpu'" in out and "'cortex-a7z'" in out
    at = f"{inv}: field 'boards."
    assert f"{at}1.transport.key': board 'nokey': SSH key {labdir / 'keys' / 'missing'} does not exist" in out
    assert f"{at}1.transport.known_hosts': board 'nokey': known_hosts file {labdir / 'keys' / 'nowhere'} does not exist" in out
    assert f"{at}2.transport.key': board 'junkkey'" in out and "is not a private key" in out
    assert f"{at}2.transport.known_hosts': board 'junkkey'" in out and "is not a file" in out
    assert f"{at}3.transport.key': board 'locked'" in out and "is encrypted" in out
    assert f"{at}5.transport.port': board 'uart': serial port /dev/ttyKILN-NONE does not exist" in out
    assert not any("'ok-ssh'" in ln or "'ok-uart'" in ln or "boards.3.transport.known_hosts" in ln for ln in problems)
    # the emulated lab fills its transports in when it starts: nothing to check there yet
    env = {k: v for k, v in lab["env"].items() if k != "KILN_LAB"}
    ok = run_doit(env, "check_targets")
    assert "Traceback" not in ok.stdout + ok.stderr and "board type x86-host" in ok.stdout, ok.stdout + ok.stderr
    assert not any(".transport." in ln for ln in ok.stdout.splitlines()), ok.stdout
