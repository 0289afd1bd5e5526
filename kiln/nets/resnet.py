"""Net family ``resnet``: a conv3x3-BN-ReLU stem, then stages of basic residual blocks
(conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU), global average pool and a linear
head. The first block of each stage after the first halves the resolution (stride 2); where a
block changes the shape, its shortcut is a 1x1 conv (with BatchNorm unless ``shortcut_bn`` is
off, as in MLPerf Tiny's ResNet-8). The residual add is ``operator.add`` of two tensors of the
same shape, which the quantizer, the QDQ export and the TVM lowering all take."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import ResnetArchitecture


def _blocks(arch: ResnetArchitecture):
    """(in channels, out channels, stride) of every basic block, in order."""
    out, c = [], arch.stem
    for i, width in enumerate(arch.widths):
        for j in range(arch.blocks):
            out.append((c, width, 2 if i > 0 and j == 0 else 1))
            c = width
    return out


def plan(arch: ResnetArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.input((in_ch, *image_size))
    x = g.same(g.bn(g.conv(x, arch.stem, 3)))
    for cin, cout, s in _blocks(arch):
        y = g.same(g.bn(g.conv(x, cout, 3, s)))
        y = g.bn(g.conv(y, cout, 3))
        if s != 1 or cin != cout:
            x = g.conv(x, cout, 1, s)
            if arch.shortcut_bn:
                x = g.bn(x)
        x = g.same(g.add(y, x))
    g.output(g.linear(g.flatten(g.gap(x)), classes))
    return g


def estimate(arch: ResnetArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: ResnetArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    from kiln.nets.layers import ResNet

    plan(arch, image_size, in_ch, classes)  # a too-small input is a ManifestError, not a torch error
    return ResNet(in_ch, arch.stem, _blocks(arch), classes, tuple(image_size), arch.shortcut_bn)
