"""Helpers shared by the torch passes: loading splits and checkpoints, evaluating accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import atomic_path
from kiln.errors import PassError


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Path(data_dir) / f"{split}.npz"
    try:
        with np.load(path) as z:
            return z["x"], z["y"]
    except (OSError, KeyError, ValueError) as e:
        raise PassError(f"{path}: cannot read the {split} split ({e}); rerun the data task") from e


def to_tensor(x: np.ndarray):
    """uint8 NHWC images -> float32 NCHW in [0, 1], the models' (and the runner's) input."""
    import torch

    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 512) -> tuple[float, np.ndarray]:
    """Top-1 accuracy and the predictions of ``model`` on uint8 NHWC images."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            preds.append(model(to_tensor(x[i : i + batch])).argmax(1).numpy())
    p = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return (float((p == y).mean()) if len(y) else 0.0), p


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: Path):
    """Rebuild the model a checkpoint describes; return (model, checkpoint dict)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = rebuild(ckpt)
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise PassError(f"{path}: not a usable Kiln checkpoint ({e}); rerun the train task") from e
    return model, ckpt


def rebuild(ckpt: dict[str, Any]):
    """The model a checkpoint dict describes (its architecture, widths included, and weights)."""
    from kiln.nets import build
    from kiln.schema import parse_architecture

    arch = parse_architecture(ckpt["architecture"])
    model = build(arch, ckpt["channels"], ckpt["num_classes"], tuple(ckpt["image_size"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model


def weight_bytes(model) -> int:
    """Bytes of the parameters as stored (fp32 here; compression passes change this)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_layers(model) -> list[tuple[str, Any]]:
    """(name, module) of every conv and linear layer, in forward order: the layers compression
    passes prune, share and quantize (BatchNorm folds into the conv before it at export)."""
    import torch.nn as nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def stored_weight_bytes(model, ckpt: dict[str, Any]) -> int:
    """Bytes of the weights as the deployed model stores them, BatchNorm folded into the conv
    before it, so each conv/linear layer holds its weight tensor and one bias per output.

    fp32 (no ``ckpt["quantization"]``): 4 B per weight and per bias. When
    ``ckpt["quantization"]`` is set (passes/quantize.py), each quantized layer stores 1 B per
    weight, 4 B per bias (int32) and 4 B per scale: one per output channel, or one per layer
    when ``ckpt["quantization"].get("per_channel", True)`` is false. The quantized layers are
    ``ckpt["quantization"]["layers"]`` (module names) when given, else every conv/linear layer;
    the others stay fp32. Dense storage: exact zeros cost as much as any weight (the weight
    coding pass reports the sparse, entropy-coded size separately)."""
    q = ckpt.get("quantization")
    info = q if isinstance(q, dict) else {}
    quantized = set(info.get("layers") or [])
    total = 0
    for name, m in weight_layers(model):
        out = m.weight.shape[0]
        if q and (not quantized or name in quantized):
            scales = out if info.get("per_channel", True) else 1
            total += m.weight.numel() + 4 * out + 4 * scales
        else:
            total += 4 * (m.weight.numel() + out)
    return total


def sparsity(model) -> float:
    """Share of exactly-zero weights over every conv/linear weight tensor."""
    n = z = 0
    for _, m in weight_layers(model):
        n += m.weight.numel()
        z += int((m.weight == 0).sum())
    return z / n if n else 0.0


def weights_sha256(model) -> str:
    """Hash of every conv/linear weight tensor: tells whether a later pass changed them."""
    import hashlib

    h = hashlib.sha256()
    for name, m in weight_layers(model):
        h.update(name.encode())
        h.update(m.weight.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
