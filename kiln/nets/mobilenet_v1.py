"""Net family ``mobilenet_v1``: MobileNetV1 (Howard et al. 2017) with its width multiplier
``alpha``: a 3x3 stride-2 conv of 32 alpha channels, then 13 depthwise-separable blocks
(channels x alpha, strides as in the paper), global average pool and a linear head. Channel
counts are ``int(base * alpha)`` as in Keras' MobileNet (at least 1). The visual-wake-words
reference of MLPerf Tiny is alpha 0.25 over 96x96x3."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.nets.ds_cnn import conv_bn_relu, head, separable
from kiln.schema import MobilenetV1Architecture

STEM = 32
# (pointwise channels at alpha 1, depthwise stride) of the paper's 13 blocks
BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
          (512, 1), (1024, 2), (1024, 1))


def scaled(base: int, alpha: float) -> int:
    return max(1, int(base * alpha))


def plan(arch: MobilenetV1Architecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.input((in_ch, *image_size))
    x = g.same(g.bn(g.conv(x, scaled(STEM, arch.alpha), 3, 2)))
    for width, s in BLOCKS[:arch.blocks]:
        x = g.same(g.bn(g.conv(x, x.shape[0], 3, s, groups=x.shape[0])))
        x = g.same(g.bn(g.conv(x, scaled(width, arch.alpha), 1)))
    if arch.dropout:
        x = g.same(x)
    g.output(g.linear(g.flatten(g.gap(x)), classes))
    return g


def estimate(arch: MobilenetV1Architecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: MobilenetV1Architecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    plan(arch, image_size, in_ch, classes)  # a too-small input is a ManifestError, not a torch error
    c = scaled(STEM, arch.alpha)
    layers, size = conv_bn_relu(in_ch, c, 3, 2, tuple(image_size))
    for width, s in BLOCKS[:arch.blocks]:
        block, size = separable(c, scaled(width, arch.alpha), s, size)
        layers += block
        c = scaled(width, arch.alpha)
    return nn.Sequential(*layers, *head(c, classes, arch.dropout))
