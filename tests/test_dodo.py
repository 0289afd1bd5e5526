"""The task list itself (`doit list`, no torch or TVM): bad pass settings are refused before
any task runs, naming the manifest and the field; the board choice applies to the app being
deployed; source dependencies follow what each task runs."""

from __future__ import annotations

import copy
import os

import pytest

from tests.conftest import TINY, run_doit, write_project


@pytest.fixture
def env(kiln_env):
    return dict(os.environ, KILN_PROJECTS=str(kiln_env["projects"]), KILN_BUILD=str(kiln_env["build"]))


@pytest.mark.parametrize("step, field, expect", [
    ({"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": -7}},
     "compression.passes.1.prune.finetune_epochs", "greater than or equal to 0 (got -7)"),
    ({"prune": {"method": "structured", "amount": "half"}}, "compression.passes.1.prune.amount", "valid number"),
    ({"weight_coding": {"bits": 9}}, "compression.passes.1.weight_coding.bits", "less than or equal to 8 (got 9)"),
    ({"quantize": {"percentile": "high"}}, "compression.passes.1.quantize.percentile", "valid number"),
    ({"quantise": {}}, "compression.passes.1", "expected one compression pass name mapped to its settings"),
])
def test_doit_list_refuses_bad_pass_settings(kiln_env, env, step, field, expect):
    data = copy.deepcopy(TINY)
    data["compression"] = {"passes": [{"quantize": {"mode": "int8"}}, step]}
    manifest = write_project(kiln_env["projects"], data)
    p = run_doit(env, "list")  # the app is skipped with the reason (other apps would still be listed)
    assert "app 'tiny' skipped" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert str(manifest) in p.stderr and f"field '{field}'" in p.stderr and expect in p.stderr, p.stderr
    p = run_doit(env, "deploy:tiny")  # and nothing of it runs
    assert p.returncode != 0 and f"field '{field}'" in p.stdout + p.stderr and ".  train:tiny" not in p.stdout


def test_board_choice_applies_to_the_app_being_deployed(kiln_env, env):
    two = copy.deepcopy(TINY)
    two["targets"] = ["x86-host", "rpi4"]
    write_project(kiln_env["projects"], two)
    other = dict(copy.deepcopy(TINY), name="other")  # targets x86-host only
    write_project(kiln_env["projects"], other)
    listed = run_doit(env, "list", "--all", "boards=rpi4")
    assert listed.returncode == 0, listed.stderr
    assert "hil:tiny@rpi4" in listed.stdout and "hil:tiny@x86-host" not in listed.stdout
    # the other app does not target rpi4: listing still works, its deploy names its boards
    refused = run_doit(env, "deploy:other", "boards=rpi4")
    assert refused.returncode != 0 and "Traceback" not in refused.stdout + refused.stderr
    assert "rpi4 is not a board of app 'other' (its boards: x86-host)" in refused.stdout + refused.stderr
    # the environment variable is the default, the command line wins
    e = dict(env, KILN_BOARDS="x86-host")
    assert "hil:tiny@rpi4" not in run_doit(e, "list", "--all").stdout
    assert "hil:tiny@rpi4" in run_doit(e, "list", "--all", "boards=rpi4").stdout


def test_source_dependencies_follow_what_each_task_runs(kiln_env, env):
    data = copy.deepcopy(TINY)
    data["compression"] = {"passes": [{"prune": {"method": "structured", "amount": 0.5}}]}
    write_project(kiln_env["projects"], data)
    p = run_doit(env, "info", "compress:tiny")  # (exits 1: the task is not up to date)
    assert "file_dep" in p.stdout, p.stdout + p.stderr
    assert "passes/prune.py" in p.stdout and "passes/quantize.py" not in p.stdout  # only the listed passes
    p = run_doit(env, "info", "hil:tiny@x86-host")
    assert "hil/transport/ssh.py" in p.stdout and "hil/protocol.py" in p.stdout and "hil/transport/__init__.py" in p.stdout
    assert "hil/transport/serial.py" not in p.stdout  # x86-host is an SSH board


def test_a_broken_app_stops_only_itself(kiln_env, env):
    write_project(kiln_env["projects"], copy.deepcopy(TINY))
    broken = dict(copy.deepcopy(TINY), name="broken")
    path = write_project(kiln_env["projects"], broken)
    (kiln_env["projects"] / "broken").rename(kiln_env["projects"] / "renamed")  # folder differs from name:
    listed = run_doit(env, "list", "--all")
    assert listed.returncode == 0, listed.stderr
    assert "deploy:tiny" in listed.stdout and "train:tiny" in listed.stdout
    assert "app 'renamed' skipped" in listed.stderr and "field 'name' is 'broken', expected 'renamed'" in listed.stderr
    p = run_doit(env, "deploy:renamed")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "expected 'renamed'" in out and "Traceback" not in out
    assert str(path.parent.parent / "renamed" / "project.yaml") in out


@pytest.mark.parametrize("dataset", [{"format": "digits", "path": "EMPTY"},
                                     {"format": "gtsrb", "path": "EMPTY", "synthetic": None}])
def test_a_dataset_path_with_no_data_names_the_manifest_and_field(kiln_env, env, dataset):
    empty = kiln_env["root"] / "empty"
    empty.mkdir()
    data = copy.deepcopy(TINY)
    data["dataset"] = dict(dataset, path=str(empty))
    manifest = write_project(kiln_env["projects"], data)
    for cmd in (["list"], ["deploy:tiny"]):
        p = run_doit(env, *cmd)
        out = p.stdout + p.stderr
        assert "Traceback" not in out and str(manifest) in out and "field 'dataset.path'" in out, out
        assert str(empty) in out
    assert run_doit(env, "deploy:tiny").returncode != 0
    p = run_doit(env, "check_targets")  # listed with every other problem
    assert p.returncode != 0 and f"PROBLEM  {manifest}: field 'dataset.path'" in p.stdout, p.stdout


def test_build_dir_that_is_a_file_is_one_clear_message(kiln_env, env):
    f = kiln_env["root"] / "not-a-dir"
    f.write_text("x")
    p = run_doit(dict(env, KILN_BUILD=str(f)), "list")
    assert p.returncode != 0 and "Traceback" not in p.stderr and f"KILN_BUILD={f}" in p.stderr, p.stderr


def test_lab_up_and_down_exit_zero_and_leave_nothing(kiln_env, env):
    """`doit lab_up` used to start the lab and exit 2 (its action returned a path)."""
    import uuid

    import psutil
    import yaml

    tag = uuid.uuid4().hex[:6]  # namespaces are named after boards, machine-wide: no collision
    lab = kiln_env["root"] / "lab.yaml"
    lab.write_text(yaml.safe_dump({"backend": "emulated", "name": "mini", "boards": [
        {"name": f"up{tag}", "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    e = dict(env, KILN_LAB=str(lab))
    up = run_doit(e, "lab_up")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        inv = yaml.safe_load((kiln_env["build"] / "lab" / "inventory.yaml").read_text())
        assert inv["boards"][0]["name"] == f"up{tag}" and inv["boards"][0]["transport"]["host"]
        again = run_doit(e, "lab_up")
        assert again.returncode == 0 and f"-- lab_up" in again.stdout  # up to date: already held by hand
    finally:
        down = run_doit(e, "lab_down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not any(str(kiln_env["build"]) in " ".join(p.info["cmdline"] or []) for p in
                   psutil.process_iter(["cmdline"]))
    static = kiln_env["root"] / "static.yaml"
    static.write_text(yaml.safe_dump({"boards": [{"name": "b", "type": "x86-host"}]}))
    refused = run_doit(dict(env, KILN_LAB=str(static)), "lab_up")
    assert refused.returncode != 0 and "not the emulated one" in refused.stdout + refused.stderr


def test_kiln_lab_that_is_not_a_file_is_one_clear_line(kiln_env, env):
    """KILN_LAB=<a directory> was an IsADirectoryError traceback from dodo.py."""
    for lab, what in ((kiln_env["root"], "is a directory"), (kiln_env["root"] / "nope.yaml", "no such file")):
        p = run_doit(dict(env, KILN_LAB=str(lab)), "list")
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip() == p.stderr.strip().splitlines()[0], p.stderr  # one line
        assert f"KILN_LAB={lab}: {what}; expected a lab inventory YAML file" in p.stderr, p.stderr


def test_a_board_choice_from_kiln_boards_names_the_variable(kiln_env, env):
    """An error about boards that came from $KILN_BOARDS said boards=."""
    write_project(kiln_env["projects"], copy.deepcopy(TINY))
    p = run_doit(dict(env, KILN_BOARDS="rpi4"), "deploy:tiny")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "KILN_BOARDS=rpi4: rpi4 is not a board of app 'tiny' (its boards: x86-host)" in out, out
    p = run_doit(dict(env, KILN_BOARDS="x86-host"), "deploy:tiny", "boards=rpi4")  # the command line wins
    assert "boards=rpi4: rpi4 is not a board of app 'tiny'" in p.stdout + p.stderr and "KILN_BOARDS=" not in p.stdout + p.stderr


def test_a_task_of_an_unknown_or_skipped_app_says_why(kiln_env, env):
    """doit answered both with its generic 'Invalid parameter ... Must be a command, task, or a target'."""
    write_project(kiln_env["projects"], copy.deepcopy(TINY))
    write_project(kiln_env["projects"], dict(copy.deepcopy(TINY), name="broken"))
    (kiln_env["projects"] / "broken").rename(kiln_env["projects"] / "renamed")  # folder differs from name
    for args in (["deploy:tinny"], ["hil:tinny@x86-host"], ["info", "train:tinny"]):
        p = run_doit(env, *args)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and "Invalid parameter" not in out and "Traceback" not in out, out
        assert f"no app 'tinny' in {kiln_env['projects']} (apps: renamed (skipped), tiny)" in out, out
    for args in (["data:renamed"], ["compile:renamed@x86-host"]):
        p = run_doit(env, *args)
        out = p.stdout + p.stderr
        assert p.returncode != 0 and "Invalid parameter" not in out, out
        assert f"{args[0]}: app 'renamed' is skipped: " in out and "field 'name' is 'broken', expected 'renamed'" in out
    assert run_doit(env, "info", "data:tiny").returncode in (0, 1)  # a real task is doit's (1: not up to date)
    assert "no app" not in run_doit(env, "info", "data:tiny").stderr


def test_forget_and_clean_without_a_task_say_so(kiln_env, env):
    """`doit forget` and `doit clean` with no task name did nothing and said nothing (exit 0)."""
    write_project(kiln_env["projects"], copy.deepcopy(TINY))
    for cmd, flag in (("forget", "--all"), ("clean", "--clean-all")):
        p = run_doit(env, cmd)
        assert p.returncode != 0 and f"doit {cmd}: name the task(s) to {cmd}" in p.stderr and flag in p.stderr, p.stderr
    p = run_doit(env, "forget", "train:tiny")
    assert p.returncode == 0 and "forgetting train:tiny" in p.stdout, p.stdout + p.stderr
    p = run_doit(env, "forget", "--all")
    assert p.returncode == 0 and "forgetting all tasks" in p.stdout, p.stdout + p.stderr
