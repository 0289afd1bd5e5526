"""The TVM frontend the tune and compile stages share: a board's target, the Relax module of an
exported ONNX file, kernel libraries built from it, and the MetaSchedule tuning databases.

The board's ``tvm_target`` dict is used as is, except ``mcpu: host``, which is resolved to
this machine's CPU (the x86-host board is "the machine Kiln runs on"). Cross builds link with
the board's ``cc`` (e.g. aarch64-linux-gnu-g++).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import types
from pathlib import Path
from typing import Any

from kiln.artifacts import atomic_path, sha256_file, write_bytes, write_json
from kiln.errors import PassError
from kiln.schema import Board
from passes.support import int8_intrin
from passes.support.int8_intrin import design_space  # noqa: F401  (tune.py imports it from here)

log = logging.getLogger("kiln.compile")


def resolve_target(board: Board) -> dict[str, Any]:
    """The board's TVM target dict with ``mcpu: host`` replaced by the host CPU's name, less the
    vector extensions this machine does not offer (see host_mattr)."""
    target = dict(board.tvm_target)
    if target.get("mcpu") == "host":
        from tvm.target import codegen

        target["mcpu"] = codegen.llvm_get_system_cpu()
        off = host_mattr(target["mcpu"], host_isa_flags())
        if off:
            target["mattr"] = [*target.get("mattr", []), *off]
    return target


def host_isa_flags() -> set[str]:
    """CPU feature flags of this machine (/proc/cpuinfo), lower case."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _norm(flag: str) -> str:
    return flag.lower().replace("_", "").replace(".", "").replace("-", "")


def host_mattr(mcpu: str, flags: set[str]) -> list[str]:
    """``-feature`` for every AVX/AMX extension LLVM's name for this CPU implies but the machine
    does not offer. A VM may hide AVX-512 from a CPU that has it (LLVM names it from the CPU's
    family, e.g. znver4): code built for the bare name would die with SIGILL here."""
    from tvm.target import Target, codegen

    have = {_norm(f) for f in flags}
    implied = {str(f) for f in codegen.llvm_get_cpu_features(Target({"kind": "llvm", "mcpu": mcpu}))}
    return sorted(f"-{f}" for f in implied if f.startswith(("avx", "amx")) and _norm(f) not in have)


def import_onnx(onnx_path: Path, input_shape: list[int]):
    """The Relax module Kiln compiles and tunes for an exported model: ONNX import with the
    weights bound as constants, inference-only ops decomposed, and int8 QDQ patterns lowered to
    integer kernels (passes/support/relax_int8.py; a no-op for float models)."""
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from passes.support import relax_int8

    model = onnx.load(str(onnx_path))
    name = model.graph.input[0].name
    # a model with a front end takes the raw samples (int16 audio, uint8 pixels): its own dtype
    dtype = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type).name
    mod = from_onnx(model, shape_dict={name: input_shape}, dtype_dict={name: dtype}, keep_params_in_input=False)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    return relax_int8.lower(mod)


def compile_onnx(board: Board, onnx_path: Path, input_shape: list[int], out_so: Path, out_json: Path,
                 tuning: dict | None = None) -> dict:
    """Compile ``onnx_path`` for ``board`` into the kernel library ``out_so`` (its report to
    ``out_json``); ``tuning`` is the tune stage's report (tune.json): when it tuned, the
    schedules in its database are applied, others stay untuned."""
    import tvm
    from tvm import relax

    if shutil.which(board.cc) is None:
        raise PassError(f"compile for board '{board.name}': compiler '{board.cc}' (field 'cc' of its board file) not found on PATH")
    target_dict = resolve_target(board)  # what TVM is given, and what compile.json records
    try:
        target = tvm.target.Target(target_dict)
    except Exception as e:  # TVM raises its own error types for a bad target dict
        raise PassError(f"compile for board '{board.name}': invalid tvm_target {target_dict}: {e}") from e
    # LLVM compiles for its generic CPU when it does not know mcpu: the record would then name
    # a CPU that was not used (board files are checked when they load; a Board made in code is not)
    for t in (target_dict, target_dict.get("host")):
        if isinstance(t, dict) and t.get("kind") == "llvm" and t.get("mcpu"):
            triple = t.get("mtriple") or tvm.target.codegen.llvm_get_system_triple()
            if not tvm.target.codegen.llvm_is_valid_cpu(t["mcpu"], triple):
                raise PassError(f"compile for board '{board.name}': LLVM knows no CPU '{t['mcpu']}' for triple "
                                f"'{triple}' (tvm_target {target_dict}); it would compile for a generic CPU")

    t0 = time.perf_counter()
    mod = import_onnx(onnx_path, input_shape)
    tuned = None
    # a budget of 0 tunes nothing and its report says "compiled untuned": no database to read
    if tuning and tuning.get("measured") and tuning.get("trial_budget", 1):
        if tuning.get("target") != target_dict:
            raise PassError(f"compile for board '{board.name}': its tuning report is for target {tuning.get('target')}, "
                            f"not {target_dict}; rerun the tune task")
        mod, tuned = apply(mod, target, Path(tuning["database"]))
    else:
        mod = prepare(mod, target)  # fusion: without it each op is its own kernel
    mod = share_constants(mod)  # an unrolled RNN's weights once, not once per step
    try:
        ex = relax.build(mod, target=target)
        with atomic_path(out_so) as tmp:
            # export_library picks the compiler from the name; the temp name must end in .so
            so_tmp = tmp.with_suffix(".so")
            # the kernels' debug info is ~40% of the file and no board uses it
            ex.export_library(str(so_tmp), cc=board.cc, options=["-Wl,--strip-debug"])
            so_tmp.replace(tmp)
    except Exception as e:  # TVM's build and linker errors carry their own types
        raise PassError(f"compile for board '{board.name}' (target {target_dict}): {e}") from e
    info = {
        "board": board.name, "target": target_dict, "cc": board.cc, "tvm_version": tvm.__version__,
        "input_shape": input_shape, "library_bytes": out_so.stat().st_size, "sha256": sha256_file(out_so),
        "onnx_sha256": sha256_file(onnx_path), "seconds": round(time.perf_counter() - t0, 2),
        "tuned_kernels": tuned, "tuning": (tuning or {}).get("why", "not tuned"),
    }
    write_json(out_json, info)
    log.info("compile %s: %s (%d bytes) in %.1f s", board.name, out_so, info["library_bytes"], info["seconds"])
    return info


# --- MetaSchedule: databases, task preparation, applying tuned schedules ----------------------


def target_key(board: Board, target: dict[str, Any]) -> str:
    """Directory name of a board type's tuning database: its name plus a hash of the target."""
    digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:10]
    return f"{board.name}-{digest}"


def prepare(mod, target):
    """Legalize and fuse ``mod`` the way MetaSchedule extracts tasks and the compile stage applies
    the database (relax's zero pipeline); the packed int8 convs get their fixed schedule
    (int8_intrin.schedule_packed_convs) and are marked scheduled."""
    from tvm import relax

    with target:  # relax's zero pipeline (no database applied here), gathers marked injective
        mod = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))
        mod = relax.transform.FuseTIR()(relax.transform.FuseOps()(relax.transform.FoldConstant()(
            injective_gathers(mod))))
    import_cpu_tensor_intrinsics()
    return int8_intrin.schedule_packed_convs(mod, target)  # a fixed schedule, never tuned


def injective_gathers(mod):
    """``mod`` with its legalized ``take`` kernels marked injective (TVM's analysis calls a
    data-dependent read opaque, so nothing fuses with it): each output element reads one element
    of the table at the index computed for it, so the elementwise ops that compute the index
    fuse in front. An int8 sigmoid/tanh is such a table: an unrolled int8 GRU ran three extra
    kernels per step for them (activity's shape: int8 1.39x its fp32 time, 0.74x fused)."""
    import tvm

    for gv, f in list(mod.functions_items()):
        if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.rstrip("0123456789") == "take" \
                and f.attrs is not None and int(f.attrs.get("op_pattern", -1)) == 8:  # kOpaque -> kInjective
            mod[gv] = f.with_attr("op_pattern", 2)
    return mod


def share_constants(mod):
    """``mod`` with every constant tensor of equal dtype, shape and bytes made one object. An
    unrolled RNN calls its layers at every step: the ONNX import and constant folding make each
    call's weight (transposed, or lowered to int8) its own object. Measured: the exported
    library's bytes do not change (activity-shaped GRU, fp32 and int8), so the VM's
    serialization already stores equal weights once; kept so the module itself holds each
    weight once (bench/_latency_all.py reads it). Relax has no pass for it."""
    import hashlib

    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Share(PyExprMutator):
        def __init__(self, m):
            super().__init__(m)
            self.seen = {}

        def visit_generic_const_(self, op):
            a = op.value.numpy()
            return self.seen.setdefault((a.dtype.str, a.shape, hashlib.sha256(a.tobytes()).digest()), op)

    share = Share(mod)
    for gv, f in list(mod.functions_items()):
        if isinstance(f, relax.Function):
            mod[gv] = share.visit_expr(f)
    return mod


WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"
dblog = logging.getLogger("kiln.tune")  # what the database repair says


def open_database(db_dir: Path):
    """The MetaSchedule JSON database in ``db_dir`` (created if absent), repaired first (see
    repair_database): a torn or corrupt line makes TVM fail with a bare parse error, or crash."""
    from tvm.s_tir import meta_schedule as ms

    db_dir.mkdir(parents=True, exist_ok=True)
    repair_database(db_dir)
    try:
        return ms.database.JSONDatabase(path_workload=str(db_dir / WORKLOADS), path_tuning_record=str(db_dir / RECORDS),
                                        module_equality="structural")
    except Exception as e:  # TVM's own error types: a line that parses but TVM cannot decode
        raise PassError(f"tuning database {db_dir} cannot be read ({e}); it is a cache of measurements: delete "
                        "that directory to tune from scratch, or set tuning.trials: 0 in the manifest to compile "
                        "untuned") from e


def _json_line(raw: bytes, ok) -> bool:
    try:
        return bool(ok(json.loads(raw)))
    except ValueError:  # also a line that is not UTF-8
        return False


def _is_workload(obj) -> bool:
    return isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)


def _read_lines(path: Path, ok) -> tuple[list[tuple[bytes, bool]], bool]:
    """(each line of ``path`` and whether it is a valid entry, whether the last line lacks its
    newline); nothing when the file is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], False
    pieces = data.split(b"\n")
    tail = pieces.pop()  # b"" when the file ends with a newline, as every line TVM writes does
    lines = [(p, _json_line(p, ok)) for p in pieces]
    if tail:
        lines.append((tail, _json_line(tail, ok)))
    return lines, bool(tail)


def _placeholder_workload(k: int) -> bytes:
    """A valid workload line no model has (a copy kernel of one odd shape per line number): it
    keeps the line numbers, which the tuning records refer to, of the workloads after it."""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((1, 999_983 + k), "int8", name="kiln_lost_workload")
    b = te.compute(a.shape, lambda i, j: a[i, j], name="kiln_placeholder")
    mod = tvm.IRModule({"main": te.create_prim_func([a, b]).with_attr("global_symbol", "main")})
    return json.dumps([str(x) for x in ms.database.Workload(mod).as_json()], separators=(",", ":")).encode()


def _spans(ks: list[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    out, start = [], None
    for i, k in enumerate(ks):
        if start is None:
            start = k
        if i + 1 == len(ks) or ks[i + 1] != k + 1:
            out.append(f"{start}-{k}" if k != start else str(k))
            start = None
    return ", ".join(out)


def repair_database(db_dir: Path) -> bool:
    """Drop the lines of a MetaSchedule database that TVM cannot read, with a warning for each;
    True when anything was dropped. A tuning record is a cache: losing one costs trials, never
    correctness.

    A torn last line (a tune killed while writing it, or a full disk) is cut off. A corrupt
    tuning record elsewhere is dropped. A corrupt workload line before the last valid one is
    replaced by a placeholder workload, since records name workloads by line number; the records
    of a lost workload go too. The records file is rewritten before the workloads file, each
    atomically, so a repair interrupted between the two is completed by the next one."""
    wpath, rpath = db_dir / WORKLOADS, db_dir / RECORDS
    wlines, w_open = _read_lines(wpath, _is_workload)
    bad = {i for i, (_, ok) in enumerate(wlines) if not ok}
    n = max((i + 1 for i, (_, ok) in enumerate(wlines) if ok), default=0)  # workloads kept (placeholders too)

    def is_record(obj) -> bool:
        return (isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is int and 0 <= obj[0] < n
                and obj[0] not in bad and isinstance(obj[1], list))

    rlines, r_open = _read_lines(rpath, is_record)
    dropped = False
    if rlines and (r_open or not all(ok for _, ok in rlines)):
        kept = [raw for raw, ok in rlines if ok]
        lost: dict[int, list[int]] = {}  # workload line -> lines of its records, dropped with it
        for k, (raw, ok) in enumerate(rlines, 1):
            if ok:
                continue
            try:
                index = json.loads(raw)[0]
            except (ValueError, LookupError, TypeError):
                index = None
            if r_open and k == len(rlines) and index is None:
                dblog.warning("tuning database %s: dropped its torn last line (%d bytes; a tune killed while writing, "
                              "or a full disk)", rpath, len(raw))
            elif type(index) is int and (index in bad or index >= n):
                lost.setdefault(index + 1, []).append(k)
            else:
                dblog.warning("tuning database %s: dropped line %d, which is corrupt (%d bytes)", rpath, k, len(raw))
        for w, ks in sorted(lost.items()):
            dblog.warning("tuning database %s: dropped %d tuning record(s) (lines %s) of the workload on line %d of %s, "
                          "which is lost", rpath, len(ks), _spans(ks), w, wpath.name)
        dropped = dropped or len(kept) < len(rlines)
        write_bytes(rpath, b"".join(raw + b"\n" for raw in kept))
    if wlines and (w_open or bad):
        fixed = []
        for k, (raw, ok) in enumerate(wlines[:n], 1):
            if not ok:
                dblog.warning("tuning database %s: line %d is corrupt (%d bytes); replaced by a placeholder so the "
                              "workloads after it keep their line numbers", wpath, k, len(raw))
                raw = _placeholder_workload(k)
            fixed.append(raw)
        cut = wlines[n:]
        if cut:
            dblog.warning("tuning database %s: dropped its last %d line(s) (%d bytes), which are %s", wpath, len(cut),
                          sum(len(raw) for raw, _ in cut) + len(cut) - w_open,
                          "torn (a tune killed while writing, or a full disk)" if w_open and len(cut) == 1 else "corrupt")
        dropped = dropped or bool(bad)
        write_bytes(wpath, b"".join(raw + b"\n" for raw in fixed))
    return dropped


# kernels below this many FLOPs are never tuned, nor given a record from the database: the
# schedules MetaSchedule finds for them are parallel, and a parallel region costs about what
# they take. Measured on traffic_signs int8, whose four such kernels (front end, pooling sum,
# classifier) were all it had left to tune: on the emulated x86-host board the tuned library
# ran in 22.4 µs, the untuned one in 12.3 (bench/rpc_tune.py, every round alike); natively the
# two were within noise of each other (11-13 µs), and so was fp32 with its pools untuned.
# $KILN_TUNE_MIN_FLOPS overrides it (the test suite's models are that small: it sets 0).
MIN_TUNE_FLOPS = 20_000
MIN_FLOPS_ENV = "KILN_TUNE_MIN_FLOPS"


def min_tune_flops() -> float:
    raw = os.environ.get(MIN_FLOPS_ENV)
    if not raw:
        return MIN_TUNE_FLOPS
    try:
        return float(raw)
    except ValueError:
        raise PassError(f"${MIN_FLOPS_ENV}: expected a number of FLOPs, got '{raw}'") from None


def tunable(func) -> bool:
    """Whether MetaSchedule tunes this PrimFunc: not one with a fixed schedule (the packed int8
    convs) and not a tiny one (MIN_TUNE_FLOPS)."""
    import tvm
    from tvm.s_tir.analysis import estimate_tir_flops

    if func.attrs and func.attrs.get("tirx.is_scheduled"):
        return False
    try:
        flops = float(estimate_tir_flops(tvm.IRModule({"main": func})))
    except Exception:  # noqa: BLE001 - a kernel TVM cannot count: tune it as before
        return True
    return flops >= min_tune_flops()


UNTUNED = "kiln-untuned.json"  # kernels whose untuned form beat every tuned record (passes/tune.py)


def kernel_key(func) -> str:
    """A PrimFunc's key in UNTUNED: its structural hash without the ``global_symbol`` that
    MetaSchedule's task extraction adds (so the tune's task and the build's kernel agree)."""
    import tvm_ffi

    if func.attrs and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return str(tvm_ffi.structural_hash(func))


def read_untuned(db_dir: Path) -> dict:
    """UNTUNED's entries ({} if absent or unreadable: then every kernel takes its best record)."""
    try:
        data = json.loads((Path(db_dir) / UNTUNED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def apply(mod, target, db_dir: Path):
    """``(mod with the tuned schedules from db_dir applied, {"tuned": n, "untuned": [names],
    "held": [names]})``; kernels without a record, and those whose untuned form measured faster
    than every record (UNTUNED: "held"), stay as they are."""
    from tvm import relax, tirx

    if not (db_dir / "database_tuning_record.json").exists():
        raise PassError(f"tuning database {db_dir} is missing; rerun the tune task")
    import_cpu_tensor_intrinsics()
    mod = prepare(mod, target)
    # kernels that are never tuned keep their own schedule, whatever records the database holds;
    # so do those the tune measured faster untuned
    slower = read_untuned(db_dir)
    held = {gv: f for gv, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and (not tunable(f) or kernel_key(f) in slower)}
    faster_untuned = sorted(gv.name_hint for gv, f in held.items() if tunable(f))
    for gv in held:
        del mod[gv]
    before = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    with target, open_database(db_dir):
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    for gv, f in held.items():
        mod[gv] = f
    after = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    tuned = sorted(n for n in before if n in after and not after[n].same_as(before[n]))
    return mod, {"tuned": len(tuned), "untuned": sorted(set(before) - set(tuned)), "held": faster_untuned}


@contextlib.contextmanager
def quick_tvmscript():
    """Parse TVMScript (``@T.prim_func`` and friends) without ``inspect.stack()``'s cost.

    TVM's script decorators take ``inspect.stack()`` for every function they parse; for each
    frame whose file is not on disk (``<frozen importlib._bootstrap>`` during an import, the
    ``<ast>`` of an evaluated annotation) ``inspect`` looks the file up by walking every module
    in ``sys.modules`` -- thousands once torch is loaded -- so registering the CPU tensor
    intrinsics took 30 s of CPU per process on a loaded 2-core machine (about 3 s with this).
    TVM reads only each frame, its name and locals, and one caller's line of source
    (``is_defined_in_class``): the stack below gives exactly those, the line from linecache.
    ``inspect.stack`` is swapped only inside the block (the process's other callers keep
    Python's own)."""
    import inspect
    import linecache

    def stack(context: int = 1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            code = frame.f_code
            line = linecache.getline(code.co_filename, frame.f_lineno) if context > 0 else ""
            out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                         [line] if line else None, 0 if line else None))
            frame = frame.f_back
        return out

    saved, inspect.stack = inspect.stack, stack
    try:
        yield
    finally:
        inspect.stack = saved


def import_cpu_tensor_intrinsics() -> None:
    """Register the x86 and arm tensor intrinsics without importing the GPU tables.

    ``import tvm.s_tir.tensor_intrin`` (done by MetaSchedule's TuneContext) imports the CUDA and
    ROCm tables too, which takes 15-50 s on this machine; CPU targets only use x86 and arm ones.
    The tables (TVM's and Kiln's) are parsed TVMScript: :func:`quick_tvmscript`.
    """
    with quick_tvmscript():
        _import_cpu_tensor_intrinsics()


def _import_cpu_tensor_intrinsics() -> None:
    import importlib

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        int8_intrin.register()
        return
    import tvm.s_tir as s_tir

    pkg = types.ModuleType(name)
    pkg.__path__ = [str(Path(s_tir.__file__).parent / "tensor_intrin")]
    pkg.__package__ = name
    sys.modules[name] = pkg
    try:
        for sub in ("x86", "arm_cpu"):
            setattr(pkg, sub, importlib.import_module(f"{name}.{sub}"))
    except Exception:
        del sys.modules[name]
        raise
    int8_intrin.register()  # after TVM's x86 table: it replaces TVM's broken dot_16x4_vnni


# TOPI marks every pooling block with a custom schedule rule (``schedule_rule`` =
# ``meta_schedule.pool_max`` etc.), which TVM implements for Adreno GPUs only. On a CPU target
# MetaSchedule's ApplyCustomRule finds no ``s_tir.meta_schedule.cpu.<rule>`` function, logs a
# C++ warning per pooling kernel and search ("Unknown schedule rule "meta_schedule.pool_max" for
# target keys ..."; a screenful per deploy, and not Python logging, so no logger can lower it),
# drops the annotation and lets the generic rules schedule the block. Registering that very
# fallback for the "cpu" key (every llvm target has it) says so explicitly: the design space and
# the traces in existing databases stay the same, and any other unknown rule still warns.
# ApplyCustomRule stays in the rule list: without it the annotated blocks would get no schedule
# at all (the other rules skip them) and the CPU winograd rules would be lost.
POOL_RULES = ("meta_schedule.pool_max", "meta_schedule.pool_avg", "meta_schedule.adaptive_pool_max",
              "meta_schedule.adaptive_pool_avg")


def _generic_schedule(sch, block):
    """A custom rule that defers to the generic rules, as ApplyCustomRule does for an unknown one."""
    sch.unannotate(block, "schedule_rule")
    return [sch]


def register_cpu_pool_rules() -> None:
    """Register :data:`POOL_RULES` for CPU targets (where TVM registers none of its own)."""
    import tvm_ffi

    for rule in POOL_RULES:
        name = f"s_tir.meta_schedule.cpu.{rule}"
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, _generic_schedule)
