"""Squeeze-and-excitation gates written the common way, with nn.Linear on the pooled vector
(``x.mean((2, 3))`` or ``pool(x).flatten(1)``; the gate back to (N, C, 1, 1) by
``s[:, :, None, None]``, ``s.view(n, c, 1, 1)`` with sizes read from ``x.shape``, or
``s.unsqueeze(-1).unsqueeze(-1)``), int8: the plan holds them as ``avgpool`` (keepdim or not)
and ``reshape`` entries (codes moved, parameters kept), the lowered Relax module is integer and
the library compiled for this host computes the fake-quant twin's outputs bit for bit. Also:
what stays unsupported is refused naming the node and what to write instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from kiln.config import load_board
from kiln.errors import PassError
from kiln.schema import QuantizeSettings
from passes import compress, quantize
from passes.support.common import load_split, to_tensor
from passes.support.int8 import graph_plan
from passes.support.onnx_export import export_model
from passes.support.tvm_build import compile_onnx
from tests.passes.conftest import small_project
from tests.passes.test_int8_graphs import CLASSES, _bn, _data, _fit_head, _run_vm


class SeLinear(nn.Module):
    """conv-BN-ReLU, then three SE gates, each its own spelling of the Linear form, hard-swish
    between them, GAP, head."""

    def __init__(self, c=2, w=8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, w, 3, padding=1), _bn(nn.BatchNorm2d(w))
        self.a1, self.a2 = nn.Linear(w, w // 2), nn.Linear(w // 2, w)
        self.b1, self.b2 = nn.Linear(w, w // 2), nn.Linear(w // 2, w)
        self.c1, self.c2 = nn.Linear(w, w // 2), nn.Linear(w // 2, w)
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(w, CLASSES)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        s = y.mean((2, 3))  # keepdim False: (N, C)
        s = torch.sigmoid(self.a2(torch.relu(self.a1(s))))
        y = y * s[:, :, None, None]
        n, c, _, _ = y.shape
        s = self.pool(y).flatten(1)
        s = nn.functional.hardsigmoid(self.b2(torch.relu(self.b1(s))))
        y = nn.functional.hardswish(y * s.view(n, c, 1, 1))
        s = torch.mean(y, dim=[-1, -2], keepdim=True).flatten(1)
        s = torch.sigmoid(self.c2(torch.relu(self.c1(s))))
        y = y * s.unsqueeze(-1).unsqueeze(-1)
        return self.head(self.pool(y).squeeze(-1).squeeze(-1))


def test_se_gates_in_linear_form_compile_to_the_twin_bit_for_bit(tmp_path):
    import tvm

    torch.manual_seed(0)
    model = SeLinear().eval()
    data = _data(tmp_path, (2, 8, 8), 3)
    _fit_head(model, data)
    ckpt = {"architecture": {"family": "module"}, "channels": 2, "num_classes": CLASSES, "image_size": [8, 8]}
    ctx = compress.PassContext(small_project(), data, 0, 0, "quantize")
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    layers = ckpt["quantization"]["layers"]
    kinds = [s["kind"] for s in layers.values()]
    assert kinds.count("reshape") == 6 and kinds.count("avgpool") == 4 and kinds.count("mul") == 3, kinds
    assert [s.get("keepdim", True) for s in layers.values() if s["kind"] == "avgpool"] == [False, True, True, True]
    for s in layers.values():
        if s["kind"] == "mul":  # the feature map times the (N, C, 1, 1) gate
            assert [layers[i]["shape"] for i in s["inputs"]] == [[1, 8, 8, 8], [1, 8, 1, 1]]
        if s["kind"] == "reshape":  # data movement: the input's parameters kept
            assert s["output"] == s["input"]

    export_model(model, ckpt, data, tmp_path / "q.onnx", tmp_path / "q.json")
    x = to_tensor(load_split(data, "val")[0])
    with torch.no_grad():
        want, floats = twin(x).numpy(), model(x).numpy()
    assert (want.argmax(1) == floats.argmax(1)).mean() >= 0.9
    so = tmp_path / "model.so"
    compile_onnx(load_board("x86-host"), tmp_path / "q.onnx", [1, 2, 8, 8], so, tmp_path / "compile.json")
    np.testing.assert_array_equal(_run_vm(tvm.runtime.load_module(str(so)), x.numpy()), want)


class _Body(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.conv, self.fc, self.body = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, 4), body

    def forward(self, x):
        return self.body(self, x)


@pytest.mark.parametrize(("body", "match"), [
    (lambda s, x: s.conv(x)[:, :2] * s.fc(s.conv(x).mean((2, 3)))[:, 1:3, None, None],
     r"node 'getitem_1' \(getitem\).*None .*mixed with slicing.*slice first, then add the dimensions"),
    (lambda s, x: s.conv(x) * s.fc(s.conv(x).mean(1).flatten(1)[:, :4])[:, :, None, None],
     r"node 'mean' \(call_method mean\).*only a mean over H and W.*global average pooling"),
    (lambda s, x: s.fc(s.conv(x).permute(0, 2, 3, 1).mean((1, 2))),
     r"node 'permute' \(call_method permute\).*moves data across dimensions.*x\[:, :, None, None\]"),
    (lambda s, x: s.conv(x) * s.fc(s.conv(x).mean((2, 3))).view(4, 1, 1, 1),
     r"node 'view' \(call_method view\).*must keep the batch dimension first.*x\.view\(x\.shape\[0\]"),
])
def test_what_stays_unsupported_is_refused_naming_the_node(body, match):
    with pytest.raises(PassError, match=match):
        graph_plan(_Body(body).eval(), (1, 1, 8, 8))
