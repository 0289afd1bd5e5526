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

    from kiln.nets import build
    from kiln.schema import Architecture

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        arch = Architecture.model_validate(ckpt["architecture"])
        model = build(arch, ckpt["channels"], ckpt["num_classes"], tuple(ckpt["image_size"]))
        model.load_state_dict(ckpt["state_dict"])
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise PassError(f"{path}: not a usable Kiln checkpoint ({e}); rerun the train task") from e
    model.eval()
    return model, ckpt


def weight_bytes(model) -> int:
    """Bytes of the parameters as stored (fp32 here; compression passes change this)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
