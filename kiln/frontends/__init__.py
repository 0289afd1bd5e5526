"""Front ends' torch-free arithmetic, one module per front end kind, as kiln/nets/ has one per
net family: what the manifest loader and kiln/sizing.py need without torch.

Each module has ``output_shape(fe, layout, raw_shape, sample_rate) -> (C, H, W)`` (the net's
input made of one raw sample) and ``cost(fe, layout, raw_shape, sample_rate) -> (float32
constants, multiply-accumulates)`` per sample. The settings models in kiln/schema/frontends.py
call them; the torch side (``fit``, ``module``, ``reference``) is passes/frontends/<kind>.py.
"""

from __future__ import annotations


def elementwise_cost(shape: tuple[int, int, int]) -> tuple[int, int]:
    """A front end that touches each output value once: no constants, one MAC per value (the
    front end runs in float inside the library, also in an int8 one)."""
    c, h, w = shape
    return 0, c * h * w
