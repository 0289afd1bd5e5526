"""Export pass: the compressed torch model to ONNX (batch 1), checked for parity against torch
with ONNX Runtime on held-out images before the file is put in place."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kiln.artifacts import atomic_path, sha256_file, write_json
from kiln.errors import PassError
from passes.common import load_checkpoint, load_split, to_tensor

log = logging.getLogger("kiln.export")

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def run(model_pt: Path, data_dir: Path, out_onnx: Path, out_json: Path, samples: int = 64, atol: float = 1e-4) -> dict:
    import onnxruntime as ort
    import torch

    model, ckpt = load_checkpoint(model_pt)
    shape = (1, ckpt["channels"], *ckpt["image_size"])
    x, _ = load_split(data_dir, "val")
    batch = to_tensor(x[:samples])
    with atomic_path(out_onnx) as tmp:
        # dynamo=False: the TorchScript exporter folds BatchNorm into conv in eval mode
        torch.onnx.export(model, torch.zeros(shape), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = model(batch).numpy()
        got = np.concatenate([sess.run([OUTPUT], {INPUT: batch[i : i + 1].numpy()})[0] for i in range(len(batch))])
        diff = float(np.abs(ref - got).max()) if len(batch) else 0.0
        agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(batch) else 1.0
        if diff > atol or agree < 1.0:
            raise PassError(f"export: ONNX output differs from torch (max |diff| {diff:.2e} > {atol}, argmax agreement {agree:.3f})")
    info = {"opset": OPSET, "input": INPUT, "input_shape": list(shape), "output": OUTPUT,
            "num_classes": ckpt["num_classes"], "parity_max_abs_diff": diff, "parity_samples": len(batch),
            "onnx_bytes": out_onnx.stat().st_size, "sha256": sha256_file(out_onnx)}
    write_json(out_json, info)
    log.info("export: %s (%d bytes), parity max |diff| %.2e on %d samples", out_onnx, info["onnx_bytes"], diff, len(batch))
    return info
