"""Kiln's int8 arithmetic, defined once: the quantize pass computes its parameters with it,
the QDQ export (passes/support/onnx_export.py) writes them, the Relax lowering
(passes/support/relax_int8.py) computes with them, and the fake-quant twin here computes as
the compiled library does.

The unit is a *graph plan* (:func:`graph_plan`): the model traced by torch.fx, its nodes in
topological order, each with its kind and inputs, BatchNorm folded into the conv/linear before
it and a following ReLU fused into the conv/linear/add/sub/mul before it. Any model in Kiln's op
vocabulary has one (convs of any kernel, stride, padding, dilation and groups; linear; max and
global average pooling (nn.AdaptiveAvgPool2d(1) or x.mean((2, 3))); flatten; reshapes that keep the
batch dimension first (s[:, :, None, None], view, reshape, unsqueeze, squeeze); residual add, sub, mul
(a channel gate broadcast over H x W too); ReLU6; sigmoid, tanh, hard-sigmoid, hard-swish; slicing by
constants);
anything else is refused with a PassError naming the node and what to do instead.

Integer semantics, one formula per kind, computed bit for bit alike by the torch twin below and
by the compiled library (x86 and aarch64):

* weights symmetric ``int8`` per output channel ([-WMAX, WMAX]); activations 8-bit per tensor,
  ``uint8`` with zero point 0 where the tensor cannot be negative, else ``int8`` asymmetric;
  biases int32 on the scale input scale x weight scale;
* conv / linear / global average pool: an exact int32 sum, then one float32 multiplier per
  output channel (:func:`requant_multiplier`): ``round(float32(acc) * M) + zp``, clipped (a
  fused ReLU is the lower clip). A single float op rounds the same on every IEEE machine;
* add / sub: integer fixed point (:func:`add_multipliers`): ``((qa - za) * Ma +- (qb - zb) *
  Mb + 2^(S-1)) >> S`` in int64, + zp, clip. No float arithmetic, so no fused multiply-add of a
  compiler can change a result between platforms;
* mul: ``(qa - za) * (qb - zb)`` (exact int32), ``float32(.) * M``, round, + zp, clip;
* sigmoid / tanh / hard-sigmoid / hard-swish: a 256-entry table over the input codes
  (:func:`lut`), computed once in float64 and applied by indexing: exact by construction.
  sigmoid, tanh and hard-sigmoid outputs have fixed parameters (sigmoid uint8 scale 1/256, tanh
  int8 scale 1/128, hard-sigmoid uint8 scale 1/255, zero point 0); hard-swish's output range is
  calibrated like a conv's;
* mul broadcasts: a (N, C, 1, 1) gate times a (N, C, H, W) tensor (squeeze-and-excitation) is
  the same exact product per element;
* ReLU6 fused into the conv/linear/add/sub/mul before it: the range is measured after it, so
  the clip to the top code is the clip to 6 (:func:`relu6_top`); with nothing to fuse into, a
  table on the codes (parameters kept);
* data movement (slices, flatten, reshapes, max pool, a ReLU that could not be fused) works on
  the codes and keeps the parameters.

The record these functions read is ``ckpt["quantization"]`` (passes/quantize.py ``describe``):
``layers`` holds one spec per plan node, in topological order.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from kiln.errors import PassError

QMIN, QMAX = -128, 127  # int8 activations (asymmetric: tensors that can be negative)
WMAX = 127  # int8 weights are symmetric: [-127, 127]
ACT_RANGE = {"int8": (QMIN, QMAX), "uint8": (0, 255)}  # code range of each activation dtype
INPUT = "input"  # the plan name of the model's (single) input
# fixed output parameters of the table-driven activations: their ranges are known
LUT_OUTPUT = {
    "sigmoid": {"scale": 1.0 / 256, "zero_point": 0, "dtype": "uint8"},
    "tanh": {"scale": 1.0 / 128, "zero_point": 0, "dtype": "int8"},
    # 1/255, not sigmoid's 1/256: hard-sigmoid reaches 1.0 exactly (x >= 3), and 1.0 is code 255
    "hardsigmoid": {"scale": 1.0 / 255, "zero_point": 0, "dtype": "uint8"},
}
# table-driven activations (:func:`lut`); those not in LUT_OUTPUT have a calibrated output
TABLES = ("sigmoid", "tanh", "hardsigmoid", "hardswish", "relu6")
RELU6_TOP = 6.0  # ReLU6's upper bound (nn.ReLU6, F.relu6, clamp(x, 0, 6), hardtanh(x, 0, 6))
WEIGHTED = ("conv", "linear")
MOVES = ("maxpool", "flatten", "getitem", "reshape", "relu")  # on codes, parameters unchanged
ADD_BITS = 30  # add/sub fixed point: the larger multiplier lies in (2^29, 2^30]
FUSES_RELU = ("conv", "linear", "add", "sub", "mul")


def act_range(dtype: str) -> tuple[int, int]:
    """(min, max) code of an 8-bit activation dtype."""
    if dtype not in ACT_RANGE:
        raise ValueError(f"activation dtype {dtype!r}: expected one of {sorted(ACT_RANGE)}")
    return ACT_RANGE[dtype]


def _f32(v) -> np.float64:
    """A scale as the library holds it (float32), widened exactly to float64."""
    return np.float64(np.float32(v))


def requant_multiplier(in_scale, w_scale, out_scale, n: int = 1) -> np.ndarray:
    """float32 multipliers taking an int32 accumulator (input scale x weight scale, summed over
    ``n`` terms for an average) to the output scale. The torch twin (below) and the Relax
    lowering (passes/support/relax_int8.py) both call this, so both round with the very same
    float32 numbers."""
    s_w = np.asarray(w_scale, dtype=np.float32).astype(np.float64)
    return (_f32(in_scale) * s_w / (_f32(out_scale) * n)).astype(np.float32)


def mul_multiplier(sa, sb, so) -> np.float32:
    """The float32 multiplier of an 8-bit product: sa * sb / so."""
    return np.float32(_f32(sa) * _f32(sb) / _f32(so))


def add_multipliers(sa, sb, so) -> tuple[int, int, int]:
    """Integer multipliers and shift (Ma, Mb, S) of an 8-bit add/sub: Mx = round(sx / so * 2^S),
    S chosen so the larger multiplier lies in (2^29, 2^30] (29 bits of precision, int64 sums
    far from overflow). The twin and the Relax lowering both call this."""
    ra, rb = _f32(sa) / _f32(so), _f32(sb) / _f32(so)
    big = max(ra, rb)
    e = math.ceil(math.log2(big)) if big > 0 else 0
    shift = ADD_BITS - e
    if shift < 1:
        raise PassError(f"quantize: an add/sub whose input scale is {big:.3g}x its output scale has no "
                        "fixed-point form (calibrate on data that reaches the add's output range)")
    shift = min(shift, 48)
    return int(np.round(ra * 2.0**shift)), int(np.round(rb * 2.0**shift)), shift


def lut(kind: str, in_qp: dict, out_qp: dict | None = None) -> list[int]:
    """The output code of ``kind`` (sigmoid, tanh, hardsigmoid, hardswish) for every input
    code, lowest code first: f((c - zp) * scale) in float64, rounded half to even onto the
    output grid, clipped. hard-sigmoid and hard-swish are torch's (MobileNetV3's):
    relu6(x + 3) / 6 and x * relu6(x + 3) / 6."""
    def hsig(v):
        return np.clip(v + 3.0, 0.0, 6.0) / 6.0

    f = {"sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)), "tanh": np.tanh, "hardsigmoid": hsig,
         "hardswish": lambda v: v * hsig(v), "relu6": lambda v: np.clip(v, 0.0, RELU6_TOP)}[kind]
    out_qp = out_qp or LUT_OUTPUT[kind]
    lo, hi = act_range(act_dtype(in_qp))
    codes = np.arange(lo, hi + 1, dtype=np.float64)
    y = f((codes - in_qp["zero_point"]) * _f32(in_qp["scale"]))
    q = np.round(y / _f32(out_qp["scale"])) + out_qp["zero_point"]
    return [int(v) for v in np.clip(q, *act_range(act_dtype(out_qp)))]


def relu6_top(qp: dict) -> int:
    """The code of 6.0 on the grid ``qp`` (round(6 / scale) + zp, float64): a fused ReLU6's
    upper clip, below the dtype's top code only where the range reaches past 6 (parameters
    given by a quantized model file; a calibrated range, measured after the ReLU6, never does)."""
    return int(np.round(RELU6_TOP / _f32(qp["scale"]))) + int(qp["zero_point"])


def act_dtype(qp: dict) -> str:
    """An activation's dtype; records of version 1 (before uint8) hold int8 only."""
    return qp.get("dtype", "int8")


# ---------------------------------------------------------------------------------------------
# the graph plan


def _fail(node, what: str, fix: str):
    raise PassError(f"quantize: node '{node.name}' ({what}): {fix}")


def _module_kind(node, m) -> str:
    """The plan kind of a call to module ``m``; PassError for a module outside the vocabulary."""
    import torch.nn as nn

    what = f"{type(m).__name__} '{node.target}'"
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            _fail(node, what, f"padding {m.padding!r} ({m.padding_mode}) has no int8 lowering; give integer zero padding")
        return "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
        return "bn"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 is Hardtanh(0, 6)
        if (m.min_val, m.max_val) != (0.0, RELU6_TOP):
            _fail(node, what, f"Hardtanh({m.min_val}, {m.max_val}): only ReLU6 = Hardtanh(0, 6) is lowered")
        return "relu6"
    if isinstance(m, nn.MaxPool2d):
        if m.dilation not in (1, (1, 1)) or m.return_indices:
            _fail(node, what, "a max pool with dilation or indices has no int8 lowering")
        return "maxpool"
    if isinstance(m, nn.AdaptiveAvgPool2d):
        if m.output_size not in (1, (1, 1)):
            _fail(node, what, f"output size {m.output_size}: only global average pooling (output size 1) is lowered")
        return "avgpool"
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            _fail(node, what, "only nn.Flatten() (start_dim 1, end_dim -1) is lowered")
        return "flatten"
    if isinstance(m, (nn.Identity, nn.Dropout)):
        return "identity"
    if isinstance(m, nn.Sigmoid):
        return "sigmoid"
    if isinstance(m, nn.Tanh):
        return "tanh"
    if isinstance(m, nn.Hardsigmoid):
        return "hardsigmoid"
    if isinstance(m, nn.Hardswish):
        return "hardswish"
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
        _fail(node, what, "TVM's ONNX import has no LSTM/GRU/RNN: use family rnn (cells unrolled into Linear, "
                          "sigmoid, tanh, mul and add)")
    _fail(node, what, "has no int8 lowering in Kiln; use Conv2d, Linear, BatchNorm, ReLU, MaxPool2d, "
                      "AdaptiveAvgPool2d(1), Flatten, Dropout, Identity, Sigmoid, Tanh, Hardsigmoid, Hardswish, ReLU6")
    raise AssertionError  # unreachable


SHAPE_OPS = ("view", "reshape", "unsqueeze", "squeeze")  # call_method / torch.* spellings of a "reshape" entry


def _shape_arithmetic(node) -> bool:
    """A node computing sizes, not a tensor (``x.shape``, ``x.size(0)``, ``n, c, _, _ = x.shape``):
    the plan skips it; a reshape reading it takes its target shape from the traced output."""
    return node.op in ("call_function", "call_method") and "tensor_meta" not in node.meta and (
        node.target in (getattr, operator.getitem, "size") or getattr(node.target, "__module__", None) == "_operator")


def _shape_kind(node) -> str | None:
    """``reshape`` (view, reshape, unsqueeze, squeeze) or ``avgpool`` (a mean over H and W) for a
    call that is one of them, else None. A reshape moves codes (parameters unchanged); its
    target is the traced output shape, so sizes read from ``x.shape`` / ``x.size()`` work."""
    import torch

    t = node.target
    name = t if node.op == "call_method" else getattr(t, "__name__", "")
    if node.op == "call_function" and t not in (torch.reshape, torch.unsqueeze, torch.squeeze, torch.mean):
        return None
    if name in SHAPE_OPS:
        return "reshape"
    if name == "mean":
        args = dict(zip(("dim", "keepdim"), node.args[1:]), **node.kwargs)
        dims = args.get("dim")
        dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        if set(args) - {"dim", "keepdim"} or not all(isinstance(d, int) for d in dims) or \
                sorted(d % 4 for d in dims) != [2, 3] or not isinstance(args.get("keepdim", False), bool):
            _fail(node, f"{node.op} mean", "only a mean over H and W of a 4-D tensor (x.mean((2, 3)), "
                                           "keepdim or not) is lowered: global average pooling")
        return "avgpool"
    return None


def _relu6_kind(node) -> str | None:
    """``relu6`` for F.relu6(x), F.hardtanh(x, 0, 6), torch.clamp/clip(x, 0, 6) and
    x.clamp/clip(0, 6) (bounds by position or keyword); PassError naming the node for other
    bounds; None for any other call."""
    import torch
    import torch.nn.functional as F

    t = node.target
    if node.op == "call_method":
        name = t if t in ("clamp", "clip") else None
    else:
        name = {F.relu6: "relu6", F.hardtanh: "hardtanh", torch.clamp: "clamp", torch.clip: "clip"}.get(t)
    if name is None:
        return None
    keys = {"relu6": ("inplace",), "hardtanh": ("min_val", "max_val", "inplace"),
            "clamp": ("min", "max"), "clip": ("min", "max")}[name]
    args = dict(zip(keys, node.args[1:]), **node.kwargs)
    if name == "relu6":
        args.update(min=0.0, max=RELU6_TOP)
    bounds = (args.get("min", args.get("min_val", -1.0 if name == "hardtanh" else None)),
              args.get("max", args.get("max_val", 1.0 if name == "hardtanh" else None)))
    if args.get("inplace") or any(isinstance(b, torch.fx.Node) for b in bounds) or \
            tuple(None if b is None else float(b) for b in bounds) != (0.0, RELU6_TOP):
        _fail(node, f"{node.op} {name}", f"bounds {bounds}: only a clamp to [0, 6] (ReLU6: F.relu6, clamp(x, 0, 6), "
                                         "hardtanh(x, 0, 6), nn.ReLU6; not in place) is lowered; for [0, inf) use relu")
    return "relu6"


def _reshape_to(node, in_shape: list[int], out_shape: list[int]) -> list[int]:
    """The target shape of a ``reshape`` entry (batch dimension left out): PassError unless the
    batch dimension stays where it is."""
    if len(out_shape) < 1 or out_shape[0] != in_shape[0] or math.prod(out_shape) != math.prod(in_shape):
        _fail(node, f"{node.op} {getattr(node.target, '__name__', node.target)}",
              f"reshape {in_shape} -> {out_shape} must keep the batch dimension first: write "
              "x.view(x.shape[0], ...), x.flatten(1), x[:, :, None, None] or x.unsqueeze(-1)")
    return list(out_shape[1:])


def _function_kind(node) -> str:
    import torch
    import torch.nn.functional as F

    kind = _shape_kind(node) or _relu6_kind(node)
    if kind is not None:
        return kind
    t = node.target
    table = {operator.add: "add", torch.add: "add", operator.sub: "sub", torch.sub: "sub",
             operator.mul: "mul", torch.mul: "mul", torch.sigmoid: "sigmoid", torch.tanh: "tanh",
             torch.relu: "relu", F.relu: "relu", operator.getitem: "getitem", torch.flatten: "flatten",
             F.hardsigmoid: "hardsigmoid", F.hardswish: "hardswish"}
    kind = table.get(t)
    if node.op == "call_method":
        kind = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "flatten": "flatten"}.get(t)
    name = getattr(t, "__name__", str(t))
    if kind is None:
        fix = ("moves data across dimensions: only reshapes that keep the order (view, reshape, flatten(1), "
               "unsqueeze, squeeze, x[:, :, None, None]) and constant slices are lowered" if name in
               ("size", "shape", "permute", "transpose", "contiguous", "expand", "repeat", "t")
               else "has no int8 lowering in Kiln; use the op vocabulary (Conv2d, Linear, add, sub, mul, sigmoid, "
                    "tanh, relu, constant slices, nn.Flatten)")
        _fail(node, f"{node.op} {name}", fix)
    if kind in ("add", "sub", "mul"):
        if node.kwargs or len(node.args) != 2 or not all(hasattr(a, "op") for a in node.args):
            _fail(node, f"{node.op} {name}", "only a tensor with a tensor (same shape, or broadcast: a (N, C, 1, 1) gate; no alpha) is lowered; "
                                              "a constant operand has no int8 lowering")
    elif kind == "flatten":
        args = list(node.args[1:]) + list(node.kwargs.values())
        if args not in ([1], [1, -1]):
            _fail(node, f"{node.op} {name}", "only flatten(x, 1) is lowered")
    elif kind in ("sigmoid", "tanh", "relu", "hardsigmoid", "hardswish"):
        extra = list(node.args[1:]) + [v for k, v in node.kwargs.items() if not (kind != "sigmoid" and k == "inplace")]
        if extra or node.kwargs.get("inplace"):
            _fail(node, f"{node.op} {name}", "expects one tensor argument (and no inplace)")
    return kind


def _index(node, idx, shape) -> list[list]:
    """A constant getitem index, normalized against the input's shape: one item per dimension,
    ["i", k] (an integer, k >= 0) or ["s", start, stop, step] (a slice, bounds resolved; the
    batch dimension's is always whole: ["s", None, None, 1])."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    if any(i is Ellipsis for i in idx):
        at = idx.index(Ellipsis)
        fill = len(shape) - (len(idx) - 1)
        idx = idx[:at] + (slice(None),) * fill + idx[at + 1 :]
    if len(idx) > len(shape):
        _fail(node, "getitem", f"index {idx} has more items than the input has dimensions ({len(shape)})")
    idx = idx + (slice(None),) * (len(shape) - len(idx))
    out = []
    for d, (item, n) in enumerate(zip(idx, shape)):
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            _fail(node, "getitem", f"index item {item!r}: only constant python ints and slices are lowered")
        if isinstance(item, int):
            k = item + n if item < 0 else item
            if not 0 <= k < n:
                _fail(node, "getitem", f"index {item} out of range for dimension {d} of size {n}")
            if d == 0:
                _fail(node, "getitem", "indexing the batch dimension has no int8 lowering")
            out.append(["i", k])
        else:
            if any(not (v is None or isinstance(v, int)) for v in (item.start, item.stop, item.step)):
                _fail(node, "getitem", f"slice {item}: bounds must be constant ints")
            start, stop, step = item.indices(n)
            if step <= 0 or stop <= start:
                _fail(node, "getitem", f"slice {item} on a dimension of {n}: only non-empty forward slices are lowered")
            if d == 0:  # the batch: whole (the plan is traced at batch 1, it runs at any)
                if (start, stop, step) != (0, n, 1):
                    _fail(node, "getitem", "slicing the batch dimension has no int8 lowering")
                start = stop = None
            out.append(["s", start, stop, step])
    return out


def _adds_unit_dims(node, shape) -> bool:
    """A getitem whose index has ``None`` items (new unit dimensions) and otherwise takes every
    element (``s[:, :, None, None]``, ``s[..., None]``): a ``reshape`` entry. PassError naming
    the node for None mixed with slicing or integer indexing."""
    idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    if not any(i is None for i in idx):
        return False
    rest = tuple(i for i in idx if i is not None)
    if any(i is not Ellipsis and i != slice(None) for i in rest):
        _fail(node, "getitem", f"index {idx}: None (a new unit dimension) mixed with slicing or integer indexing has "
                               "no int8 lowering; slice first, then add the dimensions in a second step "
                               "(y = x[:, 2:5]; y[:, :, None, None])")
    return True


def getitem_key(index: list[list]) -> tuple:
    """The torch index of a normalized :func:`_index`."""
    return tuple(item[1] if item[0] == "i" else slice(item[1], item[2], item[3]) for item in index)


def graph_plan(model, input_shape: tuple[int, ...]) -> list[dict]:
    """The model as Kiln quantizes it: torch.fx nodes in topological order, grouped. Each entry:
    name (a conv/linear/pool/flatten module's qualified name, i.e. its state_dict prefix, at its
    first call; the fx node name otherwise; ``input`` for the input), kind (input, conv,
    linear, add, sub, mul, sigmoid, tanh, relu, maxpool, avgpool, flatten, getitem), inputs (entry names), shape (of
    its output at batch 1), tap (the fx node whose value is the entry's output: after the folded
    BatchNorm and the fused ReLU), and per kind: module, bn (the folded BatchNorm's name), relu
    (fused), index (getitem). The last entry is the model's output. PassError naming the node on
    anything outside the vocabulary."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, ... on data-dependent control flow
        raise PassError(f"quantize: torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
                        "int8 needs a model without data-dependent control flow or shape ops") from e
    try:
        ShapeProp(gm).propagate(torch.zeros(input_shape))
    except Exception as e:  # the model's own errors, whatever their type
        raise PassError(f"quantize: {type(model).__name__} fails on an input of shape {tuple(input_shape)}: {e}") from e
    gm.graph.eliminate_dead_code()  # what the output does not need has no place in the library
    mods = dict(gm.named_modules())
    plan: dict[str, dict] = {}
    of: dict[str, str] = {}  # fx node name -> the entry whose output it is
    called: set[str] = set()

    def src(node, arg) -> str:
        if not hasattr(arg, "op") or arg.name not in of:
            _fail(node, "an argument", f"{arg!r} is not a tensor of the graph")
        return of[arg.name]

    def shape(node) -> list[int]:
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            _fail(node, node.op, "does not produce one tensor")
        return list(meta.shape)

    def add(node, entry: dict) -> None:
        entry.update(shape=shape(node), tap=node.name)
        plan[entry["name"]] = entry
        of[node.name] = entry["name"]

    nodes = {n.name: n for n in gm.graph.nodes}

    def _node(name):
        return nodes[name]

    def readers(n) -> list:
        """The nodes reading ``n``'s value, through Identity/Dropout (which only pass it on)."""
        out = []
        for u in n.users:
            if u.op == "call_module" and isinstance(mods[u.target], (torch.nn.Identity, torch.nn.Dropout)):
                out += readers(u)
            elif _shape_arithmetic(u):  # reads the sizes only
                continue
            else:
                out.append(u)
        return out

    def sole_reader(entry, node) -> bool:
        return readers(_node(entry["tap"])) == [node]

    def fusable(node, entry, kinds) -> bool:
        """A ReLU fuses into the entry before it when nothing else reads that entry's output."""
        return entry["kind"] in kinds and not entry.get("relu") and sole_reader(entry, node)

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if INPUT in plan:
                _fail(node, "placeholder", "int8 models take one input tensor")
            add(node, {"name": INPUT, "kind": "input", "inputs": []})
        elif node.op == "get_attr":
            _fail(node, f"get_attr {node.target}", "a constant tensor in the graph has no int8 lowering; make it a "
                                                  "Conv2d/Linear parameter")
        elif node.op == "output":
            out = node.args[0]
            if not hasattr(out, "op"):
                _fail(node, "output", "int8 models return one tensor")
            if of[out.name] == INPUT or of[out.name] != list(plan)[-1]:
                _fail(node, "output", "the model must return the result of its last op (not its input)")
            return list(plan.values())
        elif node.op == "call_module":
            m = mods[node.target]
            kind = _module_kind(node, m)
            x = src(node, node.args[0]) if node.args else None
            if len(node.args) != 1 or node.kwargs:
                _fail(node, f"{type(m).__name__} '{node.target}'", "expects one tensor argument")
            prev = plan[x]
            if kind == "identity":
                of[node.name] = x
            elif kind == "bn":
                want = "conv" if isinstance(m, torch.nn.BatchNorm2d) else "linear"
                if not (prev["kind"] == want and prev["bn"] is None and not prev["relu"] and sole_reader(prev, node)):
                    _fail(node, f"{type(m).__name__} '{node.target}'",
                          f"a BatchNorm folds only into the {want} right before it (whose output nothing else uses)")
                prev.update(bn=node.target, tap=node.name)
                of[node.name] = x
            elif kind in ("relu", "relu6") and fusable(node, prev, FUSES_RELU):
                prev.update(relu=True, tap=node.name, **({"relu6": True} if kind == "relu6" else {}))
                of[node.name] = x
            elif kind in WEIGHTED:
                # a layer called again (an unrolled RNN's shared weights) is one more entry, named
                # by its fx node: same weights, its own activation parameters
                name = node.target if node.target not in called else node.name
                called.add(node.target)
                add(node, {"name": name, "kind": kind, "inputs": [x], "module": node.target, "bn": None,
                           "relu": False})
            elif kind in ("maxpool", "avgpool", "flatten"):
                add(node, {"name": node.name if node.target in plan else node.target, "kind": kind, "inputs": [x],
                           "module": node.target})
            else:  # relu (not fusable), sigmoid, tanh
                add(node, {"name": node.name, "kind": kind, "inputs": [x]})
        elif _shape_arithmetic(node):
            continue  # sizes, read by a reshape whose target is its traced output shape
        elif node.op in ("call_function", "call_method"):
            kind = _function_kind(node)
            ins = [src(node, a) for a in (node.args if kind in ("add", "sub", "mul") else node.args[:1])]
            if kind in ("relu", "relu6") and fusable(node, plan[ins[0]], FUSES_RELU):
                plan[ins[0]].update(relu=True, tap=node.name, **({"relu6": True} if kind == "relu6" else {}))
                of[node.name] = ins[0]
            elif kind == "getitem" and _adds_unit_dims(node, plan[ins[0]]["shape"]):
                add(node, {"name": node.name, "kind": "reshape", "inputs": ins,
                           "to": _reshape_to(node, plan[ins[0]]["shape"], shape(node))})
            elif kind == "getitem":
                add(node, {"name": node.name, "kind": kind, "inputs": ins,
                           "index": _index(node, node.args[1], plan[ins[0]]["shape"])})
            elif kind == "reshape":
                add(node, {"name": node.name, "kind": kind, "inputs": ins,
                           "to": _reshape_to(node, plan[ins[0]]["shape"], shape(node))})
            elif kind == "avgpool":  # x.mean((2, 3)): keepdim False drops H and W
                if len(plan[ins[0]]["shape"]) != 4:
                    _fail(node, f"{node.op} mean", "only a mean over H and W of a 4-D tensor is lowered")
                add(node, {"name": node.name, "kind": kind, "inputs": ins,
                           "keepdim": len(shape(node)) == 4})
            else:
                entry = {"name": node.name, "kind": kind, "inputs": ins}
                if kind in FUSES_RELU:
                    entry["relu"] = False
                add(node, entry)
    raise PassError("quantize: the traced graph has no output")


def recurrent_roles(plan: list[dict]) -> dict[str, str]:
    """The entries of an unrolled recurrence that play the same part at different time steps,
    each mapped to its first occurrence (entries outside the recurrence are absent): calibration
    measures one range per part over every step, so every step after the first carries the same
    activation parameters, the exported steps are the same ops with the same constants and the
    compiled library holds one set of kernels for them (its code no longer grows with the
    sequence length).

    The recurrence is found from the layer called most often (an unrolled cell's projections,
    once per step): its last evenly spaced calls (at least 3; the first step may differ) give
    the period P; the entry at ``first call + k*P + j`` plays the part of ``first call + j`` when
    both have the same kind, module, fused ReLU and shape and read entries at the same
    distances back (a read of an entry before the first call matches any: the input, the
    first step's state). Sharing a range is a calibration choice: the twin and the library
    compute with whatever parameters the record holds, so a wrong match costs accuracy, never
    exactness. The matching stops at the first entry that differs (the head after the last step)."""
    calls: dict[str, list[int]] = {}
    for i, e in enumerate(plan):
        if e["kind"] in WEIGHTED:
            calls.setdefault(e["module"], []).append(i)
    at = max(calls.values(), key=len, default=[])
    while len(at) >= 3 and len({b - a for a, b in zip(at, at[1:])}) != 1:
        at = at[1:]  # the first step may be shorter (no recurrent term): the evenly spaced calls after it
    if len(at) < 3:
        return {}
    start, period = at[0], at[1] - at[0]
    pos = {e["name"]: i for i, e in enumerate(plan)}

    def sig(i: int) -> tuple:
        e = plan[i]
        reads = tuple("before" if pos[x] < start else i - pos[x] for x in e["inputs"])  # before: any
        return e["kind"], e.get("module"), e.get("relu"), tuple(e["shape"]), reads

    roles = {}
    for i in range(start + period, len(plan)):
        j = start + (i - start) % period
        a, b = sig(i), sig(j)
        if a[:4] != b[:4] or len(a[4]) != len(b[4]) or any(
                "before" not in (x, y) and x != y for x, y in zip(a[4], b[4])):
            break
        roles[plan[i]["name"]] = roles.get(plan[j]["name"], plan[j]["name"])
    return roles


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
    return (_f32(in_scale) * np.asarray(scale, dtype=np.float32).astype(np.float64)).astype(np.float32)


def layer_bias(model, spec: dict):
    """The bias of a conv/linear entry: its own, or, when it has none, the folded BatchNorm's
    (passes/quantize.py fold_batchnorm leaves it there); None without either."""
    m = model.get_submodule(spec["module"])
    if m.bias is not None or not spec.get("bn"):
        return m.bias
    return model.get_submodule(spec["bn"]).bias


def _clip(q, spec: dict):
    """Codes clipped to the output dtype's range, from the zero point up after a fused ReLU."""
    import torch

    qmin, qmax = act_range(act_dtype(spec["output"]))
    lo = max(qmin, spec["output"]["zero_point"]) if spec.get("relu") else qmin
    hi = min(qmax, relu6_top(spec["output"])) if spec.get("relu6") else qmax  # a fused ReLU6
    return torch.clamp(q, lo, hi)


def _requant(acc, spec: dict, mult):
    """int32 accumulator (exact, as float64) -> 8-bit output codes, or float logits when the
    layer has no output parameters: float32(acc) * multiplier, round half to even, + zp, clip
    to the output dtype's range (from the zero point up after a ReLU)."""
    import torch

    y = acc.float() * torch.from_numpy(np.asarray(mult, dtype=np.float32)).reshape(1, -1, *([1] * (acc.dim() - 2)))
    if spec["output"] is None:
        return (torch.clamp(y, 0.0, RELU6_TOP) if spec.get("relu6") else torch.relu(y)) if spec["relu"] else y
    return _clip(torch.round(y) + spec["output"]["zero_point"], spec)


def _mult(spec: dict) -> np.ndarray:
    if spec["output"] is None:
        return bias_scale(spec["input"]["scale"], spec["weight_scale"])
    return requant_multiplier(spec["input"]["scale"], spec["weight_scale"], spec["output"]["scale"])


def _conv(twin, spec, xs):
    import torch.nn.functional as F

    m = twin.get_submodule(spec["module"])
    wq = weight_ints(m.weight, spec["weight_scale"])
    xi = (xs[0] - spec["input"]["zero_point"]).double()
    acc = F.conv2d(xi, wq.double(), None, m.stride, m.padding, m.dilation, m.groups)
    acc = acc + bias_ints(layer_bias(twin, spec), spec["input"]["scale"], spec["weight_scale"]).reshape(1, -1, 1, 1)
    return _requant(acc, spec, _mult(spec))


def _linear(twin, spec, xs):
    m = twin.get_submodule(spec["module"])
    wq = weight_ints(m.weight, spec["weight_scale"])
    xi = (xs[0] - spec["input"]["zero_point"]).double()
    acc = xi @ wq.double().t() + bias_ints(layer_bias(twin, spec), spec["input"]["scale"], spec["weight_scale"])
    return _requant(acc, spec, _mult(spec))


def _avgpool(twin, spec, xs):
    import torch

    x, qi, qo = xs[0], spec["input"], spec["output"]
    n = x.shape[2] * x.shape[3]
    s = (x - qi["zero_point"]).double().sum((2, 3), keepdim=spec.get("keepdim", True))
    m = requant_multiplier(qi["scale"], [1.0], qo["scale"], n)[0]
    q = torch.round(np.float32(m) * s.float()) + qo["zero_point"]
    return torch.clamp(q, *act_range(act_dtype(qo)))


def _add_sub(twin, spec, xs):
    (qa, qb), qo = spec["operands"], spec["output"]
    ma, mb, shift = add_multipliers(qa["scale"], qb["scale"], qo["scale"])
    a = (xs[0].long() - qa["zero_point"]) * ma
    b = (xs[1].long() - qb["zero_point"]) * mb
    acc = (a + b if spec["kind"] == "add" else a - b) + (1 << (shift - 1))
    return _clip(((acc >> shift) + qo["zero_point"]).float(), spec)


def _mul(twin, spec, xs):
    import torch

    (qa, qb), qo = spec["operands"], spec["output"]
    p = ((xs[0] - qa["zero_point"]) * (xs[1] - qb["zero_point"])).float()  # exact: |p| <= 255^2
    y = p * mul_multiplier(qa["scale"], qb["scale"], qo["scale"])
    return _clip(torch.round(y) + qo["zero_point"], spec)


def _table(twin, spec, xs):
    import torch

    lo, _ = act_range(act_dtype(spec["input"]))
    return torch.tensor(spec["lut"], dtype=torch.float32)[(xs[0] - lo).long()]


def _maxpool(twin, spec, xs):
    return twin.get_submodule(spec["module"])(xs[0])  # max of codes is the code of the max


def _relu(twin, spec, xs):
    import torch

    return torch.clamp(xs[0], min=spec["output"]["zero_point"])


KERNELS = {
    "conv": _conv, "linear": _linear, "avgpool": _avgpool, "add": _add_sub, "sub": _add_sub, "mul": _mul,
    "sigmoid": _table, "tanh": _table, "hardsigmoid": _table, "hardswish": _table, "relu6": _table, "maxpool": _maxpool, "relu": _relu,
    "flatten": lambda twin, spec, xs: xs[0].flatten(1),
    "getitem": lambda twin, spec, xs: xs[0][getitem_key(spec["index"])],
    "reshape": lambda twin, spec, xs: xs[0].reshape(xs[0].shape[0], *spec["to"]),
}


def upgrade(quantization: dict) -> dict:
    """A record of version 1 or 2 (an nn.Sequential's layers, each fed by the one before it)
    in the version 3 form: an ``input`` entry, ``inputs`` and ``module`` per layer, ``output``."""
    if quantization.get("version", 1) >= 3:
        return quantization
    layers = {}
    first = next(iter(quantization["layers"].values()))
    int8 = quantization["mode"] == "int8"
    layers[INPUT] = {"kind": "input", "inputs": [], **({"output": first["input"]} if int8 else {})}
    prev = INPUT
    for name, spec in quantization["layers"].items():
        layers[name] = dict(spec, inputs=[prev], module=name)
        prev = name
    return dict(quantization, version=3, layers=layers, output=prev)


def _forward_int8(twin, quantization: dict, x):
    """The twin's forward: the plan run on 8-bit codes (float tensors holding integers)."""
    layers = quantization["layers"]
    env = {}
    for name, spec in layers.items():
        if spec["kind"] == "input":
            env[name] = _quant(x, spec["output"])
        else:
            env[name] = KERNELS[spec["kind"]](twin, spec, [env[i] for i in spec["inputs"]])
    out = quantization["output"]
    spec = layers[out]
    return env[out] if spec.get("output") is None else _dequant(env[out], spec["output"])


class _Forward:
    """The twin's bound forward (an instance attribute, so the module tree, its class and its
    state_dict keys stay the float model's)."""

    def __init__(self, twin, quantization: dict):
        self.twin, self.quantization = twin, quantization

    def __call__(self, x):
        return _forward_int8(self.twin, self.quantization, x)


def snap_weights(model, quantization: dict) -> None:
    """Weights onto their int8 grids, in place (idempotent)."""
    import torch

    with torch.no_grad():
        for spec in quantization["layers"].values():
            if spec["kind"] in WEIGHTED:
                m = model.get_submodule(spec["module"])
                s = torch.tensor(spec["weight_scale"], dtype=torch.float32).reshape(-1, *([1] * (m.weight.dim() - 1)))
                m.weight.copy_(weight_ints(m.weight, spec["weight_scale"]) * s)


def fake_quant(model, quantization: dict):
    """The fake-quant twin of a (BN-folded) float model under ``quantization``: a copy of the
    model, same modules and parameters (so its state_dict rebuilds it), that computes as the
    compiled library does. int8: the plan on integer codes (``_forward_int8``); weight_only:
    the float model with its weights on their int8 grids (what the library's kernels compute)."""
    import copy

    quantization = upgrade(quantization)
    twin = copy.deepcopy(model)
    snap_weights(twin, quantization)
    if quantization["mode"] == "int8":
        twin.forward = _Forward(twin, quantization)
    twin.eval()
    return twin
