"""Prune pass: magnitude (unstructured) or L1-norm filter (structured) pruning, iterative, with
fine-tuning on the training split after each round (the training loop and augmentation of
passes/support/training.py).

Settings (kiln.schema.PruneSettings, validated when the manifest loads), e.g. ``prune: {method:
structured, amount: 0.5, steps: 2, finetune_epochs: 2}`` or ``prune: {method: magnitude, scope:
global, amount: 0.8}``:

* ``magnitude``: zero the ``amount`` share of conv/linear weights with the smallest |w|, per
  layer (``scope: layer``, the default) or under one threshold over all layers (``global``).
  The masks stay applied while fine-tuning, so the saved weights hold exact zeros. The model
  keeps its shape: dense kernels do as many MACs (the weight coding pass stores it sparsely).
* ``structured`` (``l1_structured``): remove the ``amount`` share of each conv's output filters,
  those with the smallest L1 norm once BatchNorm is folded in (the filter the board runs; with
  BN after the conv, the raw weights' scale means nothing). The channels are removed physically,
  with their BN entries and the next layer's input channels (the linear head's inputs), so the
  model is rebuilt by ``kiln.nets.build`` with smaller ``ckpt["architecture"]["widths"]``.

Each of ``steps`` rounds prunes ``amount / steps`` more, then fine-tunes ``finetune_epochs``.
Weights already exactly zero when the pass starts stay zero (an earlier magnitude pass).
Deterministic given ``ctx.seed``.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from kiln.errors import PassError
from kiln.schema import PruneSettings
from passes.support.common import accuracy, load_split, sparsity, weight_layers
from passes.support.training import fit

log = logging.getLogger("kiln.prune")


def run(model, ckpt: dict, settings: PruneSettings, ctx) -> tuple[Any, dict]:
    import torch

    s = settings
    cfg = ctx.project.training
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(ctx.seed)
    xtr, ytr = load_split(ctx.data_dir, "train")
    xva, yva = load_split(ctx.data_dir, "val")
    lr = s.finetune_lr or cfg.lr
    structured = s.method != "magnitude"
    # the weights saved are the returned model's (passes/compress.py): drop any stale ones
    ckpt = {k: v for k, v in ckpt.items() if k != "state_dict"}
    ckpt["architecture"] = dict(ckpt["architecture"])
    widths0 = list(ckpt["architecture"]["widths"])
    masks = zero_masks(model)
    rounds = []
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        share = s.amount * step / s.steps
        if structured:
            keep = filters_to_keep(model, [max(1, round(w * (1 - share))) for w in widths0])
            model = shrink(model, ckpt, keep)
            ckpt["architecture"]["widths"] = [len(k) for k in keep]
            masks = zero_masks(model)  # the kept filters' exact zeros, sliced along with them
        else:
            masks = magnitude_masks(model, share, s.scope or "layer", masks)
        apply_masks(model, masks)
        history = []
        if s.finetune_epochs:
            history = fit(model, xtr, ytr, epochs=s.finetune_epochs, batch=cfg.batch, lr=lr,
                          aug=ctx.project.dataset.augment, gen=gen, xva=xva, yva=yva,
                          after_step=functools.partial(apply_masks, masks=masks), tag=f"prune {ctx.project.name} round {step}")
        acc = history[-1]["val_accuracy"] if history else accuracy(model, xva, yva)[0]
        rounds.append({"round": step, "share": share, "widths": list(ckpt["architecture"]["widths"]),
                       "sparsity": sparsity(model), "val_accuracy": acc, "seconds": time.perf_counter() - t0})
        log.info("prune %s: round %d/%d (%s %.3f): widths %s, sparsity %.3f, val %.4f", ctx.project.name, step,
                 s.steps, s.method, share, rounds[-1]["widths"], rounds[-1]["sparsity"], acc)
    ckpt["pruning"] = [*ckpt.get("pruning", []), {**s.model_dump(), "rounds": rounds}]
    model.eval()
    return model, ckpt


# --- unstructured -----------------------------------------------------------------------------


def zero_masks(model) -> dict[str, Any]:
    """Keep-masks (True = kept) of the layers that already hold exact zeros."""
    return {n: m.weight.detach() != 0 for n, m in weight_layers(model) if bool((m.weight == 0).any())}


def apply_masks(model, masks: dict[str, Any]) -> None:
    import torch

    with torch.no_grad():
        for n, m in weight_layers(model):
            if n in masks:
                m.weight.mul_(masks[n])


def _smallest(values, k: int):
    """Indices of the ``k`` smallest values; ties broken by position, so runs are repeatable."""
    import torch

    return torch.argsort(values, stable=True)[:k]


def magnitude_masks(model, share: float, scope: str, old: dict[str, Any]) -> dict[str, Any]:
    """Keep-masks zeroing ``share`` of the conv/linear weights with the smallest |w|, per layer
    or over all layers at once; what ``old`` pruned stays pruned."""
    import torch

    layers = weight_layers(model)
    mags = [m.weight.detach().abs().flatten() for _, m in layers]
    flat = []
    if scope == "global":
        allm = torch.cat(mags)
        keep = torch.ones_like(allm, dtype=torch.bool)
        keep[_smallest(allm, round(share * allm.numel()))] = False
        flat = list(torch.split(keep, [t.numel() for t in mags]))
    else:
        for t in mags:
            keep = torch.ones_like(t, dtype=torch.bool)
            keep[_smallest(t, round(share * t.numel()))] = False
            flat.append(keep)
    masks = {}
    for (n, m), keep in zip(layers, flat):
        keep = keep.view_as(m.weight)
        masks[n] = keep & old[n] if n in old else keep
    return masks


# --- structured -------------------------------------------------------------------------------


def _cnn_layers(model):
    """The convs, their BatchNorms and the linear head of a kiln.nets.build 'cnn' model."""
    import torch.nn as nn

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(bns) != len(convs) or len(heads) != 1 or any(c.groups != 1 for c in convs):
        raise PassError("prune: structured pruning needs a kiln.nets 'cnn' model (conv-BN stages, one linear head)")
    return convs, bns, heads[0]


def filter_scores(model) -> list[Any]:
    """Per conv, each output filter's L1 norm with its BatchNorm folded in."""
    convs, bns, _ = _cnn_layers(model)
    scores = []
    for conv, bn in zip(convs, bns):
        scale = (bn.weight / (bn.running_var + bn.eps).sqrt()).abs()
        scores.append((conv.weight.detach().abs().flatten(1).sum(1) * scale.detach()))
    return scores


def filters_to_keep(model, counts: list[int]) -> list[Any]:
    """Per conv, the sorted indices of its ``counts[i]`` filters of largest score."""
    import torch

    return [torch.sort(_smallest(-s, min(c, s.numel())))[0] for s, c in zip(filter_scores(model), counts)]


def mask_filters(model, keep: list[Any]) -> None:
    """Zero (in place) every filter not in ``keep``, with its bias and BN scale and shift: the
    channel then outputs exact zeros, so the model computes what ``shrink`` computes."""
    import torch

    convs, bns, _ = _cnn_layers(model)
    with torch.no_grad():
        for conv, bn, k in zip(convs, bns, keep):
            drop = torch.ones(conv.out_channels, dtype=torch.bool)
            drop[k] = False
            for t in (conv.weight, conv.bias, bn.weight, bn.bias):
                if t is not None:
                    t[drop] = 0


def shrink(model, ckpt: dict, keep: list[Any]):
    """A new model without the filters not in ``keep``: kiln.nets.build of the checkpoint's
    architecture with the new widths, each conv/BN/head tensor sliced to the kept output and
    input channels."""
    import torch

    from kiln.nets import build
    from kiln.schema import parse_architecture

    convs, bns, head = _cnn_layers(model)
    new_arch = parse_architecture(dict(ckpt["architecture"], widths=[len(k) for k in keep]))
    small = build(new_arch, ckpt["channels"], ckpt["num_classes"], tuple(ckpt["image_size"]))
    sconvs, sbns, shead = _cnn_layers(small)
    with torch.no_grad():
        prev = torch.arange(convs[0].in_channels)
        for conv, bn, sconv, sbn, k in zip(convs, bns, sconvs, sbns, keep):
            sconv.weight.copy_(conv.weight[k][:, prev])
            if conv.bias is not None:
                sconv.bias.copy_(conv.bias[k])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(sbn, name).copy_(getattr(bn, name)[k])
            sbn.num_batches_tracked.copy_(bn.num_batches_tracked)
            prev = k
        # the head reads channel-major features: gap gives one per channel, flatten h*w each
        per = head.in_features // convs[-1].out_channels
        cols = (prev[:, None] * per + torch.arange(per)[None, :]).flatten()
        shead.weight.copy_(head.weight[:, cols])
        shead.bias.copy_(head.bias)
    small.train(model.training)
    return small
