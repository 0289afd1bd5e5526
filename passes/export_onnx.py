"""Export stage: the compressed checkpoint to ONNX (batch 1), parity-checked against torch with
ONNX Runtime before the file is put in place; fp32, or QDQ int8 for a quantized checkpoint
(passes/support/onnx_export.py does the work). The exported graph is then checked for what
TVM cannot import or build statically (kiln/nets/onnx.py ``check``), so a model the team wrote
(family module) with, say, an nn.LSTM fails here with the node named, not deep in a TVM build."""

from __future__ import annotations

from kiln.artifacts import Layout
from kiln.schema import Project
from kiln.artifacts import write_json
from passes import tasks
from passes.support.onnx_export import export_checkpoint, export_front_end


def run(project: Project, layout: Layout) -> dict:
    """Export ``layout.compressed_pt`` to ``layout.onnx``; its report to ``layout.export_json``."""
    import onnx

    from kiln.nets.onnx import check

    info = export_checkpoint(layout.compressed_pt, layout.data, layout.onnx, layout.export_json,
                             score_head=tasks.of(project).SCORE_HEAD)
    try:
        check(onnx.load(str(layout.onnx)), f"{layout.onnx} (the exported model of {project.name})")
    except Exception:
        layout.onnx.unlink(missing_ok=True)  # never leave a model the compile stage cannot build
        raise
    fe = export_front_end(layout.data, layout.front_end_onnx)
    if fe is not None:  # recorded next to the model: the compile stage builds it for each board
        info["front_end_onnx"] = fe
        write_json(layout.export_json, info)
    return info
