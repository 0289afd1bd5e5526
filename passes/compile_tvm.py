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


def import_onnx(onnx_path: Path, input_shape: list[int]):
    """The Relax module Kiln compiles and tunes for an exported model: ONNX import with the
    weights bound as constants, inference-only ops decomposed, and int8 QDQ patterns lowered to
    integer kernels (passes/relax_int8.py; a no-op for float models)."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from passes import relax_int8

    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    mod = from_onnx(model, shape_dict={name: input_shape}, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    return relax_int8.lower(mod)


def run(board: Board, onnx_path: Path, input_shape: list[int], out_so: Path, out_json: Path,
        tuning: dict | None = None) -> dict:
    """Compile ``onnx_path`` for ``board``; ``tuning`` is the tune pass's report (tune.json):
    when it tuned, the schedules in its database are applied, others stay untuned."""
    import tvm
    from tvm import relax

    from passes import tune

    if shutil.which(board.cc) is None:
        raise PassError(f"compile for board '{board.name}': compiler '{board.cc}' (field 'cc' of its board file) not found on PATH")
    target_dict = resolve_target(board)
    try:
        target = tvm.target.Target(target_dict)
    except Exception as e:  # TVM raises its own error types for a bad target dict
        raise PassError(f"compile for board '{board.name}': invalid tvm_target {target_dict}: {e}") from e

    t0 = time.perf_counter()
    mod = import_onnx(onnx_path, input_shape)
    tuned = None
    if tuning and tuning.get("measured"):
        if tuning.get("target") != target_dict:
            raise PassError(f"compile for board '{board.name}': its tuning report is for target {tuning.get('target')}, "
                            f"not {target_dict}; rerun the tune task")
        mod, tuned = tune.apply(mod, target, Path(tuning["database"]))
    else:
        mod = tune.prepare(mod, target)  # fusion: without it each op is its own kernel
    try:
        ex = relax.build(mod, target=target)
        with atomic_path(out_so) as tmp:
            # export_library picks the compiler from the name; the temp name must end in .so
            so_tmp = tmp.with_suffix(".so")
            # the kernels' debug info is ~40% of the file and no board uses it
            ex.export_library(str(so_tmp), cc=board.cc, options=["-Wl,--strip-debug"])
            so_tmp.replace(tmp)
    except Exception as e:  # TVM's build and linker errors carry their own types
        raise PassError(f"compile for board '{board.name}' (target {target_dict}): {e}") from e
    info = {
        "board": board.name, "target": target_dict, "cc": board.cc, "tvm_version": tvm.__version__,
        "input_shape": input_shape, "library_bytes": out_so.stat().st_size, "sha256": sha256_file(out_so),
        "onnx_sha256": sha256_file(onnx_path), "seconds": round(time.perf_counter() - t0, 2),
        "tuned_kernels": tuned, "tuning": (tuning or {}).get("why", "not tuned"),
    }
    write_json(out_json, info)
    log.info("compile %s: %s (%d bytes) in %.1f s", board.name, out_so, info["library_bytes"], info["seconds"])
    return info
