"""The quantize pass and the int8 path through export and compile: settings errors name their
field when the manifest loads, calibration gives per-channel weight scales and uint8 (zero point 0) activations where
they cannot be negative, the QDQ ONNX holds int8 weights, the Relax lowering computes
uint8 x int8 -> int32 with int8 weight constants (also after FoldConstant) and no separate pad
kernel, a tensor that can be negative stays asymmetric int8 (padded with its zero point),
weight-only keeps int8 weights, float models pass through unchanged, and the compiled int8
library computes what the fake-quant torch twin computes, bit for bit. (Graphs beyond
nn.Sequential: tests/passes/test_int8_graphs.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.config import load_project
from kiln.errors import ManifestError
from kiln.nets import build
from kiln.schema import QuantizeSettings, parse_architecture
from passes import compress, quantize
from passes.support.common import load_checkpoint, load_split, rebuild, save_checkpoint, to_tensor
from passes.support.onnx_export import export_checkpoint
from passes.support.tvm_build import import_onnx
from tests.conftest import write_project
from tests.passes.conftest import int8_convs, randomize_bn, small_manifest, small_project, write_splits

TARGET = {"kind": "llvm", "num-cores": 2}


def ctx(project, data, index=2):
    return compress.PassContext(project, data, project.training.seed, index, "quantize")


def quantized(small_trained, tmp_path, **params):
    """(twin, ckpt, checkpoint path) of the small trained model after the quantize pass."""
    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings.model_validate(params), ctx(project, data))
    path = tmp_path / "q.pt"
    save_checkpoint(path, dict(ckpt, state_dict=twin.state_dict()))
    return twin, ckpt, path


def exported(small_trained, tmp_path, **params):
    project, data, _ = small_trained
    twin, ckpt, path = quantized(small_trained, tmp_path, **params)
    info = export_checkpoint(path, data, tmp_path / "q.onnx", tmp_path / "q.json")
    return twin, ckpt, tmp_path / "q.onnx", info


def constants(mod) -> list[np.ndarray]:
    from tvm import relax
    from tvm.ir.expr import Constant

    out = []
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, lambda e: out.append(e.value.numpy()) if isinstance(e, Constant) and hasattr(e.value, "numpy") else None)
    return out


def calls(mod, op: str) -> list:
    from tvm import relax

    out = []
    relax.analysis.post_order_visit(mod["main"], lambda e: out.append(e) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == op else None)
    return out


def primfuncs(mod) -> list[str]:
    from tvm import relax

    return sorted(gv.name_hint for gv, f in mod.functions_items() if not isinstance(f, relax.Function))


def weight_shapes(model) -> list[tuple]:
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def run_library(mod, x: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    ex = relax.build(mod, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i : i + 1])).numpy() for i in range(len(x))])


@pytest.mark.parametrize(("params", "field"), [
    ({"mode": "int4"}, "compression.passes.2.quantize.mode"),
    ({"calibration_samples": 0}, "compression.passes.2.quantize.calibration_samples"),
    ({"calibration": "entropy"}, "compression.passes.2.quantize.calibration"),
    ({"percentile": 40}, "compression.passes.2.quantize.percentile"),
    ({"bits": 8}, "compression.passes.2.quantize.bits"),
])
def test_bad_settings_name_their_field(kiln_env, params, field):
    passes = [{"weight_coding": {}}, {"prune": {"method": "magnitude", "amount": 0.5}}, {"quantize": params}]
    write_project(kiln_env["projects"], small_manifest(passes=passes))
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):  # when the manifest loads
        load_project("small")


def test_calibration_gives_per_channel_weight_and_per_tensor_activation_params(small_trained, tmp_path):
    project, data, model_pt = small_trained
    float_model, _ = load_checkpoint(model_pt)
    twin, ckpt, path = quantized(small_trained, tmp_path, calibration_samples=64)
    q = ckpt["quantization"]
    assert q["mode"] == "int8" and q["calibration"]["samples"] == 64 and q["version"] == 3
    layers = [(name, spec) for name, spec in q["layers"].items() if spec["kind"] in ("conv", "linear")]
    assert [len(spec["weight_scale"]) for _, spec in layers] == [s[0] for s in weight_shapes(float_model)]
    for i, (name, spec) in enumerate(layers):
        assert all(s > 0 for s in spec["weight_scale"])
        # the image and every ReLU output (and what pools them) are non-negative: uint8, zero point 0
        assert spec["input"]["scale"] > 0 and spec["input"]["zero_point"] == 0 and spec["input"]["dtype"] == "uint8"
        if i < len(layers) - 1:
            assert spec["relu"] and spec["output"]["zero_point"] == 0 and spec["output"]["dtype"] == "uint8"
        else:
            assert spec["output"] is None  # float logits
        # the stored weights lie on the int8 grid of their channel's scale
        w = getattr(twin, name).weight.detach()
        s = torch.tensor(spec["weight_scale"]).reshape(-1, *([1] * (w.dim() - 1)))
        assert torch.equal(torch.round(w / s) * s, w) and (torch.round(w / s).abs() <= 127).all()
    # BatchNorm folded: an exact identity that the rebuilt model still has
    again = rebuild(torch.load(path, weights_only=False))
    assert list(again.state_dict()) == list(float_model.state_dict())
    bn = next(m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(2, bn.num_features, 3, 3)
    assert torch.equal(bn(x), x)
    # the twin stays close to the float model
    xva, yva = load_split(data, "val")
    with torch.no_grad():
        agree = (twin(to_tensor(xva)).argmax(1) == float_model(to_tensor(xva)).argmax(1)).float().mean()
    assert agree >= 0.95


def test_qdq_onnx_holds_int8_weights_and_passes_parity(small_trained, tmp_path):
    import onnx

    twin, ckpt, onnx_path, info = exported(small_trained, tmp_path)
    model = onnx.load(str(onnx_path))
    inits = {i.name: i for i in model.graph.initializer}
    for name, spec in ckpt["quantization"]["layers"].items():
        if spec["kind"] in ("conv", "linear"):
            assert inits[f"{name}.weight_q"].data_type == onnx.TensorProto.INT8
            assert inits[f"{name}.bias_q"].data_type == onnx.TensorProto.INT32
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert max(int(np.prod(i.dims)) for i in floats) <= max(s[0] for s in weight_shapes(twin))  # scales only
    dq_axes = [a.i for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_q")
               for a in n.attribute if a.name == "axis"]
    assert dq_axes and set(dq_axes) == {0}
    # every activation here is non-negative: uint8 codes with zero point 0
    zps = [i for name, i in inits.items() if name.endswith(".zero_point") and "weight" not in name and "bias" not in name]
    assert zps and all(i.data_type == onnx.TensorProto.UINT8 for i in zps)
    assert all(not onnx.numpy_helper.to_array(i).any() for i in zps)
    assert info["quantization"] == "int8" and info["parity_agreement"] >= 0.99


def test_compiled_int8_library_computes_what_the_twin_computes(small_trained, tmp_path):
    """The int8 kernels and the torch twin round with the same float32 numbers: the outputs are
    equal bit for bit."""
    project, data, _ = small_trained
    twin, ckpt, onnx_path, _ = exported(small_trained, tmp_path)
    xva, _ = load_split(data, "val")
    x = to_tensor(xva).numpy()
    got = run_library(import_onnx(onnx_path, [1, *x.shape[1:]]), x)
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, ref)  # bit for bit


def test_lowered_module_is_int8_with_int32_accumulation(small_trained, tmp_path):
    import tvm
    from tvm import relax

    twin, ckpt, onnx_path, _ = exported(small_trained, tmp_path)
    mod = import_onnx(onnx_path, [1, ckpt["channels"], *ckpt["image_size"]])
    convs, dense = int8_convs(mod), calls(mod, "relax.matmul")
    assert len(convs) == len(small_project().architecture.widths) and len(dense) == 1
    # uint8 activations with zero point 0: every conv is the packed kernel of the dot-product
    # intrinsics (its padding inside, no explicit pad)
    assert all(c["packed"] for c in convs) and not calls(mod, "relax.nn.pad")
    for c in convs + [{"data": str(d.args[0].ty.dtype), "weight": str(d.args[1].ty.dtype),
                       "acc": str(d.attrs.out_dtype)} for d in dense]:  # uint8 x int8 -> int32
        assert (c["data"], c["weight"], c["acc"]) == ("uint8", "int8", "int32")
    assert not calls(mod, "relax.dequantize")  # no float path left
    shapes = weight_shapes(twin)
    # a packed conv weight is padded to blocks of 16 output x 4 input channels
    sizes = {int(np.prod(s)) if len(s) == 2 else -(-s[0] // 16) * 16 * -(-s[1] // 4) * 4 * s[2] * s[3]
             for s in shapes}
    # the weights are int8 constants, and FoldConstant (in the tuning pipeline) leaves them so
    with tvm.target.Target(TARGET):
        folded = relax.get_pipeline("zero")(mod)
    for m in (mod, folded):
        consts = constants(m)
        assert sorted(c.size for c in consts if c.dtype == np.int8 and c.size in sizes) == sorted(sizes)
        assert not [c.shape for c in consts if c.dtype == np.float32 and c.size in sizes and c.size > 1]
    # after fusion: no separate pad kernel, the padding lives inside the conv kernels
    kernels = primfuncs(folded)
    assert not [k for k in kernels if "pad" in k], kernels
    assert len([k for k in kernels if "conv2d" in k]) == len(convs)


def test_negative_activations_stay_asymmetric_int8(small_trained, tmp_path):
    """A conv without ReLU gives a tensor that can be negative: int8 with its own zero point,
    padded explicitly with it before the next conv (zero-point term in the bias); the rest stays
    uint8. The QDQ ONNX agrees with the twin in ONNX Runtime, the library matches it exactly."""
    import onnx
    import onnxruntime as ort

    from passes.support.onnx_export import INPUT, OUTPUT, qdq_model

    project, data, model_pt = small_trained
    model, ckpt = load_checkpoint(model_pt)
    model[2] = torch.nn.Identity()  # the first conv's ReLU: its output can be negative now
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(calibration="minmax"), ctx(project, data))
    layers = ckpt["quantization"]["layers"]
    assert layers["0"]["input"]["dtype"] == "uint8" and layers["0"]["input"]["zero_point"] == 0
    neg = layers["0"]["output"]
    assert not layers["0"]["relu"] and neg["dtype"] == "int8" and neg["zero_point"] > -128
    assert layers["4"]["input"] == neg and layers["4"]["output"]["dtype"] == "uint8"
    x = to_tensor(load_split(data, "val")[0])
    proto = qdq_model(model, ckpt["quantization"], (1, *x.shape[1:]))
    zp_types = {i.name: i.data_type for i in proto.graph.initializer if i.name.endswith(".zero_point")}
    assert zp_types["0.zero_point"] == onnx.TensorProto.INT8 and zp_types["input.zero_point"] == onnx.TensorProto.UINT8
    onnx.save(proto, str(tmp_path / "n.onnx"))
    with torch.no_grad():
        ref = twin(x).numpy()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(tmp_path / "n.onnx"), opts, providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run([OUTPUT], {INPUT: x[i : i + 1].numpy()})[0] for i in range(len(x))])
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).max() <= 4 * (ref.max() - ref.min()) / 255
    mod = import_onnx(tmp_path / "n.onnx", [1, *x.shape[1:]])
    convs = int8_convs(mod)
    # the uint8 one (zero point 0) is the packed kernel; the int8 one, with its zero point, pads
    # with that code explicitly and stays a conv2d op
    assert [(c["data"], c["packed"]) for c in convs] == [("uint8", True), ("int8", False)]
    assert len(calls(mod, "relax.nn.pad")) == 1
    np.testing.assert_array_equal(run_library(mod, x.numpy()), ref)


@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_weight_only_keeps_int8_weights_in_the_library(tmp_path, head):
    """weight_only: int8 weight constants dequantized inside the kernels (FoldConstant cannot
    fold them), float activations; the library computes what the twin computes."""
    import tvm
    from tvm import relax

    torch.manual_seed(0)
    project = small_project()
    data = write_splits(tmp_path, n=64)
    arch = dict(project.architecture.model_dump(), head=head)
    model = build(parse_architecture(arch), 1, 10, (8, 8)).eval()
    ckpt = {"architecture": arch, "channels": 1, "num_classes": 10, "image_size": [8, 8]}
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="weight_only"), ctx(project, data))
    save_checkpoint(tmp_path / "w.pt", dict(ckpt, state_dict=twin.state_dict()))
    export_checkpoint(tmp_path / "w.pt", data, tmp_path / "w.onnx", tmp_path / "w.json")
    mod = import_onnx(tmp_path / "w.onnx", [1, 1, 8, 8])
    sizes = sorted(int(np.prod(s)) for s in weight_shapes(twin))
    with tvm.target.Target(TARGET):
        folded = relax.get_pipeline("zero")(mod)
    for m in (mod, folded):
        consts = constants(m)
        assert sorted(c.size for c in consts if c.dtype == np.int8) == sizes
        assert not [c.shape for c in consts if c.dtype == np.float32 and c.size in sizes and c.size > 1]
    x = to_tensor(load_split(data, "val")[0]).numpy()
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    got = run_library(mod, x)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_int8_flatten_head_and_unfolded_bn(tmp_path):
    """A flatten head (reshape on int8) and BN statistics far from identity: still exact."""
    torch.manual_seed(1)
    project = small_project()
    data = write_splits(tmp_path, n=64)
    arch = dict(project.architecture.model_dump(), head="flatten")
    model = build(parse_architecture(arch), 1, 10, (8, 8)).eval()
    randomize_bn(model)
    ckpt = {"architecture": arch, "channels": 1, "num_classes": 10, "image_size": [8, 8]}
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(calibration="minmax"), ctx(project, data))
    save_checkpoint(tmp_path / "f.pt", dict(ckpt, state_dict=twin.state_dict()))
    export_checkpoint(tmp_path / "f.pt", data, tmp_path / "f.onnx", tmp_path / "f.json")
    mod = import_onnx(tmp_path / "f.onnx", [1, 1, 8, 8])
    assert calls(mod, "relax.reshape") and not calls(mod, "relax.dequantize")
    x = to_tensor(load_split(data, "val")[0]).numpy()
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(run_library(mod, x), ref)


def test_float_model_passes_through_unchanged(tmp_path):
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from passes.support import relax_int8

    torch.manual_seed(0)
    project = small_project()
    data = write_splits(tmp_path, n=16)
    model = build(project.architecture, 1, 10, (8, 8)).eval()
    ckpt = {"architecture": project.architecture.model_dump(), "channels": 1, "num_classes": 10,
            "image_size": [8, 8], "state_dict": model.state_dict()}
    save_checkpoint(tmp_path / "m.pt", ckpt)
    info = export_checkpoint(tmp_path / "m.pt", data, tmp_path / "m.onnx", tmp_path / "m.json")
    assert info["quantization"] is None and info["parity_max_abs_diff"] <= 1e-4
    mod = from_onnx(onnx.load(str(tmp_path / "m.onnx")), shape_dict={"input": [1, 1, 8, 8]}, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    tvm.ir.assert_structural_equal(relax_int8.lower(mod), mod)
