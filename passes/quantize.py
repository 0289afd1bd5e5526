"""Compression pass: int8 post-training quantization, calibrated on training-split samples (an
anomaly detector's normal samples only: the ranges of what it will see, not of the anomalies
whose large reconstruction errors it exists to show).

Any model torch.fx can trace in Kiln's op vocabulary (passes/support/int8.py graph_plan: convs
of any kernel and groups, linear, pools, residual add/sub, mul, sigmoid, tanh, constant slices:
ResNet blocks, depthwise-separable nets, unrolled LSTM/GRU cells) is quantized node by node.

Two modes:

* ``int8``: BatchNorm folded into the convolutions, weights int8 per output channel
  (symmetric, [-127, 127]), activations 8-bit per tensor from calibrated ranges, biases int32.
  An activation whose range has no negative part (the input image in [0, 1], every ReLU output,
  and the pooled features) is ``uint8`` with zero point 0: real 0 is code 0, so a convolution
  pads with 0 inside its own kernel and has no zero-point term. A tensor that can be negative
  (a conv or linear layer without a ReLU, say) is ``int8``, asymmetric. Convolutions and dense
  layers run uint8/int8 x int8 -> int32 in the compiled library (passes/support/relax_int8.py)
  and requantize to 8 bits with one float32 multiplier per channel; add/sub in integer fixed
  point, mul as an exact integer product and one float32 multiply, sigmoid/tanh by a 256-entry
  table over the input codes (the formulas: passes/support/int8.py).
* ``weight_only``: the same int8 weights, float activations: the library stores int8 weights
  and dequantizes them inside its kernels (a quarter of the weight bytes, float arithmetic).

The model returned is the fake-quant twin of the compiled library: the same module tree (so
``kiln.nets.build`` + ``load_state_dict`` still rebuilds it; BatchNorm becomes an exact
identity), whose forward runs the graph plan on integer codes exactly as the integer kernels
do (integer accumulation, the same float32 requantization and rounding). The compress
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
from passes.tasks import fit_split
from passes.support.common import to_tensor
from passes.support.int8 import (LUT_OUTPUT, TABLES, WEIGHTED, WMAX, act_range, bias_ints, bias_scale, fake_quant,
                                 graph_plan, layer_bias, lut, recurrent_roles, snap_weights)

log = logging.getLogger("kiln.quantize")


# ---------------------------------------------------------------------------------------------
# model structure


def fold_batchnorm(model, plan: list[dict]) -> None:
    """Fold each BatchNorm into the conv (BatchNorm2d) or linear (BatchNorm1d) before it, in
    place; the BatchNorm becomes an exact identity (mean 0, var 1 - eps, weight 1, bias 0), or
    an exact bias add when the layer has no bias of its own (int8.py layer_bias reads it), so the
    module tree, and the state_dict keys a checkpoint rebuilds from, are unchanged."""
    import torch

    with torch.no_grad():
        for entry in plan:
            if entry.get("bn") is None:
                continue
            layer, bn = model.get_submodule(entry["module"]), model.get_submodule(entry["bn"])
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(scale)
            shape = (-1, *([1] * (layer.weight.dim() - 1)))
            layer.weight.copy_((layer.weight.double() * scale.reshape(shape)).float())
            new_bias = ((bias - bn.running_mean.double()) * scale + bn.bias.double()).float()
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)  # (1 - eps) + eps == 1 exactly in float32
            bn.weight.fill_(1.0)
            if layer.bias is None:
                # a layer without a bias (the usual conv before a BN) gets none: its state_dict
                # keys would change; the BN keeps the folded bias (x * 1 + b, exact)
                bn.bias.copy_(new_bias)
            else:
                layer.bias.copy_(new_bias)
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


CALIBRATED = ("input", "conv", "linear", "add", "sub", "mul", "hardswish")  # kinds whose output range is measured
# kinds whose kernels requantize to their own output parameters: a quantized model's are kept
SOURCE_KEPT = (*CALIBRATED, "avgpool")


def calibrate(model, plan: list[dict], x: np.ndarray, params: QuantizeSettings) -> dict[str, tuple[float, float]]:
    """Activation ranges of the (BN-folded, float) model on calibration images ``x``: of the
    input and of each conv/linear/add/sub/mul output (after its fused ReLU), read by an fx
    Interpreter at each entry's tap node (the other kinds' parameters follow from these)."""
    import torch

    # an unrolled recurrence: one range per part of the cell over all its steps (int8.recurrent_roles)
    roles = recurrent_roles(plan)
    taps = {e["tap"]: roles.get(e["name"], e["name"]) for e in plan if e["kind"] in CALIBRATED}
    seen: dict[str, list] = {name: [] for name in taps.values()}

    class Tap(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in taps:
                seen[taps[n.name]].append(out.detach().clone())
            return out

    gm = torch.fx.symbolic_trace(model.eval())
    with torch.no_grad():
        for i in range(0, len(x), 256):
            Tap(gm).run(to_tensor(x[i : i + 256]))
    ranges = {key: _range(torch.cat(vals), params) for key, vals in seen.items()}
    return {e["name"]: ranges[roles.get(e["name"], e["name"])] for e in plan if e["kind"] in CALIBRATED}


def _static(entry: dict) -> dict:
    """The plan entry's fields a record keeps (the fx tap is calibration's business)."""
    return {k: v for k, v in entry.items() if k not in ("name", "tap")}


def describe(model, plan: list[dict], ranges: dict | None, params: QuantizeSettings, samples: int,
             source: dict | None = None) -> dict:
    """The ``ckpt["quantization"]`` record, version 3. ``layers`` maps each plan entry (see
    passes/support/int8.py graph_plan), in topological order, to its spec: kind, inputs (entry
    names), shape (at batch 1), module (conv/linear/pools/flatten: the module's name), relu
    (fused), index (getitem); conv/linear: weight_scale (per output channel). In int8 mode each
    entry has ``output`` activation parameters {scale, zero_point, dtype} (dtype ``uint8``, zero
    point 0, or ``int8``, see :func:`act_qparams`; None for float logits: a conv/linear that is
    the model's output), single-input kinds ``input`` (their input's parameters), add/sub/mul
    ``operands`` (both inputs' parameters), sigmoid/tanh/hardsigmoid/hardswish ``lut`` (the output code of each input
    code, lowest first). ``output`` names the entry whose result the model returns.
    ``source`` (a model that came quantized, e.g. an int8 TFLite file: kiln/nets/tflite.py
    convert) holds ``activations`` (fx node -> parameters) and ``weights`` (module -> scales)
    taken instead of the calibrated and measured ones wherever the entry's kernel has its own
    output parameters (conv, linear, add, sub, mul, hard-swish, average pool, the input).
    Version 3 replaced version 2's Sequential-only ``layers`` (module name -> spec, each fed by
    the one before; passes/support/int8.py upgrade reads it); version 2 added ``dtype``."""
    layers: dict[str, dict] = {}
    int8 = ranges is not None
    last = plan[-1]["name"]
    for entry in plan:
        spec: dict[str, Any] = _static(entry)
        kind = entry["kind"]
        given = (source or {}).get("activations", {}).get(entry["tap"])
        if kind in WEIGHTED:
            spec["weight_scale"] = (source or {}).get("weights", {}).get(entry["module"]) or \
                weight_scales(model.get_submodule(entry["module"]).weight)
        if int8:
            ins = [layers[i]["output"] for i in entry["inputs"]]
            if kind in ("add", "sub", "mul"):
                spec["operands"] = ins
            elif ins:
                spec["input"] = ins[0]
            if kind in WEIGHTED and entry["name"] == last:
                spec["output"] = None  # float logits: the accumulator times the bias scale
            elif given is not None and kind in SOURCE_KEPT:
                spec["output"] = dict(given)
            elif kind in CALIBRATED:
                spec["output"] = act_qparams(*ranges[entry["name"]])
            elif kind in LUT_OUTPUT:
                spec["output"] = dict(LUT_OUTPUT[kind])
            else:  # pools and data movement keep their input's parameters
                spec["output"] = spec["input"]
            if kind in TABLES:  # hard-swish's table maps onto its calibrated output grid
                spec["lut"] = lut(kind, spec["input"], spec["output"])
        layers[entry["name"]] = spec
    calib = {"method": params.calibration, "samples": samples}
    if source:
        calib = {"method": "from the model file (scales and zero points kept)", "samples": 0}
    if params.calibration == "percentile":
        calib["percentile"] = params.percentile
    return {
        "version": 3,
        "mode": params.mode,
        "per_channel": True,
        "weights": "int8, symmetric per output channel, [-127, 127]",
        "activations": ("8-bit per tensor: uint8 with zero point 0 where the range has no negative part, "
                        "else int8 asymmetric") if params.mode == "int8" else "float32",
        "bias": "int32, scale = input scale x weight scale" if params.mode == "int8" else "float32",
        "calibration": calib,
        "layers": layers,
        "output": last,
    }


# ---------------------------------------------------------------------------------------------
# the weights as the library stores them (the twin that computes with them: passes/support/int8.py)


def quantize_weights_inplace(model, quantization: dict) -> None:
    """Snap the float weights (and, in int8 mode, biases) onto their int8/int32 grids, so the
    float state_dict holds exactly the values the library stores."""
    import torch

    snap_weights(model, quantization)
    calls: dict[str, int] = {}
    for spec in quantization["layers"].values():
        if spec["kind"] in WEIGHTED:
            calls[spec["module"]] = calls.get(spec["module"], 0) + 1
    with torch.no_grad():
        for spec in quantization["layers"].values():
            # a layer called more than once (shared weights) keeps its float bias: each call
            # rounds it onto its own grid (input scale x weight scale), twin and export alike
            if spec["kind"] not in WEIGHTED or "input" not in spec or calls[spec["module"]] > 1:
                continue
            b = layer_bias(model, spec)
            if b is not None:
                sb = torch.from_numpy(bias_scale(spec["input"]["scale"], spec["weight_scale"]))
                b.copy_((bias_ints(b, spec["input"]["scale"], spec["weight_scale"]) * sb.double()).float())


def run(model, ckpt: dict, settings: QuantizeSettings, ctx):
    """Fold BN, calibrate on training images, quantize; returns (fake-quant model, ckpt)."""
    p = settings
    if ckpt.get("quantization"):
        raise ManifestError(f"field '{ctx.field()}': the model is already quantized (quantize is listed twice)")
    model.eval()
    plan = graph_plan(model, (1, ckpt["channels"], *ckpt["image_size"]))
    fold_batchnorm(model, plan)
    ranges, n = None, 0
    if p.mode == "int8":
        x, _ = fit_split(ctx.project, ctx.data_dir, "train")
        n = min(p.calibration_samples, len(x))
        rng = np.random.default_rng(ctx.seed)
        ranges = calibrate(model, plan, x[np.sort(rng.choice(len(x), n, replace=False))], p)
    source = ckpt.get("source_quantization")
    quantization = describe(model, plan, ranges, p, n, source if p.mode == "int8" else None)
    quantize_weights_inplace(model, quantization)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    twin = fake_quant(model, quantization)
    log.info("quantize: mode %s, %d graph nodes, calibration %s on %d images", p.mode, len(plan), p.calibration, n)
    ckpt = dict(ckpt, state_dict=state, quantization=quantization)
    return twin, ckpt
