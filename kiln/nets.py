"""Model families named by a manifest's ``architecture``.

``estimate`` counts parameters and MACs analytically, in pure Python, so a manifest whose model
exceeds its MACs budget is refused when it is loaded, before any data or training work (and
without importing torch). ``build`` makes the torch module; tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.schema import Architecture


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int


def estimate(arch: Architecture, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
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


def build(arch: Architecture, in_ch: int, classes: int, image_size: tuple[int, int]):
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


def measure(model, input_shape: tuple[int, ...]) -> Complexity:
    """Count parameters (BN folded) and MACs of a torch model by tracing one forward pass."""
    import torch
    import torch.nn as nn

    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            macs += out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    model.train(was_training)
    for h in handles:
        h.remove()
    params = sum(
        p.numel() for m in model.modules() if not isinstance(m, nn.BatchNorm2d) for p in m.parameters(recurse=False)
    )
    return Complexity(params=params, macs=macs)
