"""kiln/sizing.py: board figures, the estimate, and refuse vs warn when a manifest loads."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import yaml

from kiln import sizing
from kiln.config import ROOT, board_names, load_board, load_project
from kiln.errors import ManifestError
from kiln.nets import Complexity
from kiln.schema import Project
from tests.conftest import TINY, write_project

BOARDS = ["jetson-nano", "rpi3", "rpi4", "x86-avx2", "x86-host"]


def project(**over) -> Project:
    data = copy.deepcopy(TINY)
    del data["tuning"]  # the board type's trials (TINY builds untuned, for the suite's time)
    for k, v in over.items():
        data[k] = v
    return Project.model_validate(data)


def test_every_board_declares_figures():
    assert set(BOARDS) <= set(board_names())
    for name in BOARDS:
        b = load_board(name)
        assert b.compute is not None and b.compute.fp32_macs_per_s > 0, name
        assert b.compute.int8_macs_per_s >= b.compute.fp32_macs_per_s, name  # no board is slower in int8
        assert b.compute.untuned_macs_per_s < b.compute.fp32_macs_per_s, name
        assert 1000 < b.runtime_overhead_kb < b.memory_mb * 1024, name
    # a Pi 4's A72 is faster per core than a Pi 3's A53, and an AVX2 PC faster than both
    rate = {n: load_board(n).compute.fp32_macs_per_s for n in BOARDS}
    assert rate["rpi3"] < rate["rpi4"] < rate["x86-avx2"] < rate["x86-host"]


def test_latency_is_macs_over_the_boards_rate():
    p = project()
    host, pi = load_board("x86-host"), load_board("rpi4")
    c = Complexity(params=1000, macs=52_000_000, activations=0)
    e = sizing.estimate_from(p, host, c)
    assert e["tuned"] and e["threads"] == host.cores and e["precision"] == "fp32"  # x86-host tunes natively
    assert e["latency_ms"] == pytest.approx(sizing.CALL_OVERHEAD_MS + 52e6 / (host.compute.fp32_macs_per_s * host.cores) * 1e3)
    e = sizing.estimate_from(p, pi, c)  # aarch64: compiled untuned here, which runs on one core
    assert not e["tuned"] and e["threads"] == 1
    assert e["latency_ms"] == pytest.approx(sizing.CALL_OVERHEAD_MS + 52e6 / pi.compute.untuned_macs_per_s * 1e3)
    untuned = sizing.estimate_from(project(tuning={"trials": 0}), host, c)
    assert not untuned["tuned"] and untuned["latency_ms"] > 10 * sizing.estimate_from(p, host, c)["latency_ms"]


def test_memory_is_runtime_plus_weights_plus_arena_and_int8_shrinks_it():
    host = load_board("x86-host")
    c = Complexity(params=256_000, macs=1_000_000, activations=50_000)
    fp32 = sizing.estimate_from(project(), host, c)
    assert fp32["weight_bytes"] == 4 * 256_000
    assert fp32["peak_memory_kb"] == pytest.approx(
        host.runtime_overhead_kb + sizing.WEIGHT_COPIES * 4 * 256_000 / 1024 + 4 * 50_000 / 1024, abs=0.1)
    int8 = sizing.estimate_from(project(compression={"passes": [{"quantize": {"mode": "int8"}}]}), host, c)
    assert int8["precision"] == "int8" and int8["weight_bytes"] == 256_000
    assert int8["peak_memory_kb"] < fp32["peak_memory_kb"]
    assert int8["latency_ms"] == pytest.approx(sizing.CALL_OVERHEAD_MS + 1e6 / (host.compute.int8_macs_per_s * host.cores) * 1e3)
    wo = sizing.estimate_from(project(compression={"passes": [{"quantize": {"mode": "weight_only"}}]}), host, c)
    assert wo["precision"] == "fp32" and wo["weight_bytes"] == 256_000  # int8 weights, float compute


def test_estimate_grows_with_the_design():
    board = load_board("rpi4")
    prev = None
    for widths in ([4], [4, 8], [8, 16], [16, 32, 64], [32, 64, 128]):
        e = sizing.estimate(project(architecture={"family": "cnn", "widths": widths, "max_macs": 10**9}), board)
        if prev is not None:
            assert e["macs"] > prev["macs"] and e["latency_ms"] > prev["latency_ms"]
            assert e["peak_memory_kb"] > prev["peak_memory_kb"]
        prev = e


def test_structured_pruning_is_sized_as_deployed():
    arch = {"family": "cnn", "widths": [16, 32], "max_macs": 10**9}
    full = sizing.estimate(project(architecture=arch), load_board("x86-host"))
    pruned = project(architecture=arch, compression={"passes": [{"prune": {"method": "structured", "amount": 0.5}}]})
    assert sizing.deployed_architecture(pruned).widths == [8, 16]
    assert sizing.estimate(pruned, load_board("x86-host"))["macs"] < full["macs"] / 2


def test_gpu_board_has_no_latency_estimate_but_memory():
    e = sizing.estimate(project(), load_board("jetson-nano"))
    assert e["latency_ms"] is None and "cuda" in e["basis"] and e["peak_memory_kb"] > 0


# -- through config.load_project, on a manifest in tmp_path ------------------------------------


def _manifest(kiln_env, **over):
    data = copy.deepcopy(TINY)
    data.update(over)
    write_project(kiln_env["projects"], data)
    return data


def test_refuse_names_board_figure_estimate_and_limit(kiln_env):
    _manifest(kiln_env, targets=["x86-host", "rpi4"], requirements={"latency_ms": {"p50_max": 0.05}})
    with pytest.raises(ManifestError) as e:
        load_project("tiny")
    msg = str(e.value)
    # rpi4 compiles untuned here: the tiny CNN's 46 k MACs on one A72 core take ~0.15 ms, over 0.05 ms
    assert "project.yaml" in msg and "field 'sizing'" in msg
    assert "board 'rpi4': estimated latency" in msg and "requirements.latency_ms.p50_max 0.05 ms" in msg
    assert "board 'x86-host'" not in msg  # tuned on 2 cores of this CPU it fits
    assert "sizing.on_violation: warn" in msg  # what to do about it


def test_refuse_on_memory_requirement(kiln_env):
    _manifest(kiln_env, requirements={"memory_kb": {"max": 1000}})
    with pytest.raises(ManifestError, match=r"board 'x86-host': estimated peak memory 8,\d{3} KiB .*"
                                            r"exceeds requirements\.memory_kb\.max 1000 KiB"):
        load_project("tiny")


def test_refuse_over_the_boards_ram(kiln_env, tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    targets.mkdir()
    board = yaml.safe_load((ROOT / "targets" / "x86-host.yaml").read_text())
    board.update(name="small", memory_mb=4)  # 4 MiB: less than the runtime alone
    (targets / "small.yaml").write_text(yaml.safe_dump(board))
    monkeypatch.setenv("KILN_TARGETS", str(targets))
    _manifest(kiln_env, targets=["small"])
    with pytest.raises(ManifestError, match=r"board 'small': estimated peak memory .* exceeds the board's RAM, "
                                            r"memory_mb 4 \(4,096 KiB\)"):
        load_project("tiny")


def test_warn_loads_logs_once_per_board_and_records(kiln_env, caplog):
    _manifest(kiln_env, targets=["x86-host", "rpi4", "rpi3"], requirements={"latency_ms": {"p50_max": 0.05}},
              sizing={"on_violation": "warn"})
    with caplog.at_level(logging.WARNING):
        p = load_project("tiny")
        load_project("tiny")  # doit loads a manifest more than once: still one line per board
    lines = [r.getMessage() for r in caplog.records if "estimated latency" in r.getMessage()]
    assert len(lines) == 2 and any("board 'rpi4'" in m for m in lines) and any("board 'rpi3'" in m for m in lines)
    assert {r.name for r in caplog.records if "estimated latency" in r.getMessage()} == {"kiln.board.rpi4",
                                                                                        "kiln.board.rpi3"}
    est = sizing.check("x", p, {t: load_board(t) for t in p.targets})  # what validate records per board
    assert est["rpi4"]["violations"] and not est["x86-host"]["violations"]


def test_board_files_without_the_new_fields_still_load(tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    targets.mkdir()
    old = (ROOT / "targets" / "rpi4.yaml").read_text()
    legacy = "\n".join(line for line in old.splitlines()
                       if not line.startswith(("compute:", "runtime_overhead_kb:")))
    (targets / "rpi4.yaml").write_text(legacy)
    shutil.copy(ROOT / "targets" / "x86-host.yaml", targets / "x86-host.yaml")
    monkeypatch.setenv("KILN_TARGETS", str(targets))
    b = load_board("rpi4")
    assert b.compute is None and b.runtime_overhead_kb == 8400  # defaults: not sized for latency; x86-host's RAM baseline
    e = sizing.estimate(project(targets=["rpi4"]), b)
    assert e["latency_ms"] is None and "no compute figures" in e["basis"] and e["peak_memory_kb"] > 8400
    assert sizing.violations(project(requirements={"latency_ms": {"p50_max": 1e-6}}), b, e) == []


def test_unknown_sizing_setting_is_refused(kiln_env):
    _manifest(kiln_env, sizing={"on_violation": "ignore"})
    with pytest.raises(ManifestError, match=r"field 'sizing.on_violation'.*'refuse' or 'warn'"):
        load_project("tiny")


def test_families_sized_from_torch_are_not_estimated_at_load():
    p = project()
    fake = p.architecture.model_copy()
    object.__setattr__(fake, "family", "onnx")  # the family name alone decides; no torch imported
    assert sizing.estimate(p.model_copy(update={"architecture": fake}), load_board("x86-host")) is None


def test_each_kernel_costs_the_boards_measured_per_kernel_figure():
    host = load_board("x86-host")
    assert host.compute.per_kernel_us > 0 and host.compute.untuned_per_kernel_us < host.compute.per_kernel_us
    few, many = (Complexity(params=1000, macs=2_000_000, activations=0, kernels=k) for k in (10, 210))
    for p, per_kernel in ((project(), host.compute.per_kernel_us),
                          (project(tuning={"trials": 0}), host.compute.untuned_per_kernel_us)):
        a, b = sizing.estimate_from(p, host, few), sizing.estimate_from(p, host, many)
        assert b["kernels"] == 210 and b["latency_ms"] - a["latency_ms"] == pytest.approx(200 * per_kernel * 1e-3)
        assert f"210 kernels x {per_kernel:g} us" in b["basis"]
    # a board file without the figure: no per-kernel term
    bare = host.model_copy(update={"compute": host.compute.model_copy(update={"per_kernel_us": 0.0})})
    assert sizing.estimate_from(project(), bare, many)["latency_ms"] == pytest.approx(
        sizing.estimate_from(project(), bare, few)["latency_ms"])


def test_a_recurrent_net_is_estimated_by_its_kernels_and_a_front_end_adds_its_own():
    from kiln.nets import estimate
    from kiln.schema import parse_architecture

    short, long = (estimate(parse_architecture({"family": "rnn", "cell": "gru", "hidden": 32}), (1, n), 6, 6)
                   for n in (10, 50))
    # 4 per step (ih, hh but the first step's, two gate products), the head, one for the input
    assert (short.kernels, long.kernels) == (40, 200)
    # hidden 32: every kernel under the tuning floor (serial, never tuned): the untuned figure
    assert long.small_kernels == long.kernels
    host = load_board("x86-host")
    est = sizing.estimate_from(project(), host, long)
    rate = host.compute.fp32_macs_per_s * host.cores
    assert est["latency_ms"] == pytest.approx(sizing.CALL_OVERHEAD_MS + 200 * host.compute.untuned_per_kernel_us * 1e-3
                                              + long.macs / rate * 1e3)
    wide = estimate(parse_architecture({"family": "rnn", "cell": "gru", "hidden": 128}), (1, 50), 6, 6)
    assert 0 < wide.small_kernels < wide.kernels  # its hh GEMMs (49 k MACs) are tuned
    kws = load_project("keyword_spotting")
    assert sizing.front_end_kernels(kws) == 7  # the MFCC graph: mean, gather, 2 DFT GEMMs, mel+log, DCT, transpose


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("d, c, size", [
    ({"family": "cnn", "widths": [4, 8], "head": "flatten", "max_macs": 10**9}, 3, (16, 16)),
    ({"family": "resnet", "stem": 4, "widths": [4, 8]}, 3, (9, 9)),
    ({"family": "mlp", "widths": [16, 8], "batch_norm": True}, 1, (4, 4)),
    ({"family": "rnn", "cell": "gru", "hidden": 5}, 2, (1, 4)),
], ids=["cnn", "resnet", "mlp-bn", "gru"])
def test_plan_counts_the_kernels_tvm_builds(d, c, size, tmp_path):
    import torch
    from tvm import relax
    import tvm

    from kiln.nets import build, estimate
    from kiln.schema import parse_architecture
    from passes.support.onnx_export import export_float
    from passes.support.tvm_build import import_onnx, prepare

    arch = parse_architecture(d)
    path = tmp_path / "m.onnx"
    with torch.no_grad():
        export_float(build(arch, c, 3, size), (1, c, *size), path)
    mod = prepare(import_onnx(path, [1, c, *size]), tvm.target.Target({"kind": "llvm"}))
    built = sum(str(f).count("R.call_tir(") for _, f in mod.functions.items() if isinstance(f, relax.Function))
    assert abs(estimate(arch, size, c, 3).kernels - built) <= 1, built  # the GRU: one more
