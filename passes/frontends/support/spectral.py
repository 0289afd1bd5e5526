"""What the audio front ends (mfcc, logmel) share: framing and the DFT as one strided Conv1d,
the power spectrum, the mel filterbank and the log, all against fixed bases, so the exported
graph holds only ops TVM's ONNX frontend imports (ReduceMean, Sub, Unsqueeze, Conv, Mul, Add,
Transpose, MatMul, Log); it has no STFT or DFT.

Definitions (the same in ``module`` and in the numpy ``reference``):

* the raw int16 values are scaled by 1/32768 (folded into the DFT kernels);
* frames of ``window`` samples every ``hop`` (no padding: ``1 + (L - window) // hop`` frames,
  49 for 1 s at MLPerf Tiny's 30 ms / 20 ms), each times a periodic Hann window
  ``0.5 - 0.5 cos(2 pi n / window)`` (tf.signal's and torch's default) and zero-padded to ``fft``
  points: only the ``window`` taps of each DFT kernel are nonzero, so the padding costs nothing;
* power = re^2 + im^2 of the real DFT (bins 0..fft/2);
* mel filterbank: HTK mel scale ``2595 log10(1 + f / 700)``, ``mels + 2`` edges equally spaced in
  mel from ``fmin`` to ``fmax``, triangles of peak 1 evaluated at each bin's mel value (as
  tf.signal.linear_to_mel_weight_matrix, which MLPerf Tiny's keyword spotting uses; no area
  normalisation);
* log(mel energy + ``log_offset``).

The clip's mean is taken out before the DFT and its exact DFT added back (see
``LogMelModule.forward``): the same features, without a DC offset cancelling in float32 sums.

Only the DFT bins some mel band weighs are computed (bins above ``fmax`` or below ``fmin``
never reach a feature): at the defaults bins 1..127 of 257, half the MACs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kiln.errors import PassError

log = logging.getLogger("kiln.frontends")

INT16_SCALE = 1.0 / 32768.0


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def geometry(fe, raw_shape: tuple[int, ...], sample_rate: float | None) -> tuple[int, int, int]:
    """(window, hop, frames) of a clip of ``raw_shape`` = (L,) samples; a PassError naming the
    front end's field when the settings do not fit the clip or the sample rate."""
    if sample_rate is None:
        raise PassError(f"front end '{fe.kind}': needs the dataset's sample_rate")
    if len(raw_shape) != 1:
        raise PassError(f"front end '{fe.kind}': takes audio clips of shape (L,), not {tuple(raw_shape)}")
    try:
        frames = fe.frames(int(raw_shape[0]), float(sample_rate))
    except ValueError as e:
        raise PassError(f"front end '{fe.kind}' (dataset.front_end): {e}") from e
    win, hop = fe.window(float(sample_rate))
    return win, hop, frames


def mel_matrix(fe, sample_rate: float) -> np.ndarray:
    """(fft/2 + 1, mels) float64 triangular HTK mel weights (see the module docstring)."""
    bins = fe.fft // 2 + 1
    bin_mel = hz_to_mel(np.arange(bins) * sample_rate / fe.fft)[:, None]
    edges = np.linspace(hz_to_mel(fe.fmin), hz_to_mel(fe.fmax), fe.mels + 2)
    lower, center, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
    rising = (bin_mel - lower) / (center - lower)
    falling = (upper - bin_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    empty = np.flatnonzero(weights.sum(axis=0) == 0)
    if len(empty):
        # a band narrower than a bin weighs nothing: its feature is log(log_offset), constant
        log.warning("front end '%s': %d of %d mel bands hold no FFT bin (bands %s; fft %d at %g Hz): "
                    "their features are constant", fe.kind, len(empty), fe.mels, empty[:5].tolist(), fe.fft,
                    sample_rate)
    return weights


def used_bins(weights: np.ndarray) -> tuple[int, int]:
    """[lo, hi) of the DFT bins some mel band weighs."""
    nz = np.flatnonzero(weights.sum(axis=1) > 0)
    if len(nz) == 0:
        raise PassError("front end: no FFT bin falls in any mel band (dataset.front_end fmin/fmax/fft)")
    return int(nz[0]), int(nz[-1]) + 1


def dft_kernels(win: int, fft: int, lo: int, hi: int) -> np.ndarray:
    """(2 (hi - lo), 1, win) Conv1d weights: rows lo..hi-1 window * cos, then window * -sin, scaled
    by 1/32768 (the raw int16 values' full scale)."""
    n = np.arange(win)
    k = np.arange(lo, hi)[:, None]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win)
    # the angle reduced mod fft in integers: cos(2 pi k n / fft) for large k n loses no bits
    angle = 2 * np.pi * ((k * n) % fft) / fft
    basis = np.concatenate([np.cos(angle), -np.sin(angle)]) * hann * INT16_SCALE
    return basis[:, None, :]


def logmel_module(fe, raw_shape, sample_rate, dct: np.ndarray | None = None) -> "LogMelModule":
    """The torch module of a spectral front end: raw (B, L) -> (B, 1, frames, mels) log-mel
    energies, times ``dct`` (mels, k) when given (MFCC)."""
    win, hop, frames = geometry(fe, raw_shape, sample_rate)
    weights = mel_matrix(fe, float(sample_rate))
    lo, hi = used_bins(weights)
    return LogMelModule(dft_kernels(win, fe.fft, lo, hi), hop, weights[lo:hi], fe.log_offset, dct).eval()


class LogMelModule(torch.nn.Module):
    """Conv1d DFT -> power -> mel matmul -> log (-> DCT matmul); float32 constants computed in
    float64."""

    def __init__(self, kernels: np.ndarray, hop: int, mel: np.ndarray, log_offset: float, dct: np.ndarray | None):
        super().__init__()
        # the DFT of every frame as one strided conv: out channel j is bin j's re (first half)
        # or im (second half)
        self.dft = torch.nn.Conv1d(1, kernels.shape[0], kernels.shape[2], stride=hop, bias=False)
        self.dft.weight = torch.nn.Parameter(torch.tensor(kernels, dtype=torch.float32), requires_grad=False)
        # [mel; mel]: re^2 @ mel + im^2 @ mel in one matmul (the power's sum is in it)
        self.register_buffer("mel", torch.tensor(np.concatenate([mel, mel]), dtype=torch.float32))
        self.log_offset = float(log_offset)
        self.register_buffer("dct", None if dct is None else torch.tensor(dct, dtype=torch.float32))
        # each kernel's sum (float64, then rounded): a constant's DFT, added back after the clip's
        # mean is taken out (see forward)
        self.register_buffer("dc", torch.tensor(kernels.sum(axis=2), dtype=torch.float32))  # (2K, 1)

    def forward(self, x):
        # DFT(x) = DFT(x - g) + g * DFT(1): the same in exact arithmetic, but a DC offset (a
        # microphone's, or a clip at full scale) no longer cancels inside the float32 sums, where
        # it cost up to ~1e-3 on the log of weak bands; what is left of it is rounded once
        g = x.mean(dim=1, keepdim=True)  # (B, 1)
        spec = self.dft((x - g).unsqueeze(1)) + g.unsqueeze(2) * self.dc  # (B, 2K, frames)
        energy = torch.matmul((spec * spec).transpose(1, 2), self.mel)  # (B, frames, mels)
        feats = torch.log(energy + self.log_offset)
        if self.dct is not None:
            feats = torch.matmul(feats, self.dct)
        return feats.unsqueeze(1)  # (B, 1, frames, bins)


def reference_logmel(fe, raw: np.ndarray, sample_rate: float) -> np.ndarray:
    """(N, frames, mels) float64 log-mel energies, independently of ``module``: index framing,
    np.hanning, np.fft.rfft, mel triangles by np.interp per band."""
    raw = np.asarray(raw)
    win, hop, frames = geometry(fe, raw.shape[1:], sample_rate)
    x = raw.astype(np.float64) / 32768.0
    idx = np.arange(frames)[:, None] * hop + np.arange(win)[None, :]
    hann = np.hanning(win + 1)[:-1]  # the periodic Hann window
    power = np.abs(np.fft.rfft(x[:, idx] * hann, n=fe.fft, axis=-1)) ** 2  # (N, frames, fft/2+1)
    freqs = np.fft.rfftfreq(fe.fft, 1.0 / sample_rate)
    mel_of = 1127.0 * np.log(1.0 + freqs / 700.0)  # = 2595 log10(1 + f/700)
    edges = np.linspace(1127.0 * np.log1p(fe.fmin / 700.0), 1127.0 * np.log1p(fe.fmax / 700.0), fe.mels + 2)
    bank = np.stack([np.interp(mel_of, edges[m:m + 3], [0.0, 1.0, 0.0], left=0.0, right=0.0)
                     for m in range(fe.mels)], axis=1)
    return np.log(power @ bank + fe.log_offset)
