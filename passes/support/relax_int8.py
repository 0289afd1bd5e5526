"""Relax rewrite: lower the int8 QDQ patterns of an imported ONNX model to integer kernels.

The ONNX frontend turns a QDQ model (passes/support/onnx_export.py) into float ops between
``R.dequantize`` and ``R.quantize``. Left alone, the default pipeline would run them in float,
and FoldConstant would fold ``dequantize(int8 weight)`` into fp32 constants: the library would
hold fp32 weights again. :func:`lower` rewrites, with Relax's dataflow pattern language:

Activations are 8-bit per tensor (passes/support/int8.py): ``uint8`` with zero point 0 where the
tensor cannot be negative (the input image, every ReLU output, what pools them), else ``int8``
asymmetric; weights are symmetric ``int8`` per output channel.

* conv:  ``quantize(relu?(conv2d(dequantize(xq), dequantize(Wq)) + dequantize(Bq)?))`` ->
  ``conv2d(xq, Wq, padding, out_dtype=int32) + B'`` (uint8/int8 x int8 -> int32), then
  requantize: ``astype(float32) * M``, ``round``, ``+ zp_out``, ``clip`` to the output dtype's
  range (the ReLU is the lower clip bound), ``astype(uint8 | int8)``, with one float32
  multiplier ``M = s_x * s_w / s_out`` per output channel. With zero point 0 (uint8), padding
  with 0 is exact: the conv's own padding is used, and legalization puts it inside the conv
  kernel. An input with a nonzero zero point (int8) is first padded explicitly with it (a
  separate pad kernel) and ``B'`` is the int32 bias minus ``zp_x * sum(Wq)``. A uint8 (zero
  point 0) conv is one packed kernel instead: the dot-product tile (:meth:`_emit_packed`), or
  for a depthwise conv (groups == channels) passes/support/int8_depthwise.py's, channels
  innermost, the requantization fused in both;
* dense: ``matmul(dequantize(xq), permute_dims(dequantize(Wq))) + bias`` -> ``matmul(xq, Wq^T,
  out_dtype=int32) + B'``, requantized to 8 bits, or to float logits (``* s_x * s_w``);
* add / sub: ``quantize(relu?(add | subtract(dequantize(a), dequantize(b))))`` -> integer
  fixed point in int64: ``((a - za) * Ma +- (b - zb) * Mb + 2^(S-1)) >> S + zp``, clipped
  (int8.py add_multipliers): no float op, so no platform's fused multiply-add changes a code;
* mul: ``quantize(relu?(multiply(dequantize(a), dequantize(b))))`` -> ``(a - za) * (b - zb)``
  in int32 (exact), ``astype(float32) * M``, round, + zp, clip (one float op: exact IEEE);
* sigmoid / tanh: ``quantize(sigmoid | tanh(dequantize(xq)))`` -> ``take(table, xq - qmin)``,
  the 256-entry table (int8.py lut) computed from the same float32 scales as the twin's;
  hard-sigmoid / hard-swish come as that table already (the export writes an ONNX Gather on
  the codes), taken in "clip" mode;
* data movement: ``quantize(op(dequantize(xq), ...))`` with the same parameters, ``op`` one of
  MOVE_OPS (what the frontend makes of MaxPool, Slice, Squeeze, Reshape, Flatten, Gather,
  Transpose, Unsqueeze) -> the op on the 8-bit codes; ``quantize(relu(dequantize(xq)))`` with
  the same parameters -> ``maximum(xq, zp)``; ``quantize(mean(dequantize(xq)))`` -> an integer
  sum and one multiply; ``quantize(dequantize(xq))`` with the same parameters -> ``xq``; a
  ``dequantize`` of codes left at the end (a model whose output is 8-bit) -> ``(q - zp) * s``;
* weight-only: ``relu?(conv2d | matmul (x, dequantize(Wq)) + bias?)`` with float ``x`` -> one
  TE kernel (``call_tir``) that dequantizes the int8 weight inside it, so the library keeps
  int8 weights.

What the rewrite leaves is ordinary Relax (conv2d/matmul with ``out_dtype="int32"``,
elementwise ops, plain TE kernels): legalization, fusion and MetaSchedule treat it like any
other model. Kiln's torch twin (passes/support/int8.py) computes with the same formulas and the
same float32 multipliers (:func:`requant_multiplier`), so it predicts this library's outputs.
A module without QDQ ops is returned as is.
"""

from __future__ import annotations

import numpy as np

from passes.support import int8_depthwise
from passes.support.int8 import ACT_RANGE, act_range, add_multipliers, lut, mul_multiplier, requant_multiplier

# data-movement ops of the ONNX frontend that work on codes unchanged (Slice, Squeeze, Reshape,
# Flatten, Gather, Transpose, Unsqueeze, MaxPool)
MOVE_OPS = ("relax.nn.max_pool2d", "relax.reshape", "relax.flatten", "relax.strided_slice", "relax.squeeze",
            "relax.take", "relax.permute_dims", "relax.expand_dims")


# the blocked layout of the packed int8 conv: 16 output channels x 4 input channels, the tile
# of vpdpbusd (dot_16x4_vnni) and of Kiln's AVX2 intrinsic
OC_BLOCK, IC_BLOCK = 16, 4


class _Skip(Exception):
    """A matched pattern this lowering does not handle: leave the expression as it is."""


def _in_out(orig, xq, x):
    """(8-bit output dtype, (scale, zero point) of the input, of the output) of a matched
    ``quantize(op(dequantize(xq)))``; _Skip unless both sides are 8-bit per-tensor."""
    _act_dtype(xq)
    out_dtype = str(orig.attrs.out_dtype)
    if out_dtype not in ACT_RANGE:
        raise _Skip
    return out_dtype, _per_tensor(x), _per_tensor(orig)


def _or_original(rewriter):
    """``rewriter`` that returns the matched expression unchanged when it raises _Skip."""

    def rewrite(orig, m):
        try:
            return rewriter(orig, m)
        except _Skip:
            return orig

    return rewrite


def _np(expr) -> np.ndarray:
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        raise _Skip
    return expr.value.numpy()


def _qparams(call) -> tuple[np.ndarray, np.ndarray, int]:
    """(scale, zero point, axis) of a quantize/dequantize call with constant parameters."""
    return _np(call.args[1]).astype(np.float32), _np(call.args[2]), int(call.attrs.axis)


def _per_tensor(call) -> tuple[float, int]:
    scale, zp, _ = _qparams(call)
    if scale.size != 1 or zp.size != 1:
        raise _Skip
    return float(scale.reshape(())), int(zp.reshape(()))


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _weight(dq_call, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, per-output-channel scale) of ``dequantize(Wq)`` with symmetric int8 weights,
    the scales along ``out_axis`` (or one per tensor)."""
    wq = _np(dq_call.args[0])
    scale, zp, axis = _qparams(dq_call)
    if wq.dtype != np.int8 or np.any(zp != 0) or (scale.size != 1 and (axis % wq.ndim) != out_axis):
        raise _Skip
    out = wq.shape[out_axis]
    return wq, np.broadcast_to(scale.reshape(-1), (out,)).astype(np.float32).copy()


def _bias(expr, matched_dq, acc_scale: np.ndarray) -> np.ndarray:
    """int32 bias per output channel on the accumulator scale: an int32 ``dequantize`` whose
    scale is the accumulator's is taken as it is, a float constant is rounded onto it."""
    out = acc_scale.size
    if matched_dq is not None:
        bq = _np(matched_dq.args[0])
        scale, zp, _ = _qparams(matched_dq)
        if bq.dtype == np.int32 and np.all(zp == 0) and np.allclose(scale.reshape(-1), acc_scale, rtol=1e-6, atol=0):
            values = bq.astype(np.int64)
        else:
            values = np.round((bq.astype(np.float64) - zp) * scale.astype(np.float64) / acc_scale)
    else:
        values = np.round(_np(expr).astype(np.float64) / acc_scale) if expr is not None else np.zeros(out)
    values = np.asarray(values).reshape(-1)
    if values.size == 1:
        values = np.broadcast_to(values, (out,))
    if values.size != out:
        raise _Skip
    return values.astype(np.int64)


def _int32(values: np.ndarray) -> np.ndarray:
    if np.abs(values).max(initial=0) >= 2**31:
        raise _Skip
    return values.astype(np.int32)


def _requantize(acc, mult: np.ndarray, shape: tuple[int, ...], zp_out: int | None, relu: bool,
                dtype: str = "int8"):
    """int32 accumulator -> ``dtype`` (uint8/int8, ``zp_out`` given) or float32: astype,
    multiply, round, + zero point, clip to the dtype's range (the ReLU raises the lower bound)."""
    from tvm import relax

    y = relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(mult.reshape(shape), "float32"))
    if zp_out is None:
        return relax.op.nn.relu(y) if relu else y
    qmin, qmax = act_range(dtype)
    y = relax.op.round(y)
    if zp_out:
        y = relax.op.add(y, relax.const(np.float32(zp_out)))
    lo = max(qmin, zp_out) if relu else qmin
    y = relax.op.clip(y, float(lo), float(qmax))
    return relax.op.astype(y, dtype)


def _clip_int(y, dtype: str, zp_out: int, relu: bool):
    """Integer codes clipped to ``dtype``'s range (from the zero point up after a ReLU), cast."""
    from tvm import relax

    qmin, qmax = act_range(dtype)
    lo = max(qmin, zp_out) if relu else qmin
    y = relax.op.maximum(y, relax.const(lo, "int64"))
    y = relax.op.minimum(y, relax.const(qmax, "int64"))
    return relax.op.astype(y, dtype)


def _act_dtype(expr) -> str:
    """The 8-bit activation dtype of ``expr`` (uint8 or int8); _Skip for any other."""
    dtype = _dtype(expr)
    if dtype not in ACT_RANGE:
        raise _Skip
    return dtype


# ---------------------------------------------------------------------------------------------
# patterns


def _dq(x=None):
    from tvm.relax.dpl import is_const, is_op, wildcard

    return is_op("relax.dequantize")(x if x is not None else wildcard(), is_const(), is_const())


def _const_dq():
    from tvm.relax.dpl import is_const

    return _dq(is_const())


class _Rewrites:
    """The patterns and their rewriters (each returns the pattern and its rewriter)."""

    def __init__(self, bb):
        self.bb = bb  # a BlockBuilder on the module: it adds the new kernels under unique names
        self._packed: dict = {}  # packed conv kernel (GlobalVar) -> what built it (pool_into_conv)

    # -- conv2d + bias + relu + quantize ------------------------------------------------------
    def conv_int8(self):
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq, w = wildcard(), _const_dq()
        x = _dq(xq)
        conv = is_op("relax.nn.conv2d")(x, w)
        b_dq = _const_dq()
        b_val = b_dq | is_const()
        b = is_op("relax.reshape")(b_val, wildcard()) | b_val
        add = is_op("relax.add")(conv, b)
        relu = is_op("relax.nn.relu")(add | conv)
        root = is_op("relax.quantize")(relu | add | conv, is_const(), is_const())

        def rewrite(orig, m):
            attrs = m[conv].attrs
            if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW":
                raise _Skip
            out_dtype, (s_x, zp_x), (s_out, zp_out) = _in_out(orig, m[xq], m[x])
            wq, s_w = _weight(m[w], 0)
            acc_scale = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)
            bias = np.zeros(len(s_w), np.int64)
            if add in m:
                bias = _bias(m[b_val] if b_dq not in m else None, m.get(b_dq), acc_scale)
            bias = _int32(bias - zp_x * wq.reshape(len(s_w), -1).astype(np.int64).sum(1))
            data, padding = m[xq], [int(p) for p in attrs.padding]
            mult = requant_multiplier(s_x, s_w, s_out)
            if int(attrs.groups) == 1 and _dtype(data) == "uint8" and zp_x == 0:
                return self._packed_conv(data, wq, bias, mult, attrs, padding, zp_out, relu in m, out_dtype)
            if int8_depthwise.is_depthwise(attrs, wq) and _dtype(data) == "uint8" and zp_x == 0:
                return self._depthwise_conv(data, wq, bias, mult, attrs, padding, zp_out, relu in m, out_dtype)
            if zp_x != 0 and any(padding):  # pad with the zero point, the code of 0.0 (int8 only)
                top, left, bottom, right = padding
                data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zp_x))
                padding = [0, 0, 0, 0]
            acc = relax.op.nn.conv2d(data, relax.const(wq, "int8"), strides=attrs.strides, padding=padding,
                                     dilation=attrs.dilation, groups=attrs.groups, out_dtype="int32")
            acc = relax.op.add(acc, relax.const(bias.reshape(1, -1, 1, 1), "int32"))
            return _requantize(acc, mult, (1, -1, 1, 1), zp_out, relu in m, out_dtype)

        return root, rewrite

    def _packed_conv(self, data, wq: np.ndarray, bias: np.ndarray, mult: np.ndarray, attrs, padding: list[int],
                     zp_out: int, relu: bool, out_dtype: str):
        """The conv as one packed int8 kernel (:meth:`_emit_packed`); remembered, so that a
        max pool on its output can be folded in (:meth:`pool_into_conv`)."""
        spec = {"data": data, "wq": wq, "bias": bias, "mult": np.broadcast_to(mult.reshape(-1), (wq.shape[0],)),
                "strides": [int(v) for v in attrs.strides], "dilation": [int(v) for v in attrs.dilation],
                "padding": padding, "zp_out": zp_out, "relu": relu, "out_dtype": out_dtype}
        return self._emit_packed(spec, None)

    def _depthwise_conv(self, data, wq: np.ndarray, bias: np.ndarray, mult: np.ndarray, attrs, padding: list[int],
                        zp_out: int, relu: bool, out_dtype: str):
        """A depthwise conv (uint8 input, zero point 0) as one packed kernel with its
        requantization fused (passes/support/int8_depthwise.py)."""
        from tvm import relax

        compute, consts = int8_depthwise.kernel(wq, bias, mult, attrs.strides, attrs.dilation, padding, zp_out,
                                                relu, out_dtype)
        args = [data, relax.const(consts[0], "int8"), relax.const(consts[1], "int32"), relax.const(consts[2], "float32")]
        prim, call_args, out_ty = relax.utils.gen_call_tir_inputs(compute, *args)
        return relax.call_tir(self.bb.add_func(prim, int8_depthwise.NAME), call_args, out_ty)

    def _emit_packed(self, spec: dict, pool: tuple[int, int, int, int] | None):
        """One kernel: uint8 x int8 conv in the blocked layout of the x86/ARM dot-product
        intrinsics, with its bias and requantization (and a max pool ``(kh, kw, sh, sw)`` of
        its output, unpadded), NCHW in and out.

        Inside: the input is padded and packed to ``[N, ceil(C/4), H', W', 4]`` (zeros in the
        padded channels, exact), the weight (a constant, packed here) is ``[ceil(O/16),
        ceil(C/4), KH, KW, 16, 4]``, and the int32 accumulator ``[N, ceil(O/16), OH, OW, 16]``
        sums over (C/4, KH, KW, 4) with the 4-deep channel reduction innermost next to 16
        output channels: exactly the shape of ``dot_16x4_vnni`` (vpdpbusd: 16 int32 lanes += 4
        uint8 x int8 products each, exact), which MetaSchedule's x86 rules tensorize on a VNNI
        target, and of Kiln's AVX2 intrinsic (passes/support/int8_intrin.py). The requantize
        epilogue is element by element in the same blocked layout (MetaSchedule fuses it into
        the conv's tiles) and is _requantize's arithmetic (same float32 ops, same order): the
        library stays bit-exact with the fake-quant twin. Last, the 8-bit codes are gathered
        back to NCHW, through the max pool's window when one is folded in (max commutes with
        the monotone requantization, so pooling codes is what the graph computed)."""
        from functools import reduce

        from tvm import relax, te, tirx

        wq, relu, out_dtype, zp_out = spec["wq"], spec["relu"], spec["out_dtype"], spec["zp_out"]
        out_c, in_c, kh, kw = wq.shape
        oc_blocks, ic_blocks = -(-out_c // OC_BLOCK), -(-in_c // IC_BLOCK)
        wpad = np.zeros((oc_blocks * OC_BLOCK, ic_blocks * IC_BLOCK, kh, kw), np.int8)
        wpad[:out_c, :in_c] = wq
        # [O/16, 16, C/4, 4, KH, KW] -> [O/16, C/4, KH, KW, 16, 4]
        wpack = wpad.reshape(oc_blocks, OC_BLOCK, ic_blocks, IC_BLOCK, kh, kw).transpose(0, 2, 4, 5, 1, 3)
        bias = np.zeros(oc_blocks * OC_BLOCK, np.int32)
        bias[:out_c] = spec["bias"]
        mult = np.zeros(oc_blocks * OC_BLOCK, np.float32)
        mult[:out_c] = spec["mult"]
        (sh, sw), (dh, dw) = spec["strides"], spec["dilation"]
        top, left, bottom, right = spec["padding"]
        qmin, qmax = act_range(out_dtype)
        lo = max(qmin, zp_out) if relu else qmin

        def kernel(x, w_t, b_t, m_t):
            n, _, h, wd = x.shape
            hp, wp = h + top + bottom, wd + left + right
            oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1

            def pack(b, co, y, xx, c4):
                c, yy, xi = co * IC_BLOCK + c4, y - top, xx - left
                inside = tirx.all(c < in_c, yy >= 0, yy < h, xi >= 0, xi < wd)
                return tirx.if_then_else(inside, x[b, tirx.min(c, in_c - 1), yy, xi], tirx.const(0, "uint8"))

            xp = te.compute((n, ic_blocks, hp, wp, IC_BLOCK), pack, name="data_packed")
            rco, rkh, rkw, rc4 = (te.reduce_axis((0, ic_blocks), "rco"), te.reduce_axis((0, kh), "rkh"),
                                  te.reduce_axis((0, kw), "rkw"), te.reduce_axis((0, IC_BLOCK), "rc4"))
            acc = te.compute(
                (n, oc_blocks, oh, ow, OC_BLOCK),
                lambda b, o, y, xx, o16: te.sum(
                    xp[b, rco, y * sh + rkh * dh, xx * sw + rkw * dw, rc4].astype("int32")
                    * w_t[o, rco, rkh, rkw, o16, rc4].astype("int32"), axis=[rco, rkh, rkw, rc4]),
                name="conv2d_packed_int8")

            def requant(b, o, y, xx, o16):
                c = o * OC_BLOCK + o16
                v = tirx.round((acc[b, o, y, xx, o16] + b_t[c]).astype("float32") * m_t[c])
                if zp_out:
                    v = v + tirx.const(float(zp_out), "float32")
                v = tirx.max(tirx.min(v, tirx.const(float(qmax), "float32")), tirx.const(float(lo), "float32"))
                return v.astype(out_dtype)

            codes = te.compute((n, oc_blocks, oh, ow, OC_BLOCK), requant, name="requantize")
            if pool is None:
                return te.compute((n, out_c, oh, ow),
                                  lambda b, c, y, xx: codes[b, c // OC_BLOCK, y, xx, c % OC_BLOCK], name="to_nchw")
            pkh, pkw, psh, psw = pool
            return te.compute(
                (n, out_c, (oh - pkh) // psh + 1, (ow - pkw) // psw + 1),
                lambda b, c, y, xx: reduce(tirx.max, [codes[b, c // OC_BLOCK, y * psh + i, xx * psw + j, c % OC_BLOCK]
                                                      for i in range(pkh) for j in range(pkw)]),
                name="max_pool_to_nchw")

        args = [spec["data"], relax.const(wpack, "int8"), relax.const(bias, "int32"), relax.const(mult, "float32")]
        prim, call_args, out_ty = relax.utils.gen_call_tir_inputs(kernel, *args)
        gv = self.bb.add_func(prim, "conv2d_int8_packed" + ("_max_pool" if pool else ""))
        self._packed[gv] = spec
        return relax.call_tir(gv, call_args, out_ty)

    def pool_into_conv(self):
        """max_pool2d(packed int8 conv) -> one kernel with the pool folded in (no padding,
        dilation 1, floor mode, NCHW; windows up to 4x4): one parallel region and one call
        fewer, and the conv's codes never leave the cache."""
        from tvm.relax.dpl import is_op, wildcard

        conv = is_op("relax.call_tir")(wildcard(), wildcard())
        root = is_op("relax.nn.max_pool2d")(conv)

        def rewrite(orig, m):
            spec = self._packed.get(m[conv].args[0])
            a = orig.attrs
            if (spec is None or any(int(p) for p in a.padding) or any(int(d) != 1 for d in a.dilation)
                    or bool(a.ceil_mode) or a.layout != "NCHW" or (a.out_layout or "NCHW") != "NCHW"):
                raise _Skip
            (pkh, pkw), (psh, psw) = [int(v) for v in a.pool_size], [int(v) for v in a.strides]
            if pkh * pkw > 16:
                raise _Skip
            # the conv's input as the graph has it now (later rewrites may have rebound it)
            return self._emit_packed({**spec, "data": m[conv].args[1].fields[0]}, (pkh, pkw, psh, psw))

        return root, rewrite

    # -- dense ---------------------------------------------------------------------------------
    def _dense_parts(self):
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        w = _const_dq()
        wt = is_op("relax.permute_dims")(w)
        mm = is_op("relax.matmul")(x, wt | w)
        b_dq = _const_dq()
        b_val = b_dq | is_const()
        add = is_op("relax.add")(mm, b_val)
        return xq, x, w, wt, mm, b_dq, b_val, add

    def _dense(self, orig, m, parts, relu: bool, out_q):
        from tvm import relax

        xq, x, w, wt, mm, b_dq, b_val, add = parts
        _act_dtype(m[xq])
        if len(m[xq].ty.shape) != 2:
            raise _Skip
        s_x, zp_x = _per_tensor(m[x])
        if wt in m:
            axes = m[wt].attrs.axes
            if axes is not None and [int(a) for a in axes] != [1, 0]:
                raise _Skip
            wq, s_w = _weight(m[w], 0)
            wq = np.ascontiguousarray(wq.T)  # [in, out]
        else:
            wq, s_w = _weight(m[w], 1)
        if wq.ndim != 2:
            raise _Skip
        acc_scale = (np.float64(s_x) * s_w.astype(np.float64)).astype(np.float32)
        bias = np.zeros(len(s_w), np.int64)
        if add in m:
            bias = _bias(m[b_val] if b_dq not in m else None, m.get(b_dq), acc_scale)
        bias = _int32(bias - zp_x * wq.astype(np.int64).sum(0))
        acc = relax.op.matmul(m[xq], relax.const(wq, "int8"), out_dtype="int32")
        acc = relax.op.add(acc, relax.const(bias.reshape(1, -1), "int32"))
        if out_q is None:
            return _requantize(acc, acc_scale, (1, -1), None, relu)
        s_out, zp_out = _per_tensor(out_q)
        out_dtype = str(out_q.attrs.out_dtype)
        return _requantize(acc, requant_multiplier(s_x, s_w, s_out), (1, -1), zp_out, relu, out_dtype)

    def dense_int8(self):
        from tvm.relax.dpl import is_const, is_op

        parts = self._dense_parts()
        mm, add = parts[4], parts[7]
        relu = is_op("relax.nn.relu")(add | mm)
        root = is_op("relax.quantize")(relu | add | mm, is_const(), is_const())

        def rewrite(orig, m):
            if str(orig.attrs.out_dtype) not in ACT_RANGE:
                raise _Skip
            return self._dense(orig, m, parts, relu in m, orig)

        return root, rewrite

    def dense_float_out(self, with_bias: bool):
        parts = self._dense_parts()
        root = parts[7] if with_bias else parts[4]

        def rewrite(orig, m):
            return self._dense(orig, m, parts, False, None)

        return root, rewrite

    # -- int8 data movement and pooling ---------------------------------------------------------
    def same_params(self):
        """quantize(max_pool2d | reshape | flatten (dequantize(xq))) with unchanged parameters."""
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        pool = is_op("relax.nn.max_pool2d")(x)
        reshape = is_op("relax.reshape")(x, wildcard())
        root = is_op("relax.quantize")(pool | reshape | x, is_const(), is_const())

        def rewrite(orig, m):
            if _dtype(m[xq]) != orig.attrs.out_dtype or _per_tensor(m[x]) != _per_tensor(orig):
                raise _Skip
            if pool in m:
                a = m[pool].attrs
                return relax.op.nn.max_pool2d(m[xq], a.pool_size, a.strides, a.padding, a.dilation, a.ceil_mode,
                                              a.count_include_pad, a.layout, a.out_layout)
            if reshape in m:
                return relax.op.reshape(m[xq], m[reshape].args[1])
            return m[xq]

        return root, rewrite

    def mean_int8(self):
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        mean = is_op("relax.mean")(x)
        root = is_op("relax.quantize")(mean, is_const(), is_const())

        def rewrite(orig, m):
            out_dtype, (s_x, zp_x), (s_out, zp_out) = _in_out(orig, m[xq], m[x])
            a = m[mean].attrs
            shape = [int(d) for d in m[xq].ty.shape]
            axes = [int(i) % len(shape) for i in a.axis] if a.axis is not None else list(range(len(shape)))
            n = int(np.prod([shape[i] for i in axes]))
            total = relax.op.sum(relax.op.astype(m[xq], "int32"), axes, a.keepdims)
            if zp_x:
                total = relax.op.subtract(total, relax.const(n * zp_x, "int32"))
            return _requantize(total, requant_multiplier(s_x, [1.0], s_out, n), (), zp_out, False, out_dtype)

        return root, rewrite

    # -- add / sub / mul of two 8-bit tensors -------------------------------------------------
    def _binary(self, ops: tuple[str, ...]):
        """(root pattern, the two codes, their dequantizes, the op, the relu) of
        ``quantize(relu?(op(dequantize(a), dequantize(b))))``."""
        from tvm.relax.dpl import is_const, is_op, wildcard

        a, b = wildcard(), wildcard()
        da, db = _dq(a), _dq(b)
        op = is_op(ops[0])(da, db)
        for name in ops[1:]:
            op = op | is_op(name)(da, db)
        relu = is_op("relax.nn.relu")(op)
        root = is_op("relax.quantize")(relu | op, is_const(), is_const())
        return root, a, b, da, db, op, relu

    def add_sub_int8(self):
        """Integer fixed point (int8.py add_multipliers): ((a - za) * Ma +- (b - zb) * Mb +
        2^(S-1)) >> S, + zp, clip: no float op, the same result on every platform."""
        from tvm import relax

        root, a, b, da, db, op, relu = self._binary(("relax.add", "relax.subtract"))

        def rewrite(orig, m):
            _act_dtype(m[a]), _act_dtype(m[b])
            out_dtype, (s_a, z_a), (s_out, z_out) = _in_out(orig, m[a], m[da])
            s_b, z_b = _per_tensor(m[db])
            ma, mb, shift = add_multipliers(s_a, s_b, s_out)

            def term(codes, zp, mult):
                v = relax.op.astype(codes, "int64")
                if zp:
                    v = relax.op.subtract(v, relax.const(zp, "int64"))
                return relax.op.multiply(v, relax.const(mult, "int64"))

            combine = relax.op.add if m[op].op.name == "relax.add" else relax.op.subtract
            acc = combine(term(m[a], z_a, ma), term(m[b], z_b, mb))
            acc = relax.op.add(acc, relax.const(1 << (shift - 1), "int64"))
            y = relax.op.right_shift(acc, relax.const(shift, "int64"))
            if z_out:
                y = relax.op.add(y, relax.const(z_out, "int64"))
            return _clip_int(y, out_dtype, z_out, relu in m)

        return root, rewrite

    def mul_int8(self):
        """(a - za) * (b - zb) in int32 (exact), float32 times one multiplier, round, + zp, clip."""
        from tvm import relax

        root, a, b, da, db, op, relu = self._binary(("relax.multiply",))

        def rewrite(orig, m):
            _act_dtype(m[a]), _act_dtype(m[b])
            out_dtype, (s_a, z_a), (s_out, z_out) = _in_out(orig, m[a], m[da])
            s_b, z_b = _per_tensor(m[db])

            def centred(codes, zp):
                v = relax.op.astype(codes, "int32")
                return relax.op.subtract(v, relax.const(zp, "int32")) if zp else v

            prod = relax.op.multiply(centred(m[a], z_a), centred(m[b], z_b))
            mult = np.asarray([mul_multiplier(s_a, s_b, s_out)], dtype=np.float32)
            return _requantize(prod, mult, (), z_out, relu in m, out_dtype)

        return root, rewrite

    # -- sigmoid / tanh: a table over the input codes -----------------------------------------
    def lut_int8(self):
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        fn = is_op("relax.sigmoid")(x) | is_op("relax.tanh")(x)
        root = is_op("relax.quantize")(fn, is_const(), is_const())

        def rewrite(orig, m):
            out_dtype, (s_x, zp_x), (s_out, zp_out) = _in_out(orig, m[xq], m[x])
            in_dtype = _act_dtype(m[xq])
            kind = m[fn].op.name.split(".")[-1]
            table = lut(kind, {"scale": s_x, "zero_point": zp_x, "dtype": in_dtype},
                        {"scale": s_out, "zero_point": zp_out, "dtype": out_dtype})
            lo, _ = act_range(in_dtype)
            idx = relax.op.astype(m[xq], "int32")
            if lo:
                idx = relax.op.subtract(idx, relax.const(lo, "int32"))
            # the codes index the 256-entry table in bounds by construction; "clip" costs one
            # clamp and spares every build TOPI's warning that "fast" mode would crash on them
            return relax.op.take(relax.const(np.asarray(table, dtype=out_dtype)), idx, axis=0, mode="clip")

        return root, rewrite

    def table_take(self):
        """take(8-bit table, codes): a hard-sigmoid/hard-swish table the QDQ export wrote as
        ONNX Gather (passes/support/onnx_export.py), in "clip" mode like lut_int8's (the codes
        index the 256 entries in bounds by construction)."""
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        table, idx = is_const(), wildcard()
        root = is_op("relax.take")(table, idx)

        def rewrite(orig, m):
            if _dtype(m[table]) not in ACT_RANGE or str(orig.attrs.mode) == "clip":
                raise _Skip
            return relax.op.take(m[table], m[idx], axis=orig.attrs.axis, mode="clip")

        return root, rewrite

    def relu_int8(self):
        """quantize(relu(dequantize(xq))) with unchanged parameters -> max(xq, zp)."""
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        root = is_op("relax.quantize")(is_op("relax.nn.relu")(x), is_const(), is_const())

        def rewrite(orig, m):
            dtype = _act_dtype(m[xq])
            if dtype != str(orig.attrs.out_dtype) or _per_tensor(m[x]) != _per_tensor(orig):
                raise _Skip
            return relax.op.maximum(m[xq], relax.const(np.asarray(_per_tensor(orig)[1], dtype=dtype)))

        return root, rewrite

    def moves(self):
        """quantize(op(dequantize(xq), ...)) with unchanged parameters, ``op`` a data-movement op
        (the ONNX frontend's Slice, Squeeze, Reshape, Flatten, Gather, Transpose, MaxPool) ->
        the same op on the 8-bit codes."""
        from tvm import relax
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        x = _dq(xq)
        op = None
        for name in MOVE_OPS:
            p = is_op(name)(x, varg_default_wildcard=True)
            op = p if op is None else op | p
        root = is_op("relax.quantize")(op, is_const(), is_const())

        def rewrite(orig, m):
            if _act_dtype(m[xq]) != str(orig.attrs.out_dtype) or _per_tensor(m[x]) != _per_tensor(orig):
                raise _Skip
            call = m[op]
            return relax.Call(call.op, [m[xq], *call.args[1:]], call.attrs, call.ty_args)

        return root, rewrite

    def dequantize_output(self):
        """A dequantize left at the end (a model whose output is 8-bit codes): (q - zp) * s in
        float32, as the twin's last step."""
        from tvm import relax
        from tvm.ir.expr import Constant
        from tvm.relax.dpl import is_const, is_op, wildcard

        xq = wildcard()
        root = is_op("relax.dequantize")(xq, is_const(), is_const())

        def rewrite(orig, m):
            if isinstance(m[xq], Constant):
                raise _Skip
            _act_dtype(m[xq])
            s, zp = _per_tensor(orig)
            y = relax.op.astype(m[xq], "float32")
            if zp:
                y = relax.op.subtract(y, relax.const(np.float32(zp)))
            return relax.op.multiply(y, relax.const(np.float32(s)))

        return root, rewrite

    # -- weight-only ------------------------------------------------------------------------------
    def weight_only(self, kind: str):
        """relu?(op(x, dequantize(Wq)) + bias?) with float x: one kernel, int8 weight inside."""
        from tvm import relax, te, topi
        from tvm.relax.dpl import is_const, is_op, wildcard

        x, w = wildcard(), _const_dq()
        wt = is_op("relax.permute_dims")(w)
        if kind == "conv":
            op = is_op("relax.nn.conv2d")(x, w)
        else:
            op = is_op("relax.matmul")(x, wt | w)
        b_val = is_const()
        b = is_op("relax.reshape")(b_val, wildcard()) | b_val
        add = is_op("relax.add")(op, b)
        relu = is_op("relax.nn.relu")(add)
        root = relu | add | op

        def rewrite(orig, m):
            if _dtype(m[x]) != "float32" or _dtype(m[w]) != "float32":
                raise _Skip
            wq = _np(m[w].args[0])
            scale, zp, axis = _qparams(m[w])
            if wq.dtype != np.int8:
                raise _Skip
            out_axis = (0 if kind == "conv" or wt in m else 1)
            out = wq.shape[out_axis]
            if scale.size not in (1, out) or zp.size not in (1, out) or (scale.size == out and axis % wq.ndim != out_axis and out != 1):
                raise _Skip
            if kind == "conv":
                a = m[op].attrs
                if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW":
                    raise _Skip
                bshape = (1, out, 1, 1)
            else:
                if len(m[x].ty.shape) != 2 or (wt in m and m[wt].attrs.axes is not None
                                                        and [int(i) for i in m[wt].attrs.axes] != [1, 0]):
                    raise _Skip
                bshape = (1, out)
            bias = None
            if add in m:
                bias = _np(m[b_val]).astype(np.float32)
                if bias.size != out:
                    raise _Skip
                bias = bias.reshape(bshape)
            has_relu = relu in m
            s = scale.reshape(-1).astype(np.float32)
            z = zp.reshape(-1).astype(np.int32)

            def kernel(data, wq_t, s_t, z_t, *rest):
                def deq(*i):
                    c = i[out_axis]
                    sc = s_t[c if s.size > 1 else 0]
                    zc = z_t[c if z.size > 1 else 0]
                    return (wq_t[i].astype("int32") - zc).astype("float32") * sc

                wf = te.compute(wq_t.shape, deq, name="weight_dequantized")
                if kind == "conv":
                    y = topi.nn.conv(data, wf, [int(v) for v in a.strides], [int(v) for v in a.padding],
                                     [int(v) for v in a.dilation], int(a.groups), "NCHW", "OIHW", out_dtype="float32")
                else:
                    k = te.reduce_axis((0, wq_t.shape[1 - out_axis]), name="k")
                    if out_axis == 0:
                        y = te.compute((data.shape[0], out), lambda i, j: te.sum(data[i, k] * wf[j, k], axis=k), name="dense")
                    else:
                        y = te.compute((data.shape[0], out), lambda i, j: te.sum(data[i, k] * wf[k, j], axis=k), name="dense")
                if rest:
                    bt = rest[0]
                    y = te.compute(y.shape, lambda *i: y[i] + bt[(0, i[1]) + (0,) * (len(i) - 2)], name="bias_add")
                if has_relu:
                    y = te.compute(y.shape, lambda *i: te.max(y[i], te.const(0, "float32")), name="relu")
                return y

            args = [m[x], relax.const(wq, "int8"), relax.const(s, "float32"), relax.const(z, "int32")]
            if bias is not None:
                args.append(relax.const(bias, "float32"))
            prim, call_args, out_ty = relax.utils.gen_call_tir_inputs(kernel, *args)
            gv = self.bb.add_func(prim, f"{kind}_int8_weights")
            return relax.call_tir(gv, call_args, out_ty)

        return root, rewrite


def _uses_qdq(func) -> bool:
    from tvm import relax

    found = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", None) in ("relax.quantize", "relax.dequantize"):
            found.append(e)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


def lower(mod):
    """Return ``mod`` with its int8 QDQ patterns lowered to integer ops (as is without QDQ)."""
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function) and _uses_qdq(f)]
    if not funcs:
        return mod
    bb = relax.BlockBuilder(mod)
    rw = _Rewrites(bb)
    order = [rw.conv_int8(), rw.dense_int8(), rw.dense_float_out(True), rw.dense_float_out(False),
             rw.mean_int8(), rw.add_sub_int8(), rw.mul_int8(), rw.lut_int8(), rw.table_take(), rw.relu_int8(), rw.moves(), rw.pool_into_conv(),
             rw.same_params(), rw.weight_only("conv"), rw.weight_only("dense"), rw.dequantize_output()]
    for gv, func in funcs:
        for pattern, rewriter in order:
            func = rewrite_call(pattern, _or_original(rewriter), func)
        bb.update_func(gv, func)
    return relax.transform.DeadCodeElimination()(bb.get())
