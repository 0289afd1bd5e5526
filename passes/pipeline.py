"""The order of Kiln's passes: the one place that says what follows what.

dodo.py builds one doit task per build stage; the compress stage runs the manifest's
compression passes in the order the manifest lists them, looked up here.
"""

from __future__ import annotations

# build stages, in order; each is a module in passes/ with a ``run`` entry point
BUILD_STAGES = ("data", "train", "compress", "export_onnx", "tune", "compile_tvm")

# compression passes a manifest may list under compression.passes, by name -> module; each
# module's entry point is ``run(model, ckpt, params, ctx) -> (model, ckpt)`` (passes/compress.py)
COMPRESSION_PASSES: dict[str, str] = {
    "prune": "passes.prune",
    "weight_coding": "passes.weight_coding",
    "quantize": "passes.quantize",
}

# the board type the compress stage compiles each row's model for (compression.library_bytes)
LIBRARY_BOARD = "x86-host"
