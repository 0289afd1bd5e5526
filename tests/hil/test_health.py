"""Board health: the states and their history in a real SQLite file, the command, and the check
on a real lab (a native x86-host and a qemu rpi4 over the local transport, an SSH board whose
port is closed), with the known model built by TVM and run by the real runner."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys

import pytest

from hil import health_check
from hil.emulator.faults import closed_port
from hil.lab import health
from kiln.artifacts import ROOT, read_json, runner_dir, write_json
from kiln.config import load_board
from kiln.schema import Instance


@pytest.fixture
def db(tmp_path):
    return tmp_path / "health.sqlite"


def test_states_follow_checks_and_history_keeps_them(db):
    assert health.state("b1", db) == "unknown" and health.history("b1", db=db) == []
    assert health.record_check("b1", False, "connect: refused", db) == "bad"
    assert health.state("b1", db) == "bad"
    assert health.record_check("b1", True, db=db) == "good"  # back to good by itself
    assert health.record_check("b1", True, db=db) == "good"
    rows = health.history("b1", db=db)
    assert [(s, r) for _, s, r in rows] == [("bad", "check failed: connect: refused"), ("good", "check passed"),
                                            ("good", "check passed")]
    assert [at for at, _, _ in rows] == sorted(at for at, _, _ in rows) and rows[0][0].endswith("Z")
    assert [s for _, s, _ in health.history("b1", last=1, db=db)] == ["good"]
    assert health.state("b2", db) == "unknown"  # boards are separate
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("held", ["maintenance", "retired"])
def test_maintenance_and_retired_are_never_changed_by_checks(db, held):
    health.record_check("b1", True, db=db)
    health.set_state("b1", held, "fan replaced", by="alice", db=db)
    assert health.record_check("b1", False, "connect: refused", db) == held
    assert health.record_check("b1", True, db=db) == held
    assert health.state("b1", db) == held and not health.should_check("b1", db)
    assert health.history("b1", db=db)[-1][1:] == (held, "fan replaced")  # the checks left no row
    health.set_state("b1", "unknown", "back on the rack", db=db)
    assert health.should_check("b1", db) and health.record_check("b1", True, db=db) == "good"


def test_unknown_state_is_refused(db):
    with pytest.raises(health.HealthError,
                       match="unknown health state 'broken'.*good, unknown, bad, maintenance, retired"):
        health.set_state("b1", "broken", "?", db=db)
    assert health.history("b1", db=db) == []


def command(env, *args):
    return subprocess.run([sys.executable, "-m", "hil.lab.health", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def bench_lab(kiln_env) -> dict:
    """The environment of a command on a lab of the test's own ($KILN_LAB): rpi4-1, rpi4-2."""
    import yaml

    lab = kiln_env["root"] / "bench.yaml"
    lab.write_text(yaml.safe_dump({"name": "bench", "boards": [{"name": f"rpi4-{i}", "type": "rpi4"} for i in (1, 2)]}))
    return dict(os.environ, KILN_LAB=str(lab))


def test_command_sets_shows_and_refuses(kiln_env):
    env = bench_lab(kiln_env)
    p = command(env, "set", "rpi4-2", "maintenance", "--reason", "SD card swap", "--by", "bob")
    assert p.returncode == 0, p.stderr
    assert health.state("rpi4-2") == "maintenance"  # the default database, under $KILN_BUILD
    assert (kiln_env["build"] / "lab" / "health.sqlite").is_file()
    p = command(env, "show")
    assert p.returncode == 0 and "rpi4-2" in p.stdout and "maintenance" in p.stdout and "bob" in p.stdout
    p = command(env, "show", "rpi4-2")
    assert p.returncode == 0 and "rpi4-2: maintenance" in p.stdout and "SD card swap" in p.stdout
    p = command(env, "set", "rpi4-2", "broken", "--reason", "x")
    assert p.returncode == 2 and "unknown health state 'broken'" in p.stderr and "retired" in p.stderr
    p = command(env, "set", "rpi4-2", "good")
    assert p.returncode == 2 and "--reason" in p.stderr
    assert health.state("rpi4-2") == "maintenance"


def test_command_refuses_a_board_that_is_not_in_the_lab(kiln_env):
    """A typo put nothing into maintenance (and said it had); show answered it 'unknown'."""
    env = bench_lab(kiln_env)
    p = command(env, "set", "rpi4-3", "maintenance", "--reason", "fan")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "'rpi4-3' is not a board of lab 'bench'" in p.stderr and "rpi4-1, rpi4-2" in p.stderr, p.stderr
    assert not health.db_path().exists()  # nothing stored
    p = command(env, "show", "rpi4-3")
    assert p.returncode == 2 and "'rpi4-3' is not a board of lab 'bench'" in p.stderr and "rpi4-1, rpi4-2" in p.stderr
    assert "unknown" not in p.stdout
    # the default lab when $KILN_LAB is unset: the emulated one
    p = command({k: v for k, v in os.environ.items() if k != "KILN_LAB"}, "set", "rpi4-2", "retired", "--reason", "x")
    assert p.returncode == 2 and "not a board of lab 'emulated'" in p.stderr and "x86-host" in p.stderr, p.stderr
    # a board taken out of the lab keeps its recorded history, said so
    assert command(env, "set", "rpi4-1", "retired", "--reason", "gone", "--by", "bob").returncode == 0
    (kiln_env["root"] / "bench.yaml").write_text("name: bench\nboards: [{name: rpi4-2, type: rpi4}]\n")
    p = command(env, "show", "rpi4-1")
    assert p.returncode == 0 and "rpi4-1: retired" in p.stdout and "not a board of lab 'bench'" in p.stdout


def test_show_writes_nothing_where_there_is_no_database(kiln_env, tmp_path):
    """show on a new --db path made its folder, the database and its lock file."""
    env = bench_lab(kiln_env)
    db = tmp_path / "new" / "folder" / "health.sqlite"
    p = command(env, "--db", str(db), "show")
    assert p.returncode == 0 and f"no health database at {db}" in p.stdout, p.stdout + p.stderr
    p = command(env, "--db", str(db), "show", "rpi4-1")
    assert p.returncode == 0 and "rpi4-1: unknown" in p.stdout and f"no health database at {db}" in p.stdout
    assert not (tmp_path / "new").exists()
    assert health.state("rpi4-1", db) == "unknown" and health.history("rpi4-1", db=db) == []
    assert health.boards(db) == [] and not (tmp_path / "new").exists()
    # a read of an existing database leaves its folder as it was
    health.set_state("rpi4-1", "good", "ok", db=db)
    before = sorted(p.name for p in db.parent.iterdir())
    assert command(env, "--db", str(db), "show", "rpi4-1").returncode == 0
    assert sorted(p.name for p in db.parent.iterdir()) == before


def test_db_that_is_a_directory_is_one_clear_message(kiln_env, tmp_path):
    """--db <a directory> was sqlite3.OperationalError: unable to open database file."""
    env = bench_lab(kiln_env)
    for args in (["show"], ["set", "rpi4-1", "good", "--reason", "x"]):
        p = command(env, "--db", str(tmp_path), *args)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert f"argument --db: {tmp_path} is a directory; expected the health database file" in p.stderr
    with pytest.raises(health.HealthError, match="is a directory"):
        health.set_state("b1", "good", "x", db=tmp_path)
    with pytest.raises(health.HealthError, match="is a directory"):
        health.state("b1", tmp_path)


# -- the check on a real lab ---------------------------------------------------------------

@pytest.fixture
def lab(kiln_env):
    """The runner bundles in the test's build dir (the repo's, when built, else built now) and
    the lab's instances."""
    from hil.runner.build import build_runner
    from kiln.artifacts import runtime_cache

    for arch in ("x86_64", "aarch64"):
        built = ROOT / "build" / "runner" / arch
        if (built / "runner.json").is_file():
            shutil.copytree(built, runner_dir(arch))
        else:
            build_runner(arch, runner_dir(arch), runtime_cache())
    key = kiln_env["root"] / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (kiln_env["root"] / "known_hosts").write_text("")
    return kiln_env["root"]


def local(name, type_, emulated=False):
    return Instance(name=name, type=type_, transport={"kind": "local"}, emulated=emulated)


def closed_ssh(name):
    return Instance(name=name, type="x86-host", transport={
        "kind": "ssh", "host": "127.0.0.1", "port": closed_port(), "user": "kiln", "key": "id_ed25519",
        "known_hosts": "known_hosts", "retries": 0, "connect_timeout_s": 5})


def test_native_and_emulated_boards_pass_their_check(lab):
    for inst in (local("x86-1", "x86-host"), local("rpi4-1", "rpi4", emulated=True)):
        state, check = health_check.check_board(inst, load_board(inst.type), lab)
        print(f"\n{inst.name}: {check}")
        assert check["passed"] and check["error"] is None and 0 < check["seconds"] < 60
        assert state == "good" == health.state(inst.name)
    assert (lab / "build" / "health" / "x86-host" / "model.so").is_file()
    assert (lab / "build" / "health" / "rpi4" / "model.so").is_file()


def test_broken_board_goes_bad_with_the_step_named_then_recovers(lab):
    x86 = load_board("x86-host")
    state, check = health_check.check_board(closed_ssh("flaky"), x86, lab)
    print(f"\nbroken: {check}")
    assert not check["passed"] and check["error"].startswith("connect: ") and "flaky" in check["error"]
    assert state == "bad" == health.state("flaky")
    assert "check failed: connect: " in health.history("flaky")[-1][2]
    state, check = health_check.check_board(local("flaky", "x86-host"), x86, lab)  # its link fixed
    assert check["passed"] and state == "good"
    assert [s for _, s, _ in health.history("flaky")] == ["bad", "good"]


def test_a_board_in_maintenance_is_not_even_checked(lab):
    health.set_state("bench", "maintenance", "reflowing", by="carol")
    state, check = health_check.check_board(local("bench", "x86-host"), load_board("x86-host"), lab)
    assert (state, check) == ("maintenance", None)
    assert not (lab / "build" / "lab" / "local" / "bench").exists()  # nothing was deployed to it


def test_wrong_output_fails_the_check(lab):
    x86 = load_board("x86-host")
    out = health_check.health_model(x86)
    info = read_json(out / "expected.json")
    info["expected"][1][2] += 0.01  # a fault injected: the "known" answer no longer matches
    write_json(out / "expected.json", info)
    check = health_check.health_check(local("x86-2", "x86-host"), x86, lab)
    assert not check["passed"] and check["error"].startswith("outputs: ") and "sample 1 value 2" in check["error"]



def test_a_second_build_dir_copies_the_health_model_and_a_damaged_copy_is_built_again(tmp_path, monkeypatch):
    """The health model is kept in the machine's runtime cache by its key: another build
    directory copies it instead of compiling (the compiler made to fail shows it is not called);
    a cached library that no longer matches its record is compiled again."""
    x86 = load_board("x86-host")
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "a"))
    first = health_check.health_model(x86)
    real = health_check._compile

    def no_compile(*_a):
        raise AssertionError("compiled although the cache held the model")

    monkeypatch.setattr(health_check, "_compile", no_compile)
    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "b"))
    second = health_check.health_model(x86)
    assert second != first and read_json(second / "expected.json") == read_json(first / "expected.json")
    assert (second / "model.so").read_bytes() == (first / "model.so").read_bytes()
    shared = next((tmp_path / "cache" / "health").iterdir())
    (shared / "model.so").write_bytes(b"damaged")
    calls = []
    monkeypatch.setattr(health_check, "_compile", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "c"))
    third = health_check.health_model(x86)
    assert len(calls) == 1 and read_json(third / "expected.json")["key"] == read_json(first / "expected.json")["key"]

def test_missing_runner_bundle_fails_in_prepare(kiln_env):
    check = health_check.health_check(local("x86-3", "x86-host"), load_board("x86-host"), kiln_env["root"])
    assert not check["passed"] and check["error"].startswith("prepare: runner bundle")
    assert "hil.runner.build" in check["error"]
