"""Kiln's build DAG, top to bottom: data -> train -> compress -> export -> compile per board ->
deploy to the lab and validate. `doit list` shows every task; `doit deploy:traffic_signs` runs
one app end to end. Each task reruns only when its inputs or its own slice of the manifest
change. This file imports neither torch nor TVM: the work happens in kiln/actions.py.
"""

import logging
import sys

from doit.tools import config_changed

from kiln import actions
from kiln.artifacts import ROOT, Layout, build_root, read_json, runner_dir, tree_fingerprint
from hil.emulator import lab as emulated_lab
from hil.lab import lab_boards
from kiln.config import board_names, load_board, load_project, project_names, trial_budget
from kiln.errors import KilnError
from passes.pipeline import COMPRESSION_PASSES, LIBRARY_BOARD

build_root().mkdir(parents=True, exist_ok=True)
DOIT_CONFIG = {
    "backend": "sqlite3",
    "default_tasks": [],
    "dep_file": str(build_root() / ".doit.db"),
    "verbosity": 2,
    "action_string_formatting": "new",
}
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
logging.getLogger("paramiko").setLevel(logging.WARNING)

try:  # a bad manifest, board or inventory: one clear message, no traceback
    BOARDS = {name: load_board(name) for name in board_names()}
    LAB = lab_boards()  # (name, file, instances)
    APPS = {app: load_project(app) for app in project_names()}
except KilnError as e:
    if not any(a.startswith("check_targets") for a in sys.argv[1:]):
        sys.exit(f"kiln: {e}\n(`doit check_targets` lists every problem in the board files, lab and manifests)")
    BOARDS, LAB, APPS = {}, None, {}  # check_targets reports every problem itself

KILN_SRC = [str(p) for p in sorted((ROOT / "kiln").glob("*.py"))]


def src(*names):
    """Source files a task's action runs: editing them reruns the task."""
    return KILN_SRC + [str(ROOT / n) for n in names]


TRANSPORT_SRC = {"local": ["hil/transport/local.py"],
                 "ssh": ["hil/transport/ssh.py", "hil/transport/retry.py"],
                 "serial": ["hil/transport/serial.py", "hil/transport/serial_board.sh", "hil/transport/retry.py"]}


def link(inst):
    """How an instance is reached: its transport (user's lab) or its link (emulated lab)."""
    return inst.transport.kind if hasattr(inst, "transport") else inst.link


def instances(app):
    from hil.lab import select

    try:
        return select(APPS[app], LAB, BOARDS)
    except KilnError as e:
        sys.exit(f"kiln: {e}")


class dataset_unchanged:
    """uptodate: the dataset tree has the same files (names, sizes, mtimes) as last run."""

    def __init__(self, app):
        self.app = app

    def __call__(self, task, values):
        root, _ = actions.dataset_root(self.app)
        fp = tree_fingerprint(root)
        task.value_savers.append(lambda: {"dataset_fingerprint": fp})
        return values.get("dataset_fingerprint") == fp


def last_run_ok(path):
    """uptodate: the last deploy to this board succeeded (a failed board is retried)."""

    def check(task, values):
        try:
            return "error" not in read_json(path)
        except (OSError, ValueError):
            return False

    return check


def task_check_targets():
    """Validate every board type (targets/*.yaml), the lab inventory and every manifest."""
    return {"actions": [actions.check_targets], "uptodate": [False], "verbosity": 2}


def task_lab_up():
    """Start the emulated lab (sshd and serial boards); deploys start it on demand anyway."""
    return {"actions": [emulated_lab.up], "uptodate": [lambda: emulated_lab.is_up()], "verbosity": 2}


def task_lab_down():
    """Stop the emulated lab's boards."""
    return {"actions": [emulated_lab.down], "uptodate": [False]}


def task_schema():
    """Export the manifest's JSON Schema (build/schema/) for editor completion."""
    out = build_root() / "schema" / "project.schema.json"
    return {"actions": [(actions.export_schema, [out])], "file_dep": [str(ROOT / "kiln" / "schema.py")],
            "targets": [str(out)]}


def task_runner():
    """Build the on-board C++ runner (+ TVM runtime libraries) for each board architecture."""
    for arch in sorted({b.arch for b in BOARDS.values()}):
        out = runner_dir(arch)
        yield {"name": arch, "doc": f"runner bundle for {arch} boards", "actions": [(actions.build_runner, [arch])],
               "file_dep": src("hil/runner/runner.cc", "hil/runner/build.py"),
               "targets": [str(out / "kiln-runner"), str(out / "runner.json")]}


def task_synth():
    """Generate a synthetic data set in the app's on-disk format when no real one is present."""
    for app, p in APPS.items():
        _, synthetic = actions.dataset_root(app)
        if synthetic:
            lay = Layout(app)
            yield {"name": app, "doc": f"synthetic data set for {app}", "actions": [(actions.synthesize, [app])],
                   "file_dep": src("passes/synth_gtsrb.py"),
                   "targets": [str(lay.synthetic / ".kiln-synthetic.json")],
                   "uptodate": [config_changed(p.dataset.synthetic.model_dump())]}


def task_data():
    """Load the data set, split it and write train/val/test arrays and the boards' test inputs."""
    for app, p in APPS.items():
        lay, ds = Layout(app), p.dataset
        _, synthetic = actions.dataset_root(app)
        yield {"name": app, "doc": f"load and split {app}'s data set", "actions": [(actions.prepare_data, [app])],
               "task_dep": [f"synth:{app}"] if synthetic else [],
               "file_dep": src("passes/data.py", "passes/digits.py"),
               "targets": [str(lay.data / f) for f in ("train.npz", "val.npz", "test.npz", "test_inputs.bin",
                                                        "test_labels.json", "data.json")],
               "uptodate": [config_changed({"format": ds.format, "path": ds.path, "image_size": ds.image_size,
                                            "split": ds.split.model_dump()}), dataset_unchanged(app)]}


def task_train():
    """Train the app's network with PyTorch; keep the best validation checkpoint."""
    for app, p in APPS.items():
        lay = Layout(app)
        yield {"name": app, "doc": f"train {app}", "actions": [(actions.train, [app])],
               "file_dep": [str(lay.data / "train.npz"), str(lay.data / "val.npz"), str(lay.data / "test.npz"),
                            *src("passes/train.py", "passes/common.py")],
               "targets": [str(lay.model_pt), str(lay.metrics)],
               "uptodate": [config_changed({"training": p.training.model_dump(), "architecture": p.architecture.model_dump(),
                                            "augment": p.dataset.augment.model_dump()})]}


def task_compress():
    """Run the manifest's compression passes within its accuracy and size budgets."""
    for app, p in APPS.items():
        lay, comp = Layout(app), p.compression
        # the modules of the passes this manifest lists (fine-tuning reuses train.py's loop);
        # library_bytes exports and compiles every row for LIBRARY_BOARD
        passes = sorted({COMPRESSION_PASSES[n].replace(".", "/") + ".py"
                         for spec in comp.passes for n in spec if n in COMPRESSION_PASSES})
        library = ["passes/export_onnx.py", "passes/compile_tvm.py", "passes/relax_int8.py"] if comp.library_bytes else []
        board = BOARDS.get(LIBRARY_BOARD) if comp.library_bytes else None
        yield {"name": app, "doc": f"compress {app}", "actions": [(actions.compress, [app])],
               "file_dep": [str(lay.model_pt), str(lay.data / "train.npz"), str(lay.data / "val.npz"),
                            *src("passes/compress.py", "passes/pipeline.py", "passes/common.py", "passes/train.py",
                                 *passes, *library)],
               "targets": [str(lay.compressed_pt), str(lay.compress_json)],
               "uptodate": [config_changed({"compression": comp.model_dump(),
                                            "board": board.model_dump() if board else None})]}


def task_export():
    """Export the compressed model to ONNX and check its outputs against torch."""
    for app in APPS:
        lay = Layout(app)
        yield {"name": app, "doc": f"export {app} to ONNX", "actions": [(actions.export, [app])],
               "file_dep": [str(lay.compressed_pt), str(lay.data / "val.npz"), *src("passes/export_onnx.py", "passes/quantize.py", "passes/relax_int8.py")],
               "targets": [str(lay.onnx), str(lay.export_json)]}


def task_tune():
    """MetaSchedule-tune the model's kernels per board type into build/tune/ (reused across rebuilds)."""
    for app, p in APPS.items():
        lay = Layout(app)
        for board in p.targets:
            yield {"name": f"{app}@{board}", "doc": f"tune {app}'s kernels for board type {board}", "actions": [(actions.tune_board, [app, board])],
                   "file_dep": [str(lay.onnx), str(lay.export_json), *src("passes/tune.py", "passes/compile_tvm.py", "passes/relax_int8.py")],
                   "targets": [str(lay.tune_json(board))],
                   "uptodate": [config_changed({"board": BOARDS[board].model_dump(), "trials": trial_budget(p, BOARDS[board])})]}


def task_compile():
    """Compile the ONNX model with TVM into a kernel library for each board type the app targets."""
    for app, p in APPS.items():
        lay = Layout(app)
        for board in p.targets:
            yield {"name": f"{app}@{board}", "doc": f"kernel library of {app} for board type {board}", "actions": [(actions.compile_board, [app, board])],
                   "file_dep": [str(lay.onnx), str(lay.export_json), str(lay.tune_json(board)),
                                *src("passes/compile_tvm.py", "passes/relax_int8.py", "passes/tune.py")],
                   "targets": [str(lay.library(board)), str(lay.compile_json(board))],
                   "uptodate": [config_changed(BOARDS[board].model_dump())]}


def task_hil():
    """Deploy the kernel library to one lab board, run the on-board runner, fetch its output."""
    for app, p in APPS.items():
        lay = Layout(app)
        for inst in instances(app):
            board = BOARDS[inst.type]
            yield {"name": f"{app}@{inst.name}", "doc": f"run {app} on lab board {inst.name} ({inst.type})", "actions": [(actions.run_on_board, [app, inst.name, inst.type, inst.emulated])],
                   "file_dep": [str(lay.library(board.name)), str(lay.data / "test_inputs.bin"),
                                str(runner_dir(board.arch) / "kiln-runner"),
                                *src("hil/deploy.py", *TRANSPORT_SRC[link(inst)], "hil/emulator/qemu.py")],
                   "targets": [str(lay.run_json(inst.name))],
                   "uptodate": [config_changed({"instance": inst.model_dump(), "board": board.model_dump(),
                                                "validation": p.validation.model_dump()}),
                                last_run_ok(lay.run_json(inst.name))],
                   "teardown": [emulated_lab.down_if_started_here]}


def task_deploy():
    """Build everything an app needs, run it on every lab board it targets, validate, report."""
    from hil.lab import compile_only

    for app, p in APPS.items():
        lay = Layout(app)
        names = [i.name for i in instances(app)]
        built_only = compile_only(p, BOARDS)
        yield {"name": app, "doc": f"deploy {app} to {', '.join(names)}, validate, report",
               "actions": [(actions.validate, [app, names, built_only])], "task_dep": ["schema"],
               "file_dep": [*(str(lay.run_json(n)) for n in names), str(lay.data / "test_labels.json"),
                            *(str(lay.compile_json(t)) for t in built_only),
                            *src("hil/validate.py", "hil/report.py")],
               "targets": [str(lay.report), *(str(lay.result(n)) for n in names)],
               "uptodate": [config_changed(p.requirements.model_dump())],
               "teardown": [emulated_lab.down_if_started_here]}
