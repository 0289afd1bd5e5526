"""family: onnx — a team's ONNX file converted into Kiln's op vocabulary, and the check that
names, before any build, what TVM cannot import or build statically."""

from __future__ import annotations

import operator

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from kiln.errors import ManifestError
from kiln.nets.onnx import check, convert, input_shape, problems


class Residual(nn.Module):
    """conv-BN-ReLU, a residual add, a depthwise conv, global pool, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 1))
        self.head = nn.Sequential(nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        y = self.stem(x)
        return self.head(torch.relu(y + self.body(y)))


class Gates(nn.Module):
    """An MLP with sigmoid/tanh gating and Sub/Mul: the operators of an unrolled recurrent cell."""

    def __init__(self):
        super().__init__()
        self.flat, self.a, self.b, self.out = nn.Flatten(), nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = self.flat(x)
        g, h = torch.sigmoid(self.a(x)), torch.tanh(self.b(x))
        return self.out(h + g * (h - g))


def exported(model: nn.Module, tmp_path, shape=(1, 1, 8, 8), name="m.onnx"):
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial BN statistics, so folding errors would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / name
    torch.onnx.export(model.eval(), torch.rand(shape), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, do_constant_folding=True)
    return path


@pytest.mark.parametrize("cls", [Residual, Gates])
def test_converted_model_computes_what_onnx_runtime_computes(cls, tmp_path):
    import onnxruntime as ort

    torch.manual_seed(1)
    path = exported(cls(), tmp_path)
    proto = onnx.load(str(path))
    assert input_shape(proto) == (1, 8, 8)
    module = convert(proto, str(path))
    x = torch.rand(16, 1, 8, 8)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(["logits"], {"input": x[i : i + 1].numpy()})[0] for i in range(16)])
    with torch.no_grad():
        got = module(x).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the graph is in Kiln's vocabulary: plain torch modules and functions an fx pass can read
    traced = torch.fx.symbolic_trace(module)
    kinds = {type(m) for m in module.modules()} - {type(module), torch.fx.GraphModule, nn.Module}
    assert kinds <= {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}
    fns = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert fns <= {operator.add, operator.sub, operator.mul, torch.sigmoid, torch.tanh}
    # the state_dict round-trips: a checkpoint of it rebuilds the same model
    again = convert(proto, str(path))
    again.load_state_dict(module.state_dict())
    with torch.no_grad():
        np.testing.assert_array_equal(again(x).numpy(), got)


def test_lstm_is_named_with_what_to_do_instead(tmp_path):
    class Lstm(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

        def forward(self, x):  # (N, 1, 8, 8): 8 steps of 8 values
            out, _ = self.rnn(x[:, 0])
            return self.head(out[:, -1])

    path = exported(Lstm(), tmp_path)
    with pytest.raises(ManifestError) as e:
        check(onnx.load(str(path)), str(path))
    msg = str(e.value)
    assert str(path) in msg and "(LSTM)" in msg and "family rnn" in msg


def _graph(nodes, inits, inputs=None):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", inputs or [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dynamic_pads_shape_ops_and_unknown_operators_are_reported_per_node():
    pads = helper.make_node("Shape", ["input"], ["shape"], name="shape_of_input")
    pad = helper.make_node("Pad", ["input", "shape"], ["padded"], name="pad_by_shape")
    weird = helper.make_node("HardSwishLike", ["padded"], ["logits"], name="mystery", domain="com.example")
    found = problems(_graph([pads, pad, weird], []))
    text = "\n".join(found)
    assert "'shape_of_input' (Shape)" in text and "fixed input shape" in text
    assert "'pad_by_shape' (Pad): dynamic pads" in text
    assert "'mystery' (HardSwishLike)" in text and "com.example" in text
    # an operator TVM imports but Kiln does not quantize is refused only for conversion
    softmax = _graph([helper.make_node("Softmax", ["input"], ["logits"], name="sm")], [])
    assert problems(softmax) == []
    with pytest.raises(ManifestError, match=r"'sm' \(Softmax\): Softmax is outside"):
        convert(softmax, "model.onnx")


def test_dynamic_input_dimensions_are_refused():
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, "H", 8])
    model = _graph([helper.make_node("Relu", ["input"], ["logits"])], [], inputs=[x])
    assert any("dimensions [2] are dynamic" in p for p in problems(model))


def test_a_file_whose_input_or_output_does_not_fit_the_dataset_is_refused_naming_it(tmp_path):
    """kiln.nets.checked_import (families onnx and tflite): the file's input against the
    dataset's (C, H, W), its output against one logit per class, each a ManifestError naming
    architecture.path and what to change; a file that fits gives the converted module."""
    from types import SimpleNamespace

    from kiln.nets.onnx import build

    arch = SimpleNamespace(path=str(exported(Gates(), tmp_path)))
    with pytest.raises(ManifestError, match=r"architecture.path: .*m\.onnx: its input is \(1, 8, 8\) \(C, H, W\) but "
                                            r"the dataset gives \(3, 8, 8\): set dataset.image_size"):
        build(arch, 3, 10, (8, 8))
    with pytest.raises(ManifestError, match=r"its output is \(1, 10\), expected \(1, 4\)"):
        build(arch, 1, 4, (8, 8))
    module = build(arch, 1, 10, (8, 8))
    assert tuple(module(torch.zeros(1, 1, 8, 8)).shape) == (1, 10)
