"""Front ends (passes/frontends/): mfcc, logmel and normalize against their independent numpy
references, their shapes against the schema's output_shape, and the kernel library TVM builds
from the exported ONNX (raw int16 / uint8 input) against the host's torch module.

Precision is ``frontends.relative_error``: per sample max |a - b| / max |b|, max over samples."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kiln.errors import PassError
from kiln.schema import LogmelFrontEnd, MfccFrontEnd, NormalizeFrontEnd
from passes import frontends
from passes.frontends import logmel, mfcc, normalize
from passes.frontends.support import spectral

SR, L = 16000, 16000
TOL_SPECTRAL = 1e-4  # the "host features equal the library's to 1e-4 relative"
TOL_NORMALIZE = 1e-6
log = logging.getLogger("kiln.test")


def clips(length: int = L, sr: int = SR) -> np.ndarray:
    """int16 clips that stress float32: noise, a loud low tone on a DC offset (leakage into weak
    bands), silence then a tone, near-silence, full-scale DC, zeros, a keyword-like harmonic sweep."""
    rng = np.random.default_rng(0)
    t = np.arange(length) / sr
    sweep = sum(np.sin(2 * np.pi * h * (180 + 120 * t) * t) / h for h in range(1, 8))
    out = [
        rng.normal(0, 3000, length),
        20000 * np.sin(2 * np.pi * 100 * t) + 8000,
        np.where(t < t[-1] / 2, 0, 15000 * np.sin(2 * np.pi * 1000 * t)),
        rng.normal(0, 2, length),
        np.full(length, 32767.0),
        np.zeros(length),
        8000 * np.sin(np.pi * t / t[-1]) ** 2 * sweep + rng.normal(0, 50, length),
    ]
    return np.clip(np.rint(np.stack(out)), -32768, 32767).astype(np.int16)


SPECTRAL = [(MfccFrontEnd(kind="mfcc"), mfcc), (LogmelFrontEnd(kind="logmel"), logmel)]


@pytest.mark.parametrize("fe, impl", SPECTRAL, ids=["mfcc", "logmel"])
def test_spectral_module_matches_numpy_reference(fe, impl):
    raw = clips()
    host = frontends.features(fe, "audio", raw, {}, SR)  # NHWC
    ref = impl.reference(fe, "audio", raw, {}, SR)  # NCHW float64
    want = fe.output_shape("audio", (L,), SR)
    assert want == ((1, 49, 10) if fe.kind == "mfcc" else (1, 49, 40))
    assert host.shape == (len(raw), want[1], want[2], want[0]) and host.dtype == np.float32
    assert ref.shape == (len(raw), *want)
    err = frontends.relative_error(host.transpose(0, 3, 1, 2), ref)
    log.info("%s host vs numpy float64: %.2e", fe.kind, err)
    assert err < TOL_SPECTRAL, err
    # a clip at full-scale DC: the offset is taken out before the float32 DFT sums (without
    # that, ~9e-5 here)
    assert frontends.relative_error(host[4:5].transpose(0, 3, 1, 2), ref[4:5]) < 1e-6


def test_spectral_other_settings_follow_the_schema_shape():
    fe = MfccFrontEnd(kind="mfcc", window_ms=32, hop_ms=16, fft=256, mels=20, fmin=50, fmax=3500,
                      coefficients=13, log_offset=1e-4)
    raw = clips(length=4000, sr=8000)
    want = fe.output_shape("audio", (4000,), 8000)
    assert want == (1, 1 + (4000 - 256) // 128, 13)
    host = frontends.features(fe, "audio", raw, {}, 8000)
    assert host.shape == (len(raw), want[1], want[2], 1)
    ref = mfcc.reference(fe, "audio", raw, {}, 8000)
    assert frontends.relative_error(host.transpose(0, 3, 1, 2), ref) < TOL_SPECTRAL


def test_mel_bank_and_computed_bins():
    fe = LogmelFrontEnd(kind="logmel")
    weights = spectral.mel_matrix(fe, SR)
    assert weights.shape == (257, 40) and np.all(weights.sum(axis=0) > 0)  # every band weighs a bin
    assert np.isclose(weights.max(), 1.0, atol=0.05) and weights.min() == 0
    lo, hi = spectral.used_bins(weights)
    assert lo >= 1 and hi <= 129  # nothing at DC, nothing above 4000 Hz (bin 128)
    mod = logmel.module(fe, "audio", (L,), {}, SR)
    # only the bins some band weighs: 127 of them in 16 residues x 8 slots of the two-stage DFT
    assert (mod.q, mod.p, mod.m) == (16, 32, 8) and mod.q * mod.m >= hi - lo


def test_spectral_settings_that_do_not_fit_are_pass_errors():
    with pytest.raises(PassError, match="longer than the clip"):
        mfcc.module(MfccFrontEnd(kind="mfcc"), "audio", (400,), {}, SR)
    with pytest.raises(PassError, match="sample_rate"):
        mfcc.module(MfccFrontEnd(kind="mfcc"), "audio", (L,), {}, None)
    with pytest.raises(PassError, match="half the sample rate"):
        logmel.module(LogmelFrontEnd(kind="logmel"), "audio", (L,), {}, 4000)


NORMALIZE = [("image", (6, 5, 3), "uint8"), ("sequence", (20, 3), "float32"), ("table", (7,), "float32")]


def _raw(layout, shape, dtype, n=40, seed=1):
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        return rng.integers(0, 256, (n, *shape)).astype(np.uint8)
    # sensor-like: channels far from zero (the last like a barometer, Pa), with different spreads
    return (rng.normal(0, 1, (n, *shape)) * np.linspace(0.5, 10, shape[-1]) + np.linspace(-200, 101325, shape[-1])
            ).astype(np.float32)


@pytest.mark.parametrize("layout, shape, dtype", NORMALIZE, ids=[n[0] for n in NORMALIZE])
def test_normalize_fit_module_and_reference(layout, shape, dtype):
    fe = NormalizeFrontEnd(kind="normalize")
    raw = _raw(layout, shape, dtype)
    stats = normalize.fit(fe, layout, raw)
    scale = 1 / 255 if layout == "image" else 1.0
    flat = raw.reshape(-1, shape[-1]).astype(np.float64) * scale
    assert np.allclose(stats["mean"], flat.mean(axis=0)) and np.allclose(stats["std"], flat.std(axis=0))
    assert all(type(v) is float for v in stats["mean"] + stats["std"])
    host = frontends.features(fe, layout, raw, stats, None)
    ref = normalize.reference(fe, layout, raw, stats)
    want = fe.output_shape(layout, shape)
    assert ref.shape == (len(raw), *want) and host.shape == (len(raw), want[1], want[2], want[0])
    assert frontends.relative_error(host.transpose(0, 3, 1, 2), ref) < TOL_NORMALIZE
    # fitted on the training split: the features come out centred, unit spread per channel
    per_channel = ref.transpose(0, 2, 3, 1).reshape(-1, ref.shape[1]) if layout != "table" else ref.reshape(len(raw), -1)
    assert np.allclose(per_channel.mean(axis=0), 0, atol=1e-9) and np.allclose(per_channel.std(axis=0), 1)


def test_normalize_given_stats_constant_channel_and_errors():
    fe = NormalizeFrontEnd(kind="normalize", scale=0.5, mean=[1.0, -2.0], std=[2.0, 4.0])
    raw = np.array([[[3.0, 4.0], [5.0, 0.0]]], dtype=np.float32)  # (1, L=2, C=2)
    out = frontends.features(fe, "sequence", raw, {"mean": [9.0, 9.0], "std": [9.0, 9.0]}, None)
    # (x * 0.5 - mean) / std, the front end's own stats win over fitted ones; (N, H=1, W=L, C)
    assert np.allclose(out[0, 0], [[0.25, 1.0], [0.75, 0.5]])
    const = np.zeros((10, 3), dtype=np.float32)
    const[:, 1] = np.arange(10)
    stats = normalize.fit(NormalizeFrontEnd(kind="normalize"), "table", const)
    assert stats["std"][0] == 1.0 and stats["std"][2] == 1.0 and stats["std"][1] > 2
    with pytest.raises(PassError, match=r"front_end.mean has 2 values.*3 channel"):
        normalize.module(fe, "image", (4, 4, 3), {}, None)
    with pytest.raises(PassError, match="not 'audio'"):
        normalize.module(fe, "audio", (100,), {}, None)
    with pytest.raises(PassError, match="no mean"):
        normalize.module(NormalizeFrontEnd(kind="normalize"), "table", (3,), {}, None)


def _library(onnx_path, shape):
    """The x86 kernel library built the way the compile stage builds it (import, fuse, build)."""
    import tvm
    from tvm import relax

    from passes.support.tvm_build import import_onnx, prepare

    target = tvm.target.Target({"kind": "llvm"})
    ex = relax.build(prepare(import_onnx(onnx_path, list(shape)), target), target=target)
    return relax.VirtualMachine(ex, tvm.cpu())


LIBRARIES = [
    (MfccFrontEnd(kind="mfcc"), "audio", (L,), SR, TOL_SPECTRAL),
    (LogmelFrontEnd(kind="logmel"), "audio", (L,), SR, TOL_SPECTRAL),
    (NormalizeFrontEnd(kind="normalize"), "image", (6, 5, 3), None, TOL_NORMALIZE),
    (NormalizeFrontEnd(kind="normalize"), "sequence", (20, 3), None, TOL_NORMALIZE),
]


@pytest.mark.parametrize("fe, layout, shape, sr, tol", LIBRARIES, ids=["mfcc", "logmel", "normalize-image", "normalize-sequence"])
def test_tvm_library_of_raw_input_matches_host(tmp_path, fe, layout, shape, sr, tol):
    import tvm

    raw = clips() if layout == "audio" else _raw(layout, shape, frontends.RAW_DTYPES[layout], n=4)
    impl = frontends.implementation(fe)
    stats = impl.fit(fe, layout, raw)
    path = tmp_path / "fe.onnx"
    model = frontends.export_onnx(fe, layout, shape, stats, sr, path)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"STFT", "DFT", "MelWeightMatrix", "HannWindow"}, ops
    inp = model.graph.input[0].type.tensor_type
    # INT16 / UINT8 / FLOAT: the board is fed the raw samples
    assert inp.elem_type == {"audio": 5, "image": 2, "sequence": 1}[layout]
    assert [d.dim_value for d in inp.shape.dim] == [1, *shape]
    vm = _library(path, (1, *shape))
    lib = np.stack([vm["main"](tvm.runtime.tensor(raw[i:i + 1])).numpy()[0] for i in range(len(raw))])
    host = frontends.features(fe, layout, raw, stats, sr).transpose(0, 3, 1, 2)
    assert lib.shape == host.shape == (len(raw), *fe.output_shape(layout, shape, sr))
    err = frontends.relative_error(lib, host)
    log.info("%s library (x86) vs host: %.2e", fe.kind, err)
    assert err < tol, err
    # the built graph takes raw values in their own dtype: the wrapper's cast is the first op
    import torch

    wrapped = frontends.build(fe, layout, shape, stats, sr)
    with torch.no_grad():
        direct = wrapped(torch.from_numpy(raw[:1])).numpy()
    assert frontends.relative_error(direct, host[:1]) < 1e-6
