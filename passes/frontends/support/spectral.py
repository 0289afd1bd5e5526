"""What the audio front ends (mfcc, logmel) share: framing (one Gather), the DFT as two GEMMs
(:class:`TwoStageDFT`), the power spectrum, the mel filterbank and the log, all against fixed
bases, so the exported graph holds only ops TVM's ONNX frontend imports (ReduceMean, Sub,
Gather, Reshape, Mul, Add, MatMul, Log, Transpose, Unsqueeze); it has no STFT or DFT.

Why two GEMMs and no strided Conv1d (the previous graph): TVM tunes a GEMM well and a 480-tap
Conv1d of one input channel badly (1.76 ms after 32 trials on x86-host where ONNX Runtime took
0.26 ms), and Cooley-Tukey's split cuts the DFT's MACs to a quarter (bench/latency.py has the
figures). numpy's FFT is the reference in the tests; torch.fft does not export to ONNX at opset
17 and TVM imports no DFT op.

Definitions (the same in ``module`` and in the numpy ``reference``):

* the raw int16 values are scaled by 1/32768 (folded into the window);
* frames of ``window`` samples every ``hop`` (no padding: ``1 + (L - window) // hop`` frames,
  49 for 1 s at MLPerf Tiny's 30 ms / 20 ms), each times a periodic Hann window
  ``0.5 - 0.5 cos(2 pi n / window)`` (tf.signal's and torch's default) and zero-padded to ``fft``
  points: stage 1 reads only the samples below the window's end, so the padding costs nothing;
* power = re^2 + im^2 of the real DFT (bins 0..fft/2);
* mel filterbank: HTK mel scale ``2595 log10(1 + f / 700)``, ``mels + 2`` edges equally spaced in
  mel from ``fmin`` to ``fmax``, triangles of peak 1 evaluated at each bin's mel value (as
  tf.signal.linear_to_mel_weight_matrix, which MLPerf Tiny's keyword spotting uses; no area
  normalisation);
* log(mel energy + ``log_offset``).

The clip's mean is taken out before framing and its exact DFT added back (see
``LogMelModule.forward``): the same features, without a DC offset cancelling in float32 sums.

Only the DFT bins some mel band weighs are computed (bins above ``fmax`` or below ``fmin``
never reach a feature): at the defaults bins 1..127 of 257, half the MACs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kiln.errors import PassError
from kiln.frontends.spectral import factors, per_residue

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


def hann(win: int) -> np.ndarray:
    """The periodic Hann window times 1/32768 (the raw int16 values' full scale), float64."""
    n = np.arange(win)
    return (0.5 - 0.5 * np.cos(2 * np.pi * n / win)) * INT16_SCALE


def _cis(num: np.ndarray, den: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2 pi num / den, the integer angle reduced mod den first (no bits lost for
    large products)."""
    a = 2 * np.pi * (num % den) / den
    return np.cos(a), np.sin(a)


class TwoStageDFT:
    """The real DFT of every frame at bins lo..hi-1 in two GEMMs (Cooley-Tukey with fft = q * p,
    sample n = p * n1 + n2, bin k = r + q * m, r = k mod q):

    * stage 1, a q-point DFT of each of the p sub-sequences x[p n1 + n2] (n1 = 0..rows-1, the
      samples below the window's end): ``C (2q, rows) @ frames (rows, p * frames)``, rows of C
      cos then -sin per residue r, so its output reshapes for free to (q, [re p; im p], frames);
    * stage 2, per residue r the twiddles e^(-2 pi i n2 k / fft) and the sum over n2:
      ``T (q, 2m, 2p) @ Y (q, 2p, frames)``, rows of T re then im of the bins k = r + q m.

    At MLPerf Tiny's settings (fft 512, q 16, p 32, 480-sample window, bins 1..127, 49 frames)
    that is 1.6 M MACs where the plain DFT (one strided conv, the previous graph) took 6.0 M.
    ``factors`` (kiln/frontends/spectral.py) picks q. Bins are laid out (r, re/im, m); ``slots``
    maps them to bin numbers (-1: an unused slot, zero in T).
    """

    def __init__(self, win: int, fft: int, lo: int, hi: int, frames: int, hop: int):
        q, p = factors(fft, win, lo, hi, frames)
        rows, m = -(-win // p), per_residue(q, lo, hi)
        self.q, self.p, self.rows, self.m = q, p, rows, m
        # gather index (rows, p, frames) of sample n = p n1 + n2 of frame f; the samples past the
        # window (n >= win: the FFT's zero padding) read sample 0 and are weighed 0
        n = p * np.arange(rows)[:, None] + np.arange(p)[None, :]
        self.index = np.where(n < win, n, 0)[:, :, None] + hop * np.arange(frames)[None, None, :]
        self.window = np.where(n < win, hann(win)[np.minimum(n, win - 1)], 0.0)[:, :, None]
        c, s = _cis(np.arange(q)[:, None] * np.arange(rows)[None, :], q)
        self.stage1 = np.stack([c, -s], axis=1).reshape(2 * q, rows)  # rows (r, re/im)
        self.slots = np.full((q, m), -1)
        for r in range(q):
            ks = np.arange(lo + (r - lo) % q, hi, q)
            self.slots[r, :len(ks)] = ks
        k = np.maximum(self.slots, 0)[:, :, None]  # (q, m, 1)
        used = (self.slots >= 0)[:, :, None]
        c, s = _cis(k * np.arange(p)[None, None, :], fft)  # (q, m, p)
        c, s = c * used, s * used
        # re = sum cos Yre + sin Yim; im = sum cos Yim - sin Yre
        self.stage2 = np.concatenate([np.concatenate([c, s], axis=2), np.concatenate([-s, c], axis=2)], axis=1)
        # the DFT of a constant 1 at every slot (the clip's mean is added back with it)
        c, s = _cis(k * np.arange(win)[None, None, :], fft)
        w = hann(win)[None, None, :]
        self.dc = np.concatenate([(c * w).sum(-1, keepdims=True), -(s * w).sum(-1, keepdims=True)], axis=1) * np.concatenate([used, used], axis=1)

    def mel_rows(self, mel: np.ndarray) -> np.ndarray:
        """(q * 2m, mels): the mel weights (bins x mels, all fft/2 + 1 bins) in the slots'
        layout, twice (re and im), zero at the unused slots: power @ it = the mel energies."""
        w = np.where((self.slots >= 0)[:, :, None], mel[np.maximum(self.slots, 0)], 0.0)  # (q, m, mels)
        return np.concatenate([w, w], axis=1).reshape(self.q * 2 * self.m, -1)


def logmel_module(fe, raw_shape, sample_rate, dct: np.ndarray | None = None) -> "LogMelModule":
    """The torch module of a spectral front end: raw (B, L) -> (B, 1, frames, mels) log-mel
    energies, times ``dct`` (mels, k) when given (MFCC)."""
    win, hop, frames = geometry(fe, raw_shape, sample_rate)
    weights = mel_matrix(fe, float(sample_rate))
    lo, hi = used_bins(weights)
    return LogMelModule(TwoStageDFT(win, fe.fft, lo, hi, frames, hop), weights, fe.log_offset, dct).eval()


def _const(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)


class LogMelModule(torch.nn.Module):
    """Frames gathered and windowed -> two-stage DFT (two GEMMs, :class:`TwoStageDFT`) -> power
    -> mel GEMM -> log (-> DCT GEMM); float32 constants computed in float64. Every GEMM keeps
    the frames as its last (column) axis, so the reshapes between them are free in TVM (views)
    and the only transpose is of the (coefficients x frames) result."""

    def __init__(self, dft: TwoStageDFT, mel: np.ndarray, log_offset: float, dct: np.ndarray | None):
        super().__init__()
        self.q, self.p, self.rows, self.m = dft.q, dft.p, dft.rows, dft.m
        self.register_buffer("index", torch.tensor(dft.index.reshape(-1), dtype=torch.int64))
        self.register_buffer("window", _const(dft.window))  # (rows, p, 1)
        self.register_buffer("stage1", _const(dft.stage1))  # (2q, rows)
        self.register_buffer("stage2", _const(dft.stage2))  # (q, 2m, 2p)
        self.register_buffer("dc", _const(dft.dc))  # (q, 2m, 1)
        self.register_buffer("mel", _const(dft.mel_rows(mel).T))  # (mels, q 2m)
        self.log_offset = float(log_offset)
        self.register_buffer("dct", None if dct is None else _const(dct.T))  # (k, mels)
        self.frames = dft.index.shape[2]

    def forward(self, x):
        b = x.shape[0]
        # DFT(x) = DFT(x - g) + g * DFT(1): the same in exact arithmetic, but a DC offset (a
        # microphone's, or a clip at full scale) no longer cancels inside the float32 sums, where
        # it cost up to ~1e-3 on the log of weak bands; what is left of it is rounded once
        g = x.mean(dim=1, keepdim=True)  # (B, 1)
        frames = (x - g)[:, self.index].reshape(b, self.rows, self.p, self.frames) * self.window
        y = torch.matmul(self.stage1, frames.reshape(b, self.rows, self.p * self.frames))  # (B, 2q, p F)
        y = y.reshape(b, self.q, 2 * self.p, self.frames)
        spec = torch.matmul(self.stage2, y) + g.reshape(b, 1, 1, 1) * self.dc  # (B, q, 2m, F)
        power = (spec * spec).reshape(b, self.q * 2 * self.m, self.frames)
        feats = torch.log(torch.matmul(self.mel, power) + self.log_offset)  # (B, mels, F)
        if self.dct is not None:
            feats = torch.matmul(self.dct, feats)
        return feats.transpose(1, 2).unsqueeze(1)  # (B, 1, frames, bins)


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
