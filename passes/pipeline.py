"""The order of Kiln's passes: the one place that says what follows what.

dodo.py builds one doit task per build stage; the compress stage runs the manifest's
compression passes in the order the manifest lists them, looked up here.
"""

from __future__ import annotations

# build stages, in order; each is a module in passes/ with a ``run`` entry point
BUILD_STAGES = ("data", "train", "compress", "export_onnx", "compile_tvm")

# compression passes a manifest may list under compression.passes, by name -> module
COMPRESSION_PASSES: dict[str, str] = {}
