"""Compression pass: int8 post-training quantization, calibrated on training-split images.

Two modes:

* ``int8``: BatchNorm folded into the convolutions, weights int8 per output channel
  (symmetric, [-127, 127]), activations 8-bit per tensor from calibrated ranges, biases int32.
  An activation whose range has no negative part (the input image in [0, 1], every ReLU output,
  and the pooled features) is ``uint8`` with zero point 0: real 0 is code 0, so a convolution
  pads with 0 inside its own kernel and has no zero-point term. A tensor that can be negative
  (a conv or linear layer without a ReLU, say) is ``int8``, asymmetric. Convolutions and dense
  layers run uint8/int8 x int8 -> int32 in the compiled library (passes/support/relax_int8.py)
  and requantize to 8 bits with one float32 multiplier per channel.
* ``weight_only``: the same int8 weights, float activations: the library stores int8 weights
  and dequantizes them inside its kernels (a quarter of the weight bytes, float arithmetic).

The model returned is the fake-quant twin of the compiled library: the same module tree (so
``kiln.nets.build`` + ``load_state_dict`` still rebuilds it; BatchNorm becomes an exact
identity), with its conv/linear/average-pool modules computing exactly what the integer kernels
compute (integer accumulation, the same float32 requantization and rounding). The compress
stage's measured accuracy is therefore the int8 library's accuracy. Everything export needs
lies in ``ckpt["quantization"]`` (see :func:`describe`); ``fake_quant`` (passes/support/int8.py,
the arithmetic this pass, the export and the Relax lowering share) rebuilds the twin from a
float model and that record.

Settings: kiln.schema.QuantizeSettings, validated when the manifest loads.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kiln.errors import ManifestError
from kiln.schema import QuantizeSettings
from passes.support.common import load_split, to_tensor
from passes.support.int8 import WMAX, act_range, bias_ints, bias_scale, fake_quant, layer_plan, weight_ints

log = logging.getLogger("kiln.quantize")


# ---------------------------------------------------------------------------------------------
# model structure


def fold_batchnorm(model, plan: list[dict]) -> None:
    """Fold each BatchNorm into the conv before it (in place); the BatchNorm becomes an exact
    identity (mean 0, var 1 - eps, weight 1, bias 0), so the module tree is unchanged."""
    import torch

    mods = dict(model.named_children())
    with torch.no_grad():
        for layer in plan:
            if layer.get("bn") is None:
                continue
            conv, bn = mods[layer["name"]], mods[layer["bn"]]
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
            conv.weight.copy_((conv.weight.double() * scale[:, None, None, None]).float())
            new_bias = ((bias - bn.running_mean.double()) * scale + bn.bias.double()).float()
            if conv.bias is None:
                conv.bias = torch.nn.Parameter(new_bias)
            else:
                conv.bias.copy_(new_bias)
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (1 - eps) + eps == 1 exactly in float32
            bn.weight.fill_(1.0)
            bn.bias.zero_()


# ---------------------------------------------------------------------------------------------
# calibration and scales


def _range(values, params: QuantizeSettings) -> tuple[float, float]:
    v = values.reshape(-1)
    if params.calibration == "percentile":
        if v.numel() > 4_000_000:  # a fixed-stride subsample keeps np.percentile cheap
            v = v[:: v.numel() // 4_000_000 + 1]
        a = v.double().numpy()
        lo, hi = float(np.percentile(a, 100 - params.percentile)), float(np.percentile(a, params.percentile))
    else:
        lo, hi = float(v.min()), float(v.max())
    return min(lo, 0.0), max(hi, 0.0)


def act_qparams(lo: float, hi: float) -> dict:
    """Per-tensor parameters {scale, zero_point, dtype} for the range [lo, hi] (0 exactly
    representable): ``uint8`` with zero point 0 when the range has no negative part (lo == 0
    after widening it to include 0), else asymmetric ``int8``. Both use all 256 codes; on a
    non-negative range they are the same grid (int8 zero point -128 = uint8 zero point 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    dtype = "uint8" if lo == 0.0 else "int8"
    qmin, qmax = act_range(dtype)
    scale = float(np.float32(max(hi - lo, 1e-8) / (qmax - qmin)))
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return {"scale": scale, "zero_point": zp, "dtype": dtype}


def weight_scales(w) -> list[float]:
    """Per-output-channel symmetric scales: max |w| / 127 (1.0 for an all-zero, pruned channel)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(1).double().numpy()
    return [float(s) for s in np.where(amax > 0, amax / WMAX, 1.0).astype(np.float32)]


def calibrate(model, plan: list[dict], x: np.ndarray, params: QuantizeSettings) -> dict[str, tuple[float, float]]:
    """Activation ranges of the (BN-folded, float) model on calibration images ``x``: the
    input's, and the output of each conv/linear layer (after its ReLU) but the last."""
    import torch

    mods = dict(model.named_children())
    quantized = [layer for layer in plan[:-1] if layer["kind"] in ("conv", "linear")]
    seen: dict[str, list] = {"input": []}
    hooks = []
    for layer in quantized:
        seen[layer["name"]] = []
        tap = mods[layer["relu"] or layer["name"]]
        hooks.append(tap.register_forward_hook(lambda _m, _i, out, key=layer["name"]: seen[key].append(out.detach().clone())))
    model.eval()
    with torch.no_grad():
        for i in range(0, len(x), 256):
            batch = to_tensor(x[i : i + 256])
            seen["input"].append(batch)
            model(batch)
    for h in hooks:
        h.remove()
    return {key: _range(torch.cat(vals), params) for key, vals in seen.items()}


def describe(model, plan: list[dict], ranges: dict | None, params: QuantizeSettings, samples: int) -> dict:
    """The ``ckpt["quantization"]`` record. ``layers`` maps each module name of the Sequential
    to its spec: conv/linear: weight_scale (per output channel), relu, and in int8 mode input
    and output activation parameters ({scale, zero_point, dtype}, dtype ``uint8`` (zero point
    0) or ``int8``, see :func:`act_qparams`; output None for the logits); maxpool/avgpool/
    flatten: input = output parameters (int8 mode). Version 2 added ``dtype`` (version 1: int8
    activations only, read as such)."""
    mods = dict(model.named_children())
    layers: dict[str, dict] = {}
    current = act_qparams(*ranges["input"]) if ranges else None
    for i, layer in enumerate(plan):
        spec: dict[str, Any] = {"kind": layer["kind"]}
        if layer["kind"] in ("conv", "linear"):
            spec["weight_scale"] = weight_scales(mods[layer["name"]].weight)
            spec["relu"] = layer["relu"] is not None
        if ranges is not None:
            spec["input"] = current
            if layer["kind"] in ("conv", "linear"):
                current = act_qparams(*ranges[layer["name"]]) if i < len(plan) - 1 else None
            spec["output"] = current
        layers[layer["name"]] = spec
    calib = {"method": params.calibration, "samples": samples}
    if params.calibration == "percentile":
        calib["percentile"] = params.percentile
    return {
        "version": 2,
        "mode": params.mode,
        "per_channel": True,
        "weights": "int8, symmetric per output channel, [-127, 127]",
        "activations": ("8-bit per tensor: uint8 with zero point 0 where the range has no negative part, "
                        "else int8 asymmetric") if params.mode == "int8" else "float32",
        "bias": "int32, scale = input scale x weight scale" if params.mode == "int8" else "float32",
        "calibration": calib,
        "layers": layers,
    }


# ---------------------------------------------------------------------------------------------
# the weights as the library stores them (the twin that computes with them: passes/support/int8.py)


def quantize_weights_inplace(model, quantization: dict) -> None:
    """Snap the float weights (and, in int8 mode, biases) onto their int8/int32 grids, so the
    float state_dict holds exactly the values the library stores."""
    import torch

    with torch.no_grad():
        for name, spec in quantization["layers"].items():
            if spec["kind"] not in ("conv", "linear"):
                continue
            m = getattr(model, name)
            s = torch.tensor(spec["weight_scale"], dtype=torch.float32).reshape(-1, *([1] * (m.weight.dim() - 1)))
            m.weight.copy_(weight_ints(m.weight, spec["weight_scale"]) * s)
            if "input" in spec and m.bias is not None:
                sb = torch.from_numpy(bias_scale(spec["input"]["scale"], spec["weight_scale"]))
                m.bias.copy_((bias_ints(m.bias, spec["input"]["scale"], spec["weight_scale"]) * sb.double()).float())


def run(model, ckpt: dict, settings: QuantizeSettings, ctx):
    """Fold BN, calibrate on training images, quantize; returns (fake-quant model, ckpt)."""
    p = settings
    if ckpt.get("quantization"):
        raise ManifestError(f"field '{ctx.field()}': the model is already quantized (quantize is listed twice)")
    model.eval()
    plan = layer_plan(model)
    fold_batchnorm(model, plan)
    ranges, n = None, 0
    if p.mode == "int8":
        x, _ = load_split(ctx.data_dir, "train")
        n = min(p.calibration_samples, len(x))
        rng = np.random.default_rng(ctx.seed)
        ranges = calibrate(model, plan, x[np.sort(rng.choice(len(x), n, replace=False))], p)
    quantization = describe(model, plan, ranges, p, n)
    quantize_weights_inplace(model, quantization)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin = fake_quant(model, quantization)
    log.info("quantize: mode %s, %d layers, calibration %s on %d images", p.mode, len(plan), p.calibration, n)
    ckpt = dict(ckpt, state_dict=state, quantization=quantization)
    return twin, ckpt
