"""A tiny trained model on a tiny learnable data set, for the compression pass tests."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.artifacts import Layout

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


def small_manifest(**compression) -> dict:
    """The small project's manifest with ``compression`` settings added."""
    data = copy.deepcopy(SMALL)
    data["compression"].update(compression)
    return data


def small_project(**compression):
    from kiln.schema import Project

    return Project.model_validate(small_manifest(**compression))


def layout_at(root: Path, app: str = "small") -> Layout:
    """The build layout of ``app`` under ``root`` (what KILN_BUILD=root gives)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KILN_BUILD", str(root))
        return Layout(app)


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
    """(project, data_dir, model.pt) of a small CNN trained on the tiny data set (the train
    stage on a build layout of its own)."""
    from passes import train

    lay = layout_at(tmp_path_factory.mktemp("small"))
    lay.data.mkdir(parents=True)
    write_splits(lay.data)
    project = small_project()
    metrics = train.run(project, lay)
    assert metrics["val_accuracy"] > 0.6, metrics  # learnable: something for pruning to keep
    assert lay.metrics.exists()
    return project, lay.data, lay.model_pt


@pytest.fixture
def small_layout(small_trained, tmp_path) -> Layout:
    """A fresh build layout under ``tmp_path`` holding the small trained model and its data, for
    a stage that writes its outputs there."""
    _, data, model_pt = small_trained
    lay = layout_at(tmp_path)
    lay.root.mkdir(parents=True)
    lay.data.symlink_to(data, target_is_directory=True)
    shutil.copy(model_pt, lay.model_pt)
    return lay


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


def int8_convs(mod) -> list[dict]:
    """Every int8 convolution of a lowered module, as the relax functions call it: a
    ``relax.nn.conv2d`` op or one of relax_int8's packed conv kernels (``conv2d_int8_packed*``,
    a call_tir) or the packed depthwise kernel (``conv2d_int8_depthwise*``). Each: the activation
    and weight dtypes, the accumulator dtype, the weight constant's shape (packed: [O/16, C/4, KH,
    KW, 16, 4]; depthwise: [C/16, KH, KW, 16]), whether it is packed (the dot-product tile) and
    whether it is the depthwise kernel."""
    import re

    from tvm import relax

    out = []

    def visit(e):
        if not isinstance(e, relax.Call):
            return
        if getattr(e.op, "name", "") == "relax.nn.conv2d":
            out.append({"data": str(e.args[0].ty.dtype), "weight": str(e.args[1].ty.dtype),
                        "acc": str(e.attrs.out_dtype), "shape": tuple(int(d) for d in e.args[1].ty.shape),
                        "packed": False, "depthwise": False, "call": e})
        elif getattr(e.op, "name", "") == "relax.call_tir" and e.args[0].name_hint.startswith(
                ("conv2d_int8_packed", "conv2d_int8_depthwise")):
            depthwise = e.args[0].name_hint.startswith("conv2d_int8_depthwise")
            block = "depthwise_packed_int8" if depthwise else "conv2d_packed_int8"
            # the accumulator's buffer, as the kernel declares it
            acc = re.search(rf'{block} = T\.sblock_alloc_buffer\(.*, "(\w+)"\)$', mod[e.args[0]].script(),
                            re.MULTILINE)
            data, weight = e.args[1].fields[:2]
            out.append({"data": str(data.ty.dtype), "weight": str(weight.ty.dtype), "acc": acc and acc.group(1),
                        "shape": tuple(int(d) for d in weight.ty.shape), "packed": not depthwise,
                        "depthwise": depthwise, "call": e})

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return out
