"""What the audio front ends (mfcc, logmel) share without torch: the window and hop in samples,
the frame count and its checks, the two-stage DFT's factors and the cost of the DFT, power
and mel matmuls (their torch graph is passes/frontends/support/spectral.py)."""

from __future__ import annotations


# kernels of the library's log-mel graph (kiln/sizing.py's per-kernel cost): the mean, the
# gather, the two DFT GEMMs, the mel GEMM with its log, the transpose out
KERNELS = 6

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
    """(float32 constants, MACs) of the two-stage DFT over the FFT bins a mel band can use (fmin
    to fmax; see :func:`factors`), the power, the mel matmul over the DFT's slots and ``dct``
    (mels x coefficients for MFCC) per frame; an estimate: passes/frontends/support/spectral.py
    drops the bins whose mel weights are all zero. The gather index (int64) counts as two."""
    win, _ = window(fe, sample_rate)
    n = frames(fe, raw_shape[0], sample_rate)
    step = sample_rate / fe.fft
    lo = int(fe.fmin / step)
    hi = min(fe.fft // 2, int(fe.fmax / step) + 1) + 1
    q, p = factors(fe.fft, win, lo, hi, n)
    rows, slots = -(-win // p), 2 * q * per_residue(q, lo, hi)
    consts = rows * p * (1 + 2 * n) + 2 * q * rows + slots * 2 * p + slots + slots * fe.mels + dct
    return consts, two_stage_macs(q, p, win, lo, hi, n) + n * (slots + slots * fe.mels + dct)


def per_residue(q: int, lo: int, hi: int) -> int:
    """The most bins of lo..hi-1 that share one residue k mod q."""
    return max(len(range(lo + (r - lo) % q, hi, q)) for r in range(q))


def two_stage_macs(q: int, p: int, win: int, lo: int, hi: int, frames: int) -> int:
    """Multiply-accumulates of the two-stage DFT (see :func:`factors`) over ``frames`` frames."""
    rows = -(-win // p)  # ceil: stage 1's sub-sequences hold the window's samples only
    return 2 * q * rows * p * frames + q * 2 * per_residue(q, lo, hi) * 2 * p * frames


def factors(fft: int, win: int, lo: int, hi: int, frames: int) -> tuple[int, int]:
    """(q, p) with q * p = fft for the two-stage DFT of passes/frontends/support/spectral.py with
    the fewest multiply-accumulates: stage 1 a q-point DFT of each of the p interleaved
    sub-sequences (one GEMM), stage 2 the twiddles and p-term sums of bins lo..hi-1 (a GEMM per
    residue k mod q). A prime ``fft`` gets q = 1 or fft: about the plain DFT's work."""
    return min(((q, fft // q) for q in range(1, fft + 1) if fft % q == 0),
               key=lambda qp: two_stage_macs(qp[0], qp[1], win, lo, hi, frames))
