"""Front end ``mfcc``: raw int16 audio (L,) -> 1 x frames x coefficients MFCCs, inside the kernel
library: the log-mel energies of passes/frontends/support/spectral.py times the first ``coefficients``
columns of the orthonormal DCT-II matrix (scipy's ``dct(type=2, norm="ortho")``)."""

from __future__ import annotations

import numpy as np

from passes.frontends.support import spectral


def dct_matrix(mels: int, coefficients: int) -> np.ndarray:
    """(mels, coefficients) float64: log-mel row vector @ it = its first DCT-II coefficients,
    orthonormal (coefficient 0 scaled by sqrt(1/mels), the others by sqrt(2/mels))."""
    m = np.arange(mels)[:, None]
    j = np.arange(coefficients)[None, :]
    basis = np.cos(np.pi * (m + 0.5) * j / mels) * np.sqrt(2.0 / mels)
    basis[:, 0] = np.sqrt(1.0 / mels)
    return basis


def fit(fe, layout, raw_train: np.ndarray) -> dict:
    """Nothing to fit: every basis is fixed by the settings."""
    return {}


def module(fe, layout, raw_shape, stats, sample_rate):
    """(B, L) raw int16 values as float32 -> (B, 1, frames, coefficients)."""
    return spectral.logmel_module(fe, tuple(raw_shape), sample_rate, dct=dct_matrix(fe.mels, fe.coefficients))


def reference(fe, layout, raw, stats, sample_rate) -> np.ndarray:
    """(N, 1, frames, coefficients) float64: numpy's FFT, scipy's DCT."""
    from scipy.fft import dct

    logmel = spectral.reference_logmel(fe, raw, sample_rate)
    return dct(logmel, type=2, norm="ortho", axis=-1)[..., :fe.coefficients][:, None]
