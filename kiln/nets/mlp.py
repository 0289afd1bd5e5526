"""Net family ``mlp``: Flatten, then per width a Linear (+ BatchNorm1d) + ReLU (+ Dropout), then a
linear head. For feature vectors (1, 1, F) and small inputs of any shape (e.g. LeNet-300-100
over digits, Deep Compression's dense test)."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import MlpArchitecture


def plan(arch: MlpArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.flatten(g.input((in_ch, *image_size)))
    for width in arch.widths:
        x = g.linear(x, width)
        if arch.batch_norm:
            x = g.bn(x)
        x = g.same(x)
        if arch.dropout:
            x = g.same(x)
    g.output(g.linear(x, classes))
    return g


def estimate(arch: MlpArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: MlpArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    layers: list[nn.Module] = [nn.Flatten()]
    f = in_ch * image_size[0] * image_size[1]
    for width in arch.widths:
        layers.append(nn.Linear(f, width))
        if arch.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if arch.dropout:
            layers.append(nn.Dropout(arch.dropout))
        f = width
    layers.append(nn.Linear(f, classes))
    return nn.Sequential(*layers)
