"""Compile pass: ONNX -> TVM Relax -> a kernel library (model.so) for one board type.

The board's ``tvm_target`` dict is used as is, except ``mcpu: host``, which is resolved to
this machine's CPU (the x86-host board is "the machine Kiln runs on"). Cross builds link with
the board's ``cc`` (e.g. aarch64-linux-gnu-g++).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from kiln.artifacts import atomic_path, sha256_file, write_json
from kiln.errors import PassError
from kiln.schema import Board

log = logging.getLogger("kiln.compile")


def resolve_target(board: Board) -> dict[str, Any]:
    """The board's TVM target dict with ``mcpu: host`` replaced by the host CPU's name."""
    target = dict(board.tvm_target)
    if target.get("mcpu") == "host":
        from tvm.target import codegen

        target["mcpu"] = codegen.llvm_get_system_cpu()
    return target


def run(board: Board, onnx_path: Path, input_shape: list[int], out_so: Path, out_json: Path) -> dict:
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    if shutil.which(board.cc) is None:
        raise PassError(f"compile for board '{board.name}': compiler '{board.cc}' (field 'cc' of its board file) not found on PATH")
    target_dict = resolve_target(board)
    try:
        target = tvm.target.Target(target_dict)
    except Exception as e:  # TVM raises its own error types for a bad target dict
        raise PassError(f"compile for board '{board.name}': invalid tvm_target {target_dict}: {e}") from e

    t0 = time.perf_counter()
    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    mod = from_onnx(model, shape_dict={name: input_shape}, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    try:
        ex = relax.build(mod, target=target)
        with atomic_path(out_so) as tmp:
            # export_library picks the compiler from the name; the temp name must end in .so
            so_tmp = tmp.with_suffix(".so")
            ex.export_library(str(so_tmp), cc=board.cc)
            so_tmp.replace(tmp)
    except Exception as e:  # TVM's build and linker errors carry their own types
        raise PassError(f"compile for board '{board.name}' (target {target_dict}): {e}") from e
    info = {
        "board": board.name, "target": target_dict, "cc": board.cc, "tvm_version": tvm.__version__,
        "input_shape": input_shape, "library_bytes": out_so.stat().st_size, "sha256": sha256_file(out_so),
        "onnx_sha256": sha256_file(onnx_path), "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out_json, info)
    log.info("compile %s: %s (%d bytes) in %.1f s", board.name, out_so, info["library_bytes"], info["seconds"])
    return info
