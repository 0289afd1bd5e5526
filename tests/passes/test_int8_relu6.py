"""ReLU6 in int8, in each of its spellings (nn.ReLU6, F.relu6, torch.clamp(x, 0, 6),
x.clamp(min=0, max=6), F.hardtanh(x, 0, 6)), on a MobileNetV2 inverted-residual block
(conv-BN-ReLU6 stem; 1x1 expand-BN-ReLU6, depthwise 3x3-BN-ReLU6, 1x1 project-BN without
activation, residual add): after a conv it fuses into the conv's requantization (the range is
measured after the ReLU6, so the clip to the top code is the clip to 6); where nothing precedes
it to fuse into, it is a 256-entry table on the codes (parameters kept). The library compiled
for this host computes the fake-quant twin's outputs bit for bit; other clamp bounds are
refused naming the node."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.config import load_board
from kiln.errors import PassError
from kiln.schema import QuantizeSettings
from passes import compress, quantize
from passes.support.common import load_split, to_tensor
from passes.support.int8 import act_dtype, act_range, graph_plan, relu6_top
from passes.support.onnx_export import export_model
from passes.support.tvm_build import compile_onnx
from tests.passes.conftest import small_project
from tests.passes.test_int8_graphs import (CLASSES, _bn, _byte_reader, _data, _decode, _fit_head, _run_vm,  # noqa: F401
                                         _selector_inputs, a64_runner)


class InvertedResidual(nn.Module):
    """MobileNetV2's block (expansion 2) between a ReLU6 stem and a 1x1 head conv."""

    def __init__(self, c=2, w=8):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(c, w, 3, padding=1), _bn(nn.BatchNorm2d(w)), nn.ReLU6()
        self.expand, self.bn1 = nn.Conv2d(w, 2 * w, 1, bias=False), _bn(nn.BatchNorm2d(2 * w))
        self.dw, self.bn2 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, groups=2 * w, bias=False), _bn(nn.BatchNorm2d(2 * w))
        self.project, self.bn3 = nn.Conv2d(2 * w, w, 1, bias=False), _bn(nn.BatchNorm2d(w))
        self.mp = nn.MaxPool2d(2)
        self.last, self.bn4 = nn.Conv2d(w, 2 * w, 1), _bn(nn.BatchNorm2d(2 * w))
        self.pool, self.head = nn.AdaptiveAvgPool2d(1), nn.Linear(2 * w, CLASSES)
        with torch.no_grad():  # activations well past 6, so the clamp at 6 matters
            self.stem.weight.mul_(10.0)
            self.last.weight.mul_(4.0)

    def forward(self, x):
        x = self.act0(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(x)))
        y = torch.clamp(self.bn2(self.dw(y)), 0, 6)
        y = x + self.bn3(self.project(y))  # linear bottleneck, residual
        y = F.hardtanh(self.mp(y), 0.0, 6.0)  # nothing to fuse into: a table on the codes
        y = self.bn4(self.last(y)).clamp(min=0, max=6)
        return self.head(self.pool(y).flatten(1))


def test_mobilenet_v2_block_with_relu6_compiles_to_the_twin_bit_for_bit(tmp_path):
    import tvm

    torch.manual_seed(1)
    model = InvertedResidual().eval()
    data = _data(tmp_path, (2, 8, 8), 5)
    _fit_head(model, data)
    x = to_tensor(load_split(data, "val")[0])
    with torch.no_grad():  # the stem's pre-activation reaches past 6: ReLU6 is not ReLU here
        assert model.bn0(model.stem(x)).max() > 6
    ckpt = {"architecture": {"family": "module"}, "channels": 2, "num_classes": CLASSES, "image_size": [8, 8]}
    ctx = compress.PassContext(small_project(), data, 0, 0, "quantize")
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    layers = ckpt["quantization"]["layers"]
    fused = [n for n, s in layers.items() if s.get("relu6")]
    assert fused == ["stem", "expand", "dw", "last"], fused
    for n in fused:  # the measured range ends at 6 at most: the top code is at or below 6's
        qo = layers[n]["output"]
        assert relu6_top(qo) >= act_range(act_dtype(qo))[1]
        assert (act_range(act_dtype(qo))[1] - qo["zero_point"]) * qo["scale"] <= 6.0 + 1e-6
    table = [s for s in layers.values() if s["kind"] == "relu6"]
    assert len(table) == 1 and table[0]["output"] == table[0]["input"]
    qi = table[0]["input"]
    lo = act_range(act_dtype(qi))[0]
    assert qi["zero_point"] > lo and min(relu6_top(qi), 127) < act_range(act_dtype(qi))[1]  # clips both ends
    assert table[0]["lut"] == [int(np.clip(c, qi["zero_point"], relu6_top(qi))) for c in range(lo, lo + 256)]

    export_model(model, ckpt, data, tmp_path / "q.onnx", tmp_path / "q.json")
    with torch.no_grad():
        want, floats = twin(x).numpy(), model(x).numpy()
    assert (want.argmax(1) == floats.argmax(1)).mean() >= 0.9
    so = tmp_path / "model.so"
    compile_onnx(load_board("x86-host"), tmp_path / "q.onnx", [1, 2, 8, 8], so, tmp_path / "compile.json")
    np.testing.assert_array_equal(_run_vm(tvm.runtime.load_module(str(so)), x.numpy()), want)


class _Body(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.conv, self.head, self.body = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4, CLASSES), body

    def forward(self, x):
        return self.head(self.body(self, x).mean((2, 3)))


@pytest.mark.parametrize(("body", "match"), [
    (lambda s, x: torch.clamp(s.conv(x), 0, 5), r"node 'clamp' \(call_function clamp\).*bounds \(0, 5\).*\[0, 6\]"),
    (lambda s, x: nn.functional.hardtanh(s.conv(x)), r"node 'hardtanh' \(call_function hardtanh\).*bounds \(-1.0, 1.0\)"),
    (lambda s, x: s.conv(x).clamp(max=6), r"node 'clamp' \(call_method clamp\).*bounds \(None, 6\).*for \[0, inf\) use relu"),
])
def test_other_clamps_are_refused_naming_the_node(body, match):
    with pytest.raises(PassError, match=match):
        graph_plan(_Body(body).eval(), (1, 1, 8, 8))


@pytest.mark.slow
def test_mobilenet_v2_block_with_relu6_on_rpi4_under_qemu_computes_the_twin_bit_for_bit(a64_runner, tmp_path):
    """The same block built for rpi4 (the board's target and cross compiler) and run by
    kiln-runner under qemu-aarch64: every output bit of 6 samples equals the twin's."""
    import json
    import subprocess

    import tvm
    from tvm import relax

    from hil.qemu import launcher
    from passes.support.tvm_build import import_onnx, prepare, resolve_target

    torch.manual_seed(1)
    model = InvertedResidual().eval()
    data = _data(tmp_path, (2, 8, 8), 5)
    _fit_head(model, data)
    ckpt = {"architecture": {"family": "module"}, "channels": 2, "num_classes": CLASSES, "image_size": [8, 8]}
    ctx = compress.PassContext(small_project(), data, 0, 0, "quantize")
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    export_model(model, ckpt, data, tmp_path / "q.onnx", tmp_path / "q.json")
    x = to_tensor(load_split(data, "val")[0][:6])
    with torch.no_grad():
        ref = twin(x).numpy()
    wrapped = _byte_reader(import_onnx(tmp_path / "q.onnx", [1, 2, 8, 8]), [2, 8, 8], CLASSES)
    inputs = _selector_inputs(x.numpy(), CLASSES)
    board = load_board("rpi4")
    target = tvm.target.Target(resolve_target(board))
    so = tmp_path / "model.so"
    relax.build(prepare(wrapped, target), target=target).export_library(str(so), cc=board.cc)
    (tmp_path / "inputs.bin").write_bytes(inputs.tobytes())
    argv = [*launcher(board), str(a64_runner), "--model", str(so), "--input", str(tmp_path / "inputs.bin"),
            "--shape", str(inputs.shape[1]), "--warmup", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(_decode(json.loads(proc.stdout)["predictions"], len(x), CLASSES), ref)
