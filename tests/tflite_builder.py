"""A TFLite writer for tests: no TensorFlow installs here (and no converter of the registries
writes .tflite without it), so the tests write their models with the ``tflite`` package's
flatbuffers builder API: a converter of our own, for tests only. :func:`digits_cnn` trains a
small CNN on scikit-learn's digits in torch and writes it as a float32 or a full-integer int8
TFLite model (per-channel symmetric int8 weights, int32 biases, int8 activations with scales
from the training split's ranges, QUANTIZE in front and DEQUANTIZE behind, as TFLite's own
converter lays such a model out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

F32, I32, I8 = 0, 2, 9  # tflite.TensorType


class Writer:
    """Tensors and operators of one subgraph, written as a TFLite flatbuffer by :meth:`save`."""

    def __init__(self):
        self.tensors: list[dict] = []
        self.buffers: list[bytes] = [b""]  # buffer 0 is the empty one, by convention
        self.ops: list[dict] = []
        self.codes: list[int] = []

    def tensor(self, name: str, shape, dtype: int = F32, data: np.ndarray | None = None, scale=None,
               zero_point=None, axis: int = 0) -> int:
        buf = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buf = len(self.buffers) - 1
        q = None
        if scale is not None:
            q = {"scale": np.atleast_1d(np.asarray(scale, np.float32)),
                 "zero_point": np.atleast_1d(np.asarray(zero_point, np.int64)), "axis": axis}
        self.tensors.append({"name": name, "shape": list(shape), "type": dtype, "buffer": buf, "q": q})
        return len(self.tensors) - 1

    def op(self, code: int, inputs: list[int], outputs: list[int], options: tuple[int, dict] | None = None) -> None:
        if code not in self.codes:
            self.codes.append(code)
        self.ops.append({"code": self.codes.index(code), "inputs": inputs, "outputs": outputs, "options": options})

    def save(self, path: Path, inputs: list[int], outputs: list[int]) -> None:
        import importlib

        import flatbuffers

        # the generated modules (tflite/__init__ re-exports their classes under the same names)
        (Buffer, Model, Operator, OperatorCode, QuantizationParameters, SubGraph, Tensor, AddOptions, Conv2DOptions,
         DepthwiseConv2DOptions, FullyConnectedOptions, Pool2DOptions, ReducerOptions, SoftmaxOptions) = (
            importlib.import_module(f"tflite.{m}") for m in (
                "Buffer", "Model", "Operator", "OperatorCode", "QuantizationParameters", "SubGraph", "Tensor",
                "AddOptions", "Conv2DOptions", "DepthwiseConv2DOptions", "FullyConnectedOptions", "Pool2DOptions",
                "ReducerOptions", "SoftmaxOptions"))

        modules = {1: Conv2DOptions, 2: DepthwiseConv2DOptions, 5: Pool2DOptions, 8: FullyConnectedOptions,
                   9: SoftmaxOptions, 11: AddOptions, 21: AddOptions, 27: ReducerOptions}
        b = flatbuffers.Builder(4096)

        def vec(start, values, dtype):
            arr = np.asarray(values, dtype=dtype)
            return b.CreateNumpyVector(arr) if arr.size else _empty(start)

        def _empty(start):
            start(b, 0)
            return b.EndVector()

        buffers = []
        for data in self.buffers:
            d = b.CreateNumpyVector(np.frombuffer(data, np.uint8)) if data else None
            Buffer.BufferStart(b)
            if d is not None:
                Buffer.BufferAddData(b, d)
            buffers.append(Buffer.BufferEnd(b))
        tensors = []
        for t in self.tensors:
            name = b.CreateString(t["name"])
            shape = vec(Tensor.TensorStartShapeVector, t["shape"], np.int32)
            q = None
            if t["q"] is not None:
                sc = b.CreateNumpyVector(t["q"]["scale"])
                zp = b.CreateNumpyVector(t["q"]["zero_point"])
                QuantizationParameters.QuantizationParametersStart(b)
                QuantizationParameters.QuantizationParametersAddScale(b, sc)
                QuantizationParameters.QuantizationParametersAddZeroPoint(b, zp)
                QuantizationParameters.QuantizationParametersAddQuantizedDimension(b, t["q"]["axis"])
                q = QuantizationParameters.QuantizationParametersEnd(b)
            Tensor.TensorStart(b)
            Tensor.TensorAddShape(b, shape)
            Tensor.TensorAddType(b, t["type"])
            Tensor.TensorAddBuffer(b, t["buffer"])
            Tensor.TensorAddName(b, name)
            if q is not None:
                Tensor.TensorAddQuantization(b, q)
            tensors.append(Tensor.TensorEnd(b))
        ops = []
        for o in self.ops:
            ins = vec(Operator.OperatorStartInputsVector, o["inputs"], np.int32)
            outs = vec(Operator.OperatorStartOutputsVector, o["outputs"], np.int32)
            opt = None
            if o["options"] is not None:
                kind, fields = o["options"]
                mod = modules[kind]
                cls = mod.__name__.split(".")[-1]  # e.g. Conv2DOptions: Conv2DOptionsStart, ...
                getattr(mod, f"{cls}Start")(b)
                for field, value in fields.items():
                    getattr(mod, f"{cls}Add{field}")(b, value)
                opt = getattr(mod, f"{cls}End")(b)
            Operator.OperatorStart(b)
            Operator.OperatorAddOpcodeIndex(b, o["code"])
            Operator.OperatorAddInputs(b, ins)
            Operator.OperatorAddOutputs(b, outs)
            if opt is not None:
                Operator.OperatorAddBuiltinOptionsType(b, o["options"][0])
                Operator.OperatorAddBuiltinOptions(b, opt)
            ops.append(Operator.OperatorEnd(b))

        def table_vector(start, items):
            start(b, len(items))
            for it in reversed(items):
                b.PrependUOffsetTRelative(it)
            return b.EndVector()

        t_vec = table_vector(SubGraph.SubGraphStartTensorsVector, tensors)
        o_vec = table_vector(SubGraph.SubGraphStartOperatorsVector, ops)
        i_vec = vec(SubGraph.SubGraphStartInputsVector, inputs, np.int32)
        out_vec = vec(SubGraph.SubGraphStartOutputsVector, outputs, np.int32)
        sg_name = b.CreateString("main")
        SubGraph.SubGraphStart(b)
        SubGraph.SubGraphAddTensors(b, t_vec)
        SubGraph.SubGraphAddInputs(b, i_vec)
        SubGraph.SubGraphAddOutputs(b, out_vec)
        SubGraph.SubGraphAddOperators(b, o_vec)
        SubGraph.SubGraphAddName(b, sg_name)
        sg = SubGraph.SubGraphEnd(b)
        codes = []
        for c in self.codes:
            OperatorCode.OperatorCodeStart(b)
            OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, min(c, 127))
            OperatorCode.OperatorCodeAddBuiltinCode(b, c)
            OperatorCode.OperatorCodeAddVersion(b, 1)
            codes.append(OperatorCode.OperatorCodeEnd(b))
        c_vec = table_vector(Model.ModelStartOperatorCodesVector, codes)
        s_vec = table_vector(Model.ModelStartSubgraphsVector, [sg])
        b_vec = table_vector(Model.ModelStartBuffersVector, buffers)
        desc = b.CreateString("kiln test model")
        Model.ModelStart(b)
        Model.ModelAddVersion(b, 3)
        Model.ModelAddOperatorCodes(b, c_vec)
        Model.ModelAddSubgraphs(b, s_vec)
        Model.ModelAddDescription(b, desc)
        Model.ModelAddBuffers(b, b_vec)
        b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
        Path(path).write_bytes(bytes(b.Output()))


# tflite.BuiltinOperator codes and tflite.BuiltinOptions tags the tests use
CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, FULLY_CONNECTED, MAX_POOL_2D, MEAN, QUANTIZE, SOFTMAX = 3, 4, 6, 9, 17, 40, 114, 25
HARD_SWISH, MUL, LOGISTIC, ADD = 117, 18, 14, 0
O_CONV, O_DW, O_POOL, O_FC, O_SOFTMAX, O_ADD, O_MUL, O_REDUCER = 1, 2, 5, 8, 9, 11, 21, 27
SAME, VALID, RELU = 0, 1, 1


_TRAINED: dict = {}


def trained_digits_cnn(epochs: int = 30):
    """A small CNN trained on scikit-learn's digits (pixels as Kiln's digits format scales them):
    conv 3x3 (8) ReLU, max pool 2, conv 3x3 (16) ReLU, global mean, linear (10); and the
    training images (N, 1, 8, 8) in [0, 1]."""
    import torch
    import torch.nn as nn

    from passes.formats.digits import load_digits, shipped_path

    if epochs in _TRAINED:  # one training per test process
        return _TRAINED[epochs]
    x, y, _ = load_digits(shipped_path(), (8, 8))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(epochs):
        for i in range(0, len(yt), 128):
            loss = nn.functional.cross_entropy(net(xt[i : i + 128]), yt[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _TRAINED[epochs] = net.eval(), xt
    return _TRAINED[epochs]


def _act(lo: float, hi: float) -> tuple[float, int]:
    """TFLite's int8 activation parameters of [lo, hi] (0 exact): scale, zero point."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / 255))
    return scale, int(np.clip(round(-128 - lo / scale), -128, 127))


def digits_cnn(path: Path, int8: bool = False, softmax: bool = True) -> Path:
    """Write :func:`trained_digits_cnn` as a TFLite file: float32, or full-integer int8."""
    import torch

    net, xt = trained_digits_cnn()
    conv1, conv2, fc = net[0], net[3], net[7]
    with torch.no_grad():  # calibration ranges of every activation, on the training images
        a1 = torch.relu(conv1(xt))
        p1 = net[2](a1)
        a2 = torch.relu(conv2(p1))
        m = a2.mean((2, 3))
        lg = fc(m)
    w = Writer()
    q = {}
    if int8:
        q = {"x": (1 / 255, -128), "a1": _act(0, float(a1.max())), "a2": _act(0, float(a2.max())),
             "m": _act(0, float(m.max())), "lg": _act(float(lg.min()), float(lg.max()))}
        q["p1"] = q["a1"]  # a max pool keeps its input's parameters

    def act(name, shape):
        if not int8:
            return w.tensor(name, shape)
        s, z = q[name]
        return w.tensor(name, shape, I8, scale=s, zero_point=z)

    def weights(name, wt: np.ndarray, bias: np.ndarray, in_scale: float | None):
        if not int8:
            return (w.tensor(f"{name}/weights", wt.shape, F32, wt.astype(np.float32)),
                    w.tensor(f"{name}/bias", bias.shape, F32, bias.astype(np.float32)))
        flat = np.abs(wt.reshape(wt.shape[0], -1)).max(1)
        s = np.where(flat > 0, flat / 127, 1.0).astype(np.float32)
        wq = np.clip(np.round(wt / s.reshape(-1, *([1] * (wt.ndim - 1)))), -127, 127).astype(np.int8)
        bs = (np.float32(in_scale) * s).astype(np.float32)
        bq = np.round(bias / bs).astype(np.int32)
        return (w.tensor(f"{name}/weights", wt.shape, I8, wq, scale=s, zero_point=np.zeros(len(s), np.int64)),
                w.tensor(f"{name}/bias", bias.shape, I32, bq, scale=bs, zero_point=np.zeros(len(s), np.int64)))

    x_in = w.tensor("input", [1, 8, 8, 1])
    x = x_in
    if int8:
        x = act("x", [1, 8, 8, 1])
        w.op(QUANTIZE, [x_in], [x])
    w1, b1 = weights("conv1", conv1.weight.detach().numpy().transpose(0, 2, 3, 1), conv1.bias.detach().numpy(),
                     q.get("x", (None,))[0])
    a1 = act("a1", [1, 8, 8, 8])
    w.op(CONV_2D, [x, w1, b1], [a1], (O_CONV, {"Padding": SAME, "StrideW": 1, "StrideH": 1,
                                              "FusedActivationFunction": RELU}))
    p1 = act("p1", [1, 4, 4, 8])
    w.op(MAX_POOL_2D, [a1], [p1], (O_POOL, {"Padding": VALID, "StrideW": 2, "StrideH": 2, "FilterWidth": 2,
                                            "FilterHeight": 2}))
    w2, b2 = weights("conv2", conv2.weight.detach().numpy().transpose(0, 2, 3, 1), conv2.bias.detach().numpy(),
                     q.get("p1", (None,))[0])
    a2 = act("a2", [1, 4, 4, 16])
    w.op(CONV_2D, [p1, w2, b2], [a2], (O_CONV, {"Padding": SAME, "StrideW": 1, "StrideH": 1,
                                               "FusedActivationFunction": RELU}))
    axes = w.tensor("mean/axes", [2], I32, np.array([1, 2], np.int32))
    mt = act("m", [1, 16])
    w.op(MEAN, [a2, axes], [mt], (O_REDUCER, {"KeepDims": False}))
    wf, bf = weights("fc", fc.weight.detach().numpy(), fc.bias.detach().numpy(), q.get("m", (None,))[0])
    lg = act("lg", [1, 10])
    w.op(FULLY_CONNECTED, [mt, wf, bf], [lg], (O_FC, {}))
    out = lg
    if int8:
        out = w.tensor("logits", [1, 10])
        w.op(DEQUANTIZE, [lg], [out])
    elif softmax:
        out = w.tensor("probabilities", [1, 10])
        w.op(SOFTMAX, [lg], [out], (O_SOFTMAX, {"Beta": 1.0}))
    w.save(path, [x_in], [out])
    return path


# the MobileNet-ish model's operators (tflite.BuiltinOperator) and the fused activation RELU6
AVERAGE_POOL_2D, RELU6_OP, RESHAPE, TANH, SUB, CUSTOM = 1, 21, 22, 28, 41, 32
F_RELU6 = 3


def mobilenet_ish(path: Path, int8: bool = False, seed: int = 0) -> tuple[Path, np.ndarray]:
    """A MobileNet-ish TFLite file with random (seeded) weights, float32 or full-integer int8
    (activation parameters from the ranges on the returned calibration images, (64, 1, 8, 8) in
    [0, 1]), written with every operator the converter knows beyond :func:`digits_cnn`'s:
    CONV_2D + RELU6 (fused), DEPTHWISE_CONV_2D + RELU6 (fused), a linear 1x1 CONV_2D, ADD
    (residual), HARD_SWISH, a squeeze-and-excitation gate (global AVERAGE_POOL_2D, 1x1 CONV_2D,
    RELU6 as an operator, 1x1 CONV_2D, LOGISTIC, MUL broadcast over H x W), TANH, SUB, a second
    global AVERAGE_POOL_2D, RESHAPE to (1, features), FULLY_CONNECTED."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(seed)
    # images of different brightness (a power of uniform noise), so the pooled features differ
    xs = torch.from_numpy((rng.uniform(0, 1, size=(64, 1, 8, 8)) ** rng.uniform(0.2, 5, size=(64, 1, 1, 1)))
                          .astype(np.float32))
    w = Writer()
    val: dict[int, torch.Tensor] = {}  # tensor index -> its float value (NCHW) on the images
    q: dict[int, tuple[float, int]] = {}  # tensor index -> int8 (scale, zero point)

    def act(name, v: torch.Tensor, qp: tuple[float, int] | None = None) -> int:
        shape = [v.shape[0] and 1, *v.shape[2:], v.shape[1]] if v.dim() == 4 else [1, v.shape[1]]
        if int8:
            qp = qp or _act(float(v.min()), float(v.max()))
            i = w.tensor(name, shape, I8, scale=qp[0], zero_point=qp[1])
            q[i] = qp
        else:
            i = w.tensor(name, shape)
        val[i] = v
        return i

    def conv(name, x: int, cin: int, cout: int, k: int, depthwise: bool = False, relu6: bool = False) -> int:
        wt = rng.normal(0, 1.5 / np.sqrt(k * k * (1 if depthwise else cin)), size=(cout, 1 if depthwise else cin, k, k))
        wt = wt.astype(np.float32)
        bias = rng.normal(0, 0.2, size=cout).astype(np.float32)
        with torch.no_grad():
            y = F.conv2d(val[x], torch.from_numpy(wt), torch.from_numpy(bias), padding=k // 2,
                         groups=cin if depthwise else 1)
            if relu6:
                y = torch.clamp(y, 0, 6)
        # TFLite layouts: conv OHWI (per-channel axis 0), depthwise 1HWC (axis 3)
        tw = wt.transpose(1, 2, 3, 0) if depthwise else wt.transpose(0, 2, 3, 1)
        axis = 3 if depthwise else 0
        if int8:
            amax = np.abs(wt.reshape(cout, -1)).max(1)
            s = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
            wq = np.clip(np.round(tw / s.reshape([-1 if d == axis else 1 for d in range(4)])), -127, 127)
            bs = (np.float32(q[x][0]) * s).astype(np.float32)
            zeros = np.zeros(cout, np.int64)
            wi = w.tensor(f"{name}/weights", tw.shape, I8, wq.astype(np.int8), scale=s, zero_point=zeros, axis=axis)
            bi = w.tensor(f"{name}/bias", [cout], I32, np.round(bias / bs).astype(np.int32), scale=bs, zero_point=zeros)
        else:
            wi = w.tensor(f"{name}/weights", tw.shape, F32, np.ascontiguousarray(tw))
            bi = w.tensor(f"{name}/bias", [cout], F32, bias)
        out = act(name, y)
        opts = {"Padding": SAME if k > 1 else VALID, "StrideW": 1, "StrideH": 1,
                "FusedActivationFunction": F_RELU6 if relu6 else 0}
        if depthwise:
            opts["DepthMultiplier"] = 1
        w.op(DEPTHWISE_CONV_2D if depthwise else CONV_2D, [x, wi, bi], [out], (O_DW if depthwise else O_CONV, opts))
        return out

    def unary(code, name, x, fn, qp=None) -> int:
        with torch.no_grad():
            out = act(name, fn(val[x]), qp)
        w.op(code, [x], [out])
        return out

    def binary(code, name, a, b, fn) -> int:
        with torch.no_grad():
            out = act(name, fn(val[a], val[b]))
        w.op(code, [a, b], [out])
        return out

    def gap(name, x) -> int:
        h = val[x].shape[2]
        with torch.no_grad():
            out = act(name, val[x].mean((2, 3), keepdim=True), q.get(x))  # a pool keeps its input's parameters
        w.op(AVERAGE_POOL_2D, [x], [out], (O_POOL, {"Padding": VALID, "StrideW": 1, "StrideH": 1, "FilterWidth": h,
                                                    "FilterHeight": h}))
        return out

    x_in = w.tensor("input", [1, 8, 8, 1])
    val[x_in] = xs
    x = x_in
    if int8:
        x = act("x", xs, (1 / 255, -128))
        w.op(QUANTIZE, [x_in], [x])
    a = conv("stem", x, 1, 8, 3, relu6=True)
    d = conv("dw", a, 8, 8, 3, depthwise=True, relu6=True)
    p = conv("project", d, 8, 8, 1)
    r = binary(ADD, "residual", a, p, torch.add)
    h = unary(HARD_SWISH, "hswish", r, F.hardswish)
    g = gap("squeeze", h)
    g = unary(RELU6_OP, "se_relu6", conv("se1", g, 8, 4, 1), lambda v: torch.clamp(v, 0, 6),
              None)  # its own parameters here; the converter keeps the input's (a clamp on codes)
    s = unary(LOGISTIC, "gate", conv("se2", g, 4, 8, 1), torch.sigmoid, (1 / 256, -128))
    m = binary(MUL, "excite", h, s, torch.mul)
    t = unary(TANH, "tanh", m, torch.tanh, (1 / 128, 0))
    u = binary(SUB, "sub", m, t, torch.sub)
    v = gap("pool", u)
    shape = w.tensor("flat/shape", [2], I32, np.array([1, 8], np.int32))
    with torch.no_grad():
        f = act("flat", val[v].flatten(1), q.get(v))
    w.op(RESHAPE, [v, shape], [f])
    wt = rng.normal(0, 3.0, size=(10, 8)).astype(np.float32)
    bias = rng.normal(0, 0.1, size=10).astype(np.float32)
    with torch.no_grad():
        lg_v = val[f] @ torch.from_numpy(wt).t() + torch.from_numpy(bias)
    lg = act("lg", lg_v)
    if int8:
        amax = np.abs(wt).max(1)
        sw = (amax / 127).astype(np.float32)
        bs = (np.float32(q[f][0]) * sw).astype(np.float32)
        zeros = np.zeros(10, np.int64)
        wi = w.tensor("fc/weights", wt.shape, I8, np.clip(np.round(wt / sw[:, None]), -127, 127).astype(np.int8),
                      scale=sw, zero_point=zeros)
        bi = w.tensor("fc/bias", [10], I32, np.round(bias / bs).astype(np.int32), scale=bs, zero_point=zeros)
    else:
        wi, bi = w.tensor("fc/weights", wt.shape, F32, wt), w.tensor("fc/bias", [10], F32, bias)
    w.op(FULLY_CONNECTED, [f, wi, bi], [lg], (O_FC, {}))
    out = lg
    if int8:
        out = w.tensor("logits", [1, 10])
        w.op(DEQUANTIZE, [lg], [out])
    w.save(path, [x_in], [out])
    return path, xs.numpy()
