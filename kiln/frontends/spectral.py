"""What the audio front ends (mfcc, logmel) share without torch: the window and hop in samples,
the frame count and its checks, and the cost of the DFT, power and mel matmuls (their torch
graph is passes/frontends/support/spectral.py)."""

from __future__ import annotations


def window(fe, sample_rate: float) -> tuple[int, int]:
    """(window, hop) in samples."""
    return round(sample_rate * fe.window_ms / 1000), max(1, round(sample_rate * fe.hop_ms / 1000))


def frames(fe, length: int, sample_rate: float) -> int:
    """Frames of a clip of ``length`` samples (no padding); ValueError when the settings do not
    fit the clip or the sample rate."""
    win, hop = window(fe, sample_rate)
    if win > length:
        raise ValueError(f"a {fe.window_ms} ms window ({win} samples) is longer than the clip ({length} samples)")
    if win > fe.fft:
        raise ValueError(f"fft ({fe.fft}) must be at least the window's {win} samples")
    if fe.fmax > sample_rate / 2:
        raise ValueError(f"fmax ({fe.fmax} Hz) is above half the sample rate ({sample_rate / 2:g} Hz)")
    return 1 + (length - win) // hop


def cost(fe, raw_shape: tuple[int, ...], sample_rate: float, dct: int = 0) -> tuple[int, int]:
    """The DFT over the FFT bins a mel band can use (fmin to fmax), the power, the mel matmul
    and ``dct`` (mels x coefficients for MFCC) per frame; an estimate: passes/frontends/support/spectral.py
    drops the bins whose mel weights are all zero."""
    win, _ = window(fe, sample_rate)
    n = frames(fe, raw_shape[0], sample_rate)
    step = sample_rate / fe.fft
    nbins = min(fe.fft // 2, int(fe.fmax / step) + 1) - int(fe.fmin / step) + 1
    consts = 2 * win * nbins + nbins * fe.mels + dct
    return consts, n * (2 * win * nbins + 2 * nbins + nbins * fe.mels + dct)
