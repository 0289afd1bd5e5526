"""Compile stage: the exported ONNX model -> TVM Relax -> a kernel library (model.so) for one
board type, with the tuned schedules of the tune stage's database where it tuned (the
frontend and the build: passes/support/tvm_build.py). An app with a front end also gets the
front end alone as front_end.so (untuned), which the hil stage runs to compare the board's
features with the host's."""

from __future__ import annotations

from kiln.artifacts import Layout, read_json
from kiln.schema import Board, Project
from passes.support.tvm_build import compile_onnx


def run(project: Project, board: Board, layout: Layout) -> dict:
    """Compile ``layout.onnx`` for ``board`` into ``layout.library(board.name)`` (its report:
    ``layout.compile_json``), applying ``layout.tune_json``'s database when that report exists
    and says it tuned."""
    export = read_json(layout.export_json)
    tune_json = layout.tune_json(board.name)
    tuning = read_json(tune_json) if tune_json.exists() else None
    fe = export.get("front_end_onnx")
    if fe is not None:  # first: the model's compile.json, written last, vouches for both
        compile_onnx(board, layout.root / fe["file"], fe["input_shape"], layout.front_end_library(board.name),
                     layout.front_end_compile_json(board.name))
    return compile_onnx(board, layout.onnx, export["input_shape"], layout.library(board.name),
                        layout.compile_json(board.name), tuning=tuning)
