"""passes/tune.py: MetaSchedule tuning into a persistent database, reused across retraining,
applied by the compile pass; boards that cannot be measured natively are not tuned and say why."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from kiln.config import load_board
from passes import tune

SHAPE = [1, 1, 8, 8]


def tiny_onnx(path, seed: int):
    """A tiny CNN (widths [4, 8], 8x8x1, 10 classes) with seeded random weights, as ONNX."""
    import torch

    from kiln.nets import build
    from kiln.schema import Architecture

    torch.manual_seed(seed)
    model = build(Architecture(family="cnn", widths=[4, 8], head="gap", max_macs=10**6), 1, 10, (8, 8)).eval()
    torch.onnx.export(model, torch.zeros(SHAPE), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


def run_library(so, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_aarch64_board_is_not_tuned_and_says_why(tmp_path):
    info = tune.run(load_board("rpi4"), tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "tune", 64, tmp_path / "t.json")
    assert info["measured"] is None and info["trials_run"] == 0
    assert "qemu-user timings are not a cost signal" in info["why"]
    assert json.loads((tmp_path / "t.json").read_text())["why"] == info["why"]
    assert not (tmp_path / "tune").exists()


def test_where_to_measure_checks_the_board_isa_against_this_cpu(monkeypatch):
    avx2 = load_board("x86-avx2")
    target = {**avx2.tvm_target}
    if platform.machine() != "x86_64":
        pytest.skip("x86 host only")
    monkeypatch.setattr(tune, "host_isa_flags", lambda: {"avx2", "fma", "bmi2", "sse4_2"})
    mode, why = tune.where_to_measure(avx2, target)
    assert mode == "native" and "mcpu haswell" in why
    monkeypatch.setattr(tune, "host_isa_flags", lambda: {"sse4_2"})
    mode, why = tune.where_to_measure(avx2, target)
    assert mode is None and "lacks" in why and "avx2" in why
    mode, why = tune.where_to_measure(load_board("x86-host"), {"kind": "llvm", "mcpu": "whatever"})
    assert mode == "native" and why == "the host itself"


@pytest.mark.skipif(platform.machine() != "x86_64", reason="tunes for the x86 host")
def test_tune_then_compile_and_retrained_model_reuses_the_records(tmp_path):
    from passes import compile_tvm

    board = load_board("x86-host")
    db_root = tmp_path / "tune"
    first = tune.run(board, tiny_onnx(tmp_path / "a.onnx", 0), SHAPE, db_root, 12, tmp_path / "a.json")
    assert first["measured"] == "native" and first["trials_run"] > 0
    assert first["tasks"] and not any(t["reused"] for t in first["tasks"])
    db = db_root / tune.target_key(board, compile_tvm.resolve_target(board))
    assert (db / "database_tuning_record.json").stat().st_size > 0

    # the compile pass applies the records; the tuned library computes what the untuned one does
    info = compile_tvm.run(board, tmp_path / "a.onnx", SHAPE, tmp_path / "tuned.so", tmp_path / "c.json", tuning=first)
    assert info["tuned_kernels"]["tuned"] > 0
    compile_tvm.run(board, tmp_path / "a.onnx", SHAPE, tmp_path / "plain.so", tmp_path / "p.json")
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    np.testing.assert_allclose(run_library(tmp_path / "tuned.so", x), run_library(tmp_path / "plain.so", x), rtol=1e-4, atol=1e-5)

    # "retraining": other weights, same layer shapes -> every task found, no trials
    again = tune.run(board, tiny_onnx(tmp_path / "b.onnx", 1), SHAPE, db_root, 12, tmp_path / "b.json")
    assert again["trials_run"] == 0, again
    planned = [t for t in again["tasks"] if again["plan"].get(t["name"])]
    assert planned and all(t["reused"] for t in planned) and len(again["tasks"]) == len(first["tasks"])
    # a bigger budget tops the same records up instead of starting over
    more = tune.run(board, tmp_path / "b.onnx", SHAPE, db_root, 24, tmp_path / "c.json")
    assert 0 < more["trials_run"] <= 12


def test_compile_refuses_a_tuning_report_for_another_target(tmp_path):
    from kiln.errors import PassError
    from passes import compile_tvm

    board = load_board("x86-host")
    report = {"measured": "native", "target": {"kind": "llvm", "mcpu": "other"}, "database": str(tmp_path), "why": "x"}
    with pytest.raises(PassError, match="rerun the tune task"):
        compile_tvm.run(board, tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "m.so", tmp_path / "m.json", tuning=report)


@pytest.mark.parametrize("trials", [12, 64, 128, 256])
def test_budget_goes_mostly_to_the_heavy_kernels_and_none_is_left_out(trials):
    light = [(f"pool{i}", 1.0) for i in range(7)]
    heavy = [("conv1", 221.0), ("conv2", 295.0), ("conv3", 295.0)]
    plan = dict(tune.allocate(light + heavy, trials))
    assert sum(plan.values()) <= trials
    assert all(plan.get(t, 0) > 0 for t, _ in heavy), plan  # every convolution is tuned
    assert sum(plan.get(t, 0) for t, _ in light) <= trials // 3
    if trials - trials // 3 >= 3 * tune.SEARCH_ROUND:  # a whole search round each
        assert all(plan[t] >= tune.SEARCH_ROUND for t, _ in heavy)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="tunes for the x86 host")
def test_a_search_failure_is_one_clear_error_naming_the_board(tmp_path, monkeypatch):
    from kiln.errors import PassError

    def broken(*a, **k):  # a fault injected into MetaSchedule's search
        raise RuntimeError("search exploded")

    monkeypatch.setattr(tune, "_tune_group", broken)
    with pytest.raises(PassError, match=r"tune for board 'x86-host'.*search exploded.*tuning.trials: 0"):
        tune.run(load_board("x86-host"), tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "tune", 12, tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
