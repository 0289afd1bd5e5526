"""Net family ``autoencoder``: a dense autoencoder (MLPerf Tiny's anomaly-detection reference):
Flatten, Linear-BatchNorm1d-ReLU blocks of ``widths``, the ``bottleneck`` block, the mirrored
decoder blocks, and a Linear back to the input size C*H*W. Its objective is reconstruction:
trained on MSE against the flattened input; the reconstruction error is the anomaly score.
The ``classes`` argument is not used (the output has the input's size)."""

from __future__ import annotations

from kiln.nets import Complexity, Plan
from kiln.schema import AutoencoderArchitecture


def widths(arch: AutoencoderArchitecture) -> list[int]:
    return [*arch.widths, arch.bottleneck, *reversed(arch.widths)]


def plan(arch: AutoencoderArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Plan:
    g = Plan()
    x = g.flatten(g.input((in_ch, *image_size)))
    features = x.numel
    for width in widths(arch):
        x = g.same(g.bn(g.linear(x, width)))
    g.output(g.linear(x, features))
    return g


def estimate(arch: AutoencoderArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    return plan(arch, image_size, in_ch, classes).complexity()


def build(arch: AutoencoderArchitecture, in_ch: int, classes: int, image_size: tuple[int, int]):
    import torch.nn as nn

    features = in_ch * image_size[0] * image_size[1]
    layers: list[nn.Module] = [nn.Flatten()]
    f = features
    for width in widths(arch):
        layers += [nn.Linear(f, width), nn.BatchNorm1d(width), nn.ReLU()]
        f = width
    layers.append(nn.Linear(f, features))
    return nn.Sequential(*layers)
