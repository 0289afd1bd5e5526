"""Tune stage: MetaSchedule search for a model's kernels on one board type, into a persistent
tuning database that the compile stage applies (passes/support/tvm_build.py).

The database lives under ``build/tune/<board>-<target hash>/`` (MetaSchedule's JSON workload and
record files), keyed by the resolved TVM target, and is shared by every app compiled for that
board type. Tasks are keyed by their TIR workload (layer shapes and dtypes, not weight values),
so retraining a model whose layer shapes are unchanged finds every task already tuned and runs
no trials.

Where it measures (issue #5): only a board whose code runs natively on this machine gives a
cost signal — the host board itself, or another x86_64 board type whose ISA the host CPU
implements (an AVX2 board on an AVX2 host): candidates are built for the *board's* target and
timed here, and the report says so. qemu-user timings are never used as a cost signal; a board
that can be neither measured natively nor reached over TVM RPC is not tuned and the report
gives the reason.

Measuring on the board (``tuning.measure: rpc`` in the manifest, or ``$KILN_TUNE_MEASURE=rpc``):
every instance of the board type in the lab ($KILN_LAB, else the emulated lab, started on
demand) that can serve TVM RPC runs ``kiln-runner --rpc-serve`` and MetaSchedule times
candidates there (passes/support/rpc_measure.py), several boards of one type sharing the
trials. Emulated (qemu-user) and serial instances are skipped, and tune.json says why; with none
left the board type is compiled untuned. tune.json records ``measured: "rpc"`` and the boards.
The stage knows the lab only through the core's interface, kiln.measure.MeasuringLab: dodo.py
hands one over with the measure mode, both loaded objects (hil/rpc.py implements it; passes/
never reaches into hil/).

Two things make MetaSchedule usable on a 2-core build machine (see README, "Tuning"):
- candidates are built in this process, one after another; MetaSchedule's default builder
  starts fresh worker processes for every batch, each of which imports every tensor-intrinsic
  table (CUDA's takes 15-50 s here), so its 30 s build timeout failed every candidate;
- only the CPU tensor-intrinsic tables are imported (x86, arm), for the same reason.

Tuned is never slower than untuned, kernel by kernel: after the search, each kernel's untuned
form (the plain loops a build without the database compiles) is measured by the same builder
and runner; where it beats every record, its key goes into kiln-untuned.json beside the
database and tvm_build.apply keeps the kernel out of MetaSchedule's ApplyDatabase
(``_baselines``; a record with an empty trace cannot stand for it: the database skips those).
With the few trials a build spends, the search's best can lose to the plain loops on a light,
memory-bound kernel: traffic_signs' int8 input quantize (an NHWC->NCHW transpose with a
rounding) measured 3.15 µs best tuned, 1.51 µs untuned on x86-host in a cold `make deploy`
(its tune.json).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from kiln.artifacts import Layout, read_json, tuning_root, write_json
from kiln.config import trial_budget
from kiln.errors import KilnError, PassError
from kiln.measure import MeasuringLab, measure_mode
from kiln.schema import Board, Project
from passes.support.tvm_build import (design_space, host_isa_flags, import_cpu_tensor_intrinsics, import_onnx,
                                      UNTUNED, kernel_key, open_database, prepare, read_untuned, tunable,
                                      register_cpu_pool_rules, repair_database, resolve_target, target_key)

log = logging.getLogger("kiln.tune")


# ISA flags (as /proc/cpuinfo names them) an x86 mcpu needs; a board type whose mcpu is listed
# here runs natively on a host that has them all
_MCPU_FLAGS = {
    "haswell": {"avx2", "fma", "bmi2"},
    "broadwell": {"avx2", "fma", "bmi2", "adx"},
    "skylake": {"avx2", "fma", "bmi2", "adx"},
    "znver2": {"avx2", "fma", "bmi2"},
    "znver3": {"avx2", "fma", "bmi2", "vaes"},
    "skylake-avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "cascadelake": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
    "icelake-server": {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
}


def where_to_measure(board: Board, target: dict[str, Any], measure: str = "auto",
                     lab: MeasuringLab | None = None) -> tuple[str | None, str]:
    """(mode, why): mode ``native`` when candidates built for this board's target can be timed on
    this machine, ``rpc`` when ``measure`` asks for the board itself and the lab has an instance
    that can serve TVM RPC, else None with the reason it is not tuned."""
    import platform

    if measure == "rpc":
        return _rpc_usable(board, lab)
    if board.arch != platform.machine():
        return None, (
            f"{board.arch} board: its code cannot run natively here, qemu-user timings are not a cost "
            "signal; compiled untuned. tuning.measure: rpc tunes it on a real board of the type, over TVM RPC"
        )
    if board.emulation is None and board.tvm_target.get("mcpu") == "host":
        return "native", "the host itself"
    mcpu = str(target.get("mcpu", ""))
    needed = _MCPU_FLAGS.get(mcpu)
    if needed is None:
        return None, f"no known ISA for mcpu '{mcpu}' to check against this CPU; compiled untuned"
    missing = needed - host_isa_flags()
    if missing:
        return None, f"this CPU lacks {sorted(missing)} needed by mcpu '{mcpu}'; compiled untuned"
    return "native", f"tuned on this machine for the board's target (mcpu {mcpu}); this CPU implements its ISA"


def _rpc_usable(board: Board, lab: MeasuringLab | None) -> tuple[str | None, str]:
    """("rpc", why) when the lab (as described: nothing is started yet) has an instance of
    ``board`` that can serve TVM RPC, else (None, why naming each instance left out)."""
    if lab is None:
        raise PassError(f"tune for board '{board.name}': measuring over TVM RPC needs a lab, and none was given")
    path = lab.path
    try:
        usable, skipped = lab.instances(board)
    except KilnError as e:
        raise PassError(f"tune for board '{board.name}': measuring over TVM RPC needs the lab {path}: {e}") from e
    left_out = "; ".join(f"{n}: {w}" for n, w in skipped.items())
    if not usable:
        return None, (f"measure: rpc, but lab {path} has no instance of {board.name} that can serve TVM RPC"
                      + (f" ({left_out})" if left_out else "") + "; compiled untuned")
    return "rpc", (f"measured on the board over TVM RPC ({', '.join(i.name for i in usable)} in lab {path})"
                   + (f"; skipped {left_out}" if left_out else ""))


def _in_process_builder():
    """A MetaSchedule builder that compiles candidates in this process (see module doc)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # a candidate that fails to build is skipped by the search
                    results.append(BuilderResult(None, f"build failed: {e}"))
            return results

    return InProcessBuilder()


def run(project: Project, board: Board, layout: Layout, measure: str | None = None,
        lab: MeasuringLab | None = None) -> dict:
    """Tune ``layout.onnx`` for ``board`` into the shared database under build/tune/, with the
    trial budget of the manifest or the board type; the report goes to ``layout.tune_json``.
    ``measure`` (kiln.measure.measure_mode of the project when not given) and ``lab`` (where
    ``rpc`` measures) come from dodo.py as loaded objects."""
    shape = read_json(layout.export_json)["input_shape"]
    return tune_onnx(board, layout.onnx, shape, tuning_root(), trial_budget(project, board),
                     layout.tune_json(board.name), measure=measure or measure_mode(project), lab=lab)


def tune_onnx(board: Board, onnx_path: Path, input_shape: list[int], db_root: Path, trials: int,
              out_json: Path, measure: str = "auto", lab: MeasuringLab | None = None) -> dict:
    """Tune ``onnx_path``'s untuned tasks for ``board`` with up to ``trials`` trials in all, into
    the database under ``db_root``; the report (tune.json) goes to ``out_json``. ``measure``:
    auto/native (on this machine when the board's code runs here) or rpc (on the boards of
    ``lab``, a kiln.measure.MeasuringLab: hil.rpc.RpcLab of a lab file)."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    t0 = time.perf_counter()
    target_dict = resolve_target(board)
    db_dir = db_root / target_key(board, target_dict)
    mode, why = where_to_measure(board, target_dict, measure, lab)
    info: dict[str, Any] = {"board": board.name, "target": target_dict, "database": str(db_dir), "measured": mode,
                            "why": why, "trial_budget": trials, "tasks": [], "trials_run": 0}
    if mode is None or trials == 0:
        if mode is not None:
            info["why"] = "trial budget is 0; compiled untuned"
        info["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(out_json, info)
        log.info("tune %s: not tuned (%s)", board.name, info["why"])
        return info
    target = tvm.target.Target(target_dict)
    import_cpu_tensor_intrinsics()
    register_cpu_pool_rules()  # no "Unknown schedule rule meta_schedule.pool_max" per pool kernel
    mod = prepare(import_onnx(onnx_path, input_shape), target)
    # lines TVM cannot read are dropped first; records lost that way are tuned again: the trials
    # spent per kernel no longer say how many records it has
    damaged = repair_database(db_dir)
    db = open_database(db_dir)
    # kernels with a fixed schedule (the packed int8 convs, tvm_build.prepare) and tiny ones
    # are not tuned (tvm_build.tunable)
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target) if tunable(t.dispatched[0]["main"])]
    flops = [float(estimate_tir_flops(t.dispatched[0])) * t.weight for t in extracted]
    spent = {} if damaged else _spent(db_dir)
    records_before = [_records(db, t) for t in extracted]
    have = [max(_records(db, t), spent.get(_key(t), 0)) for t in extracted]
    # the budget is per model: kernels already measured as often as the plan gives them (the
    # same layer shapes, from an earlier build of any app) are reused and not tuned again
    plan = allocate(list(zip(extracted, flops)), trials)
    todo = [(t, n - have[extracted.index(t)]) for t, n in plan if n - have[extracted.index(t)] > 0]
    for t, f, h in zip(extracted, flops, have):
        info["tasks"].append({"name": t.task_name, "weight": t.weight, "flops": f, "records": h,
                              "reused": h > 0 and all(t is not u for u, _ in todo)})
    info["tasks_reused"] = sum(t["reused"] for t in info["tasks"])
    info["plan"] = {t.task_name: n for t, n in plan}
    if todo:
        log.info("tune %s: %d of %d kernels to tune, %d trials (%s), measured %s", board.name, len(todo),
                 len(extracted), sum(n for _, n in todo), ", ".join(f"{t.task_name}: {n}" for t, n in todo), mode)
        # MetaSchedule's own log goes to files under the database's logs/; the console gets
        # its warnings and Kiln's progress lines
        ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
        ms_log.setLevel(logging.WARNING)
        # MetaSchedule's logging config lists the handlers already on its logger by name and
        # formats each name: a nameless one (pytest's log capture, an embedding app's) crashes it
        # with "'NoneType' object has no attribute 'format'", so they are left out of the tune
        for h in [h for h in ms_log.handlers if h.get_name() is None]:
            ms_log.removeHandler(h)
        with _measuring(board, mode, lab, info) as (runner, builder, endpoints):
            for k, group in enumerate(_groups(todo), 1):
                log.info("tune %s: group %d: %s, %d trials each", board.name, k,
                         ", ".join(t.task_name for t, _ in group), group[0][1])
                before = sum(_records(db, t) for t, _ in group)
                try:
                    _tune_group(group, db, db_dir, ms, runner=runner, builder=builder)
                except Exception as e:  # MetaSchedule raises TVM's own error types
                    raise PassError(f"tune for board '{board.name}' (target {target_dict}): MetaSchedule failed on "
                                    f"{', '.join(t.task_name for t, _ in group)}: {e} (its log: {db_dir / 'logs'}; records "
                                    "so far are kept; set tuning.trials: 0 in the manifest to compile untuned)") from e
                _check_boards(board, endpoints, group, before, sum(_records(db, t) for t, _ in group), db_dir)
                for t, n in group:
                    spent[_key(t)] = have[extracted.index(t)] + n
                write_json(db_dir / SPENT, spent)
            info["trials_run"] = sum(_records(db, t) for t in extracted) - sum(records_before)
            _baselines([t for t, _ in todo], db, db_dir, ms, builder or _in_process_builder(),
                       runner or ms.runner.LocalRunner(timeout_sec=30), info, board)
    else:
        log.info("tune %s: all %d kernels already tuned in %s; no trials", board.name, len(extracted), db_dir)
    if mode == "rpc":
        info.setdefault("boards", [])  # no kernel left to tune: no board was used
    info["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(out_json, info)
    return info


LIGHT_SHARE = 0.05  # kernels under 5% of the model's FLOPs (pooling, reshapes, the head) ...
LIGHT_TRIALS = 8  # ... get up to this many trials (a third of the budget at most); the heavy ones
# (convolutions) share the rest
SEARCH_ROUND = 16  # candidates measured per search round


def allocate(todo: list[tuple[Any, float]], trials: int) -> list[tuple[Any, int]]:
    """Trials per task: a few for light kernels; the rest in whole search rounds to the heavy
    ones by FLOPs (largest remainder), any last partial round to the heaviest."""
    total = sum(f for _, f in todo) or 1.0
    light = [t for t, f in todo if f < LIGHT_SHARE * total]
    heavy = sorted(((t, f) for t, f in todo if f >= LIGHT_SHARE * total), key=lambda tf: -tf[1])
    per_light = min(LIGHT_TRIALS, trials // max(1, 3 * len(light)))  # light kernels: at most a third
    left = max(0, trials - per_light * len(light))
    plan = [(t, per_light) for t in light]
    rounds, partial = divmod(left, SEARCH_ROUND)
    if rounds < len(heavy):  # too little for a round each: an even share each
        each, extra = divmod(left, max(1, len(heavy)))
        plan += [(t, each + (extra if i == 0 else 0)) for i, (t, _) in enumerate(heavy)]
        return [(t, n) for t, n in plan if n > 0]
    # a round each, the other rounds by FLOPs (largest remainder), a last partial round to the heaviest
    heavy_total = sum(f for _, f in heavy) or 1.0
    shares = [(rounds - len(heavy)) * f / heavy_total for _, f in heavy]
    counts = [int(s) for s in shares]
    for i in sorted(range(len(heavy)), key=lambda i: counts[i] - shares[i])[: rounds - len(heavy) - sum(counts)]:
        counts[i] += 1
    plan += [(t, (n + 1) * SEARCH_ROUND + (partial if i == 0 else 0)) for i, ((t, _), n) in enumerate(zip(heavy, counts))]
    return [(t, n) for t, n in plan if n > 0]


def _groups(plan: list[tuple[Any, int]]) -> list[list[tuple[Any, int]]]:
    """Tasks with the same trial count tune together (MetaSchedule takes one per-task cap)."""
    by_n: dict[int, list] = {}
    for t, n in plan:
        by_n.setdefault(n, []).append((t, n))
    return list(by_n.values())


@contextlib.contextmanager
def _measuring(board: Board, mode: str, lab: MeasuringLab | None, info: dict):
    """(runner, builder, endpoints) for ``mode``: MetaSchedule's local runner and the in-process
    builder for native, for rpc the board servers (up for the block) and their RPC runner."""
    if mode != "rpc":
        yield None, None, []
        return
    from passes.support.rpc_measure import rpc_runner, so_builder

    try:
        with lab.endpoints(board) as (endpoints, skipped), \
                tempfile.TemporaryDirectory(prefix="kiln-rpc-locks-") as locks:
            if not endpoints:
                raise PassError(f"tune for board '{board.name}': no instance of it can serve TVM RPC now "
                                f"({'; '.join(f'{n}: {w}' for n, w in skipped.items()) or 'none in the lab'})")
            info["boards"] = [ep.board for ep in endpoints]
            info["skipped_boards"] = skipped
            log.info("tune %s: measuring over TVM RPC on %s", board.name,
                     ", ".join(f"{ep.board} ({ep.host}:{ep.port})" for ep in endpoints))
            yield (rpc_runner([(ep.host, ep.port, ep.key) for ep in endpoints], Path(locks)),
                   so_builder(board.cc), endpoints)
            # candidates measured on each board (its server's sessions): several boards share the trials
            info["sessions"] = {ep.board: ep.sessions() for ep in endpoints}
    except KilnError as e:
        if isinstance(e, PassError):
            raise
        raise PassError(f"tune for board '{board.name}' over TVM RPC: {e}") from e


def _check_boards(board: Board, endpoints: list, group, before: int, after: int, db_dir: Path) -> None:
    """After a group measured on boards: each board's server still answers, and kernels that had
    no records have some now (a board that fails every candidate leaves MetaSchedule running
    on, recording none; kernels with records may find no new candidate in a small space)."""
    for ep in endpoints:
        try:
            ep.check()
        except KilnError as e:
            raise PassError(f"tune for board '{board.name}': lost a measuring board during the tune: {e} "
                            f"(records so far are kept in {db_dir})") from e
    if endpoints and before == 0 and after == 0:
        raise PassError(f"tune for board '{board.name}': no candidate of {', '.join(t.task_name for t, _ in group)} "
                        f"was measured on {', '.join(ep.board for ep in endpoints)} over TVM RPC (every run failed; "
                        f"MetaSchedule's log: {db_dir / 'logs'})")


def _tune_group(group: list[tuple[Any, int]], db, db_dir: Path, ms, runner=None, builder=None) -> None:
    per_task = group[0][1]
    target = group[0][0].target
    # more than one search round per task: an xgboost cost model steers the later rounds;
    # a single round is random sampling, where training the model would only cost time
    per_iter = min(SEARCH_ROUND, per_task)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=[t for t, _ in group], work_dir=str(db_dir / "logs"), space=design_space(target),
        # a smaller population than MetaSchedule's 512: the search itself, not the
        # measurements, dominated tuning time on 2 cores
        strategy=ms.search_strategy.EvolutionarySearch(population_size=128, genetic_num_iters=3),
        num_threads=2, seed=0,
    )
    ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(db_dir / "logs"), max_trials_global=per_task * len(group),
        max_trials_per_task=per_task, num_trials_per_iter=per_iter, builder=builder or _in_process_builder(),
        runner=runner or ms.runner.LocalRunner(timeout_sec=30), database=db,
        cost_model="xgb" if per_task > per_iter else "random",
    )


def _baselines(tasks: list, db, db_dir: Path, ms, builder, runner, info: dict, board: Board) -> None:
    """Measure each task's untuned kernel with the search's builder and runner; where it beats
    the best tuned record, its key goes into ``UNTUNED`` (kiln-untuned.json beside the records),
    which tvm_build.apply holds out of MetaSchedule's ApplyDatabase (MetaSchedule's database
    skips a record with an empty trace, so the untuned form cannot simply be one more record).
    tune.json gets, per kernel, the untuned and the best tuned µs and which one the build
    takes. A kernel whose untuned form fails to build or run keeps its tuned records."""
    by_name = {t["name"]: t for t in info["tasks"]}
    untuned = read_untuned(db_dir)
    for task in tasks:
        mod = task.dispatched[0]
        best = db.get_top_k(db.commit_workload(mod), 1)
        tuned_s = _seconds(best[0].run_secs) if best else None
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        built = builder.build([ms.builder.BuilderInput(mod, task.target)])[0]
        if built.error_msg:
            log.warning("tune %s: %s: the untuned kernel did not build for its baseline: %s", board.name,
                        task.task_name, built.error_msg.strip().splitlines()[-1])
            continue
        device = "cpu" if str(task.target.kind.name) == "llvm" else str(task.target.kind.name)  # Kiln tunes CPUs
        ran = runner.run([ms.runner.RunnerInput(built.artifact_path, device, args)])[0].result()
        if ran.error_msg or not ran.run_secs:
            log.warning("tune %s: %s: the untuned kernel did not run for its baseline: %s", board.name,
                        task.task_name, (ran.error_msg or "no timing").strip().splitlines()[-1])
            continue
        untuned_s = _seconds(ran.run_secs)
        kept = tuned_s is None or untuned_s <= tuned_s
        key = kernel_key(mod["main"])
        if kept:
            untuned[key] = {"kernel": task.task_name, "untuned_us": round(untuned_s * 1e6, 3),
                            "tuned_us": None if tuned_s is None else round(tuned_s * 1e6, 3)}
            log.info("tune %s: %s: untuned (%.2f µs) beats every tuned candidate (%s): the build keeps it untuned",
                     board.name, task.task_name, untuned_s * 1e6,
                     "none measured" if tuned_s is None else f"best {tuned_s * 1e6:.2f} µs")
        else:
            untuned.pop(key, None)
        by_name.get(task.task_name, {}).update(
            untuned_us=round(untuned_s * 1e6, 3), tuned_us=None if tuned_s is None else round(tuned_s * 1e6, 3),
            schedule="untuned" if kept else "tuned")
    write_json(db_dir / UNTUNED, untuned)


def _seconds(run_secs) -> float:
    """Mean of a record's measured repeats, as MetaSchedule ranks records."""
    vals = [float(v) for v in run_secs]
    return sum(vals) / len(vals)


SPENT = "kiln-trials.json"  # trials spent per kernel: a small search space may yield fewer records


def _key(task) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def _spent(db_dir: Path) -> dict[str, int]:
    try:
        return json.loads((db_dir / SPENT).read_text())
    except (OSError, ValueError):
        return {}


def _records(db, task) -> int:
    """Measured candidates of ``task``'s kernel in the database."""
    if not db.has_workload(task.dispatched[0]):
        return 0
    return len(db.get_top_k(db.commit_workload(task.dispatched[0]), 1_000_000))
