"""Front end ``logmel``: raw int16 audio (L,) -> 1 x frames x mels log-mel energies, inside the
kernel library (definitions in passes/frontends/support/spectral.py)."""

from __future__ import annotations

import numpy as np

from passes.frontends.support import spectral


def fit(fe, layout, raw_train: np.ndarray) -> dict:
    """Nothing to fit: every basis is fixed by the settings."""
    return {}


def module(fe, layout, raw_shape, stats, sample_rate):
    """(B, L) raw int16 values as float32 -> (B, 1, frames, mels)."""
    return spectral.logmel_module(fe, tuple(raw_shape), sample_rate)


def reference(fe, layout, raw, stats, sample_rate) -> np.ndarray:
    """(N, 1, frames, mels) float64, with numpy's FFT."""
    return spectral.reference_logmel(fe, raw, sample_rate)[:, None]
