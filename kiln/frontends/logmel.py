"""Front end ``logmel``'s shape and cost: 1 x frames x mels (torch: passes/frontends/logmel.py)."""

from __future__ import annotations

from kiln.frontends import spectral


KERNELS = spectral.KERNELS


def output_shape(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int, int]:
    return (1, spectral.frames(fe, raw_shape[0], sample_rate), fe.mels)


def cost(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int]:
    return spectral.cost(fe, raw_shape, sample_rate)
