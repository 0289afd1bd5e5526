"""Board targets are checked against the LLVM inside TVM when a board file loads (kiln/llvm.py):
an mcpu or mattr LLVM does not know is refused naming the file, the field, the value and the
close matches from LLVM's own list for that triple; the lists are asked of TVM in a subprocess
once and read from the cache afterwards. And the compile stage records the target it used."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
import yaml

from kiln import config, llvm
from kiln.errors import ManifestError
from tests.conftest import ROOT

AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "mattr": ["+neon"]}


@pytest.fixture
def targets(tmp_path, monkeypatch):
    """A copy of the repo's board types in tmp; ``targets.write(name, tvm_target)`` adds one."""
    d = tmp_path / "targets"
    shutil.copytree(ROOT / "targets", d)
    monkeypatch.setenv("KILN_TARGETS", str(d))

    class T:
        dir = d

        @staticmethod
        def write(name, tvm_target, arch="aarch64"):
            path = d / f"{name}.yaml"
            path.write_text(yaml.safe_dump({"name": name, "arch": arch, "cc": "g++", "memory_mb": 512,
                                            "tvm_target": tvm_target}))
            return path

    return T


def refused(name):
    with pytest.raises(ManifestError) as e:
        config.load_board(name)
    return str(e.value)


def suggestions(msg):
    return msg.split("close matches: ", 1)[1].split(" (")[0].split(", ")


def test_unknown_aarch64_cpu_is_refused_with_aarch64_matches(targets):
    path = targets.write("a99", {**AARCH64, "mcpu": "cortex-a99"})
    msg = refused("a99")
    assert f"{path}: field 'tvm_target.mcpu'" in msg and "'cortex-a99'" in msg and "aarch64-linux-gnu" in msg
    close = suggestions(msg)
    assert close and all(c.startswith("cortex-a") for c in close)  # from the aarch64 list, not x86's
    assert "cortex-a9" not in close  # a 32-bit Arm CPU: not in aarch64's list


def test_x86_typo_names_the_cpu_it_meant(targets):
    path = targets.write("hsw", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswel"}, arch="x86_64")
    msg = refused("hsw")
    assert f"{path}: field 'tvm_target.mcpu'" in msg and "'haswel'" in msg
    assert suggestions(msg)[0] == "haswell"


def test_x86_without_mtriple_is_checked_against_the_host_triple(targets):
    targets.write("skx", {"kind": "llvm", "mcpu": "skylake-avx521"}, arch="x86_64")
    msg = refused("skx")
    assert "field 'tvm_target.mcpu'" in msg and "the host triple" in msg and "skylake-avx512" in suggestions(msg)


def test_unknown_or_bare_mattr_is_refused_by_index(targets):
    path = targets.write("feat", {**AARCH64, "mattr": ["+neon", "+garbage", "nen", "-crc"]})
    msg = refused("feat")
    assert f"{path}: field 'tvm_target.mattr.1'" in msg and "feature 'garbage'" in msg
    assert "field 'tvm_target.mattr.2'" in msg and "'nen'" in msg  # no +/-: LLVM would turn it off
    assert "mattr.0" not in msg and "mattr.3" not in msg
    targets.write("feat2", {**AARCH64, "mattr": ["+neno"]})
    assert "neon" in suggestions(refused("feat2"))


def test_cuda_board_host_target_is_checked(targets):
    jet = yaml.safe_load((targets.dir / "jetson-nano.yaml").read_text())
    jet["tvm_target"]["host"]["mcpu"] = "cortex-a5y"
    (targets.dir / "jetson-nano.yaml").write_text(yaml.safe_dump(jet))
    msg = refused("jetson-nano")
    assert "jetson-nano.yaml: field 'tvm_target.host.mcpu'" in msg and "'cortex-a5y'" in msg
    assert "cortex-a57" in suggestions(msg)


def test_unknown_triple_is_refused_not_crashed(targets):
    targets.write("tri", {"kind": "llvm", "mtriple": "foo-bar-baz", "mcpu": "generic"})
    msg = refused("tri")  # LLVM segfaults on this triple: the subprocess takes it
    assert "field 'tvm_target.mtriple'" in msg and "foo-bar-baz" in msg


def test_valid_targets_load(targets):
    for name in config.board_names():  # the repo's boards (x86-host's mcpu: host included)
        assert config.load_board(name).name == name
    # an alias that llvm_get_cpu_archlist omits, a feature no CPU enables by default, and a disable
    targets.write("m1", {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "apple-m1",
                         "mattr": ["+strict-align", "-sve"]})
    targets.write("host2", {"kind": "llvm", "mcpu": "host", "mattr": ["-avx512f"]}, arch="x86_64")
    assert config.load_board("m1").tvm_target["mcpu"] == "apple-m1"
    assert config.load_board("host2").tvm_target["mcpu"] == "host"


def test_lists_are_cached_and_the_cache_is_used(targets, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    cached = llvm.cache_file("aarch64-linux-gnu")
    assert str(cached).startswith(str(tmp_path / "cache")) and not cached.exists()
    t0 = time.perf_counter()
    config.load_board("rpi4")
    first = time.perf_counter() - t0
    info = json.loads(cached.read_text())
    assert info["triple"] == "aarch64-linux-gnu" and "cortex-a72" in info["cpus"] and "neon" in info["features"]
    assert not list(cached.parent.glob(".*.tmp"))  # written atomically

    def no_subprocess(*a, **k):
        raise AssertionError("asked TVM again although the lists are cached")

    monkeypatch.setattr(llvm.subprocess, "run", no_subprocess)
    t0 = time.perf_counter()
    for _ in range(10):
        config.load_board("rpi4")
    again = (time.perf_counter() - t0) / 10
    assert again < 0.05 and again < first / 20, (first, again)


def test_board_load_does_not_import_tvm(targets):
    import subprocess

    code = ("import sys; from kiln.config import load_board, board_names\n"
            "[load_board(n) for n in board_names()]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tvm', 'torch')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr


# --- the compile stage's record (passes/support/tvm_build.py) ---------------------------------


def tiny_onnx(path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                              "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_compile_json_records_the_target_tvm_was_given(tmp_path):
    from tvm.target import codegen

    from passes.support import tvm_build

    board = config.load_board("x86-host")
    assert board.tvm_target["mcpu"] == "host"
    info = tvm_build.compile_onnx(board, tiny_onnx(tmp_path / "m.onnx"), [1, 4], tmp_path / "m.so", tmp_path / "c.json")
    recorded = json.loads((tmp_path / "c.json").read_text())["target"]
    assert recorded == info["target"] == tvm_build.resolve_target(board)
    assert recorded["mcpu"] == str(codegen.llvm_get_system_cpu())  # not "host"
    off = tvm_build.host_mattr(recorded["mcpu"], tvm_build.host_isa_flags())
    assert recorded.get("mattr", []) == off  # the extensions this machine lacks, turned off


def test_compile_refuses_a_cpu_llvm_would_replace(tmp_path):
    """A Board made in code skips the load-time check; the compile must not record a CPU that
    LLVM replaced with its generic one."""
    from kiln.errors import PassError
    from kiln.schema import Board
    from passes.support import tvm_build

    board = Board(name="hsw", arch="x86_64", cc="g++", memory_mb=512,
                  tvm_target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswel"})
    with pytest.raises(PassError, match="knows no CPU 'haswel'"):
        tvm_build.compile_onnx(board, tiny_onnx(tmp_path / "m.onnx"), [1, 4], tmp_path / "m.so", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()
