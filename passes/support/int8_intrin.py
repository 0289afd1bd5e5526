"""Kiln's x86 int8 tensor intrinsics (the aarch64 ones are in int8_intrin_arm.py, registered
from here), the fixed schedule of the packed int8 conv that uses them, and the MetaSchedule
design space for the other kernels.

Every intrinsic here computes the same 16x4 tile, the one the packed int8 conv of
passes/support/relax_int8.py (``_emit_packed``) is laid out for::

    C[i] (int32) += sum_{k<4} A[k] (uint8) * B[i, k] (int8)      for i < 16

and computes it exactly (no saturation anywhere), so a library stays bit-exact with the
fake-quant twin whichever one a board's target gets:

* ``dot_16x4_vnni`` (AVX-512 VNNI, ``vpdpbusd`` on 512 bits): TVM 0.27 registers an intrinsic
  of that name, but its implementation passes ``<16 x i32>`` operands to
  ``llvm.x86.avx512.vpdpbusd.512``, whose signature in the LLVM this TVM wheel carries takes
  ``<64 x i8>``: every candidate fails LLVM's module verification ("Call parameter type does
  not match function signature"). Kiln re-registers the name with the operands typed as LLVM
  expects (MetaSchedule's ``DefaultX86("vnni")`` rules, which ask for it by name on int8
  dense layers, then work too).
* ``kiln_dot_16x4_avx2`` (AVX2 without VNNI, e.g. Haswell): both operands widened to int16
  (``vpmovzxbw`` / ``vpmovsxbw``) and multiplied with ``vpmaddwd``, which sums products in
  pairs into int32 — exact, where ``vpmaddubsw`` (uint8 x int8 pairs summed into *saturating*
  int16) is not: 2 x 255 x 127 = 64770 > 32767 for Kiln's ranges (TVM's ``dot_16x4_avx512``
  saturates that way, and ONNX Runtime's fused u8s8 kernels disagree with the exact result on
  traffic_signs for that reason; it is not used). The pair sums of neighbouring lanes are then
  added.

The packed convs get a fixed schedule (:func:`schedule_packed`, applied by
tvm_build.prepare), not a tuned one: see the note above it. TVM ships no AVX2 int8 intrinsic,
so these are Kiln's own (written against TVM's TensorIntrin API; nothing fetched is copied).
"""

from __future__ import annotations

from typing import Any

from passes.support import int8_depthwise, int8_intrin_arm

VNNI = "dot_16x4_vnni"  # the name MetaSchedule's DefaultX86("vnni") asks for
AVX2 = "kiln_dot_16x4_avx2"
_registered = False


def _intrinsics():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i, k in T.grid(16, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # the 4 activation bytes repeated in every 32-bit lane, as LLVM's <64 x i8> operand
            # (inline: a named value would become a "local" buffer, which this TVM allocates
            # with TVMBackendAllocWorkspace on every call)
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"), C.vload([0], dtype="int32x16"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16), dtype="int8x64"),
                B.vload([0, 0], dtype="int8x64"), dtype="int32x16")

    @T.prim_func(s_tir=True)
    def avx2(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # a0 a1 a2 a3 as int16, four times over: one 16 x int16 register
            a16 = T.reinterpret(T.broadcast(T.reinterpret(T.Cast("int16x4", A.vload([0], "uint8x4")), dtype="int64"), 4),
                                dtype="int16x16")
            for h in range(2):  # outputs 8h .. 8h+7
                # rows 8h .. 8h+3 and 8h+4 .. 8h+7, widened: (a0 b0 + a1 b1, a2 b2 + a3 b3) per row
                lo = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                                             T.Cast("int16x16", B.vload([h * 8, 0], dtype="int8x16")), dtype="int32x8")
                hi = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), a16,
                                             T.Cast("int16x16", B.vload([h * 8 + 4, 0], dtype="int8x16")), dtype="int32x8")
                C[T.ramp(h * 8, 1, 8)] = C.vload([h * 8], dtype="int32x8") + (
                    T.Shuffle([lo, hi], [0, 2, 4, 6, 8, 10, 12, 14]) + T.Shuffle([lo, hi], [1, 3, 5, 7, 9, 11, 13, 15]))

    return desc, vnni, avx2


def register() -> None:
    """Register (re-register, for VNNI) Kiln's int8 intrinsics; idempotent. Call after TVM's x86
    table is imported (passes/support/tvm_build.py import_cpu_tensor_intrinsics)."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin

    desc, vnni, avx2 = _intrinsics()
    TensorIntrin.register(VNNI, desc, vnni, override=True)
    TensorIntrin.register(AVX2, desc, avx2, override=True)
    int8_intrin_arm.register(desc)  # the aarch64 one, against the same tile description
    _registered = True


def intrin_for(target) -> str | None:
    """The int8 intrinsic Kiln's own MetaSchedule rule list tiles with on ``target``: None where
    MetaSchedule's defaults apply (VNNI: ``DefaultX86("vnni")`` asks for the re-registered
    ``dot_16x4_vnni``). Elsewhere on AVX2 x86 (AVX-512 without VNNI included, whose
    ``DefaultX86("avx512")`` would tile with TVM's saturating ``dot_16x4_avx512``) it is the
    exact AVX2 one: the same choice as the packed convs' (:func:`packed_intrin`). On aarch64
    it is None too: MetaSchedule's ARM defaults (the rule list above is x86's)."""
    intrin = packed_intrin(target)
    return intrin if intrin == AVX2 else None


def design_space(target) -> Any:
    """MetaSchedule's design space for ``target``: the default (``post-order-apply`` with the
    rules MetaSchedule picks from the target) except on AVX2-only x86, where it is the same
    x86 rule list with Kiln's exact AVX2 intrinsic tiling the int8 convolutions."""
    intrin = intrin_for(target)
    if intrin is None:
        return "post-order-apply"
    from tvm.s_tir import meta_schedule as ms

    register()
    reuse_write = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = [
        ms.schedule_rule.ApplyCustomRule(),
        ms.schedule_rule.InlineConstantScalars(),
        ms.schedule_rule.AutoInline(into_producer=False, into_consumer=True, inline_const_tensor=True,
                                    disallow_if_then_else=True, require_injective=True, require_ordered=True,
                                    disallow_op=["tirx.exp"]),
        ms.schedule_rule.AddRFactor(max_jobs_per_core=16, max_innermost_factor=64),
        ms.schedule_rule.MultiLevelTilingWithIntrin(intrin, structure="SSRSRS", max_innermost_factor=64,
                                                    reuse_write=reuse_write),
        ms.schedule_rule.MultiLevelTiling(structure="SSRSRS", max_innermost_factor=64, reuse_write=reuse_write),
        ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=64,
                                                    unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True),
        ms.schedule_rule.RandomComputeLocation(),
    ]
    postprocs = [
        ms.postproc.DisallowDynamicLoop(), ms.postproc.RewriteParallelVectorizeUnroll(),
        ms.postproc.RewriteReductionBlock(), ms.postproc.RewriteTensorize(vectorize_init_loop=True),
        ms.postproc.RewriteLayout(),
    ]
    mutators = {ms.mutator.MutateTileSize(): 0.9, ms.mutator.MutateComputeLocation(): 0.05,
                ms.mutator.MutateUnroll(): 0.03, ms.mutator.MutateParallel(max_jobs_per_core=16): 0.02}
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs, mutator_probs=mutators)


# --- the packed int8 conv's fixed schedule ----------------------------------------------------
# relax_int8's packed conv kernels are not left to MetaSchedule: with the few trials a build
# spends per kernel it found tensorized schedules 2-4x slower than a plain one (measured on
# traffic_signs: 15, 8 and 5 µs for its three convs, where this schedule takes 3.9, 3.8, 1.9),
# so they get this one, for every CPU target, and are marked scheduled (tune.py skips them).
PACKED_BLOCK = "conv2d_packed_int8"
# tiles of 8 output pixels x 16 channels: 8 accumulators of 16 int32 lanes, in registers
PIXEL_TILE = 8
# below this many multiply-accumulates (padded), a kernel runs on one thread: a parallel region
# costs ~0.5-1 µs on this machine, more than these convs gain from a second core (measured: the
# three traffic_signs convs took 3.9/3.8/1.9 µs on one thread, 4.3/4.1/3.1 on two)
PARALLEL_MACS = 4_000_000


def packed_intrin(target) -> str | None:
    """The 16x4 intrinsic the packed conv is tensorized with on ``target``: VNNI where it has
    it, the exact AVX2 one on other AVX2 x86, on aarch64 the exact udot one where it has
    dotprod and the NEON smlal one elsewhere (passes/support/int8_intrin_arm.py), None on
    other CPUs (a plain loop LLVM vectorizes)."""
    import tvm_ffi

    if str(target.kind.name) != "llvm":
        return None
    has = tvm_ffi.get_global_func("target.target_has_feature")
    if has("avx512vnni", target):
        return VNNI
    if has("avx2", target):
        return AVX2
    if str(target.attrs.get("mtriple", "")).startswith("aarch64"):
        return int8_intrin_arm.intrin_for(lambda feature: bool(has(feature, target)))
    return None


def _packed_block(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        sch.get_sblock(PACKED_BLOCK)
    except Exception:  # noqa: BLE001 - not a packed conv kernel
        return None
    return sch


def schedule_packed(func, target):
    """``func`` (a packed int8 conv kernel, possibly with ops fused behind it) scheduled for
    ``target``: output rows x tiles of PIXEL_TILE pixels outermost; in each, the accumulators of
    the tile (on the stack, in registers once unrolled), the reduction over input-channel
    blocks and taps with the tile's pixels and the 16x4 intrinsic innermost, then the
    requantization of the tile, vectorized over its 16 channels. Packing and the NCHW gather
    (or max pool) are loops of their own; ops fused behind are inlined into the gather."""
    sch = _packed_block(func)
    if sch is None:
        return func
    register()
    conv, rq, pack, gather = int8_depthwise.stages(sch, PACKED_BLOCK)
    b, o, y, x, o16, rco, rkh, rkw, rc4 = sch.get_loops(conv)
    ow = int(sch.get(x).extent)
    tile = max(t for t in range(1, min(PIXEL_TILE, ow) + 1) if ow % t == 0)
    x0, x1 = sch.split(x, [None, tile])
    sch.reorder(b, o, y, x0, rco, rkh, rkw, x1, o16, rc4)
    outer = sch.fuse(b, o, y, x0)
    sch.reverse_compute_at(rq, outer)
    macs = 1
    for loop in (outer, rco, rkh, rkw):
        macs *= int(sch.get(loop).extent)
    if macs * tile * 64 >= PARALLEL_MACS:
        # before tensorize: the blockized intrinsic block is neither a complete nor a reduction
        # block, and 'parallel' refuses a loop over it (every conv past PARALLEL_MACS failed)
        sch.parallel(outer)
        sch.parallel(sch.fuse(*sch.get_loops(pack)[:3]))
        sch.parallel(sch.fuse(*sch.get_loops(gather)[:2]))
    init = sch.decompose_reduction(conv, rco)
    intrin = packed_intrin(target)
    if intrin is not None:
        sch.tensorize(o16, intrin)
    else:  # the 4-deep reduction unrolled around the 16 channels, which LLVM vectorizes (a
        # reduction block's loop takes no vectorize annotation)
        sch.reorder(rc4, o16)
        sch.unroll(rc4)
    sch.unroll(x1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(rq)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_packed_convs(mod, target):
    """``mod`` with each packed int8 conv kernel replaced by :func:`schedule_packed` (CPU
    targets; others are left to their own pipeline)."""
    from tvm import tirx

    if str(target.kind.name) != "llvm":
        return mod
    done = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled")):
            g = schedule_packed(f, target)
            if g.same_as(f):  # the packed depthwise conv: its own schedule, vectorized over channels
                g = int8_depthwise.schedule(f, PARALLEL_MACS)
            if not g.same_as(f):
                done[gv] = g
    for gv, g in done.items():
        mod[gv] = g
    return mod
