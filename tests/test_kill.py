"""kill -9 at each stage of the DAG (passes/pipeline.py's list, whose declared outputs are checked):
nothing looks complete that is not, and the rerun executes
only the killed task and those after it (doit's state is committed per task: kiln/doitdb.py);
an output damaged after it was built is rebuilt (kiln/uptodate.py).

One chain of real `doit deploy:tiny` runs on a fresh build: each run is the rerun after the
previous kill and is itself killed when the next stage starts, so the module costs about one
tiny build. The lab is one local x86-host board (no sshd)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from kiln.artifacts import Layout, sha256_file
from tests.conftest import DOIT, ROOT, TINY, write_project

pytestmark = pytest.mark.slow

BOARD = "x86-host"


def declared(env) -> tuple[Layout, dict[str, tuple[str, list[Path]]]]:
    """The tiny app's layout and stages, in order, as dodo.py declares their tasks
    (passes/pipeline.py): {stage: (its doit task, its outputs)}."""
    from hil.lab import describe
    from kiln.config import load_board, load_project
    from kiln.registry import implementation
    from passes.pipeline import PIPELINE, App

    with pytest.MonkeyPatch.context() as mp:
        for k in ("KILN_LAB", "KILN_PROJECTS", "KILN_BUILD"):
            mp.setenv(k, env[k])
        p, lay, lab = load_project("tiny"), Layout("tiny"), describe(Path(env["KILN_LAB"]))
        root, synthetic = implementation(p.dataset).locate(p.dataset, lay)
        app = App("tiny", p, lay, {BOARD: load_board(BOARD)}, root, synthetic, instances=lab.boards, lab=lab)
        return lay, {s.name: (f"{s.name}:{u.name}", s.outputs(u)) for s in PIPELINE for u in s.units(app)}


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    data = copy.deepcopy(TINY)
    data["tuning"] = {"trials": 8}
    write_project(tmp / "projects", data)
    inv = tmp / "lab.yaml"
    inv.write_text(yaml.safe_dump({"name": "desk", "boards": [
        {"name": BOARD, "type": BOARD, "transport": {"kind": "local"}}]}))
    env = dict(os.environ, KILN_LAB=str(inv), KILN_PROJECTS=str(tmp / "projects"), KILN_BUILD=str(tmp / "build"),
               PYTHONUNBUFFERED="1")  # doit's ". task" lines arrive as it prints them
    lay, stages = declared(env)
    task = {s: t for s, (t, _) in stages.items()}
    assert list(stages)[0] == "synth" and list(stages)[-1] == "deploy" and task["hil"] == f"hil:tiny@{BOARD}", stages
    return {"env": env, "build": tmp / "build", "layout": lay, "stages": list(stages), "task": task,
            "outputs": {s: out for s, (_, out) in stages.items()}}


class Run:
    """One `doit deploy:tiny`: what it executed (". name") and found up to date ("-- name")."""

    def __init__(self, lines, rc, killed_at):
        self.lines, self.rc, self.killed_at = lines, rc, killed_at
        self.text = "".join(lines)
        self.executed = [ln[3:].strip() for ln in lines if ln.startswith(".  ")]
        self.uptodate = [ln[3:].strip() for ln in lines if ln.startswith("-- ")]


def deploy(env, kill_at=None, timeout=900):
    """Run `doit deploy:tiny` (from the repo root, where doit reads pyproject.toml); with
    ``kill_at``, SIGKILL its whole process group the moment doit starts that task."""
    p = subprocess.Popen([*DOIT, "deploy:tiny"], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, start_new_session=True)
    watchdog = threading.Timer(timeout, lambda: os.killpg(p.pid, signal.SIGKILL))
    watchdog.start()
    lines, killed = [], None
    try:
        for line in p.stdout:
            lines.append(line)
            if kill_at and line.startswith(f".  {kill_at}"):
                os.killpg(p.pid, signal.SIGKILL)
                killed = kill_at
                break
        p.stdout.close()
        rc = p.wait()
    finally:
        watchdog.cancel()
    for _ in range(50):  # nothing of the group outlives the kill
        try:
            os.killpg(p.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"processes of the killed doit (group {p.pid}) are still running")
    return Run(lines, rc, killed)


def nothing_looks_complete_that_is_not(proj, killed_stage, done_stages):
    """After a kill at the start of ``killed_stage``: none of its outputs (nor a later stage's)
    exists; every finished stage's outputs exist and match the hashes their records hold; every
    JSON file the build has parses (a torn file would not)."""
    build, lay, outputs, stages = proj["build"], proj["layout"], proj["outputs"], proj["stages"]
    later = stages[stages.index(killed_stage):]
    for s in later:
        present = [str(p) for p in outputs[s] if p.exists()]
        assert not present, f"killed at the start of {killed_stage}: {s} outputs exist: {present}"
    for s in done_stages:
        missing = [str(p) for p in outputs[s] if not p.exists()]
        assert not missing, f"{s} finished but its outputs are missing: {missing}"
    for f in build.rglob("*.json"):
        if f.name.startswith("."):
            continue
        if f.name.startswith("database_"):  # MetaSchedule's databases: one JSON a line
            assert all(json.loads(line) for line in f.read_text().splitlines()), f
        elif "logs" not in f.parts:
            json.loads(f.read_text())
    if "data" in done_stages:
        rec = json.loads(lay.data_json.read_text())
        assert all(sha256_file(lay.data / n) == h for n, h in rec["files"].items())
    if "export" in done_stages:
        assert sha256_file(lay.onnx) == json.loads(lay.export_json.read_text())["sha256"]


def test_kill_at_each_stage_then_the_rerun_executes_only_what_was_left(proj):
    env, stages, task = proj["env"], proj["stages"], proj["task"]
    finished: list[str] = []  # tasks that completed in the killed runs so far
    prev = None  # the stage killed by the previous run
    for stage in [*stages, None]:
        run = deploy(env, kill_at=task[stage] if stage else None)
        if prev is not None:
            # the rerun after the kill at `prev`: nothing that had finished runs again, and
            # the killed task runs first of the pipeline's stages
            again = sorted(set(run.executed) & set(finished))
            assert not again, f"killed at {prev}; the rerun executed again {again}\n{run.text}"
            assert [t for t in run.executed if t in task.values()][:1] == [task[prev]], run.text
            assert set(finished) <= set(run.uptodate), run.text
        if stage is None:
            assert run.rc == 0, run.text
            break
        assert run.killed_at == task[stage], f"{task[stage]} never started:\n{run.text}"
        finished += run.executed[:-1]  # all but the killed one completed
        nothing_looks_complete_that_is_not(proj, stage, stages[: stages.index(stage)])
        prev = stage
    report = json.loads(proj["outputs"]["deploy"][0].read_text())
    assert report["passed"], report
    # a no-op: everything up to date
    run = deploy(env)
    assert run.rc == 0 and not run.executed, run.text


@pytest.mark.parametrize("stage, victim", [
    ("compile", lambda lay: lay.library(BOARD)), ("data", lambda lay: lay.split("train")),
    ("export", lambda lay: lay.onnx), ("compile", lambda lay: lay.compile_json(BOARD)),
    ("train", lambda lay: lay.model_pt), ("compress", lambda lay: lay.compressed_pt)],
    ids=["model.so", "train.npz", "model.onnx", "compile.json", "model.pt", "compressed.pt"])
def test_a_damaged_output_is_rebuilt_by_its_task_alone(proj, stage, victim):
    """doit only checks that targets exist: a truncated kernel library made every deploy fail
    on the board until `doit forget`. An output that no longer matches the sha256 in its
    record (or a damaged record) makes its task rerun, and only the tasks whose inputs then
    change run after it."""
    env, lay, stages, task = proj["env"], proj["layout"], proj["stages"], proj["task"]
    if not lay.report.exists():  # run alone: the build first
        assert deploy(env).rc == 0
    path = victim(lay)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    run = deploy(env)
    assert run.rc == 0, run.text
    assert task[stage] in run.executed, run.text
    before = stages[: stages.index(stage)]
    assert not [t for t in run.executed if t in {task[s] for s in before}], run.text
    if path.suffix == ".pt":  # torch.save names its zip's records after the (temporary) file: not byte-equal
        rec, key = (lay.metrics, "model_sha256") if stage == "train" else (lay.compress_json, "compressed_sha256")
        assert len(path.read_bytes()) == len(data) and sha256_file(path) == json.loads(rec.read_text())[key]
    elif path.suffix != ".json":  # a record also holds timings
        assert path.read_bytes() == data  # rebuilt as it was (these stages are deterministic)
    assert f"{path}" in run.text and "rebuilding" in run.text  # the log says why
    run = deploy(env)
    assert run.rc == 0 and not run.executed, run.text


def test_each_saved_task_is_in_the_file_at_once_and_a_checker_never_writes_back_a_stale_copy(tmp_path):
    """Two doit processes in one checkout share build/.doit.db: what one saves the other reads
    at once (not when the first exits), and the verified-outputs cache a process adds to a task
    it only checked goes over the row as it is now, not over that process's old copy."""
    from doit.dependency import JSONCodec

    from kiln.doitdb import DurableSqliteDB

    path = str(tmp_path / ".doit.db")
    a, b = DurableSqliteDB(path, JSONCodec()), DurableSqliteDB(path, JSONCodec())
    a.set("data:x", "_values_:", {"_config_changed": "1"})
    assert not b.in_("data:x")  # a task's entries are saved one by one: not yet complete
    a.set("data:x", "deps:", ["in.txt"])  # ... 'deps:' last: the task is saved
    assert b.get("data:x", "deps:") == ["in.txt"]
    a.remove("data:x")
    assert not DurableSqliteDB(path, JSONCodec()).in_("data:x")

    a.set("t", "_values_:", {"v": "old"})
    a.set("t", "deps:", [])
    assert b.get("t", "_values_:") == {"v": "old"}  # b now holds a copy of t
    a.set("t", "_values_:", {"v": "new"})
    a.set("t", "deps:", [])  # a runs t again
    b.merge_values("t", {"_verified:r.json": {"f": [1, 2]}})
    b.dump()  # b exits
    c = DurableSqliteDB(path, JSONCodec())
    assert c.get("t", "_values_:") == {"v": "new", "_verified:r.json": {"f": [1, 2]}}


def test_ctrl_c_between_two_tasks_is_one_line_and_exit_130(tmp_path):
    """SIGINT (a terminal's Ctrl-C: to doit's whole process group) while doit is between two
    tasks -- here frozen right after it reported one up to date, in its own reporter and
    up-to-date checks -- ends the run with ``kiln: interrupted; rerun to go on`` and exit 130,
    no traceback (before: doit's KeyboardInterrupt traceback, exit 1); the rerun goes on."""
    for app in ("tiny", "tiny2"):
        write_project(tmp_path / "projects", {**copy.deepcopy(TINY), "name": app})
    inv = tmp_path / "lab.yaml"
    inv.write_text(yaml.safe_dump({"boards": [{"name": BOARD, "type": BOARD, "transport": {"kind": "local"}}]}))
    env = dict(os.environ, KILN_LAB=str(inv), KILN_PROJECTS=str(tmp_path / "projects"),
               KILN_BUILD=str(tmp_path / "build"), PYTHONUNBUFFERED="1")
    argv = [*DOIT, "data:tiny", "data:tiny2"]
    assert subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    for _ in range(3):  # it may finish before the signal lands: then once more
        p = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        out = []
        for line in p.stdout:
            out.append(line)
            if line.startswith("-- "):  # doit's own code now: no action runs in an up-to-date run
                os.killpg(p.pid, signal.SIGSTOP)
                os.killpg(p.pid, signal.SIGINT)
                os.killpg(p.pid, signal.SIGCONT)
                break
        out += p.stdout.readlines()
        rc, text = p.wait(timeout=60), "".join(out)
        if rc != 0:
            break
    assert rc == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.rstrip().splitlines()[-1] == "kiln: interrupted; rerun to go on"
    again = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "-- data:tiny2" in again.stdout, again.stdout + again.stderr
