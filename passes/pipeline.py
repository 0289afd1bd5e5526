"""The order of Kiln's build stages: the one place that says what follows what.

dodo.py builds one doit task per stage (tune and compile once per board type). Each stage is a
module in passes/ with one entry point ``run`` that takes loaded objects (Project, Board,
Layout). The compress stage runs the manifest's compression passes in the order the manifest
lists them; each pass's module is named by its settings model in kiln/schema.py.
"""

# build stages, in order: module names under passes/
STAGES = ("data", "train", "compress", "export_onnx", "tune", "compile_tvm")

# the board type the compress stage compiles each row's model for (compression.library_bytes)
LIBRARY_BOARD = "x86-host"
