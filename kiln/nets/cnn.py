"""Net family ``cnn``: conv3x3-BN-ReLU-maxpool stages of ``widths`` channels, then a linear
head after global average pooling (``gap``) or flattening (``flatten``)."""

from __future__ import annotations

from kiln.nets import Complexity
from kiln.schema import CnnArchitecture


def estimate(arch: CnnArchitecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    """Parameters and multiply-accumulates of one inference at batch 1 (BN folded into conv)."""
    h, w = image_size
    params = macs = 0
    c = in_ch
    for width in arch.widths:
        # conv3x3, padding 1, with bias (BatchNorm folds into it at export)
        params += c * width * 9 + width
        macs += c * width * 9 * h * w
        c = width
        h, w = h // 2, w // 2  # 2x2 max-pool
    feat = c if arch.head == "gap" else c * h * w
    params += feat * classes + classes
    macs += feat * classes
    return Complexity(params=params, macs=macs)


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
