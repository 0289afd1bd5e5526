"""Front end ``normalize``: ``(x * scale - mean) / std`` per channel, inside the kernel library,
so the board is fed raw values (uint8 pixels, raw sensor readings, raw table features).

Layouts (the raw sample's, see kiln/schema/datasets.py ``_DatasetBase.layout``): image (H, W, C) ->
C x H x W; sequence (L, C) -> C x 1 x L; table (F,) -> 1 x 1 x F. The statistics are per
channel (per feature for a table), i.e. over every axis of the raw sample but its last.
``scale`` defaults to 1/255 for images and 1 otherwise. ``mean`` and ``std`` come from the
front end's settings when given, else from ``fit`` on the training split (after scale); a
fitted std under STD_FLOOR is taken as 1, so a channel constant over the training set is
centred, not blown up by 1/std (scikit-learn's StandardScaler does the same).

The graph is ``((x - shift_hi) - shift_lo) * (scale / std)`` with ``shift = mean / scale``
split into a float32 part and its float32 remainder: per-channel Sub, Sub, Mul, in raw units.
A raw value near its channel's mean minus the float32 part is exact (Sterbenz), so a sensor far
from zero (a barometer at 101325 Pa, spread 10) keeps its digits; a single float32 shift would
round them away (~1e-4 of the features there), and ``x * a + b`` would cancel after scaling.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from kiln.errors import PassError

log = logging.getLogger("kiln.frontends")

STD_FLOOR = 1e-6


def default_scale(fe, layout) -> float:
    if fe.scale is not None:
        return float(fe.scale)
    return 1.0 / 255.0 if layout == "image" else 1.0


def _check_layout(fe, layout, raw_shape) -> None:
    if layout not in fe.layouts:
        raise PassError(f"front end 'normalize' takes raw {'/'.join(fe.layouts)} samples, not '{layout}' "
                        f"(dataset.front_end)")
    want = {"image": 3, "sequence": 2, "table": 1}[layout]
    if len(raw_shape) != want:
        raise PassError(f"front end 'normalize': a raw {layout} sample has {want} axes, got shape {tuple(raw_shape)}")


def fit(fe, layout, raw_train: np.ndarray) -> dict:
    """{"mean": [...], "std": [...]} per channel of the scaled training samples, python floats."""
    _check_layout(fe, layout, raw_train.shape[1:])
    if fe.mean is not None and fe.std is not None:  # both given: they are what the module uses, nothing to fit
        return {"mean": [float(v) for v in fe.mean], "std": [float(v) for v in fe.std]}
    if raw_train.shape[0] == 0:
        raise PassError("front end 'normalize': the training split is empty, nothing to fit mean and std on")
    # two passes over chunks of samples (mean, then the mean squared deviation: numpy's std), so a
    # memory-mapped training split is never copied whole into float64 (8x its uint8 size)
    step = max(1, (1 << 21) // max(1, int(np.prod(raw_train.shape[1:]))))
    scale, channels = default_scale(fe, layout), raw_train.shape[-1]

    def chunks():
        for i in range(0, raw_train.shape[0], step):
            yield np.asarray(raw_train[i:i + step]).reshape(-1, channels).astype(np.float64) * scale

    count = int(np.prod(raw_train.shape[:-1]))
    mean = sum(c.sum(axis=0) for c in chunks()) / count
    std = np.sqrt(sum(((c - mean) ** 2).sum(axis=0) for c in chunks()) / count)
    flat = np.flatnonzero(std < STD_FLOOR)
    if len(flat):
        log.warning("front end 'normalize': %d channel(s) constant over the training split (first %s): "
                    "std taken as 1", len(flat), flat[:5].tolist())
        std[flat] = 1.0
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _stat(fe, stats, name: str, channels: int) -> np.ndarray:
    """The front end's own ``mean``/``std`` when set, else the fitted one, checked for length."""
    value = getattr(fe, name) if getattr(fe, name) is not None else (stats or {}).get(name)
    if value is None:
        raise PassError(f"front end 'normalize': no {name} (set dataset.front_end.{name}, or fit it on the training split)")
    value = np.asarray(value, dtype=np.float64)
    if value.shape != (channels,):
        raise PassError(f"front end 'normalize': dataset.front_end.{name} has {value.size} values, the raw sample "
                        f"has {channels} channel(s) (features)")
    if name == "std" and np.any(value <= 0):
        raise PassError(f"front end 'normalize': every std must be positive, got {value.tolist()}")
    return value


def affine(fe, layout, raw_shape, stats) -> tuple[np.ndarray, np.ndarray]:
    """(shift, gain) float64 per channel: features = (x - shift) * gain, in raw units."""
    _check_layout(fe, layout, raw_shape)
    channels = int(raw_shape[-1])
    scale = default_scale(fe, layout)
    mean, std = _stat(fe, stats, "mean", channels), _stat(fe, stats, "std", channels)
    return mean / scale, scale / std


class NormalizeModule(torch.nn.Module):
    """(B, *raw) raw values as float32 -> (B, C, H, W)."""

    def __init__(self, layout: str, shift: np.ndarray, gain: np.ndarray):
        super().__init__()
        self.layout = layout
        # per channel along the raw sample's last axis: broadcasts without a reshape
        hi = shift.astype(np.float32)
        self.register_buffer("shift_hi", torch.tensor(hi))
        self.register_buffer("shift_lo", torch.tensor((shift - hi.astype(np.float64)).astype(np.float32)))
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float32))

    def forward(self, x):
        y = ((x - self.shift_hi) - self.shift_lo) * self.gain
        if self.layout == "image":
            return y.permute(0, 3, 1, 2)  # (B, C, H, W)
        if self.layout == "sequence":
            return y.transpose(1, 2).unsqueeze(2)  # (B, C, 1, L)
        return y.unsqueeze(1).unsqueeze(1)  # (B, 1, 1, F)


def module(fe, layout, raw_shape, stats, sample_rate=None) -> NormalizeModule:
    shift, gain = affine(fe, layout, tuple(raw_shape), stats)
    return NormalizeModule(layout, shift, gain).eval()


def reference(fe, layout, raw, stats, sample_rate=None) -> np.ndarray:
    """(N, C, H, W) float64, straight from the definition."""
    raw = np.asarray(raw)
    _check_layout(fe, layout, raw.shape[1:])
    channels = raw.shape[-1]
    x = (raw.astype(np.float64) * default_scale(fe, layout) - _stat(fe, stats, "mean", channels)) \
        / _stat(fe, stats, "std", channels)
    if layout == "image":
        return x.transpose(0, 3, 1, 2)
    if layout == "sequence":
        return x.transpose(0, 2, 1)[:, :, None, :]
    return x[:, None, None, :]
