"""Export to ONNX: a Kiln checkpoint to ONNX (batch 1), checked for parity against torch with
ONNX Runtime on held-out images before the file is put in place.

A quantized checkpoint (``ckpt["quantization"]``, passes/quantize.py) exports as a QDQ model
of its graph plan (any graph in Kiln's op vocabulary, see passes/support/int8.py): int8 weight
initializers (once per layer, also when an unrolled RNN calls it at every step) with
per-output-channel DequantizeLinear (axis 0), int32 biases (int8 mode, per call), and a
QuantizeLinear/DequantizeLinear pair on every 8-bit activation tensor, whose zero point's type
gives the activation's dtype (uint8 with zero point 0 for non-negative tensors, int8
otherwise). Its reference is the fake-quant torch twin (passes/support/int8.py);
int8 parity is judged by argmax agreement and a logits tolerance in units of the logits' int8
step, since ONNX Runtime rounds its own way (one int8 step here and there). ONNX Runtime runs
the QDQ graph unfused (ORT_ENABLE_BASIC): its fused x86 int8 kernels saturate (see
:func:`export_checkpoint`), the compiled library does not.

The export stage (passes/export_onnx.py) runs it on the compressed checkpoint; the compress
stage runs it on each row's checkpoint in a temporary directory to size its kernel library."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kiln.artifacts import Layout, atomic_path, sha256_file, write_json
from kiln.errors import PassError
from passes.support.common import load_checkpoint, load_split, to_tensor
from passes.support.int8 import (act_dtype, act_range, bias_ints, bias_scale, fake_quant, layer_bias, relu6_top, upgrade,
                                 weight_ints)

log = logging.getLogger("kiln.export")

OPSET = 17
INPUT, OUTPUT = "input", "logits"
INT8_MIN_AGREEMENT = 0.99  # ONNX Runtime's int8 kernels may round a value differently, rarely
INT8_TOL_STEPS = 4.0  # logits tolerance, in int8 steps of the reference logits' range


def qdq_model(model, quantization: dict, shape: tuple[int, ...]):
    """The QDQ ONNX model of a quantized (BN-folded) model, node by node from the record's
    graph plan (``ckpt["quantization"]["layers"]``, topological order): Conv, Gemm, Add, Sub,
    Mul, Sigmoid, Tanh, Relu, MaxPool, GlobalAveragePool, Flatten, Slice (+ Squeeze for an
    integer index), each 8-bit output followed by its own QuantizeLinear/DequantizeLinear pair
    (so the Relax lowering sees one op between a dequantize and a quantize). Node and
    initializer names follow the plan's names (module names for the layers)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    quantization = upgrade(quantization)
    int8 = quantization["mode"] == "int8"
    layers = quantization["layers"]
    nodes, inits = [], []

    def init(name, arr):
        # np.ascontiguousarray would make a scalar shape [1]: a per-tensor scale must stay a scalar
        # (the ONNX spec's form; ONNX Runtime's default optimization fuses DQ-Add-Q into QLinearAdd
        # and refuses a scale of shape [1])
        arr = np.asarray(arr)
        inits.append(numpy_helper.from_array(arr if arr.flags.c_contiguous else arr.copy(order="C"), name))
        return name

    def qdq(x, qp, tag, out=None):
        """x -> QuantizeLinear -> DequantizeLinear with per-tensor uint8/int8 parameters (scalars)."""
        s = init(f"{tag}.scale", np.array(qp["scale"], dtype=np.float32))
        z = init(f"{tag}.zero_point", np.array(qp["zero_point"], dtype=np.dtype(act_dtype(qp))))
        out = out or f"{tag}.dq"
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}.q"], name=f"{tag}.quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", s, z], [out], name=f"{tag}.dequantize"))
        return out

    shared: set[str] = set()

    def weights(name, m, spec):
        """int8 weight (once per module: an unrolled RNN calls its layers at every step) and
        int32 bias (per call, int8 mode: its scale is the call's input scale x weight scale)
        initializers, dequantized per channel."""
        scale, mod = spec["weight_scale"], spec["module"]
        if mod not in shared:
            shared.add(mod)
            wq = weight_ints(m.weight, scale).numpy().astype(np.int8)
            ws = init(f"{mod}.weight_scale", np.asarray(scale, dtype=np.float32))
            wz = init(f"{mod}.weight_zero_point", np.zeros(len(scale), dtype=np.int8))
            nodes.append(helper.make_node("DequantizeLinear", [init(f"{mod}.weight_q", wq), ws, wz], [f"{mod}.weight"],
                                          axis=0, name=f"{mod}.weight.dequantize"))
        bias = layer_bias(model, spec)
        if bias is None:
            return f"{mod}.weight", None
        if not int8:
            if f"{mod}.bias" not in {i.name for i in inits}:
                init(f"{mod}.bias", bias.detach().numpy().astype(np.float32))
            return f"{mod}.weight", f"{mod}.bias"
        bq = bias_ints(bias, spec["input"]["scale"], scale).numpy().astype(np.int32)
        bs = init(f"{name}.bias_scale", bias_scale(spec["input"]["scale"], scale))
        bz = init(f"{name}.bias_zero_point", np.zeros(len(scale), dtype=np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [init(f"{name}.bias_q", bq), bs, bz], [f"{name}.bias"], axis=0))
        return f"{mod}.weight", f"{name}.bias"

    def ints(name, values):
        return init(name, np.asarray(values, dtype=np.int64))

    def relu6_bounds(name):
        return [init(f"{name}.relu6_min", np.array(0.0, np.float32)), init(f"{name}.relu6_max", np.array(6.0, np.float32))]

    def emit(name, spec, xs, out):
        kind = spec["kind"]
        m = model.get_submodule(spec["module"]) if "module" in spec else None
        relu = spec.get("relu")
        y = f"{name}.pre_relu" if relu else out
        if kind in ("conv", "linear"):
            w, b = weights(name, m, spec)
            if kind == "conv":
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise PassError(f"export: conv '{name}': padding {m.padding!r} ({m.padding_mode}) has no QDQ export")
                ph, pw = m.padding
                nodes.append(helper.make_node("Conv", [xs[0], w] + ([b] if b else []), [y], name=name,
                                              kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                              pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups))
            else:
                nodes.append(helper.make_node("Gemm", [xs[0], w] + ([b] if b else []), [y], name=name, transB=1))
        elif kind in ("add", "sub", "mul"):
            nodes.append(helper.make_node(kind.capitalize(), xs, [y], name=name))
        elif kind in ("sigmoid", "tanh"):
            nodes.append(helper.make_node(kind.capitalize(), xs, [out], name=name))
        elif kind in ("hardsigmoid", "hardswish", "relu6") and int8:
            # the table itself, on the input's codes (Cast, Sub, Gather, then dequantized):
            # exact in ONNX Runtime and, once imported, plain integer ops for the Relax lowering
            # (TVM's frontend would spell HardSwish as several float ops between Q and DQ)
            lo = act_range(act_dtype(spec["input"]))[0]
            idx = f"{name}.index"
            nodes.append(helper.make_node("Cast", [f"{spec['inputs'][0]}.q"], [idx], to=TensorProto.INT32,
                                          name=f"{name}.cast"))
            if lo:
                nodes.append(helper.make_node("Sub", [idx, init(f"{name}.lowest", np.array(lo, np.int32))],
                                              [f"{name}.offset"], name=f"{name}.offset"))
                idx = f"{name}.offset"
            table = init(f"{name}.table", np.asarray(spec["lut"], dtype=np.dtype(act_dtype(spec["output"]))))
            nodes.append(helper.make_node("Gather", [table, idx], [f"{name}.codes"], axis=0, name=name))
            qp = spec["output"]
            nodes.append(helper.make_node(
                "DequantizeLinear", [f"{name}.codes", init(f"{name}.table_scale", np.array(qp["scale"], np.float32)),
                                     init(f"{name}.table_zero_point", np.array(qp["zero_point"], np.dtype(act_dtype(qp))))],
                [out], name=f"{name}.table_dequantize"))
        elif kind == "hardsigmoid":
            nodes.append(helper.make_node("HardSigmoid", xs, [out], name=name, alpha=1.0 / 6, beta=0.5))
        elif kind == "hardswish":
            nodes.append(helper.make_node("HardSwish", xs, [out], name=name))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", xs, [out], name=name))
        elif kind == "relu6":  # float (int8: its table, above)
            nodes.append(helper.make_node("Clip", [xs[0], *relu6_bounds(name)], [out], name=name))
        elif kind == "maxpool":
            k, s, p = (v if isinstance(v, (tuple, list)) else (v, v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
            nodes.append(helper.make_node("MaxPool", xs, [out], name=name, kernel_shape=list(k), strides=list(s),
                                          pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(m.ceil_mode)))
        elif kind == "avgpool" and not spec.get("keepdim", True):  # x.mean((2, 3))
            nodes.append(helper.make_node("ReduceMean", xs, [out], name=name, axes=[2, 3], keepdims=0))
        elif kind == "avgpool":
            nodes.append(helper.make_node("GlobalAveragePool", xs, [out], name=name))
        elif kind == "reshape":  # unit dimensions added or dropped (x[:, :, None, None], view, squeeze)
            nodes.append(helper.make_node("Reshape", [xs[0], ints(f"{name}.shape", [-1, *spec["to"]])], [out],
                                          name=name))
        elif kind == "flatten":
            nodes.append(helper.make_node("Flatten", xs, [out], name=name, axis=1))
        elif kind == "getitem" and _gathers(spec["index"], in_shape(spec)):
            gather(name, spec, xs[0], out)
        elif kind == "getitem":
            sliced = [(d, it) for d, it in enumerate(spec["index"])
                      if d > 0 and (it[0] == "i" or it[1:] != [0, in_shape(spec)[d], 1])]
            squeeze = [d for d, it in enumerate(spec["index"]) if it[0] == "i"]
            starts = [it[1] for _, it in sliced]
            ends = [it[1] + 1 if it[0] == "i" else it[2] for _, it in sliced]
            steps = [1 if it[0] == "i" else it[3] for _, it in sliced]
            axes = [d for d, _ in sliced]
            z = f"{name}.slice" if squeeze else out
            nodes.append(helper.make_node("Slice", [xs[0], ints(f"{name}.starts", starts), ints(f"{name}.ends", ends),
                                                    ints(f"{name}.axes", axes), ints(f"{name}.steps", steps)],
                                          [z], name=name))
            if squeeze:
                if int8:  # one op between each dequantize and quantize
                    z = qdq(z, spec["output"], f"{name}.slice")
                nodes.append(helper.make_node("Squeeze", [z, ints(f"{name}.squeeze_axes", squeeze)], [out],
                                              name=f"{name}.squeeze"))
        else:
            raise PassError(f"export: node '{name}' of kind {kind!r} has no QDQ export")
        if relu and spec.get("relu6") and int8 and spec["output"] is not None:
            # a fused ReLU6 on 8-bit codes: the requantization's clip to the top code is its upper
            # bound, so the Relax lowering sees the Relu it fuses (exact where 6 is at or past the top)
            if relu6_top(spec["output"]) < act_range(act_dtype(spec["output"]))[1]:
                raise PassError(f"export: node '{name}': a fused ReLU6 on output parameters {spec['output']} "
                                "whose 6.0 lies below the top code has no int8 lowering; give the layer the range [0, 6]")
            nodes.append(helper.make_node("Relu", [y], [out], name=f"{name}.relu"))
        elif relu and spec.get("relu6"):
            nodes.append(helper.make_node("Clip", [y, *relu6_bounds(name)], [out], name=f"{name}.relu6"))
        elif relu and kind not in ("sigmoid", "tanh", "relu", "hardsigmoid", "hardswish", "relu6"):
            nodes.append(helper.make_node("Relu", [y], [out], name=f"{name}.relu"))

    def in_shape(spec):
        return layers[spec["inputs"][0]]["shape"]

    def gather(name, spec, x, out):
        """x[..., i, ..., j] (integer indices, every other axis whole): one Gather per index,
        last axis first, each index a scalar initializer. An unrolled RNN reads step t of its
        input so: the index is a constant argument of one shared kernel, where a Slice's bounds
        would be compiled into a kernel per step (a library growing with the sequence length)."""
        picks = [(d, it[1]) for d, it in enumerate(spec["index"]) if it[0] == "i"][::-1]
        for k, (d, i) in enumerate(picks):
            last = k == len(picks) - 1
            y = out if last else f"{name}.gather{d}"
            nodes.append(helper.make_node("Gather", [x, ints(f"{name}.index{d}", i)], [y], axis=d,
                                          name=name if last else f"{name}.gather{d}"))
            x = qdq(y, spec["output"], y) if int8 and not last else y  # one op between DQ and Q

    names: dict[str, str] = {}
    out_name = quantization["output"]
    for name, spec in layers.items():
        if spec["kind"] == "input":
            names[name] = qdq(INPUT, spec["output"], INPUT) if int8 else INPUT
            continue
        coded = int8 and spec.get("output") is not None
        out = OUTPUT if name == out_name and not coded else f"{name}.out"
        emit(name, spec, [names[i] for i in spec["inputs"]], out)
        if coded:  # the model's own output, if 8-bit, is its dequantized codes under Kiln's name
            out = qdq(out, spec["output"], name, OUTPUT if name == out_name else None)
        names[name] = out
    with torch.no_grad():
        out_shape = list(model(torch.zeros(shape)).shape)
    graph = helper.make_graph(nodes, "kiln_qdq", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def _gathers(index: list[list], shape: list[int]) -> bool:
    """Whether a getitem index (int8.py's normalized form) only picks integer positions, every
    other axis whole: it exports as Gathers (see qdq_model's gather)."""
    ints = [d for d, it in enumerate(index) if it[0] == "i"]
    whole = all(it[0] == "i" or d == 0 or it[1:] == [0, shape[d], 1] for d, it in enumerate(index))
    return bool(ints) and whole


def export_float(model, shape: tuple[int, ...], path: Path) -> None:
    """A float torch model to ONNX at ``path`` (batch 1, Kiln's input/output names)."""
    import torch

    # dynamo=False: the TorchScript exporter folds BatchNorm into conv in eval mode
    torch.onnx.export(model.eval(), torch.zeros(shape), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)


def export_checkpoint(model_pt: Path, data_dir: Path, out_onnx: Path, out_json: Path, samples: int = 64,
                      atol: float = 1e-4, score_head: bool = False) -> dict:
    """Export the checkpoint ``model_pt`` to ``out_onnx`` once it agrees with torch on the first
    ``samples`` validation samples of ``data_dir``; its report (shape, parity) to ``out_json``."""
    model, ckpt = load_checkpoint(model_pt)
    return export_model(model, ckpt, data_dir, out_onnx, out_json, samples, atol, score_head)


def export_float_of(model_pt: Path, data_dir: Path, out_onnx: Path, out_json: Path) -> dict:
    """The float network of a quantized checkpoint (its weights as trained, no fake
    quantization), exported as :func:`export_checkpoint` exports the deployed model (the front
    end in front): the fp32 library of the same widths that benchmarks set the int8 one against."""
    model, ckpt = load_checkpoint(model_pt)
    return export_model(model, {k: v for k, v in ckpt.items() if k != "quantization"}, data_dir, out_onnx, out_json)


def _front_end(data_dir: Path):
    """The data stage's front end (front_end.json) as a torch module on raw samples, or None."""
    path = Path(data_dir) / Layout.FRONT_END_JSON
    if not path.is_file():
        return None, None
    from pydantic import TypeAdapter

    from kiln.artifacts import read_json
    from kiln.schema import FrontEnd
    from passes import frontends

    info = read_json(path)
    fe = TypeAdapter(FrontEnd).validate_python(info["settings"])
    return frontends.build(fe, info["layout"], tuple(info["raw_shape"]), info["stats"], info["sample_rate"],
                           info["raw_dtype"]), info


def export_front_end(data_dir: Path, out_onnx: Path) -> dict | None:
    """The front end alone (raw samples in, features out), for the on-board check of its
    features against the host's; None when the app has none."""
    import torch

    fe_module, info = _front_end(data_dir)
    if fe_module is None:
        return None
    raw = torch.zeros((1, *info["raw_shape"]), dtype=getattr(torch, info["raw_dtype"]))
    with atomic_path(out_onnx) as tmp:
        torch.onnx.export(fe_module.eval(), raw, str(tmp), input_names=[INPUT], output_names=["features"],
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return {"file": out_onnx.name, "input_shape": [1, *info["raw_shape"]], "input_dtype": info["raw_dtype"],
            "sha256": sha256_file(out_onnx)}


def _rename(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]


def wrap(net, fe_module, fe_info: dict | None, score: bool):
    """The deployed graph around the net's ONNX: the front end in front (raw samples in: the
    board is fed int16 audio, uint8 pixels, raw sensor values and the library computes the
    features) and, for anomaly detection, the score behind (the mean squared reconstruction
    error of the features, (1, 1)). The front end is exported by torch from its own module
    and spliced in node by node (names prefixed ``front_end/``)."""
    import io

    import onnx
    import torch
    from onnx import TensorProto, helper

    g = net.graph
    features = "features" if fe_module is not None else INPUT
    if fe_module is not None:
        _rename(g, INPUT, features)
        buf = io.BytesIO()
        raw = torch.zeros((1, *fe_info["raw_shape"]), dtype=getattr(torch, fe_info["raw_dtype"]))
        torch.onnx.export(fe_module.eval(), raw, buf, input_names=[INPUT], output_names=[features],
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
        fe = onnx.load_from_string(buf.getvalue()).graph
        keep = {INPUT, features}
        names = {n for node in fe.node for n in [*node.input, *node.output]} | {i.name for i in fe.initializer}
        for n in names - keep - {""}:
            _rename(fe, n, f"front_end/{n}")
        for init in fe.initializer:
            init.name = f"front_end/{init.name}"
        for node in fe.node:
            node.name = f"front_end/{node.name}"
        nodes = [*fe.node, *g.node]  # protobuf lists take no slice assignment
        del g.node[:]
        g.node.extend(nodes)
        g.initializer.extend(fe.initializer)
        del g.input[:]
        g.input.append(fe.input[0])
    if score:
        net_out = "reconstruction"
        _rename(g, OUTPUT, net_out)
        g.initializer.append(onnx.numpy_helper.from_array(np.array([1, -1], dtype=np.int64), "score/shape"))
        g.node.extend([
            helper.make_node("Reshape", [features, "score/shape"], ["score/flat"], name="score/flatten"),
            helper.make_node("Sub", [net_out, "score/flat"], ["score/diff"], name="score/sub"),
            helper.make_node("Mul", ["score/diff", "score/diff"], ["score/sq"], name="score/square"),
            helper.make_node("ReduceMean", ["score/sq"], [OUTPUT], name="score/mean", axes=[1], keepdims=1),
        ])
        del g.output[:]
        g.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, 1]))
    onnx.checker.check_model(net)
    return net


class _Deployed:
    """The torch reference of the deployed graph on the net's features: the net, and the score
    behind it for anomaly detection (the front end's part is checked on the raw samples)."""

    def __init__(self, model, score: bool):
        self.model, self.score = model, score

    def __call__(self, x):
        out = self.model(x)
        return ((out - x.flatten(1)) ** 2).mean(1, keepdim=True) if self.score else out


def export_model(model, ckpt: dict, data_dir: Path, out_onnx: Path, out_json: Path, samples: int = 64,
                 atol: float = 1e-4, score_head: bool = False) -> dict:
    """:func:`export_checkpoint` of a model already built (the float model of ``ckpt``, its
    weights as the checkpoint holds them; a quantized checkpoint's twin is made here). With a
    front end (the data stage's front_end.json), the ONNX model takes the raw samples and ONNX
    Runtime is fed the raw validation samples, torch the features the host computed from
    them; with ``score_head`` (the task's, passes/tasks/), or a checkpoint trained for anomaly
    detection, the graph ends in the anomaly score."""
    import onnx
    import onnxruntime as ort
    import torch

    quant = ckpt.get("quantization")
    shape = (1, ckpt["channels"], *ckpt["image_size"])
    score = score_head or bool(ckpt.get("anomaly"))  # a detector ends in its score
    fe_module, fe_info = _front_end(data_dir)
    x, _ = load_split(data_dir, "val")
    batch = to_tensor(x[:samples])
    if fe_info is not None:
        with np.load(Path(data_dir) / Layout.RAW_NPZ) as z:
            feed = z["val"][:samples]
        in_shape, in_dtype = [1, *fe_info["raw_shape"]], fe_info["raw_dtype"]
    else:
        feed, in_shape, in_dtype = batch.numpy(), list(shape), "float32"
    with atomic_path(out_onnx) as tmp:
        if quant:
            with torch.no_grad():
                net = qdq_model(model, quant, shape)
            model = fake_quant(model, quant)  # the reference: what the int8 library computes
        else:
            export_float(model, shape, tmp)
            net = onnx.load(str(tmp))
        if fe_module is not None or score:
            net = wrap(net, fe_module, fe_info, score)
        onnx.save(net, str(tmp))
        opts = ort.SessionOptions()
        if quant:
            # ONNX Runtime's fused x86 int8 kernels (QLinearConv, u8s8 via VPMADDUBSW) saturate
            # int16 pair sums with 8-bit weights; the reference is the QDQ graph's own meaning
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = _Deployed(model, score)(batch).numpy()
        got = np.concatenate([sess.run([OUTPUT], {INPUT: feed[i : i + 1]})[0] for i in range(len(feed))]) \
            if len(feed) else ref[:0]
        diff = float(np.abs(ref - got).max()) if len(batch) else 0.0
        agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(batch) else 1.0
        if score:  # one value per sample: judged relative to the scores' own size
            tol, min_agree = max(atol, 1e-3 * float(np.abs(ref).max()) if len(batch) else 0.0), 1.0
            if quant and quant["mode"] == "int8":
                tol *= 50  # the input's int8 code may round the other way on a front end's float noise
        elif quant and quant["mode"] == "int8":
            step = float(ref.max() - ref.min()) / 255 if len(batch) else 0.0
            tol, min_agree = INT8_TOL_STEPS * step, INT8_MIN_AGREEMENT
        else:
            tol, min_agree = atol * (10 if fe_module is not None else 1), 1.0
        if diff > tol or agree < min_agree:
            raise PassError(f"export: ONNX output differs from torch (max |diff| {diff:.2e} > {tol:.2e}, "
                            f"argmax agreement {agree:.3f}, need {min_agree})")
        if quant and len(feed):  # portable: ONNX Runtime at its defaults (fused QLinear ops) takes it too
            try:
                ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run([OUTPUT], {INPUT: feed[:1]})
            except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
                raise PassError(f"export: ONNX Runtime at its default optimization level refuses the exported "
                                f"model: {e}") from e
    info = {"opset": OPSET, "input": INPUT, "input_shape": in_shape, "input_dtype": in_dtype, "output": OUTPUT,
            "net_input_shape": list(shape), "front_end": fe_info["kind"] if fe_info else None,
            "output_kind": "anomaly score" if score else "logits",
            "num_classes": ckpt["num_classes"], "parity_max_abs_diff": diff, "parity_tolerance": tol,
            "parity_agreement": agree, "parity_samples": len(batch), "quantization": quant["mode"] if quant else None,
            "onnx_bytes": out_onnx.stat().st_size, "sha256": sha256_file(out_onnx)}
    write_json(out_json, info)
    log.info("export: %s (%d bytes), parity max |diff| %.2e, agreement %.3f on %d samples", out_onnx,
             info["onnx_bytes"], diff, agree, len(batch))
    return info
