"""An unrolled recurrent cell (family rnn's UnrolledRNN) compiles to one set of kernels for all
its steps: calibration gives every step after the first the same activation parameters
(int8.recurrent_roles), the step index is an argument of a shared Gather kernel (the VM
already stores a weight the steps share once). So doubling the sequence length adds no kernel, the library grows only by the VM's per-call instructions (hundreds of
bytes a step, where it grew by ~35 KB a step), and the int8 library still computes the twin
bit for bit on x86-host (rpi4 under qemu: tests/passes/test_int8_graphs.py's gru and lstm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.config import load_board
from kiln.nets.layers import UnrolledRNN
from kiln.schema import QuantizeSettings
from passes import compress, quantize
from passes.support.common import load_split, to_tensor
from passes.support.int8 import graph_plan, recurrent_roles
from passes.support.onnx_export import export_float, export_model
from passes.support.tvm_build import compile_onnx, import_onnx, prepare, resolve_target
from tests.passes.conftest import small_project

CLASSES, FEATURES, HIDDEN = 4, 3, 8


def _data(root, steps):
    rng = np.random.default_rng(steps)
    templates = rng.uniform(0, 255, size=(CLASSES, 1, steps, FEATURES))
    for split, n in (("train", 64), ("val", 16)):
        y = rng.integers(0, CLASSES, size=n)
        x = np.clip(0.7 * templates[y] + rng.normal(0, 30, size=(n, 1, steps, FEATURES)), 0, 255).astype(np.uint8)
        np.savez(root / f"{split}.npz", x=x, y=y.astype(np.int64))
    return root


def _exported(cell, steps, root):
    """(fp32 onnx, int8 onnx, twin, data dir) of a seeded cell over ``steps`` steps."""
    root.mkdir()
    data = _data(root, steps)
    torch.manual_seed(0)
    model = UnrolledRNN(cell, FEATURES, HIDDEN, steps, CLASSES).eval()
    export_float(model, (1, FEATURES, 1, steps), root / "fp32.onnx")
    ckpt = {"architecture": {"family": "module"}, "channels": FEATURES, "num_classes": CLASSES,
            "image_size": [1, steps]}
    ctx = compress.PassContext(small_project(), data, 0, 0, "quantize")
    twin, ckpt = quantize.run(model, ckpt, QuantizeSettings(mode="int8", calibration="minmax"), ctx)
    export_model(model, ckpt, data, root / "int8.onnx", root / "int8.json", samples=16)
    return root / "fp32.onnx", root / "int8.onnx", twin, data


def _prepared(onnx_path, steps):
    import tvm

    target = tvm.target.Target(resolve_target(load_board("x86-host")))
    return prepare(import_onnx(onnx_path, [1, FEATURES, 1, steps]), target)


def _kernels(mod) -> int:
    import tvm

    return sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items())


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_every_step_after_the_first_shares_the_first_full_steps_parts(cell):
    steps = 6
    plan = graph_plan(UnrolledRNN(cell, FEATURES, HIDDEN, steps, CLASSES).eval(), (1, FEATURES, 1, steps))
    roles = recurrent_roles(plan)
    hh = [e["name"] for e in plan if e.get("module") == "hh"]
    assert len(hh) == steps - 1 and hh[0] not in roles and all(roles[n] == hh[0] for n in hh[1:])
    names = [e["name"] for e in plan]
    parts = set(roles.values())  # the second step's entries (and the third's input read)
    assert "head" not in roles and parts <= set(names[names.index(hh[0]) - 2 : names.index(hh[1])])
    # steps 3 .. L each a copy of every part (the last step reads no next input)
    assert 0 <= len(parts) * (steps - 2) - len(roles) <= 2
    assert recurrent_roles(graph_plan(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), (1, 1, 1, 4))) == {}


@pytest.fixture(scope="module")
def gru(tmp_path_factory):
    root = tmp_path_factory.mktemp("gru")
    return {steps: _exported("gru", steps, root / str(steps)) for steps in (4, 8)}


@pytest.mark.slow
def test_twice_the_steps_adds_no_kernel_and_stays_bit_exact(gru, tmp_path):
    import tvm
    from tvm import relax

    for kind in (0, 1):  # fp32, int8: the same kernels at 4 and 8 steps
        mods = [_prepared(gru[steps][kind], steps) for steps in (4, 8)]
        assert _kernels(mods[0]) == _kernels(mods[1]), kind
    board = load_board("x86-host")
    sizes = {}
    for steps, (_, int8, twin, data) in gru.items():
        so = tmp_path / f"int8_{steps}.so"
        sizes[steps] = compile_onnx(board, int8, [1, FEATURES, 1, steps], so, tmp_path / "c.json")["library_bytes"]
        x = to_tensor(load_split(data, "val")[0])
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
        got = np.concatenate([vm["main"](tvm.runtime.tensor(x[i : i + 1].numpy())).numpy() for i in range(len(x))])
        with torch.no_grad():
            np.testing.assert_array_equal(got, twin(x).numpy())
    # 4 more steps add the VM's calls only (it was ~35 KB a step: int8 kernels per step)
    assert sizes[8] - sizes[4] < 4 * 3000, sizes
