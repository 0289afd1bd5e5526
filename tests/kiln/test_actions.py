"""kiln.actions' per-task lock: two doit processes in one build never run one task at once, and
the one that finds the other made the task's outputs since it started takes them."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from kiln import actions


@pytest.fixture
def build(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_BUILD", str(tmp_path / "build"))
    return tmp_path / "build"


def task(name, *targets):
    return SimpleNamespace(name=name, targets=[str(t) for t in targets])


def test_outputs_from_before_this_process_started_are_made_again(build, monkeypatch, tmp_path):
    out = tmp_path / "model.pt"
    out.write_bytes(b"old")
    monkeypatch.setattr(actions, "_STARTED", time.time() + 5)  # started after the file was written
    with actions._one_at_a_time(task("train:app", out)) as done:
        assert done is False


def test_outputs_another_process_made_since_this_one_started_are_taken(build, monkeypatch, tmp_path):
    a, b = tmp_path / "model.pt", tmp_path / "metrics.json"
    monkeypatch.setattr(actions, "_STARTED", time.time() - 5)
    a.write_bytes(b"new")
    with actions._one_at_a_time(task("train:app", a, b)) as done:
        assert done is False  # one of its targets is missing: not made elsewhere
    b.write_text("{}")
    with actions._one_at_a_time(task("train:app", a, b)) as done:
        assert done is True
    # through doit's action: the taken task's entry point is not called (os.remove would delete a)
    assert actions.run("os:remove", str(a), task=task("train:app", a, b)) is True
    assert a.exists()
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    assert actions.run("os:remove", str(victim), task=task("train:other", tmp_path / "absent")) is True
    assert not victim.exists()  # not made elsewhere: run
    with actions._one_at_a_time(task("hil:app@board", a)) as done:  # a measurement: always run
        assert done is False
    with actions._one_at_a_time(task("nightly")) as done:  # no targets: never serialized
        assert done is False


def test_a_second_process_waits_for_the_one_holding_the_task(build, tmp_path):
    lock = build / ".locks" / "compile:app@x86-host.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
        "sys.stdin.readline()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        entered = threading.Event()

        def take():
            with actions._one_at_a_time(task("compile:app@x86-host", tmp_path / "model.so")):
                entered.set()

        t = threading.Thread(target=take)
        t.start()
        assert not entered.wait(1.0), "took the task while another process held it"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert entered.wait(10.0), "still waiting after the other process let go"
        t.join(5)
    finally:
        holder.kill()
        holder.wait()
    with open(lock, "a") as f:  # and it let go itself
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert not os.path.exists(tmp_path / "model.so")


@pytest.mark.parametrize("argv, expect", [
    (["forget"], ("forget", [], set())),
    (["-f", "dodo.py", "-d", "/repo", "forget"], ("forget", [], {"-f", "-d"})),  # how tests and nightly call doit
    (["-f", "dodo.py", "deploy:a", "boards=x"], ("run", ["deploy:a"], {"-f"})),
    (["boards=x", "run", "deploy:a"], ("run", ["deploy:a"], set())),
    (["-n", "2", "-P", "thread", "hil:a@b"], ("run", ["hil:a@b"], {"-n", "-P"})),  # run's -n takes a value
    (["clean", "-n", "--db-file", "x.db", "train:a"], ("clean", ["train:a"], {"-n", "--db-file"})),  # clean's -n not
    (["list", "--all"], ("list", [], {"--all"})),
])
def test_command_line_is_read_as_doit_reads_it(argv, expect):
    from kiln.actions import command_line

    assert command_line(argv) == expect


def test_refused_command_line_names_apps_and_reasons():
    from kiln.actions import refused_command_line

    stages = ("data", "deploy", "hil")
    apps, broken = {"a": object()}, {"b": "projects/b/project.yaml: field 'name': ..."}
    assert refused_command_line(["deploy:a"], apps, broken, stages) is None
    assert refused_command_line(["deploy:b"], apps, broken, stages, {"deploy:b"}) is None  # a task it has
    assert refused_command_line(["data:b"], apps, broken, stages) == f"data:b: app 'b' is skipped: {broken['b']}"
    assert refused_command_line(["hil:c@x"], apps, broken, stages, where="projects") == \
        "hil:c@x: no app 'c' in projects (apps: a, b (skipped))"
    assert refused_command_line(["lab_up", "schema"], apps, broken, stages) is None
    assert "name the task(s) to forget" in refused_command_line(["forget"], apps, broken, stages)
    assert refused_command_line(["forget", "-a"], apps, broken, stages) is None
    assert "name the task(s) to clean" in refused_command_line(["clean", "-n"], apps, broken, stages)
    assert refused_command_line(["clean", "--clean-all"], apps, broken, stages) is None
