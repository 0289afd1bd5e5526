"""passes/tune.py: MetaSchedule tuning into a persistent database, reused across retraining,
applied by the compile stage; boards that cannot be measured natively are not tuned and say why;
the stages read the layout and the manifest's trial budget."""

from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

import numpy as np
import pytest

from kiln.config import load_board
from kiln.errors import PassError
from passes import tune
from passes.support import tvm_build

SHAPE = [1, 1, 8, 8]


def tiny_onnx(path, seed: int):
    """A tiny CNN (widths [4, 8], 8x8x1, 10 classes) with seeded random weights, as ONNX."""
    import torch

    from kiln.nets import build
    from kiln.schema import CnnArchitecture

    torch.manual_seed(seed)
    model = build(CnnArchitecture(family="cnn", widths=[4, 8], head="gap", max_macs=10**6), 1, 10, (8, 8)).eval()
    torch.onnx.export(model, torch.zeros(SHAPE), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False)
    return path


def settled(compiled: dict) -> int:
    """Kernels of a compile that took their tuned records or, measured faster, their untuned form."""
    return compiled["tuned_kernels"]["tuned"] + len(compiled["tuned_kernels"]["held"])


def run_library(so, x):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(so)), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_aarch64_board_is_not_tuned_and_says_why(tmp_path):
    info = tune.tune_onnx(load_board("rpi4"), tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "tune", 64,
                          tmp_path / "t.json")
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
    board = load_board("x86-host")
    db_root = tmp_path / "tune"
    first = tune.tune_onnx(board, tiny_onnx(tmp_path / "a.onnx", 0), SHAPE, db_root, 12, tmp_path / "a.json")
    assert first["measured"] == "native" and first["trials_run"] > 0
    assert first["tasks"] and not any(t["reused"] for t in first["tasks"])
    db = db_root / tvm_build.target_key(board, tvm_build.resolve_target(board))
    assert (db / "database_tuning_record.json").stat().st_size > 0

    # the compile stage applies the records; the tuned library computes what the untuned one does
    # every kernel takes its records, or its untuned form where that measured faster (held)
    info = tvm_build.compile_onnx(board, tmp_path / "a.onnx", SHAPE, tmp_path / "tuned.so", tmp_path / "c.json", tuning=first)
    measured = [t for t in first["tasks"] if "schedule" in t]  # those the search gave records
    assert measured and settled(info) == len(measured), (info, first["tasks"])
    # without the baselines' list every kernel takes its records
    (db / tvm_build.UNTUNED).unlink()
    info = tvm_build.compile_onnx(board, tmp_path / "a.onnx", SHAPE, tmp_path / "tuned.so", tmp_path / "c.json", tuning=first)
    assert info["tuned_kernels"]["tuned"] == len(measured) and not info["tuned_kernels"]["held"], info
    tvm_build.compile_onnx(board, tmp_path / "a.onnx", SHAPE, tmp_path / "plain.so", tmp_path / "p.json")
    x = np.random.default_rng(0).random(SHAPE, dtype=np.float32)
    np.testing.assert_allclose(run_library(tmp_path / "tuned.so", x), run_library(tmp_path / "plain.so", x), rtol=1e-4, atol=1e-5)

    # "retraining": other weights, same layer shapes -> every task found, no trials
    again = tune.tune_onnx(board, tiny_onnx(tmp_path / "b.onnx", 1), SHAPE, db_root, 12, tmp_path / "b.json")
    assert again["trials_run"] == 0, again
    planned = [t for t in again["tasks"] if again["plan"].get(t["name"])]
    assert planned and all(t["reused"] for t in planned) and len(again["tasks"]) == len(first["tasks"])
    # a bigger budget tops the same records up instead of starting over
    more = tune.tune_onnx(board, tmp_path / "b.onnx", SHAPE, db_root, 24, tmp_path / "c.json")
    assert 0 < more["trials_run"] <= 12


def test_compile_refuses_a_tuning_report_for_another_target(tmp_path):
    from kiln.errors import PassError

    board = load_board("x86-host")
    report = {"measured": "native", "target": {"kind": "llvm", "mcpu": "other"}, "database": str(tmp_path), "why": "x"}
    with pytest.raises(PassError, match="rerun the tune task"):
        tvm_build.compile_onnx(board, tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "m.so", tmp_path / "m.json",
                               tuning=report)


def test_the_stages_read_the_layout_and_the_manifests_trial_budget(kiln_env):
    """tune.run and compile_tvm.run on a build layout: the input shape from export.json, the
    budget from tuning.trials (0 here: untuned), the reports under build/<app>/type/<board>/."""
    from kiln.artifacts import Layout
    from kiln.schema import Project
    from passes import compile_tvm
    from tests.passes.conftest import small_manifest

    project = Project.model_validate(dict(small_manifest(), tuning={"trials": 0}))
    board, lay = load_board("x86-host"), Layout("small")
    lay.root.mkdir(parents=True)
    tiny_onnx(lay.onnx, 0)
    lay.export_json.write_text(json.dumps({"input_shape": SHAPE}))
    info = tune.run(project, board, lay)
    assert info["measured"] == "native" and info["trial_budget"] == 0 and info["why"] == "trial budget is 0; compiled untuned"
    assert json.loads(lay.tune_json("x86-host").read_text()) == info
    out = compile_tvm.run(project, board, lay)
    assert out["input_shape"] == SHAPE and out["tuning"] == info["why"] and out["tuned_kernels"] is None
    assert lay.library("x86-host").stat().st_size == out["library_bytes"]
    assert json.loads(lay.compile_json("x86-host").read_text()) == out


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
        tune.tune_onnx(load_board("x86-host"), tiny_onnx(tmp_path / "m.onnx", 0), SHAPE, tmp_path / "tune", 12,
                       tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()


def test_pool_kernels_are_scheduled_without_unknown_rule_warnings(tmp_path, capfd):
    """TOPI's pooling blocks name a custom schedule rule that TVM has for Adreno only: on a CPU
    target the generic rules schedule them, as before, and MetaSchedule's C++ log no longer
    warns "Unknown schedule rule meta_schedule.pool_max" for every pooling kernel."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(tvm_build.resolve_target(load_board("x86-host")))
    tvm_build.import_cpu_tensor_intrinsics()
    tvm_build.register_cpu_pool_rules()
    mod = tvm_build.prepare(tvm_build.import_onnx(tiny_onnx(tmp_path / "m.onnx", 0), SHAPE), target)
    pools = [t for t in ms.relax_integration.extract_tasks(mod, target) if "pool" in t.task_name]
    # the design spaces tuning searches (the same space generator and rules as _tune_group's)
    contexts = [ms.TuneContext(mod=t.dispatched[0], target=target, space_generator="post-order-apply",
                               task_name=t.task_name, num_threads=1) for t in pools]
    traces = [str(s.trace) for c in contexts for s in c.generate_design_space()]
    assert pools and traces
    # the annotation goes, as ApplyCustomRule drops an unknown one, and the generic rules apply
    # (with it left on, every rule but ApplyCustomRule would skip the block)
    assert all('unannotate(block_or_loop=b0, ann_key="schedule_rule")' in t for t in traces), traces[0]
    assert any("rfactor(" in t for t in traces), traces
    assert "Unknown schedule rule" not in capfd.readouterr().err


def test_host_cpu_drops_the_vector_extensions_this_machine_hides():
    """A VM may hide AVX-512 from a CPU LLVM names by its family (znver4): the x86-host target
    must not ask for what /proc/cpuinfo lacks, or its library dies with SIGILL."""
    from passes.support.tvm_build import host_mattr

    off = host_mattr("znver4", {"avx", "avx2", "fma", "sse4_2"})
    assert "-avx512f" in off and "-avx512vnni" in off and "-avx2" not in off
    assert host_mattr("znver4", {"avx", "avx2", "fma", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                                 "avx512_vnni", "avx512_bf16", "avx512_bitalg", "avx512ifma", "avx512vbmi",
                                 "avx512_vbmi2", "avx512_vpopcntdq"}) == []


# --- a damaged tuning database (issue 11): lines TVM cannot read are dropped, with a warning ---


WL, REC = "database_workload.json", "database_tuning_record.json"  # MetaSchedule's files, one JSON a line


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A real database, tuned once for the tiny model on this host: (board, onnx, db_root, report)."""
    if platform.machine() != "x86_64":
        pytest.skip("tunes for the x86 host")
    tmp = tmp_path_factory.mktemp("tuned")
    board = load_board("x86-host")
    onnx = tiny_onnx(tmp / "m.onnx", 0)
    info = tune.tune_onnx(board, onnx, SHAPE, tmp / "tune", 12, tmp / "t.json")
    assert info["trials_run"] > 0
    return board, onnx, tmp / "tune", info


def copy_database(tuned, dest):
    """A copy of the tuned database under ``dest``: (db_root, db_dir, workload lines, record lines)."""
    import shutil

    _, _, db_root, info = tuned
    src = db_root / tvm_build.target_key(tuned[0], info["target"])
    shutil.copytree(src, dest / "tune" / src.name, ignore=shutil.ignore_patterns("logs"))
    db = dest / "tune" / src.name
    return dest / "tune", db, (db / WL).read_bytes().splitlines(True), \
        (db / REC).read_bytes().splitlines(True)


def read_records(db_dir):
    return [json.loads(line) for line in (db_dir / REC).read_text().splitlines()]


def test_a_torn_last_line_is_dropped_and_tuning_goes_on(tuned, tmp_path, caplog, monkeypatch):
    """A tune killed while appending a record (or a full disk) leaves half a line: the next tune
    and compile went on failing with TVM's bare "Unexpected EOF" for every app sharing the
    database; now that line goes, with a warning, and its kernel is tuned again."""
    board, onnx, _, _ = tuned
    # pytest's log capture hangs its nameless handlers on MetaSchedule's logger after the
    # fixture's tune configured it; MetaSchedule's next logging config lists handlers by name
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    monkeypatch.setattr(ms_log, "handlers", [h for h in ms_log.handlers if h.get_name()])
    db_root, db, wl, rec = copy_database(tuned, tmp_path)
    torn = rec[-1][: len(rec[-1]) // 2]
    (db / REC).write_bytes(b"".join(rec[:-1]) + torn)

    info = tune.tune_onnx(board, onnx, SHAPE, db_root, 12, tmp_path / "t.json")
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(db / REC) in m and "torn last line" in m and f"{len(torn)} bytes" in m
               for m in warned), warned
    # the other records are kept as they were; the lost one costs trials: its kernel is topped up
    assert (db / REC).read_bytes().startswith(b"".join(rec[:-1]))
    assert info["trials_run"] > 0 and len(read_records(db)) >= len(rec)
    out = tvm_build.compile_onnx(board, onnx, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning=info)
    assert settled(out) > 0


def test_a_torn_last_workload_is_dropped_with_its_records(tuned, tmp_path, caplog):
    board, onnx, _, _ = tuned
    _, db, wl, rec = copy_database(tuned, tmp_path)
    last = len(wl) - 1
    (db / WL).write_bytes(b"".join(wl[:-1]) + wl[-1][:1000])
    if not any(json.loads(r)[0] == last for r in rec):  # give the torn workload a record to lose
        (db / REC).write_bytes(b"".join(rec) + json.dumps([last, json.loads(rec[0])[1]]).encode() + b"\n")

    assert len(tvm_build.open_database(db)) == sum(json.loads(r)[0] < last for r in rec)  # before: TVM's parse error
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(db / WL) in m and "dropped its last 1 line(s) (1000 bytes)" in m and "torn" in m
               for m in warned), warned
    assert any(str(db / REC) in m and f"workload on line {last + 1} of" in m for m in warned), warned
    assert (db / WL).read_bytes() == b"".join(wl[:-1])
    assert all(r[0] < last for r in read_records(db))
    assert tvm_build.repair_database(db) is False


def test_a_corrupt_line_elsewhere_is_dropped_and_the_rest_kept(tuned, tmp_path, caplog):
    """A corrupt record in the middle goes alone; a corrupt workload in the middle takes its
    records with it and leaves a placeholder, so the records of the workloads after it (which
    name them by line number) still apply; the database then opens and compiles."""
    board, onnx, _, info = tuned
    _, db, wl, rec = copy_database(tuned, tmp_path)
    used = sorted({json.loads(r)[0] for r in rec})
    assert len(used) >= 2, used
    lost_wl = used[0]  # a workload with records, and another one after it with records
    bad_rec = next(k for k, r in enumerate(rec) if json.loads(r)[0] != lost_wl)
    wl[lost_wl] = wl[lost_wl][:300] + b"\n"
    rec[bad_rec] = b'[1,[[["GetSBlock"' + b"\n"
    (db / WL).write_bytes(b"".join(wl))
    (db / REC).write_bytes(b"".join(rec))

    db_obj = tvm_build.open_database(db)  # before: TVM's bare parse error
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(str(db / REC) in m and f"dropped line {bad_rec + 1}, which is corrupt" in m
               for m in warned), warned
    assert any(str(db / WL) in m and f"line {lost_wl + 1} is corrupt" in m for m in warned), warned
    kept = [r for k, r in enumerate(rec) if k != bad_rec and json.loads(r)[0] != lost_wl]
    assert (db / REC).read_bytes() == b"".join(kept)  # the rest, byte for byte
    assert len(db_obj) == len(kept) > 0
    new_wl = (db / WL).read_bytes().splitlines(True)
    assert len(new_wl) == len(wl) and [w for k, w in enumerate(new_wl) if k != lost_wl] == \
        [w for k, w in enumerate(wl) if k != lost_wl]
    assert tvm_build.repair_database(db) is False  # once repaired, nothing more to drop
    out = tvm_build.compile_onnx(board, onnx, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning={**info, "database": str(db)})
    assert settled(out) > 0
    caplog.clear()
    assert tvm_build.repair_database(db) is False and not caplog.records


def test_tiny_and_fixed_kernels_are_not_tuned(tmp_path, monkeypatch):
    """At the default threshold the tiny CNN's kernels (all under 20 k FLOPs) are left untuned,
    and say so with no trials; the packed int8 convs never are (they carry a fixed schedule)."""
    import tvm

    board = load_board("x86-host")
    monkeypatch.delenv(tvm_build.MIN_FLOPS_ENV, raising=False)
    info = tune.tune_onnx(board, tiny_onnx(tmp_path / "a.onnx", 0), SHAPE, tmp_path / "db", 12, tmp_path / "a.json")
    assert info["trials_run"] == 0 and info["tasks"] == []
    monkeypatch.setenv(tvm_build.MIN_FLOPS_ENV, "0")
    mod = tvm_build.prepare(tvm_build.import_onnx(tmp_path / "a.onnx", SHAPE),
                            tvm.target.Target(tvm_build.resolve_target(board)))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(tvm_build.tunable(f) for f in funcs)
    assert not tvm_build.tunable(funcs[0].with_attr("tirx.is_scheduled", True))
    monkeypatch.setenv(tvm_build.MIN_FLOPS_ENV, "lots")
    with pytest.raises(PassError, match="KILN_TUNE_MIN_FLOPS"):
        tvm_build.tunable(funcs[0])


@pytest.mark.skipif(platform.machine() != "x86_64" or "avx2" not in Path("/proc/cpuinfo").read_text(),
                    reason="needs an AVX2 x86_64 host")
def test_x86_avx2_is_tuned_with_kilns_rule_list(tmp_path):
    """x86-avx2 (Haswell) tunes natively on an AVX2 host with int8_intrin.design_space's own x86
    rule list (Kiln's exact AVX2 intrinsic in it): records are written and the library builds."""
    board = load_board("x86-avx2")
    onnx_path = tiny_onnx(tmp_path / "a.onnx", 0)
    info = tune.tune_onnx(board, onnx_path, SHAPE, tmp_path / "db", 16, tmp_path / "a.json")
    assert info["measured"] == "native" and info["trials_run"] > 0, info
    compiled = tvm_build.compile_onnx(board, onnx_path, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning=info)
    assert settled(compiled) > 0


# --- the untuned baseline: tuned is never slower than untuned, kernel by kernel ----------------


@pytest.mark.skipif(platform.machine() != "x86_64", reason="tunes for the x86 host")
def test_each_kernel_keeps_the_faster_of_its_untuned_and_best_tuned_form(tmp_path):
    """After the search each tuned kernel's untuned form is measured by the same runner; the
    report says which one the build takes, kiln-untuned.json lists exactly those kept untuned,
    and the compile stage applies records to the others only."""
    board = load_board("x86-host")
    onnx_path = tiny_onnx(tmp_path / "a.onnx", 0)
    info = tune.tune_onnx(board, onnx_path, SHAPE, tmp_path / "db", 12, tmp_path / "a.json")
    # the kernels the plan gave trials: each has records, and its baseline was measured
    measured = [t for t in info["tasks"] if "schedule" in t]
    assert sorted(t["name"] for t in measured) == sorted(n for n, k in info["plan"].items() if k), info
    for t in measured:
        assert t["untuned_us"] > 0 and t["tuned_us"] > 0, t
        assert t["schedule"] == ("untuned" if t["untuned_us"] <= t["tuned_us"] else "tuned"), t
    kept = json.loads((Path(info["database"]) / tvm_build.UNTUNED).read_text())
    assert sorted(v["kernel"] for v in kept.values()) == sorted(t["name"] for t in measured if t["schedule"] == "untuned")
    compiled = tvm_build.compile_onnx(board, onnx_path, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning=info)
    assert compiled["tuned_kernels"]["tuned"] == sum(t["schedule"] == "tuned" for t in measured), (compiled, measured)
    assert compiled["tuned_kernels"]["held"] == sorted(t["name"] for t in measured if t["schedule"] == "untuned")


class _Runner:
    """A MetaSchedule runner that reports every candidate as taking ``secs`` (or failing)."""

    def __init__(self, secs: float | None):
        self.secs = secs

    def run(self, inputs):
        from tvm.s_tir.meta_schedule.runner import RunnerResult

        class Done:
            def __init__(self, result):
                self._result = result

            def result(self):
                return self._result

        if self.secs is None:
            return [Done(RunnerResult(None, "injected: the board went away")) for _ in inputs]
        return [Done(RunnerResult([self.secs], None)) for _ in inputs]


def _tuned_tasks(tmp_path):
    """The tiny CNN tuned with a few trials: (board, onnx path, tune report, its tasks, database)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    board = load_board("x86-host")
    onnx_path = tiny_onnx(tmp_path / "a.onnx", 0)
    info = tune.tune_onnx(board, onnx_path, SHAPE, tmp_path / "db", 12, tmp_path / "a.json")
    target = tvm.target.Target(tvm_build.resolve_target(board))
    mod = tvm_build.prepare(tvm_build.import_onnx(onnx_path, SHAPE), target)
    db = tvm_build.open_database(Path(info["database"]))
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if tune._records(db, t)]
    assert tasks
    return board, onnx_path, info, tasks, db


@pytest.mark.skipif(platform.machine() != "x86_64", reason="tunes for the x86 host")
def test_an_untuned_kernel_measured_faster_is_held_out_of_the_database(tmp_path):
    from tvm.s_tir import meta_schedule as ms

    board, onnx_path, info, tasks, db = _tuned_tasks(tmp_path)
    db_dir = Path(info["database"])
    # every untuned form "measures" 1 ns: all of them beat their records
    tune._baselines(tasks, db, db_dir, ms, tune._in_process_builder(), _Runner(1e-9), info, board)
    held = tvm_build.read_untuned(db_dir)
    assert sorted(v["kernel"] for v in held.values()) == sorted(t.task_name for t in tasks)
    names = {t.task_name for t in tasks}
    assert all(t["schedule"] == "untuned" for t in info["tasks"] if t["name"] in names)
    compiled = tvm_build.compile_onnx(board, onnx_path, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning=info)
    assert compiled["tuned_kernels"]["tuned"] == 0
    # and 1 s: every record beats it, and the kernels leave the list again
    tune._baselines(tasks, db, db_dir, ms, tune._in_process_builder(), _Runner(1.0), info, board)
    assert tvm_build.read_untuned(db_dir) == {}
    assert all(t["schedule"] == "tuned" for t in info["tasks"] if t["name"] in names)
    compiled = tvm_build.compile_onnx(board, onnx_path, SHAPE, tmp_path / "m.so", tmp_path / "c.json", tuning=info)
    assert compiled["tuned_kernels"]["tuned"] == len(tasks)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="tunes for the x86 host")
def test_a_baseline_that_fails_to_run_keeps_the_tuned_records(tmp_path, caplog):
    from tvm.s_tir import meta_schedule as ms

    board, _, info, tasks, db = _tuned_tasks(tmp_path)
    db_dir = Path(info["database"])
    (db_dir / tvm_build.UNTUNED).write_text("{}")
    with caplog.at_level(logging.WARNING, logger="kiln.tune"):
        tune._baselines(tasks, db, db_dir, ms, tune._in_process_builder(), _Runner(None), info, board)
    assert tvm_build.read_untuned(db_dir) == {}
    assert "did not run for its baseline: injected: the board went away" in caplog.text
    # an unreadable list is no list: every kernel takes its records
    (db_dir / tvm_build.UNTUNED).write_text("not json")
    assert tvm_build.read_untuned(db_dir) == {}
