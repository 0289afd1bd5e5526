"""The x86-cuda board type (#28 item 5): an x86 host with an NVIDIA GPU. Its board file loads and
is checked like the others; its kernel library is a CUDA one (nvcc compiles the kernels); the
runner runs it with --device cuda against TVM's CUDA runtime, and on a machine without a GPU a
deploy to it fails with one error naming the board and "no CUDA device". The GPU itself is
exercised by bench/gpu_check.sh on a machine that has one."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import yaml

from tests.conftest import TINY, run_doit, write_project


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_x86_cuda_board_loads_with_cuda_target_and_llvm_host():
    from kiln.config import load_board

    b = load_board("x86-cuda")
    assert b.arch == "x86_64" and b.runtime == "tvm-cpp"
    assert b.tvm_target["kind"] == "cuda" and b.tvm_target["host"]["kind"] == "llvm"
    assert b.tvm_target["arch"].startswith("sm_")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="TVM compiles CUDA kernels with nvcc, not on PATH here")
def test_deploy_to_x86_cuda_without_gpu_fails_naming_board_and_no_cuda_device(tmp_path):
    if _has_gpu():
        pytest.skip("this machine has a GPU: bench/gpu_check.sh runs the library on it")
    inv = tmp_path / "lab.yaml"
    inv.write_text(yaml.safe_dump({"name": "gpu-desk", "boards": [
        {"name": "gpu-1", "type": "x86-cuda", "transport": {"kind": "local"}}]}))
    env = dict(os.environ, KILN_LAB=str(inv), KILN_PROJECTS=str(tmp_path / "projects"),
               KILN_BUILD=str(tmp_path / "build"))
    data = copy.deepcopy(TINY)
    data["targets"] = ["x86-cuda"]
    write_project(tmp_path / "projects", data)

    p = run_doit(env, "deploy:tiny")
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out, out
    # the library is a CUDA one: host code for x86_64 plus a CUDA module (the CPU-only TVM here
    # refuses to load it for want of CUDA's loader, which is what says it holds one)
    lib_dir = tmp_path / "build" / "tiny" / "type" / "x86-cuda"
    compiled = json.loads((lib_dir / "compile.json").read_text())
    assert compiled["target"]["kind"] == "cuda" and compiled["target"]["host"]["kind"] == "llvm"
    import tvm

    try:
        mod = tvm.runtime.load_module(str(lib_dir / "model.so"))
        assert "cuda" in [m.kind for m in mod.imports]
    except Exception as e:  # noqa: BLE001 -- TVM's own error type; what it says is the check
        assert "{cuda}" in str(e), e
    # the runner bundle carries TVM's CUDA runtime, and the failure names the board and the cause
    assert (tmp_path / "build" / "runner" / "x86_64" / "libtvm_runtime_cuda.so").is_file()
    report = json.loads((tmp_path / "build" / "tiny" / "report.json").read_text())
    error = report["boards"]["gpu-1"]["error"]
    assert "board 'gpu-1' (type x86-cuda)" in error["message"] and "no CUDA device" in error["message"], error
    assert "no CUDA device" in out
