"""Net family ``conv1d``: temporal convolutions over a (C, 1, L) sequence (sensor windows,
audio frames). Per block a Conv2d with kernel (1, k) and 'same' padding along the sequence,
BatchNorm, ReLU and an optional (1, 2) max-pool; then global average pool and a linear head.
Conv2d with a (1, k) kernel rather than Conv1d: one op for the quantizer, the export and TVM."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import Conv1dArchitecture


def plan(arch: Conv1dArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.input((in_ch, *image_size))
    for width in arch.widths:
        x = g.same(g.bn(g.conv(x, width, (1, arch.kernel))))
        if arch.pool:
            x = g.maxpool(x, (1, 2))
    g.output(g.linear(g.flatten(g.gap(x)), classes))
    return g


def estimate(arch: Conv1dArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: Conv1dArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    from kiln.nets.layers import conv

    plan(arch, image_size, in_ch, classes)  # a too-short sequence is a ManifestError, not a torch error
    layers: list[nn.Module] = []
    c, size = in_ch, tuple(image_size)
    for width in arch.widths:
        cv, size = conv(c, width, (1, arch.kernel), 1, size)
        layers += [cv, nn.BatchNorm2d(width), nn.ReLU()]
        if arch.pool:
            layers.append(nn.MaxPool2d((1, 2)))
            size = (size[0], size[1] // 2)
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))
