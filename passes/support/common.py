"""Helpers shared by the torch passes: loading splits and checkpoints, evaluating accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import Layout, atomic_path
from kiln.errors import PassError


def load_split(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    path = Layout.split_file(data_dir, split)
    try:
        with np.load(path) as z:
            return z["x"], z["y"]
    except (OSError, KeyError, ValueError) as e:
        raise PassError(f"{path}: cannot read the {split} split ({e}); rerun the data task") from e


def to_tensor(x: np.ndarray):
    """The net's float32 NCHW input from a split's samples: uint8 NHWC images are scaled to
    [0, 1] (no front end: the board is fed them so); float32 NHWC samples are a front end's
    features (passes/frontends/), taken as they are."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    return t.div_(255.0) if x.dtype == np.uint8 else t


def accuracy(model, x: np.ndarray, y: np.ndarray, batch: int = 512) -> tuple[float, np.ndarray]:
    """Top-1 accuracy and the predictions of ``model`` on uint8 NHWC images."""
    import torch

    model.eval()
    preds = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            preds.append(model(to_tensor(x[i : i + batch])).argmax(1).numpy())
    p = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return (float((p == y).mean()) if len(y) else 0.0), p


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path: Path):
    """Rebuild the model a checkpoint describes; return (model, checkpoint dict)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model = rebuild(ckpt)
    except (OSError, KeyError, RuntimeError, ValueError) as e:
        raise PassError(f"{path}: not a usable Kiln checkpoint ({e}); rerun the train task") from e
    return model, ckpt


def rebuild(ckpt: dict[str, Any]):
    """The model a checkpoint dict describes: its architecture built by its family, every layer
    resized to the shapes its saved weights have (``adopt_shapes``), then the weights loaded.

    Resizing from the saved tensors, rather than replaying the recorded pruning, is what makes
    any family's pruned graph rebuild: structured pruning only ever narrows conv, linear and
    BatchNorm layers (torch-pruning removes channels in place; the forward code is unchanged),
    so the saved shapes say everything, and a checkpoint written by any version of the prune
    pass (or by hand) loads without its pruning history. The cnn family's pruned
    ``architecture.widths`` already build the right shapes; then nothing is resized."""
    from kiln.nets import build
    from kiln.schema import parse_architecture

    arch = parse_architecture(ckpt["architecture"])
    return restore(build(arch, ckpt["channels"], ckpt["num_classes"], tuple(ckpt["image_size"])), ckpt["state_dict"])


def restore(model, state_dict: dict[str, Any]):
    """``model`` (freshly built, unpruned) resized to ``state_dict``'s shapes, loaded, in eval
    mode: what ``rebuild`` does once the family has built the model."""
    adopt_shapes(model, state_dict)
    model.load_state_dict(state_dict)
    model.eval()
    return model


def adopt_shapes(model, state_dict: dict[str, Any]) -> list[str]:
    """Resize in place each Conv2d, Linear and BatchNorm of ``model`` whose tensors in
    ``state_dict`` have other shapes: channels/features from the saved weight, and for a
    depthwise conv (groups = in = out channels) its groups too, so it stays depthwise. Returns
    the names of the resized layers. A tensor whose shape no resize explains (a kernel size, a
    missing key) is left for ``load_state_dict`` to refuse, naming it."""
    import torch
    import torch.nn as nn

    resized = []
    for name, m in model.named_modules():
        pre = f"{name}." if name else ""
        w = state_dict.get(pre + "weight")
        if w is None or not isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        if tuple(w.shape) == tuple(m.weight.shape):
            continue
        if w.dim() != m.weight.dim() or (isinstance(m, nn.Conv2d) and tuple(w.shape[2:]) != tuple(m.weight.shape[2:])):
            continue  # not a narrower layer: load_state_dict names the mismatch
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if depthwise and w.shape[1] != 1:
                continue
            out = w.shape[0]
            groups = out if depthwise else m.groups
            m.out_channels, m.groups, m.in_channels = out, groups, w.shape[1] * groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape[0], w.shape[1]
        else:
            m.num_features = w.shape[0]
            for buf in ("running_mean", "running_var"):
                if getattr(m, buf, None) is not None:
                    setattr(m, buf, torch.zeros(w.shape[0]))
        m.weight = nn.Parameter(torch.empty(w.shape, dtype=m.weight.dtype))
        if m.bias is not None and (pre + "bias") in state_dict:
            m.bias = nn.Parameter(torch.empty(state_dict[pre + "bias"].shape, dtype=m.bias.dtype))
        resized.append(name)
    return resized


def trace(model, what: str = "this pass"):
    """The torch.fx graph of ``model``: the passes read a net's structure from it (which layer
    feeds which), not from module order, so any family's graph works. A module fx cannot trace
    is refused with the reason."""
    import torch.fx

    try:
        return torch.fx.symbolic_trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...: all mean "not traceable"
        raise PassError(f"{what} needs a model torch.fx can trace (Kiln's op vocabulary): {type(model).__name__} "
                        f"does not trace ({type(e).__name__}: {e})") from e


def bn_after(model, gm=None) -> dict[str, str]:
    """Conv2d/Linear name -> name of the BatchNorm2d/BatchNorm1d applied directly to its output
    and to nothing else, from the fx graph: the BN that folds into that layer on the board."""
    import torch.nn as nn

    gm = gm if gm is not None else trace(model, "finding BatchNorm after conv/linear layers")
    mods = dict(model.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), (nn.Conv2d, nn.Linear)):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn, layer = mods.get(users[0].target), mods[node.target]
        if (isinstance(layer, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or (
                isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)):
            out[node.target] = users[0].target
    return out


def weight_bytes(model) -> int:
    """Bytes of the parameters as stored (fp32 here; compression passes change this)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def weight_layers(model) -> list[tuple[str, Any]]:
    """(name, module) of every conv and linear layer, in forward order: the layers compression
    passes prune, share and quantize (BatchNorm folds into the conv before it at export)."""
    import torch.nn as nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def stored_weight_bytes(model, ckpt: dict[str, Any]) -> int:
    """Bytes of the weights as the deployed model stores them, BatchNorm folded into the conv
    before it, so each conv/linear layer holds its weight tensor and one bias per output.

    fp32 (no ``ckpt["quantization"]``): 4 B per weight and per bias. When
    ``ckpt["quantization"]`` is set (passes/quantize.py), each quantized layer stores 1 B per
    weight, 4 B per bias (int32) and 4 B per scale: one per output channel, or one per layer
    when ``ckpt["quantization"].get("per_channel", True)`` is false. The quantized layers are
    ``ckpt["quantization"]["layers"]`` (module names) when given, else every conv/linear layer;
    the others stay fp32. Dense storage: exact zeros cost as much as any weight (the weight
    coding pass reports the sparse, entropy-coded size separately)."""
    q = ckpt.get("quantization")
    info = q if isinstance(q, dict) else {}
    quantized = set(info.get("layers") or [])
    total = 0
    for name, m in weight_layers(model):
        out = m.weight.shape[0]
        if q and (not quantized or name in quantized):
            scales = out if info.get("per_channel", True) else 1
            total += m.weight.numel() + 4 * out + 4 * scales
        else:
            total += 4 * (m.weight.numel() + out)
    return total


def sparsity(model) -> float:
    """Share of exactly-zero weights over every conv/linear weight tensor."""
    n = z = 0
    for _, m in weight_layers(model):
        n += m.weight.numel()
        z += int((m.weight == 0).sum())
    return z / n if n else 0.0


def weights_sha256(model) -> str:
    """Hash of every conv/linear weight tensor: tells whether a later pass changed them."""
    import hashlib

    h = hashlib.sha256()
    for name, m in weight_layers(model):
        h.update(name.encode())
        h.update(m.weight.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
