"""Export stage: the compressed checkpoint to ONNX (batch 1), parity-checked against torch with
ONNX Runtime before the file is put in place; fp32, or QDQ int8 for a quantized checkpoint
(passes/support/onnx_export.py does the work)."""

from __future__ import annotations

from kiln.artifacts import Layout
from kiln.schema import Project
from passes.support.onnx_export import export_checkpoint


def run(project: Project, layout: Layout) -> dict:
    """Export ``layout.compressed_pt`` to ``layout.onnx``; its report to ``layout.export_json``."""
    return export_checkpoint(layout.compressed_pt, layout.data, layout.onnx, layout.export_json)
