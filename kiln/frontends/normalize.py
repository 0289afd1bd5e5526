"""Front end ``normalize``'s shape and cost (torch: passes/frontends/normalize.py): an image's
C x H x W, a sequence's C x 1 x L, a table's 1 x 1 x F; one MAC per value."""

from __future__ import annotations

from kiln.frontends import elementwise_cost


KERNELS = 1  # one elementwise kernel (kiln/sizing.py's per-kernel cost)


def output_shape(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int, int]:
    if layout == "image":
        h, w, c = raw_shape
        return (c, h, w)
    if layout == "sequence":
        length, c = raw_shape
        return (c, 1, length)
    return (1, 1, raw_shape[0])


def cost(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int]:
    return elementwise_cost(output_shape(fe, layout, raw_shape, sample_rate))
