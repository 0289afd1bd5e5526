"""Net family ``tflite``: a model the team already has, as a TensorFlow Lite file
(``architecture.path``), float32 or int8-quantized (full integer: int8 activations and weights,
int32 biases).

Kiln does not train it (``TfliteArchitecture.trains`` is false): the import stage
(passes/import_model.py) checks it, reads it into a checkpoint, and the post-training passes run.
As for family onnx (kiln/nets/onnx.py), the graph is converted into a torch ``fx.GraphModule``
over Kiln's op vocabulary (NHWC -> NCHW: conv filters OHWI -> OIHW, depthwise 1HW(C*M) ->
(C*M)1HW, a dense layer after a flatten of an H x W x C map has its columns reordered to C x H x
W), so quantization, the QDQ export and the Relax lowering work on it with no further code.

An int8 model is taken as quantized: its weights are dequantized exactly (``q * scale``, which
re-quantize to the same int8 codes under the file's per-channel scales), and :func:`convert`
also returns the file's activation parameters (scale, zero point per tensor; int8 with zero
point -128 is the same grid as Kiln's uint8 with zero point 0) and weight scales, which the
quantize pass uses instead of calibrating. What Kiln does *not* keep is TFLite's requantization
arithmetic (an int32 fixed-point multiplier and shift per channel): Kiln requantizes with one
float32 multiplier (passes/support/int8.py), so a code may differ from TFLite's reference
kernels by one on a rounding tie; and the last dense layer's output stays float logits
(accumulator x scale) instead of int8 codes.

:func:`problems` reports, before any build, per operator, what TVM's own TFLite frontend
(``tvm.relax.frontend.tflite``, which reads the file with the same ``tflite`` package) has no
converter for, what it cannot import quantized, and what is outside Kiln's converter;
:func:`tvm_import` imports the file through that frontend (the import stage runs it, so a file
TVM cannot read stops the build there, with TVM's reason).

Why a converter of our own rather than TVM's Relax module: the stages after import (pruning,
quantization, the fake-quant twin, the QDQ export, the int8 lowering) work on a torch graph in
Kiln's vocabulary; TVM's import gives NHWC Relax, which none of them reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import ManifestError
from kiln.nets import Complexity

# the TFLite operators the converter maps to torch (the vocabulary of every Kiln pass)
VOCABULARY = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD", "SUB", "MUL", "RELU", "RELU6",
              "LOGISTIC", "TANH", "HARD_SWISH", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN", "RESHAPE",
              "QUANTIZE", "DEQUANTIZE", "SOFTMAX")
_FLOAT32, _INT32, _UINT8, _INT8 = 0, 2, 3, 9  # tflite.TensorType
_SAME, _VALID = 0, 1  # tflite.Padding
_ACT = {0: None, 1: "RELU", 3: "RELU6"}  # tflite.ActivationFunctionType Kiln converts


def load(path: str | Path):
    """The TFLite model (``tflite.Model``) at ``path``; a ManifestError naming the file when it
    is missing or not a TFLite flatbuffer."""
    import tflite

    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"architecture.path: {p}: no such TFLite file")
    buf = p.read_bytes()
    # a flatbuffer's file identifier sits at bytes 4..8: "TFL3" for every TFLite model
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise ManifestError(f"architecture.path: {p}: not a TFLite model (no 'TFL3' file identifier)")
    try:
        model = tflite.Model.GetRootAsModel(buf, 0)
        if model.SubgraphsLength() < 1:
            raise ValueError("no subgraph")
    except Exception as e:  # flatbuffers raises struct.error, IndexError, ... on a damaged file
        raise ManifestError(f"architecture.path: {p}: not a readable TFLite model ({type(e).__name__}: {e})") from e
    return model


def _opcode(model, op) -> str:
    from tflite.BuiltinOperator import BuiltinOperator

    names = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    oc = model.OperatorCodes(op.OpcodeIndex())
    code = max(oc.DeprecatedBuiltinCode(), oc.BuiltinCode())
    return names.get(code, f"CUSTOM({oc.CustomCode()})" if code == 32 else f"code {code}")


def _name(sg, i: int) -> str:
    n = sg.Tensors(i).Name()
    return n.decode() if isinstance(n, bytes) else str(n)


def _where(model, sg, k: int) -> str:
    op = sg.Operators(k)
    out = op.OutputsAsNumpy()
    return f"operator {k} '{_name(sg, int(out[0])) if len(out) else '?'}' ({_opcode(model, op)})"


def tvm_tables(model) -> tuple[set[str], set[str]] | None:
    """(operators TVM's Relax TFLite frontend converts, those it converts quantized), from its
    OperatorConverter; None where this TVM has no such frontend."""
    try:
        from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter
    except ImportError:
        return None
    conv = OperatorConverter(model, model.Subgraphs(0), None, None)
    return set(conv.convert_map), set(getattr(OperatorConverter, "_SUPPORTED_QUANTIZED_OPS", conv.convert_map))


def _quantized_tensor(t) -> bool:
    return t.Type() in (_INT8, _UINT8)


def is_quantized(model) -> bool:
    """Whether the model computes in integers (any 8-bit activation tensor an operator writes)."""
    sg = model.Subgraphs(0)
    return any(_quantized_tensor(sg.Tensors(int(o))) for k in range(sg.OperatorsLength())
               for o in sg.Operators(k).OutputsAsNumpy())


def problems(model, vocabulary: bool = False) -> list[str]:
    """What keeps ``model`` from being imported by TVM's TFLite frontend, one line per operator;
    with ``vocabulary``, also every operator outside Kiln's converter."""
    sg = model.Subgraphs(0)
    tables = tvm_tables(model)
    out: list[str] = []
    if model.SubgraphsLength() > 1:
        out.append(f"the model has {model.SubgraphsLength()} subgraphs (control flow): Kiln imports one")
    for i in sg.InputsAsNumpy():
        t = sg.Tensors(int(i))
        sig = t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else None
        if sig is not None and any(int(d) < 0 for d in list(sig)[1:]):
            out.append(f"input '{_name(sg, int(i))}': dimensions {list(sig)} are dynamic: convert with a fixed input shape")
    for k in range(sg.OperatorsLength()):
        op = sg.Operators(k)
        code = _opcode(model, op)
        ins = [sg.Tensors(int(j)) for j in op.InputsAsNumpy() if j >= 0]
        outs = [sg.Tensors(int(j)) for j in op.OutputsAsNumpy()]
        quant = any(_quantized_tensor(t) for t in ins[:1] + outs)
        hybrid = not quant and any(_quantized_tensor(t) for t in ins[1:])
        if tables is not None and code not in tables[0]:
            out.append(f"{_where(model, sg, k)}: TVM's TFLite frontend has no converter for {code}")
        elif tables is not None and quant and code not in tables[1]:
            out.append(f"{_where(model, sg, k)}: TVM's TFLite frontend does not import {code} quantized")
        elif hybrid:
            out.append(f"{_where(model, sg, k)}: dynamic-range quantization (int8 weights, float activations) is "
                       "not imported: convert with full integer quantization, or keep the model float")
        elif vocabulary and code not in VOCABULARY:
            out.append(f"{_where(model, sg, k)}: {code} is outside what Kiln converts and compresses "
                       f"({', '.join(VOCABULARY)}); use family onnx or module with the model in that vocabulary")
    return out


def check(model, origin: str, vocabulary: bool = False) -> None:
    """Raise a ManifestError naming ``origin`` and every problem :func:`problems` finds."""
    found = problems(model, vocabulary)
    if found:
        more = f"\n  ... and {len(found) - 8} more" if len(found) > 8 else ""
        raise ManifestError(f"{origin}: cannot be built for the boards:\n  " + "\n  ".join(found[:8]) + more)


def tvm_import(path: str | Path):
    """The file imported by TVM's own TFLite frontend: (Relax IRModule, input name, NHWC shape)."""
    import tflite
    from tvm.relax.frontend.tflite import from_tflite

    model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    sg = model.Subgraphs(0)
    i = int(sg.InputsAsNumpy()[0])
    name, shape = _name(sg, i), tuple(int(d) for d in sg.Tensors(i).ShapeAsNumpy())
    dtype = {_FLOAT32: "float32", _INT8: "int8", _UINT8: "uint8"}.get(sg.Tensors(i).Type(), "float32")
    try:
        mod = from_tflite(model, shape_dict={name: shape}, dtype_dict={name: dtype})
    except Exception as e:  # TVM's frontend raises OpNotImplemented, AssertionError, tvm.error.*, ...
        raise ManifestError(f"architecture.path: {path}: TVM's TFLite frontend cannot import it "
                            f"({type(e).__name__}: {e})") from e
    return mod[0] if isinstance(mod, tuple) else mod, name, shape


def input_shape(model) -> tuple[int, ...]:
    """(C, H, W) of the model's one NHWC input (batch left out); (1, 1, F) for a (N, F) input."""
    sg = model.Subgraphs(0)
    if sg.InputsLength() != 1:
        raise ManifestError(f"architecture.path: the model has {sg.InputsLength()} inputs; Kiln feeds one tensor")
    dims = [int(d) for d in sg.Tensors(int(sg.InputsAsNumpy()[0])).ShapeAsNumpy()]
    if len(dims) == 4:
        return (dims[3], dims[1], dims[2])
    if len(dims) == 2:
        return (1, 1, dims[1])
    raise ManifestError(f"architecture.path: input shape {dims}: Kiln feeds (N, H, W, C) images or (N, F) vectors")


def _qparams(t) -> dict | None:
    """Kiln's activation parameters of an 8-bit tensor (int8 with zero point -128 is uint8 with
    zero point 0: the same grid); None for a float tensor."""
    if not _quantized_tensor(t):
        return None
    q = t.Quantization()
    scale, zp = float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0])
    if t.Type() == _UINT8:  # the older uint8 scheme: the same real values as int8 with zp - 128
        return {"scale": scale, "zero_point": zp, "dtype": "uint8"} if zp == 0 else \
            {"scale": scale, "zero_point": zp - 128, "dtype": "int8"}
    if zp == -128:
        return {"scale": scale, "zero_point": 0, "dtype": "uint8"}
    return {"scale": scale, "zero_point": zp, "dtype": "int8"}


def _array(model, sg, idx: int, origin: str, where: str):
    """A constant tensor's values as float32, dequantized exactly (q * scale per channel)."""
    import numpy as np

    t = sg.Tensors(idx)
    data = model.Buffers(t.Buffer()).DataAsNumpy()
    if isinstance(data, int) or data is None or len(data) == 0:
        raise ManifestError(f"{origin}: {where}: its input '{_name(sg, idx)}' must be a constant")
    dtype = {_FLOAT32: np.float32, _INT32: np.int32, _INT8: np.int8, _UINT8: np.uint8}.get(t.Type())
    if dtype is None:
        raise ManifestError(f"{origin}: {where}: constant '{_name(sg, idx)}' of TFLite type {t.Type()} is not read")
    shape = [int(d) for d in t.ShapeAsNumpy()]
    v = np.frombuffer(data.tobytes(), dtype=dtype).reshape(shape)
    if t.Type() == _FLOAT32:
        return v.astype(np.float32), None
    q = t.Quantization()
    scale = q.ScaleAsNumpy().astype(np.float32)
    zp = q.ZeroPointAsNumpy().astype(np.int64)
    axis = q.QuantizedDimension() if scale.size > 1 else 0
    bshape = [1] * v.ndim
    if scale.size > 1:
        bshape[axis] = -1
    real = ((v.astype(np.int64) - zp.reshape(bshape)).astype(np.float32) * scale.reshape(bshape)).astype(np.float32)
    return real, scale


def _pads(where: str, origin: str, padding: int, size: tuple[int, int], k: tuple[int, int], s: tuple[int, int],
          d: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    if padding == _VALID:
        return (0, 0)
    out = []
    for n, kk, ss, dd in zip(size, k, s, d):
        total = max((-(-n // ss) - 1) * ss + (kk - 1) * dd + 1 - n, 0)
        if total % 2:
            raise ManifestError(f"{origin}: {where}: SAME padding here is asymmetric ({total // 2} before, "
                                f"{total - total // 2} after: input {size}, kernel {k}, stride {s}); Kiln's convs "
                                "pad symmetrically: give the input an odd size, or use VALID padding and pad it before")
        out.append(total // 2)
    return tuple(out)


def _options(op, cls):
    table = op.BuiltinOptions()
    o = cls()
    if table is not None:
        o.Init(table.Bytes, table.Pos)
    return o if table is not None else None


def convert(model, origin: str):
    """(torch ``fx.GraphModule`` computing what ``model`` computes, NCHW, eval mode; ``source``:
    the file's quantization for an int8 model, else None). ``source`` holds ``activations``
    (fx node name -> Kiln activation parameters of the tensor that node computes) and
    ``weights`` (conv/linear module name -> per-output-channel scale), what the quantize pass
    takes instead of calibrating."""
    import numpy as np
    import torch
    import torch.nn as nn
    from tflite.AddOptions import AddOptions
    from tflite.Conv2DOptions import Conv2DOptions
    from tflite.DepthwiseConv2DOptions import DepthwiseConv2DOptions
    from tflite.FullyConnectedOptions import FullyConnectedOptions
    from tflite.Pool2DOptions import Pool2DOptions
    from tflite.ReducerOptions import ReducerOptions

    check(model, origin, vocabulary=True)
    sg = model.Subgraphs(0)
    quantized = is_quantized(model)
    root = nn.Module()
    fx = torch.fx.Graph()
    env: dict[int, Any] = {}
    shape: dict[int, list[int]] = {}  # TFLite (NHWC) shape of each tensor computed so far
    flat_from: dict[int, list[int]] = {}  # a flattened tensor -> the (N, H, W, C) map it came from
    source: dict[str, dict] = {"activations": {}, "weights": {}}
    i0 = int(sg.InputsAsNumpy()[0])
    env[i0] = ph = fx.placeholder("input")  # fx names it input_1 (it shadows a builtin): key by its name
    shape[i0] = [int(d) for d in sg.Tensors(i0).ShapeAsNumpy()]
    if len(shape[i0]) == 2:  # Kiln feeds (N, 1, 1, F): flatten it back
        root.add_module("input_flatten", nn.Flatten())
        env[i0] = fx.call_module("input_flatten", (env[i0],))
    if _qparams(sg.Tensors(i0)):
        source["activations"][ph.name] = _qparams(sg.Tensors(i0))
    count = [0]

    def add(prefix: str, mod) -> str:
        count[0] += 1
        name = f"{prefix}{count[0]}"
        root.add_module(name, mod)
        return name

    def activate(y, fn: int, where: str):
        act = _ACT.get(fn, "?")
        if act == "?":
            raise ManifestError(f"{origin}: {where}: fused activation {fn} is not converted (only NONE, RELU, RELU6)")
        if act == "RELU":
            return fx.call_module(add("relu", nn.ReLU()), (y,))
        if act == "RELU6":
            return fx.call_module(add("relu6", nn.ReLU6()), (y,))
        return y

    for k in range(sg.OperatorsLength()):
        op = sg.Operators(k)
        code, where = _opcode(model, op), _where(model, sg, k)
        ins = [int(j) for j in op.InputsAsNumpy()]
        out = int(op.OutputsAsNumpy()[0])
        oshape = [int(d) for d in sg.Tensors(out).ShapeAsNumpy()]

        def x(j=0):
            if ins[j] not in env:
                raise ManifestError(f"{origin}: {where}: input '{_name(sg, ins[j])}' is a constant or produced by "
                                    "no earlier operator (Kiln converts tensor-with-tensor operators only)")
            return env[ins[j]]

        if code in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            w, wscale = _array(model, sg, ins[1], origin, where)
            n, h, wd, c = shape[ins[0]]
            if code == "CONV_2D":
                o = _options(op, Conv2DOptions)
                weight, groups = w.transpose(0, 3, 1, 2), 1  # OHWI -> OIHW
            else:
                o = _options(op, DepthwiseConv2DOptions)
                weight, groups = w.transpose(3, 0, 1, 2), c  # 1HW(C*M) -> (C*M)1HW
            s, dil = (o.StrideH(), o.StrideW()), (o.DilationHFactor(), o.DilationWFactor())
            pads = _pads(where, origin, o.Padding(), (h, wd), tuple(weight.shape[2:]), s, dil)
            has_bias = len(ins) > 2 and ins[2] >= 0
            conv = nn.Conv2d(c, weight.shape[0], tuple(weight.shape[2:]), stride=s, padding=pads, dilation=dil,
                             groups=groups, bias=has_bias)
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
                if has_bias:
                    conv.bias.copy_(torch.from_numpy(_array(model, sg, ins[2], origin, where)[0].reshape(-1)))
            name = add("conv", conv)
            if wscale is not None:
                source["weights"][name] = [float(v) for v in np.broadcast_to(wscale.reshape(-1), (weight.shape[0],))]
            y = activate(fx.call_module(name, (x(),)), o.FusedActivationFunction(), where)
        elif code == "FULLY_CONNECTED":
            o = _options(op, FullyConnectedOptions)
            w, wscale = _array(model, sg, ins[1], origin, where)
            src = flat_from.get(ins[0]) or (shape[ins[0]] if len(shape[ins[0]]) == 4 else None)
            if src is not None and src[1] * src[2] > 1:
                # TFLite flattened (H, W, C); Kiln's nn.Flatten flattens (C, H, W): reorder the columns
                _, h, wd, c = src
                w = w.reshape(-1, h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
            xin = x()
            if len(shape[ins[0]]) == 4:
                xin = fx.call_module(add("flatten", nn.Flatten()), (xin,))
            has_bias = len(ins) > 2 and ins[2] >= 0
            lin = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                if has_bias:
                    lin.bias.copy_(torch.from_numpy(_array(model, sg, ins[2], origin, where)[0].reshape(-1)))
            name = add("fc", lin)
            if wscale is not None:
                source["weights"][name] = [float(v) for v in np.broadcast_to(wscale.reshape(-1), (w.shape[0],))]
            y = activate(fx.call_module(name, (xin,)), o.FusedActivationFunction(), where)
        elif code in ("ADD", "SUB", "MUL"):
            import operator

            fn = {"ADD": operator.add, "SUB": operator.sub, "MUL": operator.mul}[code]
            if len(shape[ins[0]]) != len(shape.get(ins[1], [])):
                raise ManifestError(f"{origin}: {where}: operands of ranks {len(shape[ins[0]])} and "
                                    f"{len(shape.get(ins[1], []))}: Kiln converts operands of the same rank")
            o = _options(op, AddOptions)  # SubOptions and MulOptions share its first field
            y = activate(fx.call_function(fn, (x(0), x(1))), o.FusedActivationFunction() if o else 0, where)
        elif code in ("RELU", "RELU6"):
            y = fx.call_module(add(code.lower(), nn.ReLU() if code == "RELU" else nn.ReLU6()), (x(),))
        elif code in ("LOGISTIC", "TANH"):
            y = fx.call_function(torch.sigmoid if code == "LOGISTIC" else torch.tanh, (x(),))
        elif code == "HARD_SWISH":
            y = fx.call_module(add("hardswish", nn.Hardswish()), (x(),))
        elif code in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            o = _options(op, Pool2DOptions)
            n, h, wd, c = shape[ins[0]]
            kk, s = (o.FilterHeight(), o.FilterWidth()), (o.StrideH(), o.StrideW())
            if code == "AVERAGE_POOL_2D":
                if kk != (h, wd) or o.Padding() != _VALID:
                    raise ManifestError(f"{origin}: {where}: only a global average pool (filter = the whole {h}x{wd} "
                                        "map, VALID) is converted")
                pool = nn.AdaptiveAvgPool2d(1)
            else:
                pool = nn.MaxPool2d(kk, stride=s, padding=_pads(where, origin, o.Padding(), (h, wd), kk, s))
            y = activate(fx.call_module(add("pool", pool), (x(),)), o.FusedActivationFunction(), where)
        elif code == "MEAN":
            data = model.Buffers(sg.Tensors(ins[1]).Buffer()).DataAsNumpy()
            axes = sorted(int(a) % 4 for a in np.frombuffer(data.tobytes(), dtype=np.int32))
            if len(shape[ins[0]]) != 4 or axes != [1, 2]:
                raise ManifestError(f"{origin}: {where}: MEAN over axes {axes}: only the global mean over H and W "
                                    "(axes [1, 2]) is converted")
            o = _options(op, ReducerOptions)
            y = fx.call_module(add("pool", nn.AdaptiveAvgPool2d(1)), (x(),))
            if _qparams(sg.Tensors(out)) is not None:  # the pool requantizes to the mean's parameters
                source["activations"][y.name] = _qparams(sg.Tensors(out))
            if not (o is not None and o.KeepDims()):
                y = fx.call_module(add("flatten", nn.Flatten()), (y,))
        elif code == "RESHAPE":
            src = shape[ins[0]]
            if len(oshape) != 2 or int(np.prod(src[1:])) != oshape[1]:
                raise ManifestError(f"{origin}: {where}: RESHAPE {src} -> {oshape}: only flattening to (N, features) "
                                    "is converted")
            y = x()
            if len(src) == 4:
                flat_from[out] = src
                y = fx.call_module(add("flatten", nn.Flatten()), (y,))
        elif code == "QUANTIZE":
            if ins[0] != i0 or not quantized:
                raise ManifestError(f"{origin}: {where}: QUANTIZE is converted only on the model's float input")
            source["activations"][ph.name] = _qparams(sg.Tensors(out))
            y = x()
        elif code in ("DEQUANTIZE", "SOFTMAX"):
            # the model's output: Kiln reads float logits (a softmax keeps their argmax; it is dropped)
            if list(sg.OutputsAsNumpy()) != [out]:
                raise ManifestError(f"{origin}: {where}: {code} is converted only as the model's last operator")
            y = x()
        else:  # check(vocabulary=True) refused it already; kept so a new VOCABULARY entry cannot pass silently
            raise ManifestError(f"{origin}: {where}: {code} is not converted")
        env[out] = y
        shape[out] = oshape
        qp = _qparams(sg.Tensors(out))
        if qp is not None and code not in ("QUANTIZE", "DEQUANTIZE", "SOFTMAX"):
            source["activations"][y.name] = qp
    outs = [int(o) for o in sg.OutputsAsNumpy()]
    if len(outs) != 1:
        raise ManifestError(f"{origin}: the model has {len(outs)} outputs; Kiln reads one (the logits)")
    fx.output(env[outs[0]])
    module = torch.fx.GraphModule(root, fx)
    module.eval()
    return module, (source if quantized else None)


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    """The TFLite file's model as a torch module, checked against the dataset's input and classes."""
    return build_with_source(arch, in_ch, classes, image_size)[0]


def build_with_source(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    """(module, the file's quantization or None): see :func:`convert`."""
    from kiln.nets import checked_import

    model = load(arch.path)
    return checked_import(arch.path, input_shape(model), (in_ch, *image_size),
                          lambda: convert(model, f"architecture.path: {arch.path}"), classes)


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    """Counted on the converted model (imports torch: the import stage calls it)."""
    from kiln.nets import measure

    return measure(build(arch, in_ch, classes, image_size), (in_ch, *image_size))


def imported(arch, in_ch: int, classes: int, image_size: tuple[int, int], compression) -> tuple[Any, dict]:
    """The import stage's view (kiln.nets.imported): the file imported by TVM's own TFLite
    frontend (a file it cannot read stops here), the converted module, and for an int8 file its
    quantization (``checkpoint["source_quantization"]``, which the quantize pass keeps). An int8
    file takes ``quantize`` (mode int8) as its one pass: it is quantized already, and pruning or
    weight sharing would move its weights off the grids its scales were chosen for."""
    model = load(arch.path)
    check(model, f"architecture.path: {arch.path}")
    tvm_import(arch.path)
    module, source = build_with_source(arch, in_ch, classes, image_size)
    names = [(s.name, getattr(s.settings, "mode", None)) for s in compression.passes]
    if source is not None and names != [("quantize", "int8")]:
        raise ManifestError(f"compression.passes: {arch.path} is int8-quantized: list exactly one pass, "
                            "quantize: {mode: int8}, which keeps the file's scales and zero points "
                            f"(listed: {[n for n, _ in names] or 'none'})")
    extra = {"metrics": {"tflite_quantized": source is not None, "tvm_tflite_import": "ok"}}
    if source is not None:
        extra["checkpoint"] = {"source_quantization": source}
    return module, extra
