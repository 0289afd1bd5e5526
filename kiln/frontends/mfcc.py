"""Front end ``mfcc``'s shape and cost: 1 x frames x coefficients (torch: passes/frontends/mfcc.py)."""

from __future__ import annotations

from kiln.frontends import spectral


KERNELS = spectral.KERNELS + 1  # and the DCT's GEMM


def output_shape(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int, int]:
    return (1, spectral.frames(fe, raw_shape[0], sample_rate), fe.coefficients)


def cost(fe, layout: str, raw_shape: tuple[int, ...], sample_rate: float | None = None) -> tuple[int, int]:
    return spectral.cost(fe, raw_shape, sample_rate, dct=fe.mels * fe.coefficients)
