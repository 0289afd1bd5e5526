"""The packed int8 depthwise conv (passes/support/int8_depthwise.py): depthwise convs with a
uint8 input (a ReLU's output) become one kernel each, channels innermost in blocks of 16, the
requantization fused, and the library computes the fake-quant twin bit for bit on x86-host
(AVX-512 VNNI), x86-avx2 and, under qemu-aarch64, rpi4 (NEON) and rpi5 (dotprod).

The net is a DS-CNN in miniature over an odd-sized input: 20 channels (a block of 16 and one
padded to 16), a stride-2 and a stride-1 depthwise 3x3, pointwise 1x1 convs on the packed
dot-product path, an int8 (zero point not 0) depthwise input that must stay a grouped conv2d."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn

from kiln.config import load_board
from passes.support import int8_depthwise
from passes.support.common import load_split, to_tensor
from passes.support.onnx_export import export_model
from passes.support.tvm_build import compile_onnx, import_onnx, prepare, resolve_target
from tests.passes import test_int8_graphs as g
from tests.passes.conftest import int8_convs

# kiln-runner's aarch64 bundle, shared with the graph tests (a module fixture)
a64_runner = g.a64_runner


class TinyDsCnn(nn.Module):
    """conv-BN-ReLU (20), dw 3x3/2-BN-ReLU, pw 1x1 (20)-BN-ReLU, dw 3x3-BN-ReLU, pw 1x1 (24)-BN,
    dw 3x3 on that int8 (BN, no ReLU: zero point not 0) output, GAP, head."""

    def __init__(self, c=1, w=20):
        super().__init__()

        def block(cin, cout, k, stride=1, groups=1, relu=True):
            layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), g._bn(nn.BatchNorm2d(cout))]
            return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

        self.body = nn.Sequential(block(c, w, 3), block(w, w, 3, 2, w), block(w, w, 1), block(w, w, 3, 1, w),
                                  block(w, 24, 1, relu=False), block(24, 24, 3, 1, 24, relu=False))
        self.pool, self.flat, self.head = nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, g.CLASSES)

    def forward(self, x):
        return self.head(self.flat(self.pool(self.body(x))))


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """TinyDsCnn quantized and exported (QDQ ONNX), its val inputs and the twin's outputs."""
    root = tmp_path_factory.mktemp("tiny_ds_cnn")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(g.GRAPHS, "tiny_ds_cnn", (TinyDsCnn, (1, 11, 9)))
        _, model, twin, ckpt, data = g._quantized("tiny_ds_cnn", root)
    export_model(model, ckpt, data, root / "q.onnx", root / "q.json")
    x = to_tensor(load_split(data, "val")[0][:16])
    with torch.no_grad():
        ref = twin(x).numpy()
    return {"root": root, "model": model, "twin": twin, "ckpt": ckpt, "data": data, "onnx": root / "q.onnx",
            "x": x, "ref": ref, "shape": [ckpt["channels"], *ckpt["image_size"]]}


def test_depthwise_convs_on_uint8_become_the_packed_kernel(net, monkeypatch):
    """The two depthwise convs after a ReLU are the packed depthwise kernel (weights [C/16, KH,
    KW, 16] int8, int32 accumulator, 8-bit codes out: the requantization inside), the pointwise
    ones the dot-product kernel, and the one on an int8 tensor stays a grouped conv2d. With the
    parallel threshold lowered to 1 MAC, the kernels' fixed schedule is vectorized and
    parallel, and the library still computes the twin bit for bit (the default, one thread, is
    the x86 and aarch64 tests below)."""
    import tvm
    from tvm import relax

    from passes.support import int8_intrin

    mod = import_onnx(net["onnx"], [1, *net["shape"]])
    convs = int8_convs(mod)
    kinds = [("depthwise" if c["depthwise"] else "packed" if c["packed"] else "conv2d", c["data"]) for c in convs]
    assert sorted(kinds) == sorted([("packed", "uint8")] * 3 + [("depthwise", "uint8")] * 2 + [("conv2d", "int8")])
    for c in convs:
        assert c["weight"] == "int8" and c["acc"] == "int32"
        if c["depthwise"]:
            assert c["shape"] == (2, 3, 3, int8_depthwise.LANES)  # 20 channels: two blocks of 16
            assert str(c["call"].ty.dtype) == "uint8"
    monkeypatch.setattr(int8_intrin, "PARALLEL_MACS", 1)
    target = tvm.target.Target(resolve_target(load_board("x86-host")))
    prepared = prepare(mod, target)
    done = [f for gv, f in prepared.functions_items() if int8_depthwise.NAME in gv.name_hint]
    assert len(done) == 2
    for f in done:
        assert f.attrs["tirx.is_scheduled"] and "T.vectorized(" in f.script() and "T.parallel(" in f.script()
    got = g._run_vm(relax.build(prepared, target=target), net["x"].numpy())
    np.testing.assert_array_equal(got, net["ref"])


@pytest.mark.parametrize("board_name", ["x86-host", "x86-avx2"])
def test_x86_library_with_depthwise_kernels_computes_the_twin_bit_for_bit(net, tmp_path, board_name):
    """The compile stage's own path for the board, the library run in-process."""
    import tvm

    so = tmp_path / "model.so"
    compile_onnx(load_board(board_name), net["onnx"], [1, *net["shape"]], so, tmp_path / "compile.json")
    got = g._run_vm(tvm.runtime.load_module(str(so)), net["x"].numpy())
    np.testing.assert_array_equal(got, net["ref"])


def _depthwise_asm(so) -> dict[str, str]:
    """The aarch64 disassembly of each depthwise kernel of the library ``so``."""
    dump = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(so)],
                          capture_output=True, text=True, check=True).stdout
    funcs: dict[str, str] = {}
    name = None
    for line in dump.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
        elif name and int8_depthwise.NAME in name and not name.startswith("__tvm_ffi"):
            funcs[name] = funcs.get(name, "") + line + "\n"
    return funcs


@pytest.mark.slow
@pytest.mark.parametrize("board_name", ["rpi4", "rpi5"])
def test_aarch64_library_with_depthwise_kernels_under_qemu_computes_the_twin_bit_for_bit(net, board_name, a64_runner,
                                                                                          tmp_path):
    """Cross-compiled for the board (rpi4: Cortex-A72, rpi5: A76 with dotprod) and run by
    kiln-runner under qemu-aarch64 with the board's -cpu; the depthwise kernels' code is NEON
    widening multiply-accumulates (smlal), not a scalar loop."""
    import json

    import tvm
    from tvm import relax

    from hil.qemu import launcher

    board = load_board(board_name)
    target = tvm.target.Target(resolve_target(board))
    x = net["x"][:6]
    wrapped = g._byte_reader(import_onnx(net["onnx"], [1, *net["shape"]]), net["shape"], g.CLASSES)
    inputs = g._selector_inputs(x.numpy(), g.CLASSES)
    so = tmp_path / "model.so"
    relax.build(prepare(wrapped, target), target=target).export_library(str(so), cc=board.cc)
    if shutil.which("aarch64-linux-gnu-objdump"):
        asm = _depthwise_asm(so)
        assert len(asm) == 2 and all("\tsmlal" in a for a in asm.values()), list(asm)
    (tmp_path / "inputs.bin").write_bytes(inputs.tobytes())
    argv = [*launcher(board), str(a64_runner), "--model", str(so), "--input", str(tmp_path / "inputs.bin"),
            "--shape", str(inputs.shape[1]), "--warmup", "0"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(g._decode(json.loads(proc.stdout)["predictions"], len(x), g.CLASSES), net["ref"][:6])
