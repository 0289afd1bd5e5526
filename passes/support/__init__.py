"""Support modules the passes share; they never import a pass (docs/ARCHITECTURE.md, "Layers").

* ``common``: splits, checkpoints, accuracy and weight-size figures of the torch passes;
* ``training``: the seeded training loop and online augmentation (train, prune, weight coding);
* ``int8``: Kiln's int8 arithmetic, one definition for the quantize pass, the QDQ export and
  the Relax lowering, and the fake-quant torch twin that computes as the int8 library does;
* ``relax_int8``: the Relax rewrite of int8 QDQ patterns to integer kernels;
* ``onnx_export``: a checkpoint to ONNX (fp32, or QDQ int8), parity-checked against torch;
* ``tvm_build``: the TVM frontend: targets, ONNX import, kernel libraries, MetaSchedule databases.
"""
