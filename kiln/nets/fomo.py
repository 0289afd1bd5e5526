"""Net family ``fomo``: a FOMO-style detector (Edge Impulse's "Faster Objects, More Objects"),
fully convolutional. The backbone is MobileNetV1's (kiln/nets/mobilenet_v1.py, the vocabulary's
depthwise-separable net) cut early: its 3x3 stride-2 stem and its first ``blocks`` (4 or 5)
depthwise-separable blocks, widths scaled by ``alpha``. Their strides (2, 1, 2, 1, 2, 1) bring
the grid to 1/8 of the input, where FOMO cuts MobileNetV2 (block_6_expand): a cell there sees
enough of the frame to tell a sign from clutter, and the grid is fine enough to put one centre
in a cell. Then FOMO's head: a 1x1 conv-ReLU of ``head_width`` channels and a 1x1 conv of
classes + 1 channels, background first: the (classes + 1, ceil(H/8), ceil(W/8)) logits of a
per-cell softmax (taken by the host, kiln/tasks/detection.py), returned flattened in that (C, H, W)
order, (1, (classes + 1) * h * w). The Flatten is what keeps the whole net on the int8 path's
packed kernels bit for bit: the int8 plan gives the last weighted layer float outputs (the
accumulator times the bias scale), which the Relax lowering does for a dense layer only
(passes/support/relax_int8.py), so a conv as the last op would stay a float conv; behind the
Flatten the output conv returns 8-bit codes like every other conv and the library dequantizes them
at its end, exactly as the twin does. Only Conv2d, BatchNorm2d (folded), ReLU and the Flatten.

``classes`` is the number of object classes (the dataset's); the output has one more channel."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.nets.mobilenet_v1 import build_trunk, plan_trunk
from kiln.schema import FomoArchitecture
from kiln.tasks.detection import STRIDE, grid  # noqa: F401  (the grid is 1/8 of the input, each side rounded up)


def plan(arch: FomoArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = plan_trunk(g, arch.alpha, arch.blocks, image_size, in_ch)
    if arch.head_width:
        x = g.same(g.conv(x, arch.head_width, 1))
    g.output(g.flatten(g.conv(x, classes + 1, 1)))
    return g


def estimate(arch: FomoArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: FomoArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    plan(arch, image_size, in_ch, classes)  # a too-small input is a ManifestError, not a torch error
    layers, c = build_trunk(arch.alpha, arch.blocks, image_size, in_ch)
    if arch.head_width:
        layers += [nn.Conv2d(c, arch.head_width, 1), nn.ReLU()]
        c = arch.head_width
    layers += [nn.Conv2d(c, classes + 1, 1), nn.Flatten()]
    return nn.Sequential(*layers)
