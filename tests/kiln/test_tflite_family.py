"""family: tflite — a team's TensorFlow Lite file (float32 or full-integer int8), checked
against TVM's own TFLite frontend (``tvm.relax.frontend.tflite``) operator by operator, imported
by it, and converted into Kiln's op vocabulary (NCHW); an int8 file's scales and zero points
kept by the quantize pass. The models are written by tests/tflite_builder.py (the ``tflite``
package's flatbuffers builder: no TensorFlow installs here), never checked in."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tflite.BuiltinOperator import BuiltinOperator as Op

from kiln.errors import ManifestError
from kiln.nets import tflite
from tests.tflite_builder import F32, I8, Writer, digits_cnn, trained_digits_cnn


def _tvm_run(path, x_nchw: np.ndarray) -> np.ndarray:
    """The file imported and built by TVM's own TFLite frontend, run on NHWC samples one by one."""
    import tvm
    from tvm import relax

    mod, _, _ = tflite.tvm_import(path)
    ex = relax.build(mod, target=tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))
    return np.concatenate([vm["main"](tvm.runtime.tensor(x[i : i + 1])).numpy() for i in range(len(x))])


def test_float_file_converts_to_the_trained_net_and_tvm_imports_it_alike(tmp_path):
    path = digits_cnn(tmp_path / "float.tflite")
    model = tflite.load(path)
    assert tflite.problems(model, vocabulary=True) == [] and not tflite.is_quantized(model)
    assert tflite.input_shape(model) == (1, 8, 8)
    module, source = tflite.convert(model, str(path))
    assert source is None
    net, xt = trained_digits_cnn()
    x = xt[:64]
    with torch.no_grad():
        want, got = net(x).numpy(), module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NHWC weights reordered right
    # TVM's own import of the file (which ends in SOFTMAX: Kiln drops it and reads the logits)
    probs = _tvm_run(path, x.numpy())
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(got), 1).numpy(), rtol=1e-4, atol=1e-5)
    kinds = {type(m).__name__ for m in module.modules()} - {"GraphModule", "Module"}
    assert kinds <= {"Conv2d", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d", "Flatten", "Linear"}


def test_int8_file_keeps_its_scales_and_zero_points(tmp_path):
    from kiln.schema import QuantizeSettings
    from passes.quantize import describe
    from passes.support.int8 import fake_quant, graph_plan

    path = digits_cnn(tmp_path / "int8.tflite", int8=True)
    model = tflite.load(path)
    assert tflite.problems(model, vocabulary=True) == [] and tflite.is_quantized(model)
    module, source = tflite.convert(model, str(path))
    sg = model.Subgraphs(0)
    by_name = {tflite._name(sg, i): sg.Tensors(i) for i in range(sg.TensorsLength())}
    plan = graph_plan(module, (1, 1, 8, 8))
    record = describe(module, plan, {}, QuantizeSettings(mode="int8"), 0, source)
    layers = record["layers"]
    convs = [s for s in layers.values() if s["kind"] == "conv"]
    # the file's int8 grids: its input (int8 zero point -128 = Kiln's uint8 zero point 0), each
    # conv's output (after its fused ReLU), the mean, and every weight scale, kept exactly
    assert layers["input"]["output"] == {"scale": float(np.float32(1 / 255)), "zero_point": 0, "dtype": "uint8"}
    for spec, name in zip(convs, ("a1", "a2")):
        q = by_name[name].Quantization()
        assert spec["output"]["scale"] == float(q.ScaleAsNumpy()[0]) and spec["output"]["dtype"] == "uint8"
    w = by_name["conv1/weights"].Quantization().ScaleAsNumpy()
    assert convs[0]["weight_scale"] == [float(v) for v in w]
    pool = next(s for s in layers.values() if s["kind"] == "avgpool")
    assert pool["output"]["scale"] == float(by_name["m"].Quantization().ScaleAsNumpy()[0])
    # the dequantized weights fall back onto the file's int8 codes
    wq = np.frombuffer(model.Buffers(by_name["conv1/weights"].Buffer()).DataAsNumpy().tobytes(), np.int8)
    from passes.support.int8 import weight_ints

    conv1 = module.get_submodule(convs[0]["module"])
    assert np.array_equal(weight_ints(conv1.weight, convs[0]["weight_scale"]).numpy().transpose(0, 2, 3, 1).reshape(-1),
                          wq.astype(np.float32))
    # Kiln's twin against TVM's own import of the int8 file (its QDQ float math): the same
    # classes, logits within a few steps of the file's output grid
    twin = fake_quant(module, record)
    _, xt = trained_digits_cnn()
    x = xt[:128]
    with torch.no_grad():
        mine = twin(x).numpy()
    theirs = _tvm_run(path, x.numpy())
    step = float(by_name["lg"].Quantization().ScaleAsNumpy()[0])
    assert (mine.argmax(1) == theirs.argmax(1)).mean() >= 0.97
    assert np.abs(mine - theirs).max() <= 4 * step


def test_operators_tvm_lacks_are_named_per_operator(tmp_path):
    w = Writer()
    x = w.tensor("input", [1, 4, 4, 2])
    h = w.tensor("rnn_out", [1, 4, 4, 2])
    w.op(Op.RNN, [x], [h])
    xq = w.tensor("xq", [1, 4, 4, 2], I8, scale=0.1, zero_point=0)
    w.op(Op.QUANTIZE, [h], [xq])
    pads = w.tensor("pads", [4, 2], 2, np.zeros((4, 2), np.int32))
    padded = w.tensor("padded_q", [1, 4, 4, 2], I8, scale=0.1, zero_point=0)
    w.op(Op.PAD, [xq, pads], [padded])
    out = w.tensor("transposed", [1, 4, 4, 2], F32)
    perm = w.tensor("perm", [4], 2, np.array([0, 2, 1, 3], np.int32))
    w.op(Op.TRANSPOSE, [x, perm], [out])  # float: TVM imports it, Kiln does not convert it
    path = tmp_path / "bad.tflite"
    w.save(path, [x], [out])
    model = tflite.load(path)
    text = "\n".join(tflite.problems(model, vocabulary=True))
    assert "operator 0 'rnn_out' (RNN): TVM's TFLite frontend has no converter for RNN" in text
    assert "operator 2 'padded_q' (PAD): TVM's TFLite frontend does not import PAD quantized" in text
    assert "operator 3 'transposed' (TRANSPOSE): TRANSPOSE is outside what Kiln converts" in text
    with pytest.raises(ManifestError, match="cannot be built for the boards"):
        tflite.check(model, str(path))


def test_a_file_that_is_not_tflite_is_one_clear_error(tmp_path):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ManifestError, match="not a TFLite model"):
        tflite.load(bad)
    with pytest.raises(ManifestError, match="no such TFLite file"):
        tflite.load(tmp_path / "missing.tflite")


@pytest.mark.slow
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_tflite_app_deploys_and_passes_on_x86_host_and_rpi4(int8, tmp_path):
    """``doit deploy`` of a TFLite app: the float file through the quantize pass (calibrated),
    the int8 file through the same pass keeping the file's parameters; both pass on x86-host
    and rpi4 (qemu). An int8 file with another pass listed is refused naming the field."""
    import json

    from tests.conftest import local_lab, run_doit, write_project

    lab = local_lab(tmp_path, "tfl")
    name = "tfl"

    def app(passes):
        return {"name": name, "requirements": {"accuracy": {"min": 0.5}, "agreement": {"min": 0.9}},
                "dataset": {"format": "digits", "path": "sklearn", "image_size": [8, 8],
                            "split": {"val": 0.15, "test": 0.15, "seed": 0}},
                "architecture": {"family": "tflite", "path": "model.tflite"},
                "training": {"epochs": 1, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
                "compression": {"max_accuracy_drop": 0.1, "library_bytes": False, "passes": passes},
                "validation": {"samples": 40, "warmup": 1, "timeout_s": 600}, "tuning": {"trials": 0},
                "targets": ["x86-host", "rpi4"]}

    quantize = {"quantize": {"mode": "int8", "calibration_samples": 128}}
    if int8:  # refused before anything is built: the file is quantized already
        write_project(lab["projects"], app([{"prune": {"method": "magnitude", "amount": 0.5}}, quantize]))
        digits_cnn(lab["projects"] / name / "model.tflite", int8=True)
        p = run_doit(lab["env"], f"train:{name}", timeout=600)
        assert p.returncode != 0 and "compression.passes" in p.stdout + p.stderr and "int8-quantized" in p.stdout + p.stderr
    write_project(lab["projects"], app([quantize]))
    digits_cnn(lab["projects"] / name / "model.tflite", int8=int8)
    p = run_doit(lab["env"], f"deploy:{name}", timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    build = lab["build"] / name
    report = json.loads((build / "report.json").read_text())
    assert report["passed"] and sorted(report["validated"]) == ["rpi4", "x86-host"], report
    metrics = json.loads((build / "metrics.json").read_text())
    assert metrics["trained"] is False and metrics["tflite_quantized"] is int8 and metrics["tvm_tflite_import"] == "ok"
    calibration = json.loads((build / "compress.json").read_text())
    assert calibration["passes"][-1]["pass"] == "quantize"


MOBILENET_ISH_OPS = {"CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "HARD_SWISH", "AVERAGE_POOL_2D", "RELU6", "LOGISTIC", "MUL",
                     "TANH", "SUB", "RESHAPE", "FULLY_CONNECTED"}


def test_mobilenet_ish_float_file_converts_op_for_op_as_tvm_imports_it(tmp_path):
    """Every operator the converter knows beyond the digits CNN's (tests/tflite_builder.py
    mobilenet_ish: fused RELU6 on CONV_2D and DEPTHWISE_CONV_2D, ADD, HARD_SWISH, a gate of
    AVERAGE_POOL_2D, RELU6, LOGISTIC and a broadcast MUL, TANH, SUB, RESHAPE), float32: the
    converted torch module computes what TVM's own TFLite frontend builds from the file."""
    from tests.tflite_builder import mobilenet_ish

    path, x = mobilenet_ish(tmp_path / "mbv.tflite")
    model = tflite.load(path)
    sg = model.Subgraphs(0)
    assert {tflite._opcode(model, sg.Operators(k)) for k in range(sg.OperatorsLength())} == MOBILENET_ISH_OPS
    assert tflite.problems(model, vocabulary=True) == []
    module, source = tflite.convert(model, str(path))
    assert source is None
    kinds = {type(m).__name__ for m in module.modules()} - {"GraphModule", "Module"}
    assert kinds == {"Conv2d", "ReLU6", "Hardswish", "AdaptiveAvgPool2d", "Flatten", "Linear"}
    assert next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 8)  # depthwise
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    theirs = _tvm_run(path, x)
    assert np.abs(theirs).max() > 0.1 and np.ptp(theirs.argmax(1)) > 0  # the logits depend on the input
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-6)


def test_mobilenet_ish_int8_file_keeps_its_grids_and_computes_as_tvm_imports_it(tmp_path):
    """The same model full-integer int8: Kiln's plan (RELU6 fused into the convs, LOGISTIC and
    TANH tables on TFLite's fixed grids, the file's activation parameters and weight scales kept)
    and its fake-quant twin against TVM's import of the file (dequantize-op-quantize in float
    per operator): the same classes, logits within 8 steps of the file's output grid (TVM's
    float requantization of each operator is not Kiln's float32 multiplier and integer add:
    close, not bit for bit; Kiln's own library is its twin's bit for bit, the deploy tests)."""
    from kiln.schema import QuantizeSettings
    from passes.quantize import describe
    from passes.support.int8 import fake_quant, graph_plan
    from tests.tflite_builder import mobilenet_ish

    path, x = mobilenet_ish(tmp_path / "mbv_int8.tflite", int8=True)
    model = tflite.load(path)
    assert tflite.problems(model, vocabulary=True) == [] and tflite.is_quantized(model)
    module, source = tflite.convert(model, str(path))
    record = describe(module, graph_plan(module, (1, 1, 8, 8)), {}, QuantizeSettings(mode="int8"), 0, source)
    layers = record["layers"]
    sg = model.Subgraphs(0)
    by_name = {tflite._name(sg, i): sg.Tensors(i) for i in range(sg.TensorsLength())}

    def grid(name):
        q = by_name[name].Quantization()
        return float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0])

    kinds = [s["kind"] for s in layers.values()]
    assert kinds == ["input", "conv", "conv", "conv", "add", "hardswish", "avgpool", "conv", "conv", "sigmoid", "mul",
                     "tanh", "sub", "avgpool", "flatten", "linear"], kinds
    convs = [s for s in layers.values() if s["kind"] == "conv"]
    assert [bool(s.get("relu6")) for s in convs] == [True, True, False, True, False]  # stem, dw, se1 + RELU6 op
    assert convs[1]["shape"] == [1, 8, 8, 8] and module.get_submodule(convs[1]["module"]).groups == 8
    # the file's grids kept (int8 zero point z -> Kiln's uint8 z + 128 where the range has no negative part)
    for spec, name in ((convs[0], "stem"), (layers["add"], "residual"), (layers["mul"], "excite"),
                       (layers["sub"], "sub"), (convs[3], "se_relu6")):
        s, z = grid(name)
        assert spec["output"]["scale"] == np.float32(s) and spec["output"]["zero_point"] in (z, z + 128), name
    assert layers["sigmoid"]["output"]["scale"] == grid("gate")[0] == 1 / 256
    assert layers["tanh"]["output"] == {"scale": grid("tanh")[0], "zero_point": 0, "dtype": "int8"}
    twin = fake_quant(module, record)
    with torch.no_grad():
        mine = twin(torch.from_numpy(x)).numpy()
    theirs = _tvm_run(path, x)
    step = grid("lg")[0]
    assert np.ptp(theirs, axis=0).max() > 20 * step  # the logits move with the input
    assert (mine.argmax(1) == theirs.argmax(1)).mean() >= 0.95
    # measured: 5.2 steps at most over a chain of 12 requantizing operators
    assert np.abs(mine - theirs).max() <= 8 * step


def test_a_custom_operator_is_named_with_its_node(tmp_path):
    w = Writer()
    x = w.tensor("input", [1, 4, 4, 2])
    h = w.tensor("my_custom_out", [1, 4, 4, 2])
    w.op(Op.RELU, [x], [w.tensor("r", [1, 4, 4, 2])])
    w.op(Op.CUSTOM, [1], [h])
    path = tmp_path / "custom.tflite"
    w.save(path, [x], [h])
    model = tflite.load(path)
    text = "\n".join(tflite.problems(model, vocabulary=True))
    assert "operator 1 'my_custom_out' (CUSTOM): TVM's TFLite frontend has no converter for CUSTOM" in text, text
    with pytest.raises(ManifestError, match=r"cannot be built for the boards:\n  operator 1 'my_custom_out' \(CUSTOM\)"):
        tflite.check(model, str(path))


def test_mobilenet_ish_int8_file_compiles_to_its_twin_bit_for_bit(tmp_path):
    """Where the file's operators are quantized Kiln computes them exactly: the int8 file,
    converted, keeps its grids, exported as QDQ and compiled for x86-host (the compile stage's
    own path), computes the fake-quant twin's outputs bit for bit (fused RELU6 on the file's
    parameters, depthwise conv, residual add, hard-swish and sigmoid/tanh tables, broadcast mul)."""
    import tvm

    from kiln.config import load_board
    from kiln.schema import QuantizeSettings
    from passes.quantize import describe, quantize_weights_inplace
    from passes.support.int8 import fake_quant, graph_plan
    from passes.support.onnx_export import export_model
    from passes.support.tvm_build import compile_onnx
    from tests.passes.test_int8_graphs import _data, _run_vm
    from tests.tflite_builder import mobilenet_ish

    path, x = mobilenet_ish(tmp_path / "mbv_int8.tflite", int8=True)
    module, source = tflite.convert(tflite.load(path), str(path))
    record = describe(module, graph_plan(module, (1, 1, 8, 8)), {}, QuantizeSettings(mode="int8"), 0, source)
    quantize_weights_inplace(module, record)
    ckpt = {"architecture": {"family": "tflite"}, "channels": 1, "num_classes": 10, "image_size": [8, 8],
            "quantization": record}
    data = tmp_path / "data"
    data.mkdir()
    _data(data, (1, 8, 8), 0)
    export_model(module, ckpt, data, tmp_path / "q.onnx", tmp_path / "q.json")
    with torch.no_grad():
        want = fake_quant(module, record)(torch.from_numpy(x)).numpy()
    so = tmp_path / "model.so"
    compile_onnx(load_board("x86-host"), tmp_path / "q.onnx", [1, 1, 8, 8], so, tmp_path / "compile.json")
    np.testing.assert_array_equal(_run_vm(tvm.runtime.load_module(str(so)), x), want)
