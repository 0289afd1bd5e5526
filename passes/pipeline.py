"""The order of Kiln's build stages, and what each stage's doit tasks are declared from: the one
place that says what follows what (mlc-llm's compiler_pass/pipeline.py: the list that runs).

``PIPELINE`` lists every stage of an app, in order. dodo.py makes one ``task_<stage>`` per entry
and one doit task per app (per board type, per lab instance) from it; tests/test_kill.py walks
the same list. A stage names its entry point ("module:function", imported by kiln.actions when the
task runs, called with loaded objects), the artifacts it reads and writes (kiln.artifacts.Layout),
the registry entries whose modules it also runs (its source files follow from their imports:
kiln.sources) and its slice of the manifest: a change reruns exactly the tasks that read it.
Adding a stage is one entry here.

The compress stage runs the manifest's compression passes in the order the manifest lists them;
each pass's module is named by its settings model (kiln/schema/). Nothing here imports torch,
TVM or hil/ (hil's modules are named as strings, as dodo.py hands them to kiln.actions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kiln.artifacts import Layout, runner_file
from kiln.config import trial_budget
from kiln.errors import KilnError
from kiln.measure import measure_mode
from kiln.registry import module_name
from kiln.schema.datasets import raw_augmented
from kiln.uptodate import last_run_ok, matches_record, tree_unchanged

# the board type the compress stage compiles each row's model for (compression.library_bytes)
LIBRARY_BOARD = "x86-host"

APP, BOARD_TYPE, INSTANCE = "app", "board type", "instance"  # one task per ...


@dataclass(frozen=True)
class App:
    """One app as dodo.py loaded it: everything its stages' tasks are declared from."""

    name: str
    project: Any  # kiln.schema.Project
    layout: Layout
    boards: Mapping[str, Any]  # every board type, by name
    data_root: Path | None = None  # where the data set is (located, not read)
    synthetic: bool = False  # ... and whether the synth stage generates it there
    instances: Sequence[Any] = ()  # the lab instances the deploy runs on, after the board choice
    refused: str | None = None  # why the board choice is refused (the deploy then fails, saying so)
    built_only: Sequence[str] = ()  # target types compiled for but not run in a lab
    lab: Any = None  # the lab as described (its backend, its name)
    lab_file: Path | None = None
    run_id: str = ""
    measuring_lab: Any = None  # where tuning.measure: rpc times candidates (kiln.measure)


@dataclass(frozen=True)
class Unit:
    """One task of a stage: an app, and the board type or lab instance it is for."""

    app: App
    board: Any = None  # the board type (per board type; per instance: the instance's type)
    instance: Any = None

    @property
    def p(self):
        return self.app.project

    @property
    def lay(self) -> Layout:
        return self.app.layout

    @property
    def name(self) -> str:
        """The task's name after '<stage>:': app, app@board-type or app@instance."""
        at = self.instance.name if self.instance is not None else self.board.name if self.board is not None else None
        return self.app.name if at is None else f"{self.app.name}@{at}"


def _none(u: Unit) -> list:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage: its doit tasks are ``<name>:<unit>``, one per app (board type, lab instance)."""

    name: str
    doc: str  # task_<name>'s docstring: what `doit list` shows
    entry: str  # "module:function" the task runs, with args(unit)
    args: Callable[[Unit], list]  # raising a KilnError: the task fails with it when run
    subdoc: Callable[[Unit], str]  # each task's doc
    outputs: Callable[[Unit], list[Path]]  # doit targets
    per: str = APP
    inputs: Callable[[Unit], list] = _none  # artifacts it reads (doit file_dep, before the source files)
    uses: Callable[[Unit], list[str]] = _none  # modules it runs besides the entry's (registry entries)
    config: Callable[[Unit], dict] | None = None  # its slice of the manifest (doit config_changed)
    checks: Callable[[Unit], list] = _none  # other uptodate checks (kiln.uptodate)
    task_dep: Callable[[Unit], list[str]] = _none
    when: Callable[[Unit], bool] = lambda u: True
    instead: tuple[Callable[[Unit], bool], str] | None = None  # (when, entry point): run that one instead
    teardown: tuple[str, ...] = ()  # "module:function"s run after the task
    # ("module:function", args(unit)) run before the task waits its turn (kiln.actions.call: not
    # under the per-task lock that serializes the same task of two doit processes)
    before: tuple[str, Callable[[Unit], list]] | None = None
    goal: bool = False  # the app's goal: an app that is skipped, or whose board choice is refused, fails here

    def entry_for(self, u: Unit) -> str:
        return self.instead[1] if self.instead is not None and self.instead[0](u) else self.entry

    def units(self, app: App) -> list[Unit]:
        """The tasks of this stage for ``app``."""
        if self.per == BOARD_TYPE:
            units = [Unit(app, app.boards[t]) for t in app.project.targets]
        elif self.per == INSTANCE:
            units = [Unit(app, app.boards[i.type], i) for i in app.instances]
        else:
            units = [Unit(app)]
        return [u for u in units if self.when(u)]


def modules(stage: Stage) -> list[str]:
    """Every module ``stage``'s entry points are in (tests/test_layers.py)."""
    return [e.split(":")[0] for e in (stage.entry, *(stage.instead[1:] if stage.instead else ()))]


# what the stages read and write beyond the core artifacts: a front end (passes/frontends/) has
# its own settings, ONNX graph and library; a family's own files (model.py, an .onnx) are inputs
def front_end(u: Unit) -> bool:
    return getattr(u.p.dataset, "front_end", None) is not None


def front_end_modules(u: Unit) -> list[str]:
    """The front end's module (passes/frontends/), for a format that has one set."""
    return [module_name(u.p.dataset.front_end)] if front_end(u) else []


def arch_inputs(u: Unit) -> list[str]:
    """The team's own files an architecture names (family module's model.py, family onnx's
    .onnx): every stage that rebuilds the model reads them, so editing one reruns those stages."""
    arch = u.p.architecture
    return [str(getattr(arch, f)) for f in ("file", "path") if isinstance(getattr(arch, f, None), str)]


def anomaly_slice(u: Unit) -> dict:
    """The normal classes of an anomaly-detection app: train and compress read them (absent
    for a classifier, so its tasks' recorded configuration is unchanged)."""
    return {"anomaly": u.p.anomaly.model_dump()} if u.p.anomaly is not None else {}


def detection_slice(u: Unit) -> dict:
    """A detector's settings (threshold, radius, match distance, object weight): train and
    compress judge by the F1 they define, and validate decodes with them (absent for other apps,
    so their recorded configuration is unchanged)."""
    return {"detection": u.p.detection.model_dump()} if u.p.detection is not None else {}


def raw_train_slice(u: Unit) -> dict:
    """What the data stage keeps for training that augments raw samples (raw_train.npz: the raw
    training split, and the background noise folder it read); empty otherwise, so other apps'
    recorded configuration is unchanged."""
    if not raw_augmented(u.p.dataset):
        return {}
    noise = getattr(u.p.dataset.augment, "noise", None)
    return {"raw_train": {"noise_folder": None if noise is None else (noise.folder or "default")}}


def synth_classes(u: Unit) -> dict:
    """What else a synthetic tree is drawn from: a detection data set's listed classes (its
    generator draws those signs, under those names: support/detection_synth.py)."""
    ds = u.p.dataset
    return {"dataset_classes": ds.classes} if getattr(ds, "labels", "class") == "boxes" else {}


def trains(u: Unit) -> bool:
    """False for a family Kiln does not train (family: onnx): it is imported instead."""
    return getattr(type(u.p.architecture), "trains", True)


def library_board(u: Unit):
    """compression.library_bytes compiles every row for LIBRARY_BOARD: its board file is an input."""
    return u.app.boards.get(LIBRARY_BOARD) if u.p.compression.library_bytes else None


def _measure(u: Unit) -> str | None:
    try:
        return measure_mode(u.p)
    except KilnError:  # a bad $KILN_TUNE_MEASURE: the tune task fails with it (Stage.args)
        return None


def _deployed(u: Unit) -> list[str]:
    return [i.name for i in u.app.instances]


PIPELINE: list[Stage] = [
    Stage("synth", "Generate a synthetic data set in the app's on-disk format when no real one is present.",
          "passes.data:synthesize", lambda u: [u.p, u.lay], lambda u: f"synthetic data set for {u.app.name}",
          when=lambda u: u.app.synthetic,
          outputs=lambda u: [u.app.data_root / Layout.SYNTHETIC_MARKER],
          uses=lambda u: [module_name(u.p.dataset)],
          config=lambda u: {**u.p.dataset.synthetic.model_dump(), **synth_classes(u)}),
    Stage("data", "Load the data set, split it and write train/val/test arrays and the boards' test inputs.",
          "passes.data:run", lambda u: [u.p, u.lay], lambda u: f"load and split {u.app.name}'s data set",
          task_dep=lambda u: [f"synth:{u.app.name}"] if u.app.synthetic else [],
          outputs=lambda u: [u.lay.data / f for f in Layout.data_files(front_end(u), raw_augmented(u.p.dataset))],
          uses=lambda u: [module_name(u.p.dataset), *front_end_modules(u)],
          config=lambda u: {**u.p.dataset.model_dump(exclude={"augment", "synthetic", "workers"}), **raw_train_slice(u)},
          checks=lambda u: [tree_unchanged(u.app.data_root), matches_record(u.lay.data_json, listed="files")]),
    Stage("train", "Train the app's network with PyTorch; keep the best validation checkpoint.",
          "passes.train:run", lambda u: [u.p, u.lay],
          lambda u: f"train {u.app.name}" if trains(u) else f"import {u.app.name}'s model (not trained)",
          instead=(lambda u: not trains(u), "passes.import_model:run"),
          inputs=lambda u: [u.lay.split("train"), u.lay.split("val"), u.lay.split("test"), *arch_inputs(u),
                            *((u.lay.raw_train_npz, u.lay.front_end_json) if raw_augmented(u.p.dataset) else ())],
          outputs=lambda u: [u.lay.model_pt, u.lay.metrics],
          checks=lambda u: [matches_record(u.lay.metrics, {u.lay.model_pt: "model_sha256"})],
          uses=lambda u: [module_name(u.p.architecture)],
          config=lambda u: {"training": u.p.training.model_dump(), "architecture": u.p.architecture.model_dump(),
                            "augment": u.p.dataset.augment.model_dump(), **anomaly_slice(u), **detection_slice(u)}),
    Stage("compress", "Run the manifest's compression passes within its accuracy and size budgets.",
          "passes.compress:run", lambda u: [u.p, u.lay, library_board(u)], lambda u: f"compress {u.app.name}",
          inputs=lambda u: [u.lay.model_pt, u.lay.split("train"), u.lay.split("val"), *arch_inputs(u)],
          outputs=lambda u: [u.lay.compressed_pt, u.lay.compress_json],
          checks=lambda u: [matches_record(u.lay.compress_json, {u.lay.compressed_pt: "compressed_sha256"})],
          uses=lambda u: [module_name(u.p.architecture), *(module_name(s) for s in u.p.compression.passes)],
          config=lambda u: {"compression": u.p.compression.model_dump(),
                            "board": b.model_dump() if (b := library_board(u)) else None, **anomaly_slice(u),
                            **detection_slice(u)}),
    Stage("export", "Export the compressed model to ONNX and check its outputs against torch.",
          "passes.export_onnx:run", lambda u: [u.p, u.lay], lambda u: f"export {u.app.name} to ONNX",
          inputs=lambda u: [u.lay.compressed_pt, u.lay.split("val"),
                            *((u.lay.front_end_json, u.lay.raw_npz) if front_end(u) else ()), *arch_inputs(u)],
          outputs=lambda u: [u.lay.onnx, u.lay.export_json, *([u.lay.front_end_onnx] if front_end(u) else [])],
          uses=lambda u: [module_name(u.p.architecture), *front_end_modules(u)],
          checks=lambda u: [matches_record(u.lay.export_json, {u.lay.onnx: "sha256"})]),
    Stage("tune", "MetaSchedule-tune the model's kernels per board type into build/tune/ (reused across rebuilds).",
          "passes.tune:run", lambda u: [u.p, u.board, u.lay, measure_mode(u.p), u.app.measuring_lab],
          lambda u: f"tune {u.app.name}'s kernels for board type {u.board.name}", per=BOARD_TYPE,
          inputs=lambda u: [u.lay.onnx, u.lay.export_json],
          outputs=lambda u: [u.lay.tune_json(u.board.name)],
          uses=lambda u: ["hil.rpc"] if _measure(u) == "rpc" else [],
          config=lambda u: {"board": u.board.model_dump(), "trials": trial_budget(u.p, u.board),
                            "measure": os.environ.get("KILN_TUNE_MEASURE") or u.p.tuning.measure}),
    Stage("compile", "Compile the ONNX model with TVM into a kernel library for each board type the app targets.",
          "passes.compile_tvm:run", lambda u: [u.p, u.board, u.lay],
          lambda u: f"kernel library of {u.app.name} for board type {u.board.name}", per=BOARD_TYPE,
          inputs=lambda u: [u.lay.onnx, u.lay.export_json, u.lay.tune_json(u.board.name),
                            *([u.lay.front_end_onnx] if front_end(u) else [])],
          outputs=lambda u: [u.lay.library(u.board.name), u.lay.compile_json(u.board.name),
                             *([u.lay.front_end_library(u.board.name)] if front_end(u) else [])],
          config=lambda u: u.board.model_dump(),
          checks=lambda u: [matches_record(u.lay.compile_json(u.board.name), {u.lay.library(u.board.name): "sha256"})]),
    Stage("hil", "Deploy the kernel library to one lab board, run the on-board runner, fetch its output.",
          "hil.board_run:run", lambda u: [u.p, u.board, u.instance, u.lay, u.app.lab_file, u.app.run_id],
          lambda u: f"run {u.app.name} on lab board {u.instance.name} ({u.instance.type})", per=INSTANCE,
          inputs=lambda u: [u.lay.library(u.board.name), u.lay.test_inputs,
                            *([u.lay.front_end_library(u.board.name)] if front_end(u) else []), runner_file(u.board.arch)],
          outputs=lambda u: [u.lay.last_run(u.instance.name)],
          uses=lambda u: [module_name(u.instance.transport), module_name(u.app.lab)],
          config=lambda u: {"instance": u.instance.model_dump(), "board": u.board.model_dump(),
                            "validation": u.p.validation.model_dump()},
          checks=lambda u: [last_run_ok(u.lay.last_run(u.instance.name))],
          # hold the lab before waiting for another doit process's run of this task: the other's
          # teardown then leaves the lab up for this one (and never stops it under its waiter)
          before=("hil.lab:open_lab", lambda u: [u.app.lab_file]),
          teardown=("hil.lab:close_opened",)),
    Stage("deploy", "Build everything an app needs, run it on every lab board it targets, validate, report.",
          "hil.validate:run", lambda u: [u.p, u.lay, _deployed(u), list(u.app.built_only), u.app.lab.name, u.app.run_id],
          lambda u: f"deploy {u.app.name} to {', '.join(_deployed(u))}, validate, report",
          task_dep=lambda u: ["schema"],
          inputs=lambda u: [*(u.lay.last_run(n) for n in _deployed(u)), u.lay.test_labels,
                            *(u.lay.compile_json(t) for t in u.app.built_only)],
          outputs=lambda u: [u.lay.report],
          config=lambda u: {"requirements": u.p.requirements.model_dump(), "boards": _deployed(u), **detection_slice(u)},
          teardown=("hil.lab:close_opened",), goal=True),
]

STAGES = tuple(s.name for s in PIPELINE)  # in order: doit's task names <stage>:<app>[@...]
