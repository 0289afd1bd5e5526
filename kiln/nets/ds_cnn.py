"""Net family ``ds_cnn``: a first conv (kernel, stride, 'same' padding)-BN-ReLU, then
depthwise-separable blocks (depthwise 3x3-BN-ReLU, pointwise 1x1-BN-ReLU), global average pool
and a linear head. Hello Edge's DS-CNN, MLPerf Tiny's keyword-spotting reference; depthwise
separable convs cost about 1/9 of a full 3x3 conv's MACs, which is why small boards run them."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import DsCnnArchitecture


def _strides(arch: DsCnnArchitecture) -> list[int]:
    return list(arch.strides) if arch.strides is not None else [1] * len(arch.widths)


def plan(arch: DsCnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    """The graph node by node, as ``build``'s forward runs it."""
    g = Plan()
    x = g.input((in_ch, *image_size))
    x = g.same(g.bn(g.conv(x, arch.filters, arch.kernel, arch.stride)))
    if arch.stem_dropout:
        x = g.same(x)
    for width, s in zip(arch.widths, _strides(arch)):
        x = g.same(g.bn(g.conv(x, x.shape[0], 3, s, groups=x.shape[0])))
        x = g.same(g.bn(g.conv(x, width, 1)))
    if arch.dropout:
        x = g.same(x)
    g.output(g.linear(g.flatten(g.gap(x)), classes))
    return g


def estimate(arch: DsCnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def conv_bn_relu(cin: int, cout: int, kernel, stride, size: tuple[int, int], groups: int = 1):
    """Conv2d ('same' padding for this input size) + BatchNorm2d + ReLU, and the output size.
    Shared by the depthwise-separable families (mobilenet_v1 too)."""
    import torch.nn as nn

    from kiln.nets.layers import conv

    c, out = conv(cin, cout, kernel, stride, size, groups=groups)
    return [c, nn.BatchNorm2d(cout), nn.ReLU()], out


def separable(cin: int, cout: int, stride: int, size: tuple[int, int]):
    """Depthwise 3x3-BN-ReLU then pointwise 1x1-BN-ReLU, and the output size."""
    dw, size = conv_bn_relu(cin, cin, 3, stride, size, groups=cin)
    pw, size = conv_bn_relu(cin, cout, 1, 1, size)
    return dw + pw, size


def head(c: int, classes: int, dropout: float):
    import torch.nn as nn

    return ([nn.Dropout(dropout)] if dropout else []) + [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]


def build(arch: DsCnnArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    plan(arch, image_size, in_ch, classes)  # a too-small input is a ManifestError, not a torch error
    layers, size = conv_bn_relu(in_ch, arch.filters, arch.kernel, arch.stride, tuple(image_size))
    if arch.stem_dropout:
        layers.append(nn.Dropout(arch.stem_dropout))
    c = arch.filters
    for width, s in zip(arch.widths, _strides(arch)):
        block, size = separable(c, width, s, size)
        layers += block
        c = width
    return nn.Sequential(*layers, *head(c, classes, arch.dropout))

