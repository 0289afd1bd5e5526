"""Net family ``cnn``: conv3x3-BN-ReLU-maxpool stages of ``widths`` channels, then a linear
head after global average pooling (``gap``) or flattening (``flatten``)."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import CnnArchitecture


def estimate(arch: CnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    """Parameters, multiply-accumulates and peak activations of one inference at batch 1 (BN
    folded into conv), node by node as ``build`` runs."""
    return plan(arch, image_size, in_ch, classes).complexity()


def plan(arch: CnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.input((in_ch, *image_size))
    for width in arch.widths:
        # conv3x3, padding 1, with bias (BatchNorm folds into it at export), then a 2x2 max-pool
        x = g.maxpool(g.same(g.bn(g.conv(x, width, 3, padding=1))), 2)
    if arch.head == "gap":
        x = g.gap(x)
    g.output(g.linear(g.flatten(x), classes))
    return g


def build(arch: CnnArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    """The torch module for ``arch``: conv-BN-ReLU-pool stages, then a linear classifier."""
    import torch.nn as nn

    layers: list[nn.Module] = []
    c = in_ch
    h, w = image_size
    for width in arch.widths:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = width
        h, w = h // 2, w // 2
    if arch.head == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    else:
        layers += [nn.Flatten(), nn.Linear(c * h * w, classes)]
    return nn.Sequential(*layers)
