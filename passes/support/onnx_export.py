"""Export to ONNX: a Kiln checkpoint to ONNX (batch 1), checked for parity against torch with
ONNX Runtime on held-out images before the file is put in place.

A quantized checkpoint (``ckpt["quantization"]``, passes/quantize.py) exports as a QDQ model:
int8 weight initializers with per-output-channel DequantizeLinear (axis 0), int32 biases
(int8 mode), and a QuantizeLinear/DequantizeLinear pair on every 8-bit activation tensor, whose
zero point's type gives the activation's dtype (uint8 with zero point 0 for non-negative
tensors, int8 otherwise). Its reference is the fake-quant torch twin (passes/support/int8.py);
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

from kiln.artifacts import atomic_path, sha256_file, write_json
from kiln.errors import PassError
from passes.support.common import load_checkpoint, load_split, to_tensor
from passes.support.int8 import act_dtype, bias_ints, bias_scale, fake_quant, layer_plan, weight_ints

log = logging.getLogger("kiln.export")

OPSET = 17
INPUT, OUTPUT = "input", "logits"
INT8_MIN_AGREEMENT = 0.99  # ONNX Runtime's int8 kernels may round a value differently, rarely
INT8_TOL_STEPS = 4.0  # logits tolerance, in int8 steps of the reference logits' range


def qdq_model(model, quantization: dict, shape: tuple[int, ...]):
    """The QDQ ONNX model of a quantized (BN-folded) Sequential: node and initializer names
    follow the torch module names."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper


    int8 = quantization["mode"] == "int8"
    mods = dict(model.named_children())
    nodes, inits = [], []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def qdq(x, qp, tag):
        """x -> QuantizeLinear -> DequantizeLinear with per-tensor uint8/int8 parameters."""
        s = init(f"{tag}.scale", np.array(qp["scale"], dtype=np.float32))
        z = init(f"{tag}.zero_point", np.array(qp["zero_point"], dtype=np.dtype(act_dtype(qp))))
        nodes.append(helper.make_node("QuantizeLinear", [x, s, z], [f"{tag}.q"], name=f"{tag}.quantize"))
        nodes.append(helper.make_node("DequantizeLinear", [f"{tag}.q", s, z], [f"{tag}.dq"], name=f"{tag}.dequantize"))
        return f"{tag}.dq"

    def weights(name, m, spec):
        """int8 weight (and int32 bias, int8 mode) initializers, dequantized per channel."""
        scale = spec["weight_scale"]
        wq = weight_ints(m.weight, scale).numpy().astype(np.int8)
        ws = init(f"{name}.weight_scale", np.asarray(scale, dtype=np.float32))
        wz = init(f"{name}.weight_zero_point", np.zeros(len(scale), dtype=np.int8))
        nodes.append(helper.make_node("DequantizeLinear", [init(f"{name}.weight_q", wq), ws, wz], [f"{name}.weight"], axis=0))
        if m.bias is None:
            return f"{name}.weight", None
        if not int8:
            return f"{name}.weight", init(f"{name}.bias", m.bias.detach().numpy().astype(np.float32))
        bq = bias_ints(m.bias, spec["input"]["scale"], scale).numpy().astype(np.int32)
        bs = init(f"{name}.bias_scale", bias_scale(spec["input"]["scale"], scale))
        bz = init(f"{name}.bias_zero_point", np.zeros(len(scale), dtype=np.int32))
        nodes.append(helper.make_node("DequantizeLinear", [init(f"{name}.bias_q", bq), bs, bz], [f"{name}.bias"], axis=0))
        return f"{name}.weight", f"{name}.bias"

    x = INPUT
    plan = layer_plan(model)
    first = quantization["layers"][plan[0]["name"]]
    if int8:
        x = qdq(x, first["input"], INPUT)
    for i, layer in enumerate(plan):
        name, spec, m = layer["name"], quantization["layers"][layer["name"]], mods[layer["name"]]
        out = OUTPUT if i == len(plan) - 1 else f"{name}.out"
        kind = layer["kind"]
        if kind in ("conv", "linear"):
            w, b = weights(name, m, spec)
            y = f"{name}.acc" if layer["relu"] else out
            if kind == "conv":
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise PassError(f"export: conv '{name}': padding {m.padding!r} ({m.padding_mode}) has no QDQ export")
                ph, pw = m.padding
                nodes.append(helper.make_node("Conv", [x, w] + ([b] if b else []), [y], name=name,
                                              kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                              pads=[ph, pw, ph, pw], dilations=list(m.dilation), group=m.groups))
            else:
                nodes.append(helper.make_node("Gemm", [x, w] + ([b] if b else []), [y], name=name, transB=1))
            if layer["relu"]:
                nodes.append(helper.make_node("Relu", [y], [out], name=f"{name}.relu"))
        elif kind == "maxpool":
            if m.dilation not in (1, (1, 1)):
                raise PassError(f"export: max-pool '{name}': dilation {m.dilation} has no QDQ export")
            k, s, p = (v if isinstance(v, (tuple, list)) else (v, v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding))
            nodes.append(helper.make_node("MaxPool", [x], [out], name=name, kernel_shape=list(k), strides=list(s),
                                          pads=[p[0], p[1], p[0], p[1]], ceil_mode=int(m.ceil_mode)))
        elif kind == "avgpool":
            nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=name))
        elif kind == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [out], name=name, axis=1))
        x = out
        if int8 and spec.get("output") is not None:
            x = qdq(x, spec["output"], name)
    out_shape = [shape[0], mods[plan[-1]["name"]].out_features]
    graph = helper.make_graph(nodes, "kiln_qdq", [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, out_shape)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln")
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def export_float(model, shape: tuple[int, ...], path: Path) -> None:
    """A float torch model to ONNX at ``path`` (batch 1, Kiln's input/output names)."""
    import torch

    # dynamo=False: the TorchScript exporter folds BatchNorm into conv in eval mode
    torch.onnx.export(model.eval(), torch.zeros(shape), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)


def export_checkpoint(model_pt: Path, data_dir: Path, out_onnx: Path, out_json: Path, samples: int = 64,
                      atol: float = 1e-4) -> dict:
    """Export the checkpoint ``model_pt`` to ``out_onnx`` once it agrees with torch on the first
    ``samples`` validation images of ``data_dir``; its report (shape, parity) to ``out_json``."""
    import onnx
    import onnxruntime as ort
    import torch

    model, ckpt = load_checkpoint(model_pt)
    quant = ckpt.get("quantization")
    shape = (1, ckpt["channels"], *ckpt["image_size"])
    x, _ = load_split(data_dir, "val")
    batch = to_tensor(x[:samples])
    with atomic_path(out_onnx) as tmp:
        if quant:
            with torch.no_grad():
                onnx.save(qdq_model(model, quant, shape), str(tmp))
            model = fake_quant(model, quant)  # the reference: what the int8 library computes
        else:
            export_float(model, shape, tmp)
        opts = ort.SessionOptions()
        if quant:
            # ONNX Runtime's fused x86 int8 kernels (QLinearConv, u8s8 via VPMADDUBSW) saturate
            # int16 pair sums with 8-bit weights; the reference is the QDQ graph's own meaning
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        sess = ort.InferenceSession(str(tmp), opts, providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = model(batch).numpy()
        got = np.concatenate([sess.run([OUTPUT], {INPUT: batch[i : i + 1].numpy()})[0] for i in range(len(batch))])
        diff = float(np.abs(ref - got).max()) if len(batch) else 0.0
        agree = float((ref.argmax(1) == got.argmax(1)).mean()) if len(batch) else 1.0
        if quant and quant["mode"] == "int8":
            step = float(ref.max() - ref.min()) / 255 if len(batch) else 0.0
            tol, min_agree = INT8_TOL_STEPS * step, INT8_MIN_AGREEMENT
        else:
            tol, min_agree = atol, 1.0
        if diff > tol or agree < min_agree:
            raise PassError(f"export: ONNX output differs from torch (max |diff| {diff:.2e} > {tol:.2e}, "
                            f"argmax agreement {agree:.3f}, need {min_agree})")
    info = {"opset": OPSET, "input": INPUT, "input_shape": list(shape), "output": OUTPUT,
            "num_classes": ckpt["num_classes"], "parity_max_abs_diff": diff, "parity_tolerance": tol,
            "parity_agreement": agree, "parity_samples": len(batch), "quantization": quant["mode"] if quant else None,
            "onnx_bytes": out_onnx.stat().st_size, "sha256": sha256_file(out_onnx)}
    write_json(out_json, info)
    log.info("export: %s (%d bytes), parity max |diff| %.2e, agreement %.3f on %d samples", out_onnx,
             info["onnx_bytes"], diff, agree, len(batch))
    return info
