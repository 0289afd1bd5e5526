"""kiln-runner end to end: torch -> ONNX -> TVM model.so -> runner bundle -> run on two "boards".

The x86_64 bundle runs natively; the aarch64 bundle runs under qemu-user, so this checks the
cross-compiled model.so, the downloaded aarch64 runtime wheels and the $ORIGIN rpath together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest

from hil.runner import build
from kiln.artifacts import sha256_file
from kiln.errors import PassError

pytestmark = pytest.mark.slow

SHAPE = (3, 8, 8)
CLASSES = 5
COUNT = 12
QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]  # no binfmt_misc here: call qemu
TARGETS = {
    "x86_64": ({"kind": "llvm"}, None),
    "aarch64": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
                "aarch64-linux-gnu-g++"),
}
JSON_KEYS = {"runner", "count", "output_dim", "predictions", "latencies_us", "peak_rss_kb",
             "threads", "checksum", "dtype"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny CNN exported to ONNX, its inputs.bin, and torch's logits for them."""
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    # Flatten (not global pooling) keeps random-weight logits input-dependent, so the samples
    # get different classes and the argmax comparison means something.
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, CLASSES),
    ).eval()
    x = np.random.default_rng(0).standard_normal((COUNT, *SHAPE)).astype("<f4")
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    onnx_path = root / "net.onnx"
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, and still works
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.zeros(1, *SHAPE),), str(onnx_path), input_names=["input"],
                          output_names=["logits"], dynamo=False)
    inputs = root / "inputs.bin"
    x.tofile(inputs)
    return {"root": root, "onnx": onnx_path, "inputs": inputs, "logits": logits}


def _compile_model(onnx_path, arch, out):
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target, cc = TARGETS[arch]
    mod = from_onnx(onnx.load(str(onnx_path)), shape_dict={"input": [1, *SHAPE]})
    ex = relax.build(mod, target=tvm.target.Target(target))
    ex.export_library(str(out), **({"cc": cc} if cc else {}))
    return out


def _board(arch, model, tmp_path_factory):
    """A deploy directory: the runner bundle plus model.so, as it would sit on a board."""
    root = tmp_path_factory.mktemp(arch)
    runner = build.build_runner(arch, root / "bundle", tmp_path_factory.getbasetemp() / "cache")
    model_so = _compile_model(model["onnx"], arch, root / "bundle" / "model.so")
    prefix = QEMU if arch != build.host_arch() else []
    return {"runner": runner, "model_so": model_so, "prefix": prefix, "bundle": root / "bundle"}


@pytest.fixture(scope="module")
def x86(model, tmp_path_factory):
    if build.host_arch() != "x86_64":
        pytest.skip(f"host is {build.host_arch()}, not x86_64")
    return _board("x86_64", model, tmp_path_factory)


@pytest.fixture(scope="module")
def a64(model, tmp_path_factory):
    for tool in ("aarch64-linux-gnu-g++", "qemu-aarch64"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian: g++-aarch64-linux-gnu, qemu-user)")
    return _board("aarch64", model, tmp_path_factory)


def _run(board, *args, inputs=None, model_so=None):
    argv = [*board["prefix"], str(board["runner"]),
            "--model", str(model_so or board["model_so"]),
            "--input", str(inputs), "--shape", ",".join(map(str, SHAPE)), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def _result(board, model, *args):
    proc = _run(board, *args, inputs=model["inputs"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == JSON_KEYS
    return out


def test_bundle_is_self_contained(x86, a64):
    for board, arch in ((x86, "x86_64"), (a64, "aarch64")):
        manifest = json.loads((board["bundle"] / "runner.json").read_text())
        assert manifest["arch"] == arch
        # the host bundle also carries TVM's CUDA runtime (x86-cuda boards: --device cuda) where TVM ships it
        cuda = {"libtvm_runtime_cuda.so", "libcudart.so.13"} & set(manifest["files"]) if arch == "x86_64" else set()
        assert set(manifest["files"]) == {"kiln-runner", "libtvm_runtime.so", "libtvm_ffi.so", *cuda}
        for name, digest in manifest["files"].items():
            assert sha256_file(board["bundle"] / name) == digest


def test_predictions_match_torch_on_both_boards(model, x86, a64):
    expected = model["logits"].argmax(axis=1).tolist()
    top2 = np.sort(model["logits"], axis=1)[:, -2:]
    assert len(set(expected)) > 1 and (top2[:, 1] - top2[:, 0]).min() > 1e-3  # a fair test

    results = {"x86_64": _result(x86, model, "--warmup", "2"),
               "aarch64": _result(a64, model, "--warmup", "1")}
    for arch, out in results.items():
        assert out["runner"] == "kiln-runner 2"
        assert out["count"] == COUNT and out["output_dim"] == CLASSES, arch
        assert out["predictions"] == expected, arch
        assert len(out["latencies_us"]) == COUNT and min(out["latencies_us"]) > 0
        assert out["peak_rss_kb"] > 0 and out["threads"] is None
        assert out["checksum"] == pytest.approx(float(model["logits"].sum(dtype=np.float64)),
                                                abs=1e-3)
    assert results["x86_64"]["predictions"] == results["aarch64"]["predictions"]
    assert results["x86_64"]["checksum"] == pytest.approx(results["aarch64"]["checksum"], abs=1e-4)


def _raw_model(root, dtype: str, length: int, arch: str):
    """An ONNX model taking raw ``dtype`` samples (as a front end's library does): cast, scale,
    one matmul; compiled for ``arch``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(1).standard_normal((length, 3)).astype("f4")
    elem = {"int16": TensorProto.INT16, "uint8": TensorProto.UINT8}[dtype]
    g = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["f", "s"], ["fs"]), helper.make_node("MatMul", ["fs", "w"], ["logits"])],
        "raw", [helper.make_tensor_value_info("input", elem, [1, length])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(1 / 256, "f4"), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = root / f"raw_{dtype}.onnx"
    onnx.save(m, str(path))
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target, cc = TARGETS[arch]
    mod = from_onnx(m, shape_dict={"input": [1, length]}, dtype_dict={"input": dtype})
    so = root / f"raw_{dtype}_{arch}.so"
    relax.build(mod, target=tvm.target.Target(target)).export_library(str(so), **({"cc": cc} if cc else {}))
    return so, w


@pytest.mark.parametrize("dtype", ["int16", "uint8"])
def test_raw_samples_in_their_own_dtype_and_every_output_back(x86, a64, tmp_path, dtype):
    """--dtype feeds int16 audio / uint8 pixels as they are; --outputs 1 returns every value."""
    length, count = 40, 6
    info = np.iinfo(dtype)
    x = np.random.default_rng(2).integers(info.min, info.max, (count, length), endpoint=True).astype(dtype)
    (tmp_path / "raw.bin").write_bytes(x.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    for board, arch in ((x86, "x86_64"), (a64, "aarch64")):
        so, w = _raw_model(tmp_path, dtype, length, arch)
        argv = [*board["prefix"], str(board["runner"]), "--model", str(so), "--input", str(tmp_path / "raw.bin"),
                "--shape", str(length), "--dtype", dtype, "--outputs", "1", "--warmup", "0"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["dtype"] == dtype and out["count"] == count
        want = (x.astype("f8") / 256) @ w.astype("f8")
        np.testing.assert_allclose(np.asarray(out["outputs"]), want, rtol=1e-4, atol=1e-3)
        assert out["predictions"] == want.argmax(1).tolist()
    # a file that is not a whole number of int16 samples is refused, naming the dtype
    (tmp_path / "odd.bin").write_bytes(b"\0" * (length * np.dtype(dtype).itemsize + 1))
    proc = subprocess.run([str(x86["runner"]), "--model", str(so), "--input", str(tmp_path / "odd.bin"),
                           "--shape", str(length), "--dtype", dtype], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and f"one {dtype} sample" in proc.stderr


def test_windows_of_back_to_back_inferences(model, x86):
    """--windows N times N windows of --window-size back-to-back inferences, each as a whole;
    without the flag there is no windows_us (the JSON of a deploy is unchanged)."""
    proc = _run(x86, "--windows", "5", "--window-size", "7", "--warmup", "1", inputs=model["inputs"])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["windows_us"]) == 5 and all(w > 0 for w in out["windows_us"])
    # a window's mean per inference is of the size of one inference, not of 7
    assert max(out["windows_us"]) < 7 * max(out["latencies_us"])
    assert "windows_us" not in _result(x86, model, "--warmup", "0")
    bad = _run(x86, "--windows", "0", inputs=model["inputs"])
    assert bad.returncode == 2 and "--windows: expected an integer >= 1" in bad.stderr


def test_unknown_dtype_exits_2(model, x86):
    proc = _run(x86, "--dtype", "float64", inputs=model["inputs"])
    assert proc.returncode == 2 and "--dtype: expected float32, int16, uint8 or int8" in proc.stderr


def test_threads_are_applied(model, x86):
    # The runner reads TVM's pool size back and fails if it differs, so 2 here means TVM has 2.
    assert _result(x86, model, "--threads", "2", "--warmup", "0")["threads"] == 2


def test_truncated_inputs_exit_2_naming_the_file(model, x86, tmp_path):
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(model["inputs"].read_bytes()[:1000])
    proc = _run(x86, inputs=truncated)
    assert proc.returncode == 2 and proc.stdout == ""
    assert str(truncated) in proc.stderr and "1000" in proc.stderr and "768" in proc.stderr


def test_missing_model_exits_2_naming_the_file(model, x86, tmp_path):
    missing = tmp_path / "no-such-model.so"
    proc = _run(x86, inputs=model["inputs"], model_so=missing)
    assert proc.returncode == 2 and proc.stdout == ""
    assert str(missing) in proc.stderr and "--model" in proc.stderr


def test_model_for_another_board_exits_2(model, x86, a64):
    proc = _run(x86, inputs=model["inputs"], model_so=a64["model_so"])
    assert proc.returncode == 2 and proc.stdout == ""
    assert str(a64["model_so"]) in proc.stderr and "aarch64" in proc.stderr


def test_failed_build_keeps_previous_bundle(x86, tmp_path, monkeypatch):
    bundle = x86["bundle"]
    before = (bundle / "runner.json").read_bytes()
    broken = tmp_path / "runner.cc"
    broken.write_text("int main( {\n")
    monkeypatch.setattr(build, "RUNNER_SOURCE", broken)
    with pytest.raises(PassError, match=r"g\+\+.*runner\.cc"):
        build.build_runner("x86_64", bundle, tmp_path / "cache")
    assert (bundle / "runner.json").read_bytes() == before
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".")]  # no temp left

    monkeypatch.setattr(build, "compiler_for", lambda arch: "no-such-g++")
    with pytest.raises(PassError, match="no-such-g\\+\\+"):
        build.build_runner("x86_64", tmp_path / "fresh", tmp_path / "cache")
    assert not (tmp_path / "fresh").exists()



def test_a_second_build_dir_copies_the_cached_bundle_and_a_damaged_entry_is_compiled_again(tmp_path, monkeypatch):
    """Compiled bundles are kept in the cache by what went into them: another build directory
    copies the bundle without compiling (the compiler made to fail shows it is not called), a
    changed source compiles afresh, and an entry whose files no longer match its record is
    compiled again rather than copied."""
    cache = tmp_path / "cache"  # the host's runtime comes from the installed packages: no download
    first = build.build_runner("x86_64", tmp_path / "a" / "x86_64", cache)
    entries = list((cache / "runners").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("x86_64-")
    real_compile = build._compile

    def no_compile(*_a, **_k):
        raise AssertionError("compiled although an intact bundle was cached")

    monkeypatch.setattr(build, "_compile", no_compile)
    second = build.build_runner("x86_64", tmp_path / "b" / "x86_64", cache)
    assert (second.parent / "runner.json").read_bytes() == (first.parent / "runner.json").read_bytes()
    assert sha256_file(second) == sha256_file(first) and os.access(second, os.X_OK)
    (entries[0] / "kiln-runner").write_bytes(b"damaged")
    calls = []
    monkeypatch.setattr(build, "_compile", lambda *a: calls.append(a) or real_compile(*a))
    third = build.build_runner("x86_64", tmp_path / "c" / "x86_64", cache)
    assert len(calls) == 1 and sha256_file(third) == sha256_file(first)
    changed = tmp_path / "runner.cc"
    changed.write_text(build.RUNNER_SOURCE.read_text() + "\n// changed\n")
    shutil.copy(build.RPC_SOURCE, tmp_path / build.RPC_SOURCE.name)  # runner.cc includes it
    monkeypatch.setattr(build, "RUNNER_SOURCE", changed)
    build.build_runner("x86_64", tmp_path / "d" / "x86_64", cache)
    assert len(calls) == 2 and len(list((cache / "runners").iterdir())) == 2

def test_failed_wheel_download_is_a_pass_error(tmp_path, monkeypatch):
    other = "aarch64" if build.host_arch() == "x86_64" else "x86_64"
    monkeypatch.setattr(build, "tvm_versions",
                        lambda: {"apache-tvm": "0.0.0.dev999", "apache-tvm-ffi": "0.0.0.dev999"})
    with pytest.raises(PassError, match=r"pip download .*apache-tvm==0\.0\.0\.dev999"):
        build.runtime_libs(other, tmp_path)
