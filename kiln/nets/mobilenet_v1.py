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


def plan_trunk(g: Plan, alpha: float, blocks: int, image_size: tuple[int, int], in_ch: int):
    """The stem and the first ``blocks`` separable blocks in ``g`` (this family's and fomo's
    backbone); returns the last node."""
    x = g.input((in_ch, *image_size))
    x = g.same(g.bn(g.conv(x, scaled(STEM, alpha), 3, 2)))
    for width, s in BLOCKS[:blocks]:
        x = g.same(g.bn(g.conv(x, x.shape[0], 3, s, groups=x.shape[0])))
        x = g.same(g.bn(g.conv(x, scaled(width, alpha), 1)))
    return x


def build_trunk(alpha: float, blocks: int, image_size: tuple[int, int], in_ch: int) -> tuple[list, int]:
    """The torch layers of :func:`plan_trunk`; returns (layers, their output channels)."""
    c = scaled(STEM, alpha)
    layers, size = conv_bn_relu(in_ch, c, 3, 2, tuple(image_size))
    for width, s in BLOCKS[:blocks]:
        block, size = separable(c, scaled(width, alpha), s, size)
        layers += block
        c = scaled(width, alpha)
    return layers, c


def plan(arch: MobilenetV1Architecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = plan_trunk(g, arch.alpha, arch.blocks, image_size, in_ch)
    if arch.dropout:
        x = g.same(x)
    g.output(g.linear(g.flatten(g.gap(x)), classes))
    return g


def estimate(arch: MobilenetV1Architecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: MobilenetV1Architecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    plan(arch, image_size, in_ch, classes)  # a too-small input is a ManifestError, not a torch error
    layers, c = build_trunk(arch.alpha, arch.blocks, image_size, in_ch)
    return nn.Sequential(*layers, *head(c, classes, arch.dropout))
