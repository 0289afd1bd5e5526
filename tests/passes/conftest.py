"""A tiny trained model on a tiny learnable data set, for the compression pass tests."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

# 10 classes of 8x8 grayscale images (digits format): each class a fixed random template, plus
# noise, so a small CNN learns it in a few epochs and pruning has something to lose
SMALL = {
    "name": "small",
    "requirements": {"accuracy": {"min": 0.0}},
    "dataset": {"format": "digits", "path": "sklearn", "image_size": [8, 8],
                "augment": {"rotate_deg": 5, "brightness": 0.1}},
    "architecture": {"family": "cnn", "widths": [8, 16], "max_macs": 1_000_000},
    "training": {"epochs": 4, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
    "compression": {"library_bytes": False},
    "targets": ["x86-host"],
}


def small_project(**compression):
    from kiln.schema import Project

    data = copy.deepcopy(SMALL)
    data["compression"].update(compression)
    return Project.model_validate(data)


def write_splits(out: Path, n: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, size=(10, 8, 8, 1))
    for split, count in (("train", n), ("val", n // 4), ("test", n // 4)):
        y = rng.integers(0, 10, size=count)
        x = np.clip(templates[y] * 0.7 + rng.normal(0, 40, size=(count, 8, 8, 1)), 0, 255).astype(np.uint8)
        np.savez(out / f"{split}.npz", x=x, y=y.astype(np.int64))
    return out


@pytest.fixture(scope="session")
def small_trained(tmp_path_factory):
    """(project, data_dir, model.pt) of a small CNN trained on the tiny data set."""
    from passes import train

    root = tmp_path_factory.mktemp("small")
    data = write_splits(root)
    project = small_project()
    metrics = train.run(project, data, root / "model.pt", root / "metrics.json")
    assert metrics["val_accuracy"] > 0.6, metrics  # learnable: something for pruning to keep
    return project, data, root / "model.pt"


def randomize_bn(model) -> None:
    """BatchNorm statistics and affine terms as after training, not the identity."""
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.2, 1.5)
                m.bias.uniform_(-0.3, 0.3)
