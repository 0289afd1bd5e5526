"""Kiln's aarch64 int8 tensor intrinsics for the packed int8 conv's 16x4 tile.

The tile is the one of passes/support/int8_intrin.py (``_emit_packed`` lays the conv out for
it)::

    C[i] (int32) += sum_{k<4} A[k] (uint8) * B[i, k] (int8)      for i < 16

and like the x86 ones they must be exact, so a library stays bit-exact with the fake-quant twin.

``kiln_dot_16x4_udot`` (aarch64 with the dot-product extension, ``+dotprod``: Cortex-A55,
A76, ...). ``udot`` multiplies unsigned by unsigned bytes and ``sdot`` signed by signed; the
tile mixes uint8 activations with int8 weights, and ``usdot``, which would take them as they
are, needs i8mm, which those CPUs lack. So the weights are made unsigned with an identity:
flipping the sign bit of an int8 ``b`` gives the uint8 ``b + 128``, hence::

    sum_k A[k] * B[i, k] = udot(A, B[i] ^ 0x80) - 128 * sum_k A[k]

and ``128 * sum_k A[k]`` is itself one ``udot`` of A against bytes of 128. Every term is
exact: a ``udot`` lane sums four products of at most 255 x 255 into int32 (no saturating step,
unlike x86's ``vpmaddubsw``), and the correction is at most 128 x 1020. Per tile: the 4
activation bytes broadcast to every 32-bit lane (``ld1r``), one ``udot`` for the correction,
then per 4 output channels (16 weight bytes, contiguous in the packed layout) a ``sub`` and a
``udot``; the ``eor`` depends on the weights only, so LLVM does it once for the tile's 8
pixels. (The other identity, A - 128 as int8 with ``sdot``, needs a correction per output
channel, ``128 * sum_k B[i, k]``: 4 more dot products where this needs one.)

``kiln_dot_16x4_neon`` (aarch64 without dotprod: rpi4's Cortex-A72, rpi3's A53): both
operands widened to int16 (uint8 activations fit), 16 ``smlal`` by element into the int32
accumulators, exact. Kept because LLVM does not make smlal-class code of the plain loop (the
measurements are in the comment under ``NEON`` below).

Nothing here is copied from TVM's arm_cpu tables (its 4x4 dot intrinsics take int8 x int8 or
uint8 x uint8, not this tile).
"""

from __future__ import annotations

UDOT = "kiln_dot_16x4_udot"
NEON = "kiln_dot_16x4_neon"
# Why NEON is not left to LLVM (the plain loop of int8_intrin.schedule_packed): measured on
# tests/passes/test_int8_graphs.py's resblock, its 8 -> 8 channel 3x3 conv built for rpi4
# (cortex-a72, aarch64-linux-gnu-objdump of the .so). One iteration of the innermost loop is
# 8 pixels x 16 x 4 = 512 multiply-accumulates:
#   plain loop   1285 instructions: scalar (364 madd, 64 ldrsb, 288 mov lane moves, spills);
#   this one      316: 96 smlal/smlal2 + 32 smull/smull2, the weights' widening done once
#                 for the 8 pixels (the byte deinterleave of B is lane moves, not ld4: LLVM
#                 folds the shuffles through the widening);
#   (udot, rpi5   120: 40 udot, 36 sub.)
# Under qemu-user (not a board timing) a 16 -> 48 channel ResBlock at 12x12, one thread,
# median of 20: plain 11.0 ms, this 9.2 ms on -cpu cortex-a72; plain 10.4 ms, udot 3.9 ms
# on -cpu cortex-a76; outputs identical.
_UDOT_LLVM = "llvm.aarch64.neon.udot.v4i32.v16i8"
_registered = False


def _udot_impl():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def udot(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            # (inline expressions: a named value would become a "local" buffer, which this TVM
            # allocates with TVMBackendAllocWorkspace on every call)
            # per 4 outputs j: C[4j:4j+4] = udot(C - 128 * sum(A), A x 4, (B rows 4j..4j+3) ^ 0x80)
            for j in range(4):
                C[T.ramp(j * 4, 1, 4)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(_UDOT_LLVM),
                    C.vload([j * 4], dtype="int32x4") - T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(_UDOT_LLVM), T.broadcast(T.int32(0), 4),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 4),
                                      dtype="uint8x16"),
                        T.broadcast(T.uint8(128), 16), dtype="int32x4"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 4),
                                  dtype="uint8x16"),
                    T.bitwise_xor(T.reinterpret(B.vload([j * 4, 0], dtype="int8x16"), dtype="uint8x16"),
                                  T.broadcast(T.uint8(128), 16)),
                    dtype="int32x4")

    return udot


def _neon_impl():
    """16 ``smlal`` by element: C[4q:4q+4] += B[4q:4q+4, k] (int8 -> int16) * A[k] (uint8 ->
    int16, exact: 255 fits) for k < 4, q < 4. B's rows hold k innermost, so its 64 bytes are
    loaded once and deinterleaved into the 4 columns B[:, k] (LLVM makes lane moves of it, not
    one ``ld4``: see the note under ``NEON``)."""
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name("kiln_neon_16x4")
            A = T.arg("A", T.buffer((4,), "uint8", offset_factor=1))
            B = T.arg("B", T.buffer((16, 4), "int8", offset_factor=1))
            C = T.arg("C", T.buffer((16,), "int32", offset_factor=1))
            with T.sblock("root"):
                T.reads(C[0:16], A[0:4], B[0:16, 0:4])
                T.writes(C[0:16])
                a = T.Cast("int16x4", A.vload([0], "uint8x4"))
                b = B.vload([0, 0], "int8x64")
                # column k: B[0:16, k], widened (sshll, sshll2)
                cols = [T.Cast("int16x16", T.Shuffle([b], [4 * i + k for i in range(16)])) for k in range(4)]
                for q in range(4):
                    acc = C.vload([q * 4], "int32x4")
                    for k in range(4):
                        acc = acc + T.call_llvm_pure_intrin(
                            "int32x4", "llvm.aarch64.neon.smull.v4i32",
                            T.Shuffle([cols[k]], list(range(4 * q, 4 * q + 4))), T.Shuffle([a], [k] * 4))
                    T.buffer_store(C, acc, [T.ramp(q * 4, 1, 4)])
    return ib.get()


def register(desc) -> None:
    """Register the aarch64 intrinsic against ``desc`` (int8_intrin's 16x4 tile description,
    shared so every intrinsic provably computes the same tile); idempotent."""
    global _registered
    if _registered:
        return
    from tvm.s_tir import TensorIntrin

    TensorIntrin.register(UDOT, desc, _udot_impl(), override=True)
    TensorIntrin.register(NEON, desc, _neon_impl(), override=True)
    _registered = True


def intrin_for(has_feature) -> str | None:
    """The aarch64 16x4 intrinsic for a target whose features ``has_feature(name)`` answers:
    UDOT with dotprod, else NEON (None without NEON: the plain loop)."""
    if has_feature("dotprod"):
        return UDOT
    return NEON if has_feature("neon") else None
