"""Front ends, one module each, chosen by a manifest's ``dataset.front_end.kind`` (the
``FrontEnd`` union in kiln/schema/frontends.py names each module). A front end runs inside the kernel
library: the board is fed raw samples (int16 audio, uint8 pixels, raw sensor values) and the
library computes the net's input; the host computes the same features with the same torch
graph for training. A front end module has

* ``fit(fe, layout, raw_train) -> dict``: statistics fitted on the training split (normalize:
  per-channel mean and std after scale, python floats); ``{}`` for mfcc and logmel.
* ``module(fe, layout, raw_shape, stats, sample_rate) -> torch.nn.Module``: float32 input
  (B, *raw_shape) holding the RAW values (int16 audio values as floats, 0..255 pixels), float32
  output (B, C, H, W) = ``fe.output_shape(layout, raw_shape, sample_rate)``. Built only from ops
  TVM 0.27's ONNX frontend imports (mfcc/logmel: ReduceMean, Sub, Gather, Reshape, Mul, Add,
  MatMul, Log, Transpose, Unsqueeze; normalize: Sub, Mul, Transpose, Unsqueeze; ``build`` adds a Cast): no
  STFT or DFT; exported with ``torch.onnx.export(dynamo=False, opset 17)`` at batch 1.
* ``reference(fe, layout, raw, stats, sample_rate) -> np.ndarray``: float64 (N, C, H, W), an
  independent numpy implementation (np.fft.rfft, np.hanning, ...) the tests check ``module`` by.

Here: ``build`` (the module behind a cast from the raw dtype: what the export stage prepends to
the net), ``features`` (what the data stage stores, NHWC), ``export_onnx`` and
``relative_error``, the precision metric: per sample, max |a - b| / max |b| over the sample's
features, and the max over samples (the issue's "host features equal the library's to 1e-4
relative"; a per-element relative error would be meaningless where a log-mel value or MFCC
crosses zero).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kiln.errors import PassError

log = logging.getLogger("kiln.frontends")

# the raw sample's dtype per layout, as the board receives it (kiln/schema/datasets.py _DatasetBase.layout)
RAW_DTYPES = {"image": "uint8", "audio": "int16", "sequence": "float32", "table": "float32"}
OPSET = 17
INPUT, OUTPUT = "raw", "features"


def implementation(fe):
    from kiln.registry import implementation as imp

    return imp(fe)


def module(fe, layout, raw_shape, stats, sample_rate):
    """The front end's torch module (float32 raw values in)."""
    return implementation(fe).module(fe, layout, tuple(raw_shape), stats, sample_rate)


def build(fe, layout, raw_shape, stats, sample_rate, raw_dtype=None):
    """torch module: (B, *raw_shape) tensor in ``raw_dtype`` (int16 / uint8 / float32; default
    the layout's, RAW_DTYPES) -> cast to float32 -> the front end -> (B, C, H, W) float32."""
    import torch

    raw_dtype = raw_dtype or RAW_DTYPES[layout]
    inner = module(fe, layout, raw_shape, stats, sample_rate)

    class FromRaw(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.front_end = inner
            self.raw_dtype = str(np.dtype(raw_dtype))

        def forward(self, x):
            return self.front_end(x.to(torch.float32))

    return FromRaw().eval()


def for_dataset(ds, stats: dict | None = None):
    """``build`` for a dataset's own front end, raw shape, sample rate and raw dtype."""
    return build(ds.front_end, ds.layout, ds.raw_shape(), stats or {}, getattr(ds, "sample_rate", None),
                 RAW_DTYPES[ds.layout])


def features(fe, layout, raw: np.ndarray, stats, sample_rate, batch: int = 256) -> np.ndarray:
    """float32 (N, H, W, C) features of the raw samples (N, *raw_shape), computed on the host with
    the torch module the kernel library is exported from."""
    import torch

    raw = np.asarray(raw)
    mod = module(fe, layout, raw.shape[1:], stats, sample_rate)
    want = tuple(fe.output_shape(layout, tuple(raw.shape[1:]), sample_rate))
    out = np.empty((raw.shape[0], want[1], want[2], want[0]), dtype=np.float32)
    with torch.no_grad():
        for i in range(0, raw.shape[0], batch):
            x = torch.from_numpy(raw[i:i + batch].astype(np.float32))
            y = mod(x)
            if tuple(y.shape[1:]) != want:
                raise PassError(f"front end '{fe.kind}': made features of shape {tuple(y.shape[1:])}, "
                                f"its output_shape says {want}")
            out[i:i + batch] = y.permute(0, 2, 3, 1).numpy()
    return out


def export_onnx(fe, layout, raw_shape, stats, sample_rate, path: Path, raw_dtype=None):
    """The front end alone as an ONNX file (batch 1, static shapes, input ``raw`` in the raw
    dtype, output ``features`` (1, C, H, W)); returns the loaded onnx model."""
    import onnx
    import torch

    raw_dtype = raw_dtype or RAW_DTYPES[layout]
    mod = build(fe, layout, raw_shape, stats, sample_rate, raw_dtype)
    dummy = torch.zeros((1, *raw_shape), dtype=getattr(torch, str(np.dtype(raw_dtype))))
    path = Path(path)
    try:
        torch.onnx.export(mod, (dummy,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          opset_version=OPSET, dynamo=False)
    except Exception as e:  # torch's exporter raises many types
        raise PassError(f"front end '{fe.kind}': ONNX export to {path} failed: {e}") from e
    return onnx.load(str(path))


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """max over samples of max |a - b| / max |b| (sample = first axis; b the reference)."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    scale = np.maximum(np.abs(b).max(axis=1), np.finfo(np.float64).tiny)
    return float((np.abs(a - b).max(axis=1) / scale).max())
