"""What each doit task does. dodo.py stays a readable list of tasks; the work is here.

Every action imports torch/TVM lazily (``doit list`` must stay instant) and turns a KilnError
into doit's TaskFailed, so the user sees one clear message instead of a traceback.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from doit.exceptions import TaskFailed

from kiln.artifacts import ROOT, Layout, read_json, runner_dir, runtime_cache, tuning_root, write_json
from kiln.config import default_inventory, load_board, load_inventory, load_project, trial_budget
from kiln.errors import KilnError, ManifestError, ValidationError

log = logging.getLogger("kiln")


def action(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except KilnError as e:
            return TaskFailed(f"{type(e).__name__}: {e}")
        return True

    return wrapper


def dataset_root(app: str) -> tuple[Path, bool]:
    """(dataset directory, is_synthetic): the manifest's path when it holds GTSRB, else the
    synthetic set under build/."""
    project = load_project(app)
    ds = project.dataset
    if ds.format == "digits":
        from passes.digits import resolve

        path = resolve(ds.path, ROOT)
        if not path.is_file():
            raise ManifestError(f"field 'dataset.path': no digits file at {path} (expected 'sklearn' or a digits.csv(.gz))")
        return path, False
    path = Path(ds.path) if Path(ds.path).is_absolute() else ROOT / ds.path
    if (path / "Final_Training" / "Images").is_dir():
        return path, False
    if ds.synthetic is None:
        raise ManifestError(
            f"field 'dataset.path': {path} holds no GTSRB tree (Final_Training/Images) and "
            "dataset.synthetic is off; download GTSRB there or enable synthetic data"
        )
    return Layout(app).synthetic, True


@action
def synthesize(app: str) -> None:
    from passes import synth_gtsrb

    syn = load_project(app).dataset.synthetic
    synth_gtsrb.synthesize_gtsrb(Layout(app).synthetic, per_class=syn.per_class, test_per_class=syn.test_per_class, seed=syn.seed)


@action
def prepare_data(app: str) -> None:
    from passes import data

    ds = load_project(app).dataset
    root, _ = dataset_root(app)
    data.prepare(root, Layout(app).data, tuple(ds.image_size), ds.split.val, ds.split.test, ds.split.seed, ds.format)


@action
def train(app: str) -> None:
    from passes import train

    lay = Layout(app)
    train.run(load_project(app), lay.data, lay.model_pt, lay.metrics)


@action
def compress(app: str) -> None:
    from passes import compress

    lay = Layout(app)
    compress.run(load_project(app), lay.model_pt, lay.data, lay.compressed_pt, lay.compress_json)


@action
def export(app: str) -> None:
    from passes import export_onnx

    lay = Layout(app)
    export_onnx.run(lay.compressed_pt, lay.data, lay.onnx, lay.export_json)


@action
def tune_board(app: str, board_type: str) -> None:
    from passes import tune

    lay = Layout(app)
    shape = read_json(lay.export_json)["input_shape"]
    board = load_board(board_type)
    tune.run(board, lay.onnx, shape, tuning_root(), trial_budget(load_project(app), board), lay.tune_json(board_type))


@action
def compile_board(app: str, board_type: str) -> None:
    from passes import compile_tvm

    lay = Layout(app)
    shape = read_json(lay.export_json)["input_shape"]
    tuning = read_json(lay.tune_json(board_type))
    compile_tvm.run(load_board(board_type), lay.onnx, shape, lay.library(board_type), lay.compile_json(board_type),
                    tuning=tuning)


@action
def build_runner(arch: str) -> None:
    from hil.runner.build import build_runner as build

    build(arch, runner_dir(arch), runtime_cache())


def _inputs_for(app: str, samples: int | None, dest: Path) -> tuple[Path, list[int]]:
    """The runner's input file, cut to the manifest's validation.samples when it sets one, and
    the shape of one sample (C, H, W)."""
    full = Layout(app).data / "test_inputs.bin"
    shape = read_json(Layout(app).data / "data.json")["test_inputs"]["shape"][1:]
    if samples is None:
        return full, shape
    with open(full, "rb") as f:
        dest.write_bytes(f.read(samples * shape[0] * shape[1] * shape[2] * 4))
    return dest, shape


@action
def run_on_board(app: str, instance_name: str, board_type: str, emulated: bool) -> None:
    """Deploy to one board instance and record its raw output (or its failure) in run.json.
    A board failure is recorded, not raised: the other boards and the report go on."""
    import tempfile

    from hil import deploy
    from hil.emulator import lab as emulated_lab
    from hil.emulator.qemu import launcher
    from hil.transport import open_transport
    from kiln.artifacts import build_root

    project, lay, board = load_project(app), Layout(app), load_board(board_type)
    blog = logging.getLogger(f"kiln.board.{instance_name}")
    record = {"instance": instance_name, "type": board.name, "emulated": emulated}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            rdir = runner_dir(board.arch)
            files = {n: rdir / n for n in ("kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so")}
            files["model.so"] = lay.library(board.name)
            samples = project.validation.samples
            cap = board.emulation.max_samples if emulated and board.emulation else None
            if cap and (samples is None or samples > cap):
                blog.info("emulated board: validating on the first %d test samples (emulation.max_samples)", cap)
                samples = cap
            files["inputs.bin"], shape = _inputs_for(app, samples, Path(tmp) / "inputs.bin")
            argv = [*(launcher(board) if emulated else []), "./kiln-runner", "--model", "model.so", "--input",
                    "inputs.bin", "--shape", ",".join(map(str, shape)), "--warmup", str(project.validation.warmup),
                    "--threads", str(board.cores)]
            inv_path = default_inventory() or emulated_lab.up()  # the emulated lab starts on demand
            inst = next((b for b in load_inventory(inv_path).boards if b.name == instance_name), None)
            if inst is None:
                raise ManifestError(f"{inv_path}: no board instance '{instance_name}' (the lab changed since "
                                    "the task list was made; run doit again)")
            record["transport"] = inst.transport.kind
            blog.info("deploying %s to %s (%s over %s%s)", app, inst.name, board.name, inst.transport.kind,
                      ", emulated" if emulated else "")
            transport = open_transport(inst, inv_path.parent, build_root() / "lab" / "local")
            record.update(deploy.deploy(transport, files, argv, project.validation.timeout_s, inst.name))
        except deploy.DeployError as e:
            blog.error("%s", e)
            record["error"] = {"step": e.step, "message": str(e.cause)}
        except KilnError as e:
            blog.error("%s", e)
            record["error"] = {"step": "prepare", "message": str(e)}
    write_json(lay.run_json(instance_name), record)


@action
def validate(app: str, instance_names: list[str], compile_only: list[str] = ()) -> None:
    """Turn every board's run.json into result.json and the app's report.json; fail when any
    requirement is missed on any board, naming board and requirement. Compile-only board types
    are listed with their kernel library as not validated."""
    from hil import report, validate as val

    project, lay = load_project(app), Layout(app)
    labels = read_json(lay.data / "test_labels.json")
    runs = {n: read_json(lay.run_json(n)) for n in instance_names}
    ok = [n for n in instance_names if "error" not in runs[n]]
    ref = next((n for n in ok if not runs[n]["emulated"]), ok[0] if ok else None)
    results = {}
    for name in instance_names:
        run = runs[name]
        res = {"instance": name, "type": run["type"], "transport": run.get("transport")}
        if "error" in run:
            res["error"] = run["error"]
        else:
            lib = read_json(lay.compile_json(run["type"]))["library_bytes"]
            reference = None if name == ref else runs[ref]["runner"]["predictions"]
            res.update(val.evaluate(project.requirements, run["runner"], labels, lib, run["emulated"], reference))
            res["reference_board"] = ref
            res["timings_s"] = run["timings_s"]
            res["upload"] = {"sent_bytes": run["uploaded_bytes"], "cached_bytes": run["cached_bytes"]}
        write_json(lay.result(name), res)
        results[name] = res
    for t in compile_only:
        lib = read_json(lay.compile_json(t))
        results[t] = {"type": t, "not_validated": "compile-only board: its runtime cannot run in this lab",
                      "model_bytes": lib["library_bytes"], "library": str(lay.library(t)), "target": lib["target"]}
    from hil.lab import lab_boards

    rep = report.build(app, lab_boards()[0], results)
    report.write(lay.report, rep)
    print(report.table(rep))
    if not rep["passed"]:
        raise ValidationError("; ".join(rep["failures"]))


@action
def export_schema(out: Path) -> None:
    import json

    from kiln.artifacts import write_bytes
    from kiln.schema import Project

    write_bytes(out, json.dumps(Project.model_json_schema(), indent=2).encode())


def check_targets():
    from hil.lab import check_all

    ok, problems = check_all()
    for line in ok:
        print(f"ok       {line}")
    for p in problems:
        print(f"PROBLEM  {p}")
    if problems:
        return TaskFailed(f"{len(problems)} problem(s) in board files, lab inventory or manifests (see above)")
    print(f"all {len(ok)} definitions are valid")
    return True
