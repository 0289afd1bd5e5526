"""Kiln's int8 arithmetic, defined once: the quantize pass computes its parameters with it,
the QDQ export (passes/support/onnx_export.py) writes them, the Relax lowering
(passes/support/relax_int8.py) computes with them, and the fake-quant twin here computes as
the compiled library does.

Weights are symmetric ``int8`` per output channel ([-WMAX, WMAX]); activations are 8-bit per
tensor, ``uint8`` with zero point 0 where the tensor cannot be negative, else ``int8``
asymmetric; biases are int32 on the scale input scale x weight scale. Requantization is one
float32 multiplier per output channel (:func:`requant_multiplier`), so the torch twin and the
kernels round with the very same float32 numbers.

The record these functions read is ``ckpt["quantization"]`` (passes/quantize.py ``describe``).
"""

from __future__ import annotations

import numpy as np

from kiln.errors import PassError

QMIN, QMAX = -128, 127  # int8 activations (asymmetric: tensors that can be negative)
WMAX = 127  # int8 weights are symmetric: [-127, 127]
ACT_RANGE = {"int8": (QMIN, QMAX), "uint8": (0, 255)}  # code range of each activation dtype


def act_range(dtype: str) -> tuple[int, int]:
    """(min, max) code of an 8-bit activation dtype."""
    if dtype not in ACT_RANGE:
        raise ValueError(f"activation dtype {dtype!r}: expected one of {sorted(ACT_RANGE)}")
    return ACT_RANGE[dtype]


def requant_multiplier(in_scale, w_scale, out_scale, n: int = 1) -> np.ndarray:
    """float32 multipliers taking an int32 accumulator (input scale x weight scale, summed over
    ``n`` terms for an average) to the output scale. The torch twin (below) and the Relax
    lowering (passes/support/relax_int8.py) both call this, so both round with the very same
    float32 numbers."""
    s_in = np.float64(np.float32(in_scale))
    s_w = np.asarray(w_scale, dtype=np.float32).astype(np.float64)
    s_out = np.float64(np.float32(out_scale))
    return (s_in * s_w / (s_out * n)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# model structure


def layer_plan(model) -> list[dict]:
    """The Sequential's modules grouped into quantization layers, in order. Each entry: name
    (the module's name in the Sequential, i.e. its state_dict prefix), kind (conv, linear,
    maxpool, avgpool, flatten), and for conv/linear the BatchNorm folded into it and whether a
    ReLU follows. Raises PassError on a module it cannot quantize."""
    import torch.nn as nn

    if not isinstance(model, nn.Sequential):
        raise PassError(f"quantize: expects an nn.Sequential model (kiln.nets families), got {type(model).__name__}")
    plan: list[dict] = []
    for name, m in model.named_children():
        last = plan[-1] if plan else None
        if isinstance(m, nn.Conv2d):
            plan.append({"name": name, "kind": "conv", "bn": None, "relu": None})
        elif isinstance(m, nn.Linear):
            plan.append({"name": name, "kind": "linear", "bn": None, "relu": None})
        elif isinstance(m, nn.BatchNorm2d) and last and last["kind"] == "conv" and last["bn"] is None and last["relu"] is None:
            last["bn"] = name
        elif isinstance(m, nn.ReLU) and last and last["kind"] in ("conv", "linear") and last["relu"] is None:
            last["relu"] = name
        elif isinstance(m, nn.MaxPool2d):
            plan.append({"name": name, "kind": "maxpool"})
        elif isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
            plan.append({"name": name, "kind": "avgpool"})
        elif isinstance(m, nn.Flatten):
            plan.append({"name": name, "kind": "flatten"})
        elif isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        else:
            raise PassError(f"quantize: module '{name}' ({type(m).__name__}) has no int8 lowering in Kiln")
    if not plan or plan[-1]["kind"] != "linear":
        raise PassError("quantize: the model must end with a Linear classifier")
    return plan


def act_dtype(qp: dict) -> str:
    """An activation's dtype; records of version 1 (before uint8) hold int8 only."""
    return qp.get("dtype", "int8")


# ---------------------------------------------------------------------------------------------
# the fake-quant twin: integer arithmetic in torch, exactly as the compiled library does it


def _quant(x, qp: dict):
    """Float -> 8-bit codes (as a float tensor): clip(round(x / scale) + zp) to the range of the
    tensor's dtype (uint8 or int8), round half to even."""
    import torch

    qmin, qmax = act_range(act_dtype(qp))
    return torch.clamp(torch.round(x / np.float32(qp["scale"])) + qp["zero_point"], qmin, qmax)


def _dequant(q, qp: dict):
    return (q - qp["zero_point"]) * np.float32(qp["scale"])


def weight_ints(w, scale: list[float]):
    """int8 weight values (as float) of ``w`` under per-output-channel ``scale``."""
    import torch

    s = torch.tensor(scale, dtype=torch.float32).reshape(-1, *([1] * (w.dim() - 1)))
    return torch.clamp(torch.round(w.detach() / s), -WMAX, WMAX)


def bias_ints(b, in_scale: float, scale: list[float]):
    """int32 bias values (as float64) under the bias scale = input scale x weight scale."""
    import torch

    sb = torch.from_numpy(bias_scale(in_scale, scale))
    return torch.round(b.detach().double() / sb.double()) if b is not None else torch.zeros(len(scale), dtype=torch.float64)


def bias_scale(in_scale: float, scale: list[float]) -> np.ndarray:
    return (np.float64(np.float32(in_scale)) * np.asarray(scale, dtype=np.float32).astype(np.float64)).astype(np.float32)


def _requant(acc, spec: dict, mult):
    """int32 accumulator (exact, as float64) -> 8-bit output codes, or float logits when the
    layer has no output parameters: float32(acc) * multiplier, round half to even, + zp, clip
    to the output dtype's range (from the zero point up after a ReLU)."""
    import torch

    y = acc.float() * torch.from_numpy(mult).reshape(1, -1, *([1] * (acc.dim() - 2)))
    if spec["output"] is None:
        return torch.relu(y) if spec["relu"] else y
    qmin, qmax = act_range(act_dtype(spec["output"]))
    lo = max(qmin, spec["output"]["zero_point"]) if spec["relu"] else qmin
    return torch.clamp(torch.round(y) + spec["output"]["zero_point"], lo, qmax)


_CLASSES: tuple | None = None


def _classes():
    """(QConv2d, QLinear, QAvgPool), made once: torch is imported only when a pass runs."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _make_classes()
    return _CLASSES


def _make_classes():
    import torch.nn as nn
    import torch.nn.functional as F

    class QConv2d(nn.Conv2d):
        """Conv2d (BN folded) computing as the int8 kernel does; parameters as in nn.Conv2d."""

        qspec: dict

        def forward(self, x):
            spec = self.qspec
            wq = weight_ints(self.weight, spec["weight_scale"])
            if "input" not in spec:  # weight_only: float compute with the int8 weights' values
                w = wq * self._wscale()
                return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
            xi = (_quant(x, spec["input"]) - spec["input"]["zero_point"]).double()
            acc = F.conv2d(xi, wq.double(), None, self.stride, self.padding, self.dilation, self.groups)
            acc = acc + bias_ints(self.bias, spec["input"]["scale"], spec["weight_scale"]).reshape(1, -1, 1, 1)
            q = _requant(acc, spec, _mult(spec))
            return _dequant(q, spec["output"]) if spec["output"] is not None else q

        def _wscale(self):
            import torch

            return torch.tensor(self.qspec["weight_scale"], dtype=torch.float32).reshape(-1, 1, 1, 1)

    class QLinear(nn.Linear):
        """Linear computing as the int8 dense kernel does; parameters as in nn.Linear."""

        qspec: dict

        def forward(self, x):
            import torch

            spec = self.qspec
            wq = weight_ints(self.weight, spec["weight_scale"])
            if "input" not in spec:
                w = wq * torch.tensor(spec["weight_scale"], dtype=torch.float32).reshape(-1, 1)
                return F.linear(x, w, self.bias)
            xi = (_quant(x, spec["input"]) - spec["input"]["zero_point"]).double()
            acc = xi @ wq.double().t() + bias_ints(self.bias, spec["input"]["scale"], spec["weight_scale"])
            q = _requant(acc, spec, _mult(spec))
            return _dequant(q, spec["output"]) if spec["output"] is not None else q

    class QAvgPool(nn.AdaptiveAvgPool2d):
        """Global average pool on 8-bit codes: integer sum, one float32 multiply, round."""

        qspec: dict

        def forward(self, x):
            spec = self.qspec
            n = x.shape[2] * x.shape[3]
            s = (_quant(x, spec["input"]) - spec["input"]["zero_point"]).double().sum((2, 3), keepdim=True)
            m = requant_multiplier(spec["input"]["scale"], [1.0], spec["output"]["scale"], n)[0]
            q = np.float32(m) * s.float()
            import torch

            q = torch.clamp(torch.round(q) + spec["output"]["zero_point"], *act_range(act_dtype(spec["output"])))
            return _dequant(q, spec["output"])

    return QConv2d, QLinear, QAvgPool


def _mult(spec: dict) -> np.ndarray:
    if spec["output"] is None:
        return bias_scale(spec["input"]["scale"], spec["weight_scale"])
    return requant_multiplier(spec["input"]["scale"], spec["weight_scale"], spec["output"]["scale"])


def fake_quant(model, quantization: dict):
    """The fake-quant twin of a (BN-folded) float model under ``quantization``: a new
    Sequential with the same module names and parameters, whose conv/linear/avgpool modules
    compute as the compiled library does."""
    import copy

    QConv2d, QLinear, QAvgPool = _classes()
    twin = copy.deepcopy(model)
    int8 = quantization["mode"] == "int8"
    for name, spec in quantization["layers"].items():
        m = getattr(twin, name)
        cls = {"conv": QConv2d, "linear": QLinear, "avgpool": QAvgPool if int8 else None}.get(spec["kind"])
        if cls is None:
            continue
        m.__class__ = cls  # same parameters and buffers, so the state_dict keys do not change
        m.qspec = spec
    twin.eval()
    return twin
