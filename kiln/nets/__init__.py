"""Net families named by a manifest's ``architecture.family`` (the ``Architecture`` union in
kiln/schema.py). Each family is a module here with

* ``estimate(arch, image_size, in_ch, classes) -> Complexity``: parameters and MACs counted
  analytically, in pure Python, so a design over its MACs budget is refused when the manifest
  loads, before any data or training work and without importing torch;
* ``build(arch, in_ch, classes, image_size) -> torch.nn.Module``.

``measure`` counts the same figures on a torch model; tests check the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    from kiln.registry import implementation

    return implementation(arch).estimate(arch, image_size, in_ch, classes)


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    from kiln.registry import implementation

    return implementation(arch).build(arch, in_ch, classes, image_size)


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
