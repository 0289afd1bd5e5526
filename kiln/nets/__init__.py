"""Net families named by a manifest's ``architecture.family`` (the ``Architecture`` union in
kiln/schema/nets.py). Each family is a module here with

* ``estimate(arch, image_size, in_ch, classes) -> Complexity``: counted analytically, in pure
  Python, so a design over its budget is refused when the manifest loads, before any data or
  training work and without importing torch (families whose model is only known once built,
  ``module`` and ``onnx``, measure their build instead: their schema model says
  ``analytic = False`` and the manifest loader skips them);
* ``build(arch, in_ch, classes, image_size) -> torch.nn.Module``, fx-traceable and written in
  Kiln's op vocabulary (Conv2d, BatchNorm after Conv2d/Linear, ReLU, MaxPool2d,
  AdaptiveAvgPool2d(1), Flatten, Linear, Dropout, Identity, add/sub/mul of two tensors,
  sigmoid, tanh, constant slicing), the ops every compression pass, the QDQ export and the
  TVM lowering understand.

Every input is NCHW: an image is (C, H, W), a 1-D sequence of C channels and length L is
(C, 1, L), a feature vector of F values is (1, 1, F).

What :class:`Complexity` counts, at batch 1 (``measure`` counts the same on a torch model;
tests check that the two agree for every family):

* ``params``: parameters with BatchNorm folded into the conv or linear layer before it, so a
  BatchNorm adds none (every Kiln conv/linear before a BatchNorm has its own bias, which the
  fold updates). What the deployed model stores.
* ``macs``: multiply-accumulates of conv layers (output elements x kernel area x input
  channels per group) and dense layers (output elements x input features), plus one per
  output element of every elementwise product of two tensors (the gate products of a
  recurrent cell: ``i * g``, ``f * c``, ``z * (h - n)``). Adds, activations, pooling and
  BatchNorm (folded) are not counted.
* ``activations``: peak number of activation elements alive at once, over the graph in
  execution order: while a node runs, its output and every earlier tensor that a later node
  (or the model's output) still reads are alive; the model input counts, weights do not. For a
  chain this is the largest input + output of any layer; a residual's skip tensor adds while it
  is held. Elements, not bytes: multiply by 4 (fp32) or 1 (int8).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


# passes/support/tvm_build.py MIN_TUNE_FLOPS (20 k FLOPs) in MACs: smaller kernels are not tuned
SMALL_KERNEL_MACS = 10_000


@dataclass(frozen=True)
class Complexity:
    params: int
    macs: int
    activations: int = 0
    # kernels of the compiled library as Plan counts them (0: not counted; ``measure`` does not,
    # so they are left out of the comparison)
    kernels: int = field(default=0, compare=False)
    # of which small: under passes/support/tvm_build.py's tuning floor (SMALL_KERNEL_MACS), never
    # tuned, so serial loops without the thread pool's fork and join
    small_kernels: int = field(default=0, compare=False)


def estimate(arch, image_size: tuple[int, int], in_ch: int, classes: int) -> Complexity:
    from kiln.registry import implementation

    return implementation(arch).estimate(arch, tuple(image_size), in_ch, classes)


def build(arch, in_ch: int, classes: int, image_size: tuple[int, int]):
    from kiln.registry import implementation

    return implementation(arch).build(arch, in_ch, classes, tuple(image_size))


def imported(arch, in_ch: int, classes: int, image_size: tuple[int, int], compression) -> tuple[Any, dict]:
    """(model, what the import stage adds to the checkpoint and metrics) of a family Kiln does
    not train: the family's own ``imported`` where it has one (family tflite: the file's
    quantization, TVM's import of it), else its ``build`` and nothing more."""
    from kiln.registry import implementation

    family = implementation(arch)
    if hasattr(family, "imported"):
        return family.imported(arch, in_ch, classes, tuple(image_size), compression)
    return family.build(arch, in_ch, classes, tuple(image_size)), {}


# --- the analytic side: a plan of the graph, op by op, in the order the torch build runs ------



def checked_import(path, shape: tuple, want: tuple, convert, classes: int):
    """An imported model file (family onnx, tflite) converted by ``convert()`` into a torch
    module, checked against the dataset: its input ``shape`` (C, H, W) must be ``want``, its
    output one logit per class. Returns what ``convert()`` returned (its first item the module)."""
    import torch

    from kiln.errors import ManifestError

    if shape != want:
        raise ManifestError(f"architecture.path: {path}: its input is {shape} (C, H, W) but the dataset gives "
                            f"{want}: set dataset.image_size (and the format's channels) to the model's input")
    converted = convert()
    module = converted[0] if isinstance(converted, tuple) else converted
    with torch.no_grad():
        out = module(torch.zeros(1, *want))
    if out.dim() != 2 or out.shape[1] != classes:
        raise ManifestError(f"architecture.path: {path}: its output is {tuple(out.shape)}, expected (1, {classes}) "
                            "(one logit per class of the dataset)")
    return converted

def same_padding(n: int, k: int, s: int) -> int:
    """Symmetric padding that gives Keras' 'same' output size ceil(n / s) for a kernel k at
    stride s (Keras pads the odd extra row at the end; torch pads both sides alike, and a Pad
    op of our own would export with dynamic pads TVM refuses, so one more row at the start is
    the price: same shapes and MACs). An even kernel at stride 1 gives n + 1."""
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return (total + 1) // 2


def conv_out(n: int, k: int, s: int, p: int, what: str = "input") -> int:
    out = (n + 2 * p - k) // s + 1
    if out < 1:
        from kiln.errors import ManifestError

        raise ManifestError(f"architecture: the {what} of size {n} is too small for a kernel of {k} "
                            f"at stride {s} (padding {p}); enlarge dataset.image_size or remove a stage")
    return out


@dataclass(frozen=True)
class T:
    """A tensor of the plan: its node and its shape without the batch dimension."""

    node: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Plan:
    """The graph a family builds, counted op by op without torch. Each method adds one node, as
    the torch build's fx graph has one node per module call or tensor op, so the liveness peak
    (``activations``) is computed over the same sequence as :func:`measure` computes it."""

    params: int = 0
    macs: int = 0
    bn_channels: int = 0  # BatchNorm channels (keras-style counts add 2 or 4 per channel)
    # kernels TVM's fusion leaves (kiln/sizing.py's per-kernel cost): one per conv, dense, pool
    # and product of two tensors (a recurrent gate's), one per BatchNorm of a dense layer (not
    # folded), one for the input; activations, adds and BatchNorm after a conv fuse into them.
    # Checked against the call_tir count of the built library for every family
    # (tests/kiln/test_sizing.py)
    kernels: int = 1
    small_kernels: int = 1  # the input's (a cast or reshape)

    def kernel(self, macs: int) -> None:
        """Count one kernel of ``macs`` multiply-accumulates (small under SMALL_KERNEL_MACS)."""
        self.kernels += 1
        self.small_kernels += macs < SMALL_KERNEL_MACS
    sizes: list[int] = field(default_factory=list)
    uses: list[list[int]] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def node(self, shape: tuple[int, ...], *inputs: T) -> T:
        self.sizes.append(math.prod(shape))
        self.uses.append([t.node for t in inputs])
        return T(len(self.sizes) - 1, tuple(shape))

    def input(self, shape: tuple[int, ...]) -> T:
        return self.node(shape)

    def conv(self, x: T, cout: int, kernel, stride=1, padding="same", groups: int = 1, bias: bool = True) -> T:
        c, h, w = x.shape
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride)
        ph, pw = (same_padding(h, kh, sh), same_padding(w, kw, sw)) if padding == "same" else _pair(padding)
        ho, wo = conv_out(h, kh, sh, ph, "height"), conv_out(w, kw, sw, pw, "width")
        self.params += cout * (c // groups) * kh * kw + (cout if bias else 0)
        self.macs += cout * ho * wo * (c // groups) * kh * kw
        self.kernel(cout * ho * wo * (c // groups) * kh * kw)
        return self.node((cout, ho, wo), x)

    def linear(self, x: T, out: int, bias: bool = True) -> T:
        (f,) = x.shape
        self.params += f * out + (out if bias else 0)
        self.macs += f * out
        self.kernel(f * out)
        return self.node((out,), x)

    def bn(self, x: T) -> T:
        self.bn_channels += x.shape[0]
        if len(x.shape) == 1:  # a dense layer's: TVM keeps it apart
            self.kernel(x.numel)
        return self.node(x.shape, x)

    def same(self, x: T) -> T:
        """An elementwise op of one tensor: ReLU, sigmoid, tanh, Dropout, Identity."""
        return self.node(x.shape, x)

    def maxpool(self, x: T, kernel, stride=None) -> T:
        c, h, w = x.shape
        kh, kw = _pair(kernel)
        sh, sw = _pair(stride if stride is not None else kernel)
        self.kernel(x.numel)
        return self.node((c, conv_out(h, kh, sh, 0, "height"), conv_out(w, kw, sw, 0, "width")), x)

    def gap(self, x: T) -> T:
        self.kernel(x.numel)
        return self.node((x.shape[0], 1, 1), x)

    def flatten(self, x: T) -> T:
        return self.node((x.numel,), x)

    def slice(self, x: T, shape: tuple[int, ...]) -> T:
        return self.node(shape, x)

    def add(self, a: T, b: T) -> T:
        return self.node(a.shape, a, b)

    def sub(self, a: T, b: T) -> T:
        return self.node(a.shape, a, b)

    def mul(self, a: T, b: T) -> T:
        self.macs += a.numel
        self.kernel(a.numel)
        return self.node(a.shape, a, b)

    def output(self, x: T) -> None:
        self.outputs.append(x.node)

    @property
    def activations(self) -> int:
        return peak_live(self.sizes, self.uses, self.outputs)

    def complexity(self) -> Complexity:
        return Complexity(params=self.params, macs=self.macs, activations=self.activations, kernels=self.kernels,
                          small_kernels=self.small_kernels)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def peak_live(sizes: list[int], uses: list[list[int]], outputs: list[int]) -> int:
    """Peak of the elements alive while each node runs: its output plus every earlier tensor
    that this node or a later one reads (the outputs live to the end)."""
    n = len(sizes)
    last = list(range(n))
    for i, ins in enumerate(uses):
        for j in ins:
            last[j] = max(last[j], i)
    for j in outputs:
        last[j] = n
    peak = 0
    for i in range(n):
        live = sizes[i] + sum(sizes[j] for j in range(i) if last[j] >= i)
        peak = max(peak, live)
    return peak


# --- the torch side ----------------------------------------------------------------------------


def measure(model, input_shape: tuple[int, ...]) -> Complexity:
    """Count parameters (BatchNorm folded), MACs and peak activations of a torch model by
    running one batch-1 forward pass, with the definitions of this module's docstring.

    The graph comes from ``torch.fx.symbolic_trace``; a model fx cannot trace (a team's own
    module with data-dependent control flow) is counted with forward hooks instead: conv and
    dense MACs only, and activations as the largest input + output of any leaf module."""
    import operator

    import torch
    import torch.nn as nn

    macs = 0

    def hook(mod, inp, out):
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            macs += out.numel() * k
        elif isinstance(mod, nn.Linear):
            macs += out.numel() * mod.in_features

    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            try:
                from torch.fx.passes.shape_prop import ShapeProp

                gm = torch.fx.symbolic_trace(model)
                ShapeProp(gm).propagate(x)  # calls the same module objects: the hooks count
                activations, products = _graph_counts(gm, operator)
                macs += products
            except Exception:  # fx raises many kinds on untraceable Python: count with hooks alone
                macs = 0  # what a partial propagation counted; the hooks count again in this run
                activations = _hook_activations(model, x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    bn = (nn.BatchNorm1d, nn.BatchNorm2d)
    params = sum(p.numel() for m in model.modules() if not isinstance(m, bn) for p in m.parameters(recurse=False))
    return Complexity(params=params, macs=macs, activations=activations)


def _graph_counts(gm, operator) -> tuple[int, int]:
    """(peak live activation elements, elementwise-product MACs) of a shape-propagated fx graph."""
    import torch

    nodes = [n for n in gm.graph.nodes if n.op not in ("output", "get_attr")]
    index = {n: i for i, n in enumerate(nodes)}

    def numel(n) -> int:
        meta = n.meta.get("tensor_meta")
        return math.prod(meta.shape) if meta is not None and hasattr(meta, "shape") else 0

    sizes = [numel(n) for n in nodes]
    uses = [[index[a] for a in n.all_input_nodes if a in index] for n in nodes]
    outputs = [index[a] for n in gm.graph.nodes if n.op == "output" for a in n.all_input_nodes if a in index]
    products = 0
    for n, size in zip(nodes, sizes):
        is_mul = (n.op == "call_function" and n.target in (operator.mul, torch.mul)) or \
                 (n.op == "call_method" and n.target == "mul")
        if is_mul and sum(1 for a in n.args if hasattr(a, "meta") and numel(a)) == 2:
            products += size
    return peak_live(sizes, uses, outputs), products


def _hook_activations(model, x) -> int:
    import torch

    peak = 0

    def hook(mod, inp, out):
        nonlocal peak
        ins = sum(t.numel() for t in inp if isinstance(t, torch.Tensor))
        outs = out.numel() if isinstance(out, torch.Tensor) else 0
        peak = max(peak, ins + outs)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return max(peak, x.numel())
