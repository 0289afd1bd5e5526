"""The packed int8 depthwise conv (groups == channels, one filter per channel): the kernel
relax_int8 emits for it and its fixed schedule.

A depthwise conv is no dot product over input channels (each output channel reads one input
channel), so the 16x4 dot-product tile of the packed convs (int8_intrin.py: VNNI, AVX2, udot,
NEON) does not fit it. Its reduction is over the kernel taps only (9 for a 3x3), and its
parallelism is in the channels: the layout here puts LANES channels innermost,

    input   [N, ceil(C/16), H', W', 16]   uint8, zero padded (channels and borders: exact)
    weight  [ceil(C/16), KH, KW, 16]      int8 (zeros in the padded channels)
    acc     [N, ceil(C/16), OH, OW, 16]   int32 += int32(x) * int32(w) over (KH, KW)

and the schedule vectorizes over those 16 channels: per tap, one widening multiply-accumulate
of 16 lanes, which LLVM makes of the plain vector loop (x86: ``vpmovzxbd``/``vpmovsxbd`` and
``vpmaddwd``, LLVM knowing both operands fit int16; aarch64: ``smull``/``smlal``/``smlal2``).
Every product of a uint8 code (0..255) and an int8 weight (-128..127) fits in int16 (|p| <=
32640) and the sums are int32: the result is exact, so the library stays bit-exact with the
fake-quant twin on every target whatever instructions LLVM picks. The requantization (bias,
float32 multiplier per channel, round, zero point, clip) is fused in the same kernel, on each
tile's 16 channels while they are in registers, with relax_int8._requantize's arithmetic (same
float32 ops, same order), and the codes are gathered back to NCHW.

Only a uint8 input with zero point 0 (a ReLU's output: every depthwise conv of ds_cnn and
mobilenet_v1) takes this kernel, where zero padding is exact; an int8 input (zero point not
0) stays on relax's grouped conv2d. Channel multipliers other than 1 (groups == C < O) too.
"""

from __future__ import annotations

import numpy as np

from passes.support.int8 import act_range

LANES = 16  # channels per vector block: 16 int32 accumulators = one zmm, two ymm, four q registers
BLOCK = "depthwise_packed_int8"  # the accumulator's block, by which the schedule finds the kernel
NAME = "conv2d_int8_depthwise"  # the kernel's name in the Relax module
PIXEL_TILE = 8  # output pixels per tile (8 x 16 int32 accumulators)


def is_depthwise(attrs, wq: np.ndarray) -> bool:
    """Whether a conv2d (OIHW weight ``wq``) is depthwise with channel multiplier 1."""
    groups = int(attrs.groups)
    return groups > 1 and wq.shape[1] == 1 and wq.shape[0] == groups


def kernel(wq: np.ndarray, bias: np.ndarray, mult: np.ndarray, strides, dilation, padding,
           zp_out: int, relu: bool, out_dtype: str):
    """(TE function of (x, packed weight, bias, multiplier) -> NCHW codes, its constant
    arguments (the weight packed, bias and multiplier padded to whole blocks))."""
    from tvm import te, tirx

    channels, _, kh, kw = wq.shape
    blocks = -(-channels // LANES)
    wpad = np.zeros((blocks * LANES, kh, kw), np.int8)
    wpad[:channels] = wq[:, 0]
    wpack = np.ascontiguousarray(wpad.reshape(blocks, LANES, kh, kw).transpose(0, 2, 3, 1))  # [C/16, KH, KW, 16]
    b = np.zeros(blocks * LANES, np.int32)
    b[:channels] = bias
    m = np.zeros(blocks * LANES, np.float32)
    m[:channels] = np.broadcast_to(np.asarray(mult, np.float32).reshape(-1), (channels,))
    (sh, sw), (dh, dw) = [int(v) for v in strides], [int(v) for v in dilation]
    top, left, bottom, right = [int(p) for p in padding]
    qmin, qmax = act_range(out_dtype)
    lo = max(qmin, zp_out) if relu else qmin

    def compute(x, w_t, b_t, m_t):
        n, _, h, wd = x.shape
        hp, wp = h + top + bottom, wd + left + right
        oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1

        def pack(bb, cb, y, xx, lane):
            c, yy, xi = cb * LANES + lane, y - top, xx - left
            inside = tirx.all(c < channels, yy >= 0, yy < h, xi >= 0, xi < wd)
            return tirx.if_then_else(inside, x[bb, tirx.min(c, channels - 1), yy, xi], tirx.const(0, "uint8"))

        xp = te.compute((n, blocks, hp, wp, LANES), pack, name="data_packed")
        rkh, rkw = te.reduce_axis((0, kh), "rkh"), te.reduce_axis((0, kw), "rkw")
        # widened to int32 and multiplied: LLVM makes vpmaddwd of it on x86 (operands known
        # to fit int16) and smull/smlal on aarch64; int16 products (vpmullw + widening adds, mul
        # + saddw) measured ~1.3x slower on x86-host
        acc = te.compute(
            (n, blocks, oh, ow, LANES),
            lambda bb, cb, y, xx, lane: te.sum(
                xp[bb, cb, y * sh + rkh * dh, xx * sw + rkw * dw, lane].astype("int32")
                * w_t[cb, rkh, rkw, lane].astype("int32"), axis=[rkh, rkw]),
            name=BLOCK)

        def requant(bb, cb, y, xx, lane):
            c = cb * LANES + lane
            v = tirx.round((acc[bb, cb, y, xx, lane] + b_t[c]).astype("float32") * m_t[c])
            if zp_out:
                v = v + tirx.const(float(zp_out), "float32")
            v = tirx.max(tirx.min(v, tirx.const(float(qmax), "float32")), tirx.const(float(lo), "float32"))
            return v.astype(out_dtype)

        codes = te.compute((n, blocks, oh, ow, LANES), requant, name="requantize")
        return te.compute((n, channels, oh, ow), lambda bb, c, y, xx: codes[bb, c // LANES, y, xx, c % LANES],
                          name="to_nchw")

    return compute, (wpack, b, m)


def _block(func):
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    try:
        sch.get_sblock(BLOCK)
    except Exception:  # noqa: BLE001 - not a depthwise kernel
        return None
    return sch


def stages(sch, block: str):
    """The blocks of a packed int8 kernel (this depthwise one, int8_intrin's packed convs): the
    accumulation ``block``, its requantization, the input's packing and the gather behind (back
    to NCHW, or a max pool); ops fused behind the gather (a cast) are inlined into it."""
    conv = sch.get_sblock(block)
    rq = sch.get_consumers(conv)[0]
    (pack,) = [p for p in sch.get_producers(conv) if sch.get(p).name_hint == "data_packed"]
    gather = sch.get_consumers(rq)[0]
    for c in sch.get_consumers(gather):  # a cast fused behind: computed where the gather writes
        try:
            sch.reverse_compute_inline(c)
        except Exception:  # noqa: BLE001 - left as a loop of its own
            pass
    return conv, rq, pack, gather


def schedule(func, parallel_macs: int):
    """``func`` (a depthwise kernel, possibly with ops fused behind it) scheduled: output rows x
    tiles of up to PIXEL_TILE pixels outermost; in each, the tile's accumulators, the taps, the
    tile's pixels (unrolled) and the 16 channels (vectorized) innermost, then the tile's
    requantization, vectorized over its 16 channels. Packing and the NCHW gather are loops of
    their own; ops fused behind are inlined into the gather. Parallel over the outer loop when
    the kernel has ``parallel_macs`` multiply-accumulates or more. The same for every CPU."""
    sch = _block(func)
    if sch is None:
        return func
    conv, rq, pack, gather = stages(sch, BLOCK)
    b, cb, y, x, lane, rkh, rkw = sch.get_loops(conv)
    ow = int(sch.get(x).extent)
    tile = max(t for t in range(1, min(PIXEL_TILE, ow) + 1) if ow % t == 0)
    x0, x1 = sch.split(x, [None, tile])
    sch.reorder(b, cb, y, x0, rkh, rkw, x1, lane)
    outer = sch.fuse(b, cb, y, x0)
    sch.reverse_compute_at(rq, outer)
    macs = 1
    for loop in (outer, rkh, rkw):
        macs *= int(sch.get(loop).extent)
    if macs * tile * LANES >= parallel_macs:
        sch.parallel(outer)
        sch.parallel(sch.fuse(*sch.get_loops(pack)[:3]))
        sch.parallel(sch.fuse(*sch.get_loops(gather)[:2]))
    # before decompose_reduction: its update block is no reduction block, and vectorize
    # refuses a loop over it
    sch.vectorize(lane)
    init = sch.decompose_reduction(conv, rkh)
    sch.unroll(x1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(rq)[-1])
    sch.vectorize(sch.get_loops(pack)[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
