"""Kiln's build DAG, top to bottom: data -> train -> compress -> export -> tune -> compile per
board type -> deploy to the lab's board instances and validate. `doit list` shows every task;
`doit deploy:traffic_signs` runs one app end to end. Each task reruns only when its inputs, the
source files it runs or its own slice of the manifest change.

This file holds task dicts only. It imports neither torch nor TVM: each action is a
"module:function" that kiln.actions imports when the task runs, called with loaded objects.
"""

import logging
import os
import sys

from doit import get_var
from doit.tools import config_changed

from hil.lab import choose, compile_only, describe, runnable
from hil.rpc import RpcLab
from kiln import sources
from kiln.artifacts import Layout, build_root, new_run_id, runner_dir, tree_fingerprint
from kiln.config import (board_names, lab_file, load_board, load_project, project_names, project_path, projects_dir,
                         trial_budget)
from kiln.errors import KilnError, ManifestError
from kiln.measure import measure_mode
from kiln.registry import implementation, module_name
from kiln.actions import fail, refused_command_line, run
from kiln.uptodate import matches_record
from passes.pipeline import LIBRARY_BOARD

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
APP_STAGES = ("synth", "data", "train", "compress", "export", "tune", "compile", "hil", "deploy")  # <stage>:<app>
if LAB is not None and (_refused := refused_command_line(sys.argv[1:], APPS, BROKEN, APP_STAGES,
                                                         {f"deploy:{a}" for a in BROKEN}, projects_dir())):
    sys.exit(f"kiln: {_refused}")


def dataset(app):
    """(dataset root, is_synthetic) of an app, as its format locates it (no data read)."""
    return DATA[app]


def instances(app):
    """(the app's lab instances after the board choice, the reason the choice is refused or None)."""
    try:
        return choose(APPS[app], RUNNABLE[app], BOARDS_CHOSEN, given=BOARDS_FROM), None
    except ManifestError as e:
        return [], str(e)


def stale_report(layout):
    """First action of every task that changes what an app's last report describes: remove it,
    so that a build that fails or is killed never leaves a report that says passed. (Each run's
    own report stays under runs/<run id>/.)"""
    layout.report.unlink(missing_ok=True)


class dataset_unchanged:
    """uptodate: the dataset tree has the same files (names, sizes, mtimes) as last run."""

    def __init__(self, app):
        self.app = app

    def __call__(self, task, values):
        root, _ = dataset(self.app)
        fp = tree_fingerprint(root)
        task.value_savers.append(lambda: {"dataset_fingerprint": fp})
        return values.get("dataset_fingerprint") == fp


def last_run_ok(path):
    """uptodate: the last deploy to this board succeeded (a failed board is retried)."""

    def check(task, values):
        import json

        try:
            return "error" not in json.loads(path.read_text())
        except (OSError, ValueError):
            return False

    return check


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
        out = runner_dir(arch)
        yield {"name": arch, "doc": f"runner bundle for {arch} boards", "actions": [(run, ["hil.runner.build:bundle", arch])],
               "file_dep": sources.files("hil.runner.build"),
               "targets": [str(out / "kiln-runner"), str(out / "runner.json")],
               "uptodate": [matches_record(out / "runner.json", listed="files")]}


def task_synth():
    """Generate a synthetic data set in the app's on-disk format when no real one is present."""
    for app, p in APPS.items():
        root, synthetic = dataset(app)
        if synthetic:
            yield {"name": app, "doc": f"synthetic data set for {app}", "actions": [(stale_report, [Layout(app)]), (run, ["passes.data:synthesize", p, Layout(app)])],
                   "file_dep": sources.files("passes.data", module_name(p.dataset)),
                   "targets": [str(root / ".kiln-synthetic.json")],
                   "uptodate": [config_changed(p.dataset.synthetic.model_dump())]}


def task_data():
    """Load the data set, split it and write train/val/test arrays and the boards' test inputs."""
    for app, p in APPS.items():
        lay, ds = Layout(app), p.dataset
        _, synthetic = dataset(app)
        yield {"name": app, "doc": f"load and split {app}'s data set", "actions": [(stale_report, [lay]), (run, ["passes.data:run", p, lay])],
               "task_dep": [f"synth:{app}"] if synthetic else [],
               "file_dep": sources.files("passes.data", module_name(ds), *front_end_modules(ds)),
               "targets": [str(lay.data / f) for f in ("train.npz", "val.npz", "test.npz", "test_inputs.bin",
                                                        "test_labels.json", "data.json", *front_end_files(ds))],
               "uptodate": [config_changed(ds.model_dump(exclude={"augment", "synthetic"})), dataset_unchanged(app),
                            matches_record(lay.data / "data.json", listed="files")]}


def front_end_modules(ds) -> list[str]:
    """The front end's module (passes/frontends/), for a format that has one set."""
    fe = getattr(ds, "front_end", None)
    return [module_name(fe)] if fe is not None else []


def front_end_files(ds) -> list[str]:
    """What the data stage writes for a front end: its fitted settings and the raw samples."""
    return ["front_end.json", "raw.npz"] if getattr(ds, "front_end", None) is not None else []


def anomaly_slice(p) -> dict:
    """The normal classes of an anomaly-detection app: train and compress read them (absent
    for a classifier, so its tasks' recorded configuration is unchanged)."""
    return {"anomaly": p.anomaly.model_dump()} if p.anomaly is not None else {}


def front_end_onnx(p, lay) -> list[str]:
    return [str(lay.root / "front_end.onnx")] if getattr(p.dataset, "front_end", None) is not None else []


def front_end_library(p, lay, t: str) -> list[str]:
    """The front end's own library, built by the compile stage next to the model's."""
    return [str(lay.board_type(t) / "front_end.so")] if getattr(p.dataset, "front_end", None) is not None else []


def arch_inputs(p) -> list[str]:
    """The team's own files an architecture names (family module's model.py, family onnx's
    .onnx): every stage that rebuilds the model reads them, so editing one reruns those stages."""
    arch = p.architecture
    return [str(getattr(arch, f)) for f in ("file", "path") if isinstance(getattr(arch, f, None), str)]


def task_train():
    """Train the app's network with PyTorch; keep the best validation checkpoint."""
    for app, p in APPS.items():
        lay = Layout(app)
        # a family Kiln does not train (family: onnx) is imported instead: its file is an input
        trains = getattr(type(p.architecture), "trains", True)
        stage = "passes.train" if trains else "passes.import_model"
        yield {"name": app, "doc": f"train {app}" if trains else f"import {app}'s model (not trained)",
               "actions": [(stale_report, [lay]), (run, [f"{stage}:run", p, lay])],
               "file_dep": [str(lay.data / "train.npz"), str(lay.data / "val.npz"), str(lay.data / "test.npz"),
                            *arch_inputs(p), *sources.files(stage, module_name(p.architecture))],
               "targets": [str(lay.model_pt), str(lay.metrics)],
               "uptodate": [config_changed({"training": p.training.model_dump(), "architecture": p.architecture.model_dump(),
                                            "augment": p.dataset.augment.model_dump(), **anomaly_slice(p)})]}


def task_compress():
    """Run the manifest's compression passes within its accuracy and size budgets."""
    for app, p in APPS.items():
        lay, comp = Layout(app), p.compression
        # library_bytes compiles every row for LIBRARY_BOARD: its board file is an input too
        board = BOARDS.get(LIBRARY_BOARD) if comp.library_bytes else None
        yield {"name": app, "doc": f"compress {app}", "actions": [(stale_report, [lay]), (run, ["passes.compress:run", p, lay, board])],
               "file_dep": [str(lay.model_pt), str(lay.data / "train.npz"), str(lay.data / "val.npz"),
                            *arch_inputs(p), *sources.files("passes.compress", module_name(p.architecture),
                                           *(module_name(s) for s in comp.passes))],
               "targets": [str(lay.compressed_pt), str(lay.compress_json)],
               "uptodate": [config_changed({"compression": comp.model_dump(),
                                            "board": board.model_dump() if board else None, **anomaly_slice(p)})]}


def task_export():
    """Export the compressed model to ONNX and check its outputs against torch."""
    for app, p in APPS.items():
        lay = Layout(app)
        yield {"name": app, "doc": f"export {app} to ONNX", "actions": [(stale_report, [lay]), (run, ["passes.export_onnx:run", p, lay])],
               "file_dep": [str(lay.compressed_pt), str(lay.data / "val.npz"), *(str(lay.data / f) for f in front_end_files(p.dataset)),
                            *arch_inputs(p), *sources.files("passes.export_onnx", module_name(p.architecture),
                                                            *front_end_modules(p.dataset))],
               "targets": [str(lay.onnx), str(lay.export_json), *front_end_onnx(p, lay)],
               "uptodate": [matches_record(lay.export_json, {lay.onnx: "sha256"})]}


def task_tune():
    """MetaSchedule-tune the model's kernels per board type into build/tune/ (reused across rebuilds)."""
    lab = RpcLab(LAB_FILE)  # where tuning.measure: rpc times candidates (kiln.measure.MeasuringLab)
    for app, p in APPS.items():
        lay = Layout(app)
        try:
            measure, refused = measure_mode(p), None
        except KilnError as e:  # a bad $KILN_TUNE_MEASURE fails the app's tune tasks when they run
            measure, refused = None, f"{type(e).__name__}: {e}"
        for t in p.targets:
            board = BOARDS[t]
            tune = (fail, [refused]) if refused else (run, ["passes.tune:run", p, board, lay, measure, lab])
            yield {"name": f"{app}@{t}", "doc": f"tune {app}'s kernels for board type {t}",
                   "actions": [(stale_report, [lay]), tune],
                   "file_dep": [str(lay.onnx), str(lay.export_json),
                                *sources.files("passes.tune", *(["hil.rpc"] if measure == "rpc" else []))],
                   "targets": [str(lay.tune_json(t))],
                   "uptodate": [config_changed({"board": board.model_dump(), "trials": trial_budget(p, board),
                                                 "measure": os.environ.get("KILN_TUNE_MEASURE") or p.tuning.measure})]}


def task_compile():
    """Compile the ONNX model with TVM into a kernel library for each board type the app targets."""
    for app, p in APPS.items():
        lay = Layout(app)
        for t in p.targets:
            yield {"name": f"{app}@{t}", "doc": f"kernel library of {app} for board type {t}",
                   "actions": [(stale_report, [lay]), (run, ["passes.compile_tvm:run", p, BOARDS[t], lay])],
                   "file_dep": [str(lay.onnx), str(lay.export_json), str(lay.tune_json(t)), *front_end_onnx(p, lay),
                                *sources.files("passes.compile_tvm")],
                   "targets": [str(lay.library(t)), str(lay.compile_json(t)), *front_end_library(p, lay, t)],
                   "uptodate": [config_changed(BOARDS[t].model_dump()),
                                matches_record(lay.compile_json(t), {lay.library(t): "sha256"})]}


def task_hil():
    """Deploy the kernel library to one lab board, run the on-board runner, fetch its output."""
    for app, p in APPS.items():
        lay = Layout(app)
        for inst in instances(app)[0]:
            board = BOARDS[inst.type]
            yield {"name": f"{app}@{inst.name}", "doc": f"run {app} on lab board {inst.name} ({inst.type})",
                   "actions": [(stale_report, [lay]), (run, ["hil.deploy:run", p, board, inst, lay, LAB_FILE, RUN_ID])],
                   "file_dep": [str(lay.library(board.name)), str(lay.data / "test_inputs.bin"),
                                *front_end_library(p, lay, board.name),
                                str(runner_dir(board.arch) / "kiln-runner"),
                                *sources.files("hil.deploy", module_name(inst.transport), module_name(LAB))],
                   "targets": [str(lay.last_run(inst.name))],
                   "uptodate": [config_changed({"instance": inst.model_dump(), "board": board.model_dump(),
                                                "validation": p.validation.model_dump()}),
                                last_run_ok(lay.last_run(inst.name))],
                   "teardown": [(run, ["hil.lab:close_opened"])]}


def task_deploy():
    """Build everything an app needs, run it on every lab board it targets, validate, report."""
    for app, why in BROKEN.items():
        yield {"name": app, "doc": f"deploy {app} (cannot: see below)", "actions": [(fail, [why])], "uptodate": [False]}
    for app, p in APPS.items():
        lay = Layout(app)
        chosen, refused = instances(app)
        if refused:  # listed as usual; fails, naming the app's boards, only if it is run
            yield {"name": app, "doc": f"deploy {app} ({refused})", "actions": [(fail, [refused])], "uptodate": [False]}
            continue
        names = [i.name for i in chosen]
        built_only = compile_only(p, BOARDS)
        yield {"name": app, "doc": f"deploy {app} to {', '.join(names)}, validate, report",
               "actions": [(stale_report, [lay]), (run, ["hil.validate:run", p, lay, names, built_only, LAB.name, RUN_ID])],
               "task_dep": ["schema"],
               "file_dep": [*(str(lay.last_run(n)) for n in names), str(lay.data / "test_labels.json"),
                            *(str(lay.compile_json(t)) for t in built_only),
                            *sources.files("hil.validate")],
               "targets": [str(lay.report)],
               "uptodate": [config_changed({"requirements": p.requirements.model_dump(), "boards": names})],
               "teardown": [(run, ["hil.lab:close_opened"])]}


def task_nightly():
    """Every app on every lab board whose type it targets, boards in parallel: health, leases, retries, history, reports."""
    apps = dict(APPS)  # a broken manifest is listed by doit list; boards=a,b narrows the lab, not the apps
    builds = [f"compile:{app}@{t}" for app, p in apps.items() for t in p.targets]
    busy = get_var("busy", os.environ.get("KILN_NIGHTLY_BUSY", "wait"))
    return {"actions": [(run, ["hil.nightly:task_action", apps, BOARDS, LAB_FILE, RUN_ID, busy, BOARDS_CHOSEN, BOARDS_FROM])],
            "task_dep": ["schema", *(f"runner:{a}" for a in sorted({b.arch for b in BOARDS.values()})), *builds],
            "uptodate": [False], "verbosity": 2, "teardown": [(run, ["hil.lab:close_opened"])]}
