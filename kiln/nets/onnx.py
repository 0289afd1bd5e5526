"""Net family ``onnx``: a model the team already has, as an ONNX file (``architecture.path``).

Kiln does not train it (``OnnxArchitecture.trains`` is false): the import stage
(passes/import_model.py) reads it into a checkpoint, then only post-training compression runs.
Its graph is converted here into a torch ``fx.GraphModule`` over Kiln's op vocabulary (the ops
the int8 quantizer, the QDQ export and the Relax lowering understand: Conv, Gemm/MatMul,
BatchNormalization, Relu, MaxPool, GlobalAveragePool, Flatten, Add, Sub, Mul, Sigmoid, Tanh,
Dropout/Identity), so every compression pass and the fp32 and int8 exports work on it as on a
family Kiln builds. Its initializers become the module's parameters, named after the ONNX nodes.

Why a converter of our own rather than onnx2torch: onnx2torch wraps most operators in its own
module classes (OnnxBinaryMathOperation, OnnxGemm, ...) that Kiln's fx-based quantizer and
torch-pruning would each have to learn; converting straight to nn.Conv2d/nn.Linear/... keeps the
graph in the vocabulary every pass already speaks, and the converter's refusal *is* the check
that the model can be built.

:func:`check` reports, before any build, what TVM's ONNX frontend cannot import (an operator it
has no converter for) or cannot build statically (dynamic pads, shape-computing ops, dynamic
dimensions), naming the node and what to do instead. It applies to any ONNX model: the export
stage runs it on every exported model too (a ``module`` family's own nn.LSTM, say).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

from kiln.errors import ManifestError
from kiln.nets import Complexity

# what to do instead, per operator Kiln cannot take through TVM
ADVICE = {
    "LSTM": "TVM's ONNX frontend has no LSTM: use family rnn (cell: lstm), whose cells are unrolled into "
            "MatMul/Sigmoid/Tanh/Mul, or unroll the cell in your own model with nn.Linear",
    "GRU": "TVM's ONNX frontend has no GRU: use family rnn (cell: gru), or unroll the cell with nn.Linear",
    "RNN": "unroll the recurrence with nn.Linear and tanh (or use family rnn)",
    "Loop": "control flow is not compiled: unroll the loop at export",
    "If": "control flow is not compiled: export one branch",
    "Scan": "control flow is not compiled: unroll it at export",
    "Shape": "shape-computing ops make the graph dynamic: export with a fixed input shape and "
             "do_constant_folding=True, and use nn.Flatten instead of x.view(x.size(0), -1)",
    "ConstantOfShape": "shape-computing ops make the graph dynamic: create constant tensors with a fixed shape",
    "NonZero": "data-dependent shapes cannot be compiled ahead of time",
}
# the operators the converter below maps to torch (the vocabulary of every Kiln pass)
VOCABULARY = ("Conv", "Gemm", "MatMul", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Flatten",
              "Reshape", "Add", "Sub", "Mul", "Sigmoid", "Tanh", "Dropout", "Identity", "Constant")


def _where(node, i: int) -> str:
    return f"node {i} '{node.name or node.output[0]}' ({node.op_type})"


def tvm_operators() -> set[str] | None:
    """The operators TVM's Relax ONNX frontend converts (None if that table cannot be read)."""
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:  # a TVM without this private table: the vocabulary check still runs
        return None
    return set(_get_convert_map())


def problems(model, vocabulary: bool = False) -> list[str]:
    """What keeps ``model`` (an onnx.ModelProto) from a static TVM build, one line per node;
    with ``vocabulary``, also every operator outside Kiln's converter vocabulary."""
    graph = model.graph
    consts = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    known = tvm_operators()
    out: list[str] = []  # dynamic patterns; operators TVM lacks go first (`ops`): often the cause
    ops: list[str] = []  # of the rest, e.g. an nn.LSTM's exported Shape/Expand of its h0
    for vi in graph.input:
        if vi.name in consts:
            continue
        dims = vi.type.tensor_type.shape.dim
        dynamic = [j for j, d in enumerate(dims) if j > 0 and not d.HasField("dim_value")]
        if dynamic:
            out.append(f"input '{vi.name}': dimensions {dynamic} are dynamic ({[d.dim_param for d in dims]}): "
                       "export with a fixed input shape")
    for i, node in enumerate(graph.node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            ops.append(f"{_where(node, i)}: operator domain '{node.domain}' is not standard ONNX: "
                       "TVM imports the default domain only")
        elif op in ADVICE and op not in ("Shape", "ConstantOfShape", "NonZero"):
            ops.append(f"{_where(node, i)}: {ADVICE[op]}")
        elif op in ADVICE:
            out.append(f"{_where(node, i)}: {ADVICE[op]}")
        elif known is not None and op not in known:
            ops.append(f"{_where(node, i)}: TVM's ONNX frontend has no converter for {op}: "
                       "express it with operators TVM imports, or remove it before export")
        elif op == "Pad" and len(node.input) > 1 and node.input[1] not in consts:
            out.append(f"{_where(node, i)}: dynamic pads (input '{node.input[1]}' is computed): "
                       "TVM builds constant pads only; give the pads as a constant")
        elif op in ("Reshape", "Expand", "Tile", "Slice", "Resize", "Upsample") and any(
                x and x not in consts for x in node.input[1:]):
            out.append(f"{_where(node, i)}: its shape/index inputs are computed at run time: "
                       "export with constant folding so they are constants")
        elif vocabulary and op not in VOCABULARY:
            ops.append(f"{_where(node, i)}: {op} is outside what Kiln quantizes and compresses "
                       f"({', '.join(VOCABULARY)}); use family module with your torch model instead")
    return ops + out


def check(model, origin: str, vocabulary: bool = False) -> None:
    """Raise a ManifestError naming ``origin`` and every problem :func:`problems` finds."""
    found = problems(model, vocabulary)
    if found:
        more = f"\n  ... and {len(found) - 8} more" if len(found) > 8 else ""
        raise ManifestError(f"{origin}: cannot be built for the boards:\n  " + "\n  ".join(found[:8]) + more)


def load(path: str | Path):
    """The ONNX model at ``path``; a ManifestError naming the file when it is missing or not ONNX."""
    import onnx

    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"architecture.path: {p}: no such ONNX file")
    try:
        model = onnx.load(str(p))
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError, ... : all mean "not a usable model"
        raise ManifestError(f"architecture.path: {p}: not a valid ONNX model ({type(e).__name__}: {e})") from e
    return model


def input_shape(model) -> tuple[int, ...]:
    """(C, H, W) of the model's one graph input (batch dimension left out)."""
    consts = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in consts]
    if len(inputs) != 1:
        raise ManifestError(f"architecture.path: the model has {len(inputs)} inputs; Kiln feeds one (N, C, H, W) tensor")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise ManifestError(f"architecture.path: input '{inputs[0].name}' has shape {dims}: Kiln feeds (N, C, H, W) "
                            "(1-D sequences as (N, C, 1, L), feature vectors as (N, 1, 1, F))")
    return tuple(dims[1:])


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pair(v, default) -> tuple[int, int]:
    v = list(v) if v is not None else list(default)
    return (int(v[0]), int(v[1])) if len(v) >= 2 else (int(v[0]), int(v[0]))


def _module_name(node, i: int, taken: set[str]) -> str:
    import re

    base = re.sub(r"[^A-Za-z0-9_]", "_", node.name or f"{node.op_type.lower()}_{i}").strip("_") or f"n{i}"
    if base[0].isdigit():
        base = "n" + base
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def convert(model, origin: str):
    """The torch ``fx.GraphModule`` computing what ``model`` computes (eval mode)."""
    import numpy as np
    import torch
    import torch.nn as nn
    from onnx import numpy_helper

    check(model, origin, vocabulary=True)
    graph = model.graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            weights[n.output[0]] = numpy_helper.to_array(_attrs(n)["value"])
    root = nn.Module()
    fx = torch.fx.Graph()
    env: dict[str, Any] = {}
    inputs = [vi for vi in graph.input if vi.name not in weights]
    env[inputs[0].name] = fx.placeholder("input")
    taken: set[str] = set()

    def const(name: str, what: str, i: int, node) -> np.ndarray:
        if name not in weights:
            raise ManifestError(f"{origin}: {_where(node, i)}: its {what} '{name}' must be a constant initializer")
        return weights[name]

    def add_module(node, i, mod):
        name = _module_name(node, i, taken)
        root.add_module(name, mod)
        return name

    def tensor(name: str, node, i):
        if name in env:
            return env[name]
        if name in weights:  # a constant operand of Add/Mul/Sub: a buffer
            buf = _module_name(node, i, taken) + "_const"
            root.register_buffer(buf, torch.from_numpy(np.array(weights[name], dtype=np.float32)))
            env[name] = fx.get_attr(buf)
            return env[name]
        raise ManifestError(f"{origin}: {_where(node, i)}: input '{name}' is produced by no earlier node")

    for i, node in enumerate(graph.node):
        op, a = node.op_type, _attrs(node)
        if op == "Constant":
            continue
        x = tensor(node.input[0], node, i)
        if op == "Conv":
            w = const(node.input[1], "weight", i, node)
            if w.ndim != 4:
                raise ManifestError(f"{origin}: {_where(node, i)}: only 2-D convolutions (4-D weights); "
                                    "express a 1-D convolution as a (1, k) one over (N, C, 1, L)")
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or pads[:2] != pads[2:]:
                raise ManifestError(f"{origin}: {_where(node, i)}: asymmetric or automatic padding ({pads}, "
                                    f"{a.get('auto_pad')}): export with explicit symmetric pads")
            groups = int(a.get("group", 1))
            conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_pair(a.get("strides"), (1, 1)),
                             padding=(int(pads[0]), int(pads[1])), dilation=_pair(a.get("dilations"), (1, 1)),
                             groups=groups, bias=len(node.input) > 2 and bool(node.input[2]))
            with torch.no_grad():
                conv.weight.copy_(torch.from_numpy(w.astype(np.float32)))
                if conv.bias is not None:
                    conv.bias.copy_(torch.from_numpy(const(node.input[2], "bias", i, node).astype(np.float32)))
            y = fx.call_module(add_module(node, i, conv), (x,))
        elif op in ("Gemm", "MatMul"):
            w = const(node.input[1], "weight", i, node).astype(np.float32)
            if op == "Gemm":
                if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                    raise ManifestError(f"{origin}: {_where(node, i)}: Gemm with transA/alpha/beta is not supported")
                w = w if a.get("transB", 0) else w.T
            else:
                w = w.T  # MatMul(x, W[in, out]) = x @ W: a Linear's weight is [out, in]
            if w.ndim != 2:
                raise ManifestError(f"{origin}: {_where(node, i)}: MatMul with a {w.ndim}-D weight")
            bias = len(node.input) > 2 and bool(node.input[2])
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
                if bias:
                    lin.bias.copy_(torch.from_numpy(const(node.input[2], "bias", i, node).astype(np.float32).reshape(-1)))
            y = fx.call_module(add_module(node, i, lin), (x,))
        elif op == "BatchNormalization":
            scale, b, mean, var = (const(n, k, i, node) for n, k in zip(node.input[1:5], ("scale", "bias", "mean", "var")))
            bn = nn.BatchNorm2d(len(scale), eps=float(a.get("epsilon", 1e-5)))
            with torch.no_grad():
                for t, v in ((bn.weight, scale), (bn.bias, b), (bn.running_mean, mean), (bn.running_var, var)):
                    t.copy_(torch.from_numpy(v.astype(np.float32)))
            y = fx.call_module(add_module(node, i, bn), (x,))
        elif op == "Relu":
            y = fx.call_module(add_module(node, i, nn.ReLU()), (x,))
        elif op == "MaxPool":
            k = _pair(a.get("kernel_shape"), (1, 1))
            pads = list(a.get("pads", [0, 0, 0, 0]))
            if pads[:2] != pads[2:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                raise ManifestError(f"{origin}: {_where(node, i)}: asymmetric or automatic pooling pads ({pads})")
            pool = nn.MaxPool2d(k, stride=_pair(a.get("strides"), k), padding=(int(pads[0]), int(pads[1])),
                                ceil_mode=bool(a.get("ceil_mode", 0)))
            y = fx.call_module(add_module(node, i, pool), (x,))
        elif op == "GlobalAveragePool":
            y = fx.call_module(add_module(node, i, nn.AdaptiveAvgPool2d(1)), (x,))
        elif op in ("Flatten", "Reshape"):
            if op == "Reshape":
                shape = [int(s) for s in const(node.input[1], "shape", i, node).reshape(-1)]
                if len(shape) != 2 or shape[1] not in (-1,) and shape[0] not in (1, -1, 0):
                    raise ManifestError(f"{origin}: {_where(node, i)}: Reshape to {shape}: only flattening to "
                                        "(N, features) is supported")
            elif int(a.get("axis", 1)) != 1:
                raise ManifestError(f"{origin}: {_where(node, i)}: Flatten with axis {a.get('axis')} (only 1)")
            y = fx.call_module(add_module(node, i, nn.Flatten()), (x,))
        elif op in ("Add", "Sub", "Mul"):
            fn = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul}[op]
            y = fx.call_function(fn, (x, tensor(node.input[1], node, i)))
        elif op in ("Sigmoid", "Tanh"):
            y = fx.call_function(torch.sigmoid if op == "Sigmoid" else torch.tanh, (x,))
        elif op in ("Dropout", "Identity"):
            y = x
        else:  # check(vocabulary=True) refused it already; kept so a new VOCABULARY entry cannot pass silently
            raise ManifestError(f"{origin}: {_where(node, i)}: {op} is not converted")
        env[node.output[0]] = y
    outs = [o.name for o in graph.output]
    if len(outs) != 1:
        raise ManifestError(f"{origin}: the model has {len(outs)} outputs; Kiln reads one (the logits)")
    fx.output(env[outs[0]])
    module = torch.fx.GraphModule(root, fx)
    module.eval()
    return module


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    """The ONNX file's model as a torch module, checked against the dataset's input and classes."""
    from kiln.nets import checked_import

    model = load(arch.path)
    return checked_import(arch.path, input_shape(model), (in_ch, *image_size),
                          lambda: convert(model, f"architecture.path: {arch.path}"), classes)


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    """Counted on the converted model (this imports torch: the import stage calls it, not the
    manifest loader)."""
    from kiln.nets import measure

    return measure(build(arch, in_ch, classes, image_size), (in_ch, *image_size))


def preflight(model, shape: tuple[int, ...], origin: str) -> None:
    """Export ``model`` (untrained is fine) to ONNX in memory and :func:`check` it: the train
    stage runs this on a team's own module before training, so an operator TVM cannot import
    stops the build before any epoch, with the node named."""
    import io

    import onnx
    import torch

    buf = io.BytesIO()
    try:
        torch.onnx.export(model.eval(), torch.zeros(1, *shape), buf, input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False, do_constant_folding=True)
    except Exception as e:  # torch raises many kinds for an unexportable model
        raise ManifestError(f"{origin}: the model does not export to ONNX ({type(e).__name__}: {e})") from e
    check(onnx.load_from_string(buf.getvalue()), origin)
