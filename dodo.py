"""Kiln's build DAG, top to bottom: data -> train -> compress -> export -> tune -> compile per
board type -> deploy to the lab's board instances and validate. `doit list` shows every task;
`doit deploy:traffic_signs` runs one app end to end. Each task reruns only when its inputs, the
source files it runs or its own slice of the manifest change.

This file holds task dicts only. It imports neither torch nor TVM: each action is a
"module:function" that kiln.actions imports when the task runs, called with loaded objects. The
stages of an app (synth, data, train, compress, export, tune, compile, hil, deploy) are the
list in passes/pipeline.py: one task_<stage> is made from each entry, below.
"""

import logging
import os
import sys

from doit import get_var
from doit.tools import config_changed


def _this_checkout() -> None:
    """Kiln's code must come from the checkout whose dodo.py this is. The venv of one checkout run
    in another (a second clone, a worktree) has its editable install's ``kiln`` already imported
    (doit loads kiln.doitdb, its state backend, before this file), and every path resolves from
    it: that checkout's code, projects and boards. Start doit again with this checkout first on
    the path (``-P``: not the working directory); if its code still comes from elsewhere, refuse
    naming both."""
    here = os.path.dirname(os.path.realpath(__file__))
    away = {}
    for pkg in ("kiln", "hil", "passes"):
        f = getattr(sys.modules.get(pkg), "__file__", None)
        if f and os.path.dirname(os.path.dirname(os.path.realpath(f))) != here:
            away[pkg] = os.path.dirname(os.path.dirname(os.path.realpath(f)))
    if not away:
        return
    if os.environ.get("KILN_CHECKOUT") != here:
        os.environ["KILN_CHECKOUT"] = here
        os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-P", "-m", "doit", *sys.argv[1:]])
    sys.exit(f"kiln: this build's dodo.py is in {here}, but its code ({', '.join(away)}) comes from "
             f"{next(iter(away.values()))} (that checkout's editable install); run {here}'s own venv, "
             f"or set PYTHONPATH={here}")


_this_checkout()

from hil.lab import choose, compile_only, describe, runnable
from hil.rpc import RpcLab
from kiln import sources
from kiln.artifacts import Layout, build_root, new_run_id, runner_file, runner_json
from kiln.config import board_names, lab_file, load_board, load_project, project_names, project_path, projects_dir
from kiln.errors import KilnError, ManifestError
from kiln.registry import implementation
from kiln.actions import call, fail, refused_command_line, run
from kiln.uptodate import matches_record
from passes.pipeline import PIPELINE, STAGES, App, Stage, Unit

try:
    build_root().mkdir(parents=True, exist_ok=True)
except OSError as e:
    sys.exit(f"kiln: KILN_BUILD={build_root()}: cannot use it as the build directory ({e})")
DOIT_CONFIG = {
    "backend": "sqlite3",  # Kiln's, which commits each finished task (pyproject.toml, kiln/doitdb.py)
    "default_tasks": [],
    "dep_file": str(build_root() / ".doit.db"),
    "verbosity": 2,
    "action_string_formatting": "new",
    "forget_disable_default": True,  # doit forget with no task says so (the command line is checked below too)
}
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


def _interrupted(signum, frame):
    """Ctrl-C. Inside a task's action: KeyboardInterrupt, which kiln.actions turns into one line
    and exit 130. Anywhere else (doit between two tasks: its up-to-date checks, its reporter,
    its dependency file) doit would let it through as a traceback: one line and exit 130 here,
    as SystemExit, which doit's runner lets pass after saving the tasks done and running the
    teardowns (its ``finally``)."""
    import kiln.actions

    f = frame
    while f is not None:
        if f.f_code.co_filename == kiln.actions.__file__ and f.f_code.co_name in ("run", "call"):
            raise KeyboardInterrupt
        f = f.f_back
    print("kiln: interrupted; rerun to go on", file=sys.__stderr__, flush=True)
    raise SystemExit(kiln.actions.INTERRUPTED)


if os.path.basename(sys.argv[0]) == "doit" or os.path.basename(os.path.dirname(sys.argv[0])) == "doit":
    import signal

    signal.signal(signal.SIGINT, _interrupted)  # doit's own process only (not a test importing dodo)
logging.getLogger("paramiko").setLevel(logging.WARNING)

try:
    LAB_FILE = lab_file()  # $KILN_LAB, else the emulated lab
except KilnError as e:
    sys.exit(f"kiln: {e}")
RUN_ID = new_run_id()  # one per doit invocation: where this run's per-board records go
# boards=a,b on the command line (doit's own variables), else $KILN_BOARDS: narrows the deploy of
# the app being run to those of its instances; checked per app, when its tasks run
BOARDS_CHOSEN = [b.strip() for b in get_var("boards", os.environ.get("KILN_BOARDS", "")).split(",") if b.strip()]
BOARDS_FROM = "boards" if get_var("boards") is not None else "KILN_BOARDS"  # what an error names

try:  # a bad board file or lab inventory stops everything: every app shares them
    BOARDS = {name: load_board(name) for name in board_names()}
    LAB = describe(LAB_FILE)
except KilnError as e:
    if not any(a.startswith("check_targets") for a in sys.argv[1:]):
        sys.exit(f"kiln: {e}\n(`doit check_targets` lists every problem in the board files, lab and manifests)")
    BOARDS, LAB = {}, None  # check_targets reports every problem itself


def load_app(app):
    """(project, (dataset root, is_synthetic), the lab instances it can run on): everything the
    app's tasks need, checked before any task is made. The data set is located, not read."""
    p = load_project(app)
    try:
        data = implementation(p.dataset).locate(p.dataset, Layout(app))
    except ManifestError as e:
        raise ManifestError(f"{project_path(app)}: {e}") from e
    return p, data, runnable(p, LAB, BOARDS)


# a broken manifest (or data set, or a target the lab lacks) takes out only its own app: the
# others are listed and run; the broken app's deploy task fails with the reason
APPS, DATA, RUNNABLE, BROKEN = {}, {}, {}, {}
for _app in project_names() if LAB is not None else ():
    try:
        APPS[_app], DATA[_app], RUNNABLE[_app] = load_app(_app)
    except KilnError as e:
        BROKEN[_app] = str(e)
if BROKEN and not any(a.startswith("check_targets") for a in sys.argv[1:]):
    for _app, _why in BROKEN.items():
        print(f"kiln: app '{_app}' skipped: {_why}", file=sys.stderr)
# tasks of an app that is not there or was skipped, and forget/clean with no task: doit's own
# answers say nothing useful (kiln.actions.refused_command_line)
if LAB is not None and (_refused := refused_command_line(sys.argv[1:], APPS, BROKEN, STAGES,
                                                         {f"deploy:{a}" for a in BROKEN}, projects_dir())):
    sys.exit(f"kiln: {_refused}")


def instances(app):
    """(the app's lab instances after the board choice, the reason the choice is refused or None)."""
    try:
        return choose(APPS[app], RUNNABLE[app], BOARDS_CHOSEN, given=BOARDS_FROM), None
    except ManifestError as e:
        return [], str(e)


MEASURING_LAB = RpcLab(LAB_FILE)  # where tuning.measure: rpc times candidates (kiln.measure.MeasuringLab)


def loaded(app) -> App:
    """What the stages of an app are declared from: its loaded objects (passes/pipeline.py)."""
    (root, synthetic), (chosen, refused) = DATA[app], instances(app)
    return App(app, APPS[app], Layout(app), BOARDS, root, synthetic, chosen, refused, compile_only(APPS[app], BOARDS),
               LAB, LAB_FILE, RUN_ID, MEASURING_LAB)


def stale_report(layout):
    """First action of every task that changes what an app's last report describes: remove it,
    so that a build that fails or is killed never leaves a report that says passed. (Each run's
    own report stays under runs/<run id>/.)"""
    layout.report.unlink(missing_ok=True)


def task_check_targets():
    """Validate every board type (targets/*.yaml), the lab inventory and every manifest."""
    return {"actions": [(run, ["hil.check:check_targets", LAB_FILE])], "uptodate": [False], "verbosity": 2}


def task_lab_up():
    """Start the emulated lab (sshd and serial boards), or the multi-host labgrid lab when $KILN_LAB
    names one with ``emulate``, and keep it up; deploys start it on demand anyway."""
    from hil.emulator import lab as emulated_lab

    if LAB is not None and LAB.backend == "labgrid" and getattr(LAB, "emulate", None):
        return {"actions": [(run, ["hil.emulator.multihost:up", None, LAB_FILE])], "uptodate": [False],
                "verbosity": 2}
    if LAB is not None and LAB.backend != "emulated":
        return {"actions": [(fail, [f"{LAB_FILE}: lab '{LAB.name}' is a {LAB.backend} lab, not the emulated one "
                                    "(nor a labgrid lab with 'emulate'): nothing to start"])], "uptodate": [False]}
    return {"actions": [(run, ["hil.emulator.lab:up", LAB_FILE])], "uptodate": [emulated_lab.held_by_hand],
            "verbosity": 2}


def task_lab_down():
    """Stop the emulated lab's boards (the multi-host lab too, when $KILN_LAB names it)."""
    if LAB is not None and LAB.backend == "labgrid" and getattr(LAB, "emulate", None):
        return {"actions": [(run, ["hil.emulator.multihost:down"])], "uptodate": [False]}
    return {"actions": [(run, ["hil.emulator.lab:down"])], "uptodate": [False]}


def task_schema():
    """Export JSON Schemas of manifests, board files and lab inventories (build/schema/) for editors."""
    out = build_root() / "schema"
    return {"actions": [(run, ["kiln.actions:export_schemas", out])], "file_dep": sources.files("kiln.schema"),
            "targets": [str(out / f"{n}.schema.json") for n in ("project", "board", "lab")]}


def task_runner():
    """Build the on-board C++ runner (+ TVM runtime libraries) for each board architecture."""
    for arch in sorted({b.arch for b in BOARDS.values()}):
        yield {"name": arch, "doc": f"runner bundle for {arch} boards", "actions": [(run, ["hil.runner.build:bundle", arch])],
               "file_dep": sources.files("hil.runner.build"),
               "targets": [str(runner_file(arch)), str(runner_json(arch))],
               "uptodate": [matches_record(runner_json(arch), listed="files")]}


def stage_task(stage: Stage, u: Unit) -> dict:
    """The doit task of one stage for one app (board type, lab instance), as the stage declares it."""
    try:
        action = (run, [stage.entry_for(u), *stage.args(u)])
    except KilnError as e:  # e.g. a bad $KILN_TUNE_MEASURE: the task fails with it when it runs
        action = (fail, [f"{type(e).__name__}: {e}"])
    before = [(call, [stage.before[0], *stage.before[1](u)])] if stage.before else []
    task = {"name": u.name, "doc": stage.subdoc(u), "actions": [(stale_report, [u.lay]), *before, action]}
    if deps := stage.task_dep(u):
        task["task_dep"] = deps
    task["file_dep"] = [*map(str, stage.inputs(u)), *sources.files(stage.entry_for(u).split(":")[0], *stage.uses(u))]
    task["targets"] = [str(t) for t in stage.outputs(u)]
    task["uptodate"] = [*([config_changed(stage.config(u))] if stage.config else []), *stage.checks(u)]
    if stage.teardown:
        task["teardown"] = [(run, [t]) for t in stage.teardown]
    return task


def stage_tasks(stage: Stage):
    """task_<stage>: the stage's task for each app (board type, lab instance). The goal stage
    (deploy) also lists each app that was skipped or whose board choice is refused, failing with
    the reason if it is run."""

    def tasks():
        if stage.goal:
            for app, why in BROKEN.items():
                yield {"name": app, "doc": f"{stage.name} {app} (cannot: see below)", "actions": [(fail, [why])],
                       "uptodate": [False]}
        for app in APPS:
            a = loaded(app)
            if stage.goal and a.refused:  # listed as usual; fails, naming the app's boards, only if it is run
                yield {"name": app, "doc": f"{stage.name} {app} ({a.refused})", "actions": [(fail, [a.refused])],
                       "uptodate": [False]}
                continue
            yield from (stage_task(stage, u) for u in stage.units(a))

    tasks.__name__ = tasks.__qualname__ = f"task_{stage.name}"
    tasks.__doc__ = stage.doc
    return tasks


# task_synth, task_data, ... task_deploy: one per stage of passes/pipeline.py, in its order
globals().update({f"task_{_stage.name}": stage_tasks(_stage) for _stage in PIPELINE})


def task_nightly():
    """Every app on every lab board whose type it targets, boards in parallel: health, leases, retries, history, reports."""
    apps = dict(APPS)  # a broken manifest is listed by doit list; boards=a,b narrows the lab, not the apps
    builds = [f"compile:{app}@{t}" for app, p in apps.items() for t in p.targets]
    busy = get_var("busy", os.environ.get("KILN_NIGHTLY_BUSY", "wait"))
    return {"actions": [(run, ["hil.nightly:task_action", apps, BOARDS, LAB_FILE, RUN_ID, busy, BOARDS_CHOSEN, BOARDS_FROM])],
            "task_dep": ["schema", *(f"runner:{a}" for a in sorted({b.arch for b in BOARDS.values()})), *builds],
            "uptodate": [False], "verbosity": 2, "teardown": [(run, ["hil.lab:close_opened"])]}
