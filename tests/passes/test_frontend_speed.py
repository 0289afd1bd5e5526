"""The spectral front ends' DFT as two GEMMs (passes/frontends/support/spectral.py TwoStageDFT,
#28 item 3): its float64 bases equal numpy's FFT at every bin a mel band uses, for the default
factorization and for others (a prime FFT, a window shorter than the FFT); it costs a fraction
of the plain DFT's MACs; the exported graph has no Conv, and kiln's torch-free cost counts what
it computes. The features against the numpy reference and the TVM library against the host are
tests/passes/test_frontends.py's (1e-4 relative)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.frontends import spectral as kspec
from kiln.schema import LogmelFrontEnd, MfccFrontEnd
from passes import frontends
from passes.frontends import mfcc
from passes.frontends.support import spectral


def two_stage_numpy(dft: spectral.TwoStageDFT, x: np.ndarray) -> np.ndarray:
    """(q, m, frames) complex spectrum at the slots: the module's arithmetic in float64."""
    frames = x[dft.index.reshape(-1)].reshape(dft.index.shape) * dft.window  # (rows, p, F)
    y = (dft.stage1 @ frames.reshape(dft.rows, -1)).reshape(dft.q, 2 * dft.p, -1)
    spec = dft.stage2 @ y  # (q, 2m, F)
    return spec[:, :dft.m] + 1j * spec[:, dft.m:]  # (q, m, F)


@pytest.mark.parametrize("win, fft, lo, hi, hop", [(480, 512, 1, 128, 320), (256, 256, 2, 100, 128),
                                                    (200, 211, 0, 106, 80), (100, 128, 0, 65, 50)],
                         ids=["mlperf", "fft256", "prime-fft", "short-window"])
def test_two_stage_dft_equals_numpy_fft(win, fft, lo, hi, hop):
    frames = 5
    dft = spectral.TwoStageDFT(win, fft, lo, hi, frames, hop)
    assert dft.q * dft.p == fft
    x = np.random.default_rng(0).normal(0, 3000, (frames - 1) * hop + win)
    got = two_stage_numpy(dft, x)
    idx = np.arange(frames)[:, None] * hop + np.arange(win)[None, :]
    want = np.fft.rfft(x[idx] * spectral.hann(win), n=fft, axis=-1)  # (F, bins)
    used = dft.slots >= 0
    assert sorted(dft.slots[used].tolist()) == list(range(lo, hi))  # every bin once
    np.testing.assert_allclose(got[used], want[:, dft.slots[used]].T, rtol=0, atol=1e-9 * np.abs(want).max())
    assert np.all(got[~used] == 0)
    # a constant clip: its DFT is what the module adds back after taking the mean out
    dc = dft.dc[:, :dft.m, 0] + 1j * dft.dc[:, dft.m:, 0]
    np.testing.assert_allclose(dc, two_stage_numpy(dft, np.ones_like(x))[..., 0], atol=1e-12)


def test_two_stage_dft_takes_a_quarter_of_the_plain_dfts_macs():
    q, p = kspec.factors(512, 480, 1, 128, 49)
    assert (q, p) == (16, 32)
    plain = 49 * 2 * 127 * 480  # the strided Conv1d of the previous graph
    assert kspec.two_stage_macs(q, p, 480, 1, 128, 49) < 0.3 * plain
    assert sorted(kspec.factors(211, 200, 0, 106, 5)) == [1, 211]  # prime: the plain DFT's work, still exact


def test_exported_front_end_is_gemms_and_kilns_cost_counts_them(tmp_path):
    fe = MfccFrontEnd(kind="mfcc")
    model = frontends.export_onnx(fe, "audio", (16000,), {}, 16000, tmp_path / "fe.onnx")
    ops = [n.op_type for n in model.graph.node]
    assert "Conv" not in ops and ops.count("MatMul") == 4 and ops.count("Gather") == 1, ops
    mod = mfcc.module(fe, "audio", (16000,), {}, 16000)
    consts, macs = fe.cost("audio", (16000,), 16000)
    F = 49
    counted = (mod.stage1.numel() * mod.p * F + mod.stage2.numel() * F + mod.mel.numel() * F
               + mod.dct.numel() * F + mod.mel.shape[1] * F)  # + the power's squares
    assert 0 <= macs - counted < 0.1 * counted, (macs, counted)  # kiln counts a few unused bins more
    assert macs < 0.4 * (49 * 2 * 127 * 480)  # well under the plain DFT's 6.0 M


@pytest.mark.parametrize("fe", [MfccFrontEnd(kind="mfcc", fft=256, window_ms=16, hop_ms=8, mels=20, coefficients=8),
                                LogmelFrontEnd(kind="logmel", fft=1024, window_ms=40, hop_ms=25)],
                         ids=["mfcc-fft256", "logmel-fft1024"])
def test_other_factorizations_match_the_reference(fe):
    from passes.frontends import logmel

    impl = mfcc if fe.kind == "mfcc" else logmel
    raw = np.clip(np.random.default_rng(1).normal(0, 4000, (3, 16000)), -32768, 32767).astype(np.int16)
    host = frontends.features(fe, "audio", raw, {}, 16000).transpose(0, 3, 1, 2)
    ref = impl.reference(fe, "audio", raw, {}, 16000)
    assert frontends.relative_error(host, ref) < 1e-4
