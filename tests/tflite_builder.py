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
