"""Prune pass: magnitude (unstructured) or L1-norm channel (structured) pruning of any net in
Kiln's op vocabulary, iterative, with fine-tuning on the training split after each round (the
training loop and augmentation of passes/support/training.py).

Settings (kiln.schema.PruneSettings, validated when the manifest loads), e.g. ``prune: {method:
structured, amount: 0.5, steps: 2, finetune_epochs: 2}`` or ``prune: {method: magnitude, scope:
global, amount: 0.8}``:

* ``magnitude``: zero the ``amount`` share of conv/linear weights with the smallest |w|, per
  layer (``scope: layer``, the default) or under one threshold over all layers (``global``).
  The masks stay applied while fine-tuning, so the saved weights hold exact zeros. The model
  keeps its shape: dense kernels do as many MACs (the weight coding pass stores it sparsely).
* ``structured`` (``l1_structured``): remove the ``amount`` share of the channels of every
  prunable channel group, physically. torch-pruning's DependencyGraph finds the groups: the
  channels that must go together (a conv's filters, its BN entries and the next layers' input
  channels; both convs of a residual add; a depthwise conv's channels with the pointwise conv
  that feeds them; a Linear's features with its BatchNorm1d). A channel's score is the L1 norm
  of every filter that produces it, each scaled by |gamma / sqrt(var + eps)| of the BN after it
  (the filter the board runs once BN is folded; the raw weights' scale means nothing under BN).
  Never pruned: the layers producing the net's output (the classifier keeps its classes), and
  any layer whose output is sliced along channels (the gate layers of unrolled LSTM/GRU cells:
  the forward's constant slice bounds ``g[:, 0:H]`` cannot follow a narrower layer, so their
  hidden units stay; groups that reach them are skipped). Each round checks that the pruned
  model computes what the unpruned one computes with the removed channels' consumer weights
  zeroed, so a grouping mistake is a PassError, not a silently wrong model. The checkpoint
  rebuilds from its saved shapes (passes.support.common.rebuild); the cnn family's
  ``ckpt["architecture"]["widths"]`` are narrowed too, so its architecture still describes it.

Each of ``steps`` rounds prunes ``amount / steps`` more (of the original channels), then
fine-tunes ``finetune_epochs`` on the family's loss (cross-entropy, or MSE for autoencoders, on
the normal classes' samples only: ``passes.tasks.fit_split``) and keeps its best
validation epoch, as the train stage does: on a small data set the last epoch of
a one-cycle run is often not the best, and the masks hold in every epoch's weights. Weights
already exactly zero when the pass starts stay zero (an earlier magnitude pass). Deterministic
given ``ctx.seed``. A net with no prunable channel group (the rnn family: gate layers and a head)
is refused with the reason, not returned unchanged.

``ckpt["pruning"]`` gets one entry per run of the pass: its settings, per round the share,
``channels`` (each conv/linear layer's outputs), sparsity and the validation figure, and for
structured pruning ``kept_whole`` (layer -> why it kept every channel).
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from typing import Any

from kiln.errors import PassError
from kiln.schema import PruneSettings
from passes import tasks
from passes.tasks import fit_split
from passes.support.common import bn_after, sparsity, to_tensor, trace, weight_layers
from passes.support.training import finetune_options, fit

log = logging.getLogger("kiln.prune")


def run(model, ckpt: dict, settings: PruneSettings, ctx) -> tuple[Any, dict]:
    import torch

    s = settings
    cfg = ctx.project.training
    torch.manual_seed(ctx.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(ctx.seed)
    xtr, ytr = fit_split(ctx.project, ctx.data_dir, "train")  # an anomaly detector's: normal samples only
    xva, yva = fit_split(ctx.project, ctx.data_dir, "val")
    lr = s.finetune_lr or cfg.lr
    objective = ctx.project.objective  # the loss fine-tuning uses (its task's)
    structured = s.method != "magnitude"
    # the weights saved are the returned model's (passes/compress.py): drop any stale ones
    ckpt = {k: v for k, v in ckpt.items() if k != "state_dict"}
    ckpt["architecture"] = dict(ckpt["architecture"])
    masks = zero_masks(model)
    pruner = Structured(model, to_tensor(xtr[:8]), s.amount, s.steps, ctx.field()) if structured else None
    rounds = []
    for step in range(1, s.steps + 1):
        t0 = time.perf_counter()
        share = s.amount * step / s.steps
        if structured:
            pruner.step()
            _describe(model, ckpt)
            masks = zero_masks(model)  # the kept filters' exact zeros, sliced along with them
        else:
            masks = magnitude_masks(model, share, s.scope or "layer", masks)
        apply_masks(model, masks)
        history = []
        if s.finetune_epochs:
            history = fit(model, xtr, ytr, epochs=s.finetune_epochs, batch=cfg.batch, lr=lr,
                          aug=ctx.project.dataset.augment, gen=gen, xva=xva, yva=yva,
                          after_step=functools.partial(apply_masks, masks=masks),
                          tag=f"prune {ctx.project.name} round {step}", loss=objective, keep_best=True,
                          **finetune_options(ctx.project, ctx.data_dir, ytr))
        metric, value = _val(model, xva, yva, tasks.of(ctx.project), history)
        rounds.append({"round": step, "share": share, "widths": list(ckpt["architecture"].get("widths", [])),
                       "channels": channels(model), "sparsity": sparsity(model), metric: value,
                       "seconds": time.perf_counter() - t0})
        log.info("prune %s: round %d/%d (%s %.3f): channels %s, sparsity %.3f, %s %.4f", ctx.project.name, step,
                 s.steps, s.method, share, list(rounds[-1]["channels"].values()), rounds[-1]["sparsity"], metric, value)
    ckpt["pruning"] = [*ckpt.get("pruning", []), {**s.model_dump(), "rounds": rounds}]
    if pruner is not None:
        ckpt["pruning"][-1]["kept_whole"] = pruner.kept_whole
    model.eval()
    return model, ckpt


def _val(model, xva, yva, task, history: list[dict]) -> tuple[str, float]:
    """The round's validation figure, the task's (passes/tasks/): accuracy for classifiers, MSE
    of the normal validation samples for autoencoders (the fine-tuning's last epoch has it;
    without fine-tuning it is measured)."""
    return task.VAL_METRIC, history[-1][task.VAL_METRIC] if history else task.validation(model, xva, yva)


def channels(model) -> dict[str, int]:
    """Output channels (features) of every conv/linear layer, by name: what a round left."""
    return {n: m.weight.shape[0] for n, m in weight_layers(model)}


def _describe(model, ckpt: dict) -> None:
    """Narrow the cnn family's ``widths`` to the convs' channels, so the architecture a
    checkpoint carries still describes its model (other families rebuild from saved shapes)."""
    import torch.nn as nn

    arch = ckpt["architecture"]
    if arch.get("family") == "cnn" and "widths" in arch:
        arch["widths"] = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


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


def _producers(node, mods) -> set[str]:
    """Names of the conv/linear layers whose output reaches ``node`` without passing through
    another conv/linear layer. Every other op is walked through, whatever it is (BN, an
    activation, pooling, a softmax, add/mul): for what must not be pruned, finding too many
    layers only prunes less, finding too few would prune a classifier's classes."""
    import torch.nn as nn

    found, todo, seen = set(), [node], set()
    while todo:
        n = todo.pop()
        if n in seen or not hasattr(n, "op"):
            continue
        seen.add(n)
        if n.op == "call_module" and isinstance(mods.get(n.target), (nn.Conv2d, nn.Linear)):
            found.add(n.target)
            continue
        todo.extend(n.all_input_nodes)
    return found


# ops that take a part of a tensor along a dimension, and where their dim argument sits
_SPLITTING = {"chunk": 2, "split": 2, "narrow": 1, "select": 1, "unbind": 1, "split_with_sizes": 2,
              "tensor_split": 2}


def _slices_channels(node) -> bool:
    """An op that takes part of dim 1 (channels / features): a getitem indexing dim 1 with
    anything but ``:``, or a chunk/split/narrow/select/unbind whose dim may be 1."""
    import operator

    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        if not isinstance(idx, tuple):
            return False
        if Ellipsis in idx:  # where dim 1 falls is unknown: assume it is sliced
            return any(i != slice(None) for i in idx if i is not Ellipsis)
        return len(idx) > 1 and idx[1] != slice(None)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in _SPLITTING:
        return False
    at = _SPLITTING[name]
    dim = node.kwargs.get("dim", node.args[at] if len(node.args) > at else 0)
    return not isinstance(dim, int) or dim in (1, -1)  # -1 is dim 1 of a (N, F) tensor


def protected_layers(model, gm=None) -> dict[str, str]:
    """Layers structured pruning must not narrow, by name, with why: those producing the model's
    output (its classes) and those whose output is sliced along channels (a recurrent cell's
    gate layer: the slice bounds are constants of the forward code)."""
    mods = dict(model.named_modules())
    gm = gm if gm is not None else trace(model, "structured pruning")
    out = {}
    for node in gm.graph.nodes:
        if _slices_channels(node):
            for name in _producers(node.args[0], mods):
                out.setdefault(name, f"its output is sliced along channels at {node.name} (slice bounds and chunk "
                                     "counts are constants of the forward: a recurrent cell's gates)")
    for node in gm.graph.nodes:
        if node.op == "output":
            for name in _producers(node, mods):
                out[name] = "it produces the model's output"
    return out


class FoldedL1:
    """torch-pruning importance: per channel of a group, the L1 norm of each conv/linear filter
    that produces it, times |gamma / sqrt(var + eps)| of the BatchNorm folded into that layer,
    summed over the group's producers (a residual add's convs, a depthwise conv and the
    pointwise conv feeding it). Input-side weights are left out: their norms say how much the
    next layer listens, not what the board computes for the channel."""

    def __init__(self, bn_of: dict[int, Any]):
        self.bn_of = bn_of  # id(conv/linear module) -> its BN module

    def __call__(self, group):
        import torch
        import torch.nn as nn

        score = None
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            producing = getattr(dep.pruning_fn, "__name__", "") == "prune_out_channels"
            if not isinstance(layer, (nn.Conv2d, nn.Linear)) or not producing:
                continue
            root = group[i].root_idxs
            if any(r is None for r in root):
                continue
            w = layer.weight.detach()[idxs].flatten(1).abs().sum(1)
            bn = self.bn_of.get(id(layer))
            if bn is not None:
                scale = bn.weight.detach() if bn.affine else torch.ones_like(bn.running_var)
                w = w * (scale / (bn.running_var + bn.eps).sqrt()).abs()[idxs]
            if score is None:
                score = torch.zeros(len(group[0].idxs), dtype=torch.float32)
            score.scatter_add_(0, torch.tensor(root, dtype=torch.long), w.float())
        return score


class Structured:
    """Iterative structured pruning of one model with torch-pruning's BasePruner (local scope:
    every group loses the same share of its original channels), checked round by round."""

    def __init__(self, model, example, amount: float, steps: int, field: str = "prune"):
        import torch
        import torch_pruning as tp

        self.model, self.example, self.field = model, example, field
        was = model.training
        model.eval()  # BatchNorm in eval mode while torch-pruning traces and while we check
        gm = trace(model, f"{field}: structured pruning")
        mods = dict(model.named_modules())
        self.kept_whole = protected_layers(model, gm)
        bn = {id(mods[layer]): mods[b] for layer, b in bn_after(model, gm).items()}
        # torch-pruning skips a layer whose share would leave no channel at all (amount 0.95 of 8
        # filters): it would then silently stay whole. Each layer keeps at least one channel instead,
        # as the cnn pruner did (x - 1.5 over x leaves int(1.5) = 1 after float rounding).
        ratios = {}
        for m in mods.values():
            out = getattr(m, "out_channels", getattr(m, "out_features", None))
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and out and out >= 2:
                ratios[m] = min(amount, (out - 1.5) / out)
        try:
            with torch.enable_grad():  # it traces the autograd graph
                self.pruner = tp.pruner.BasePruner(
                    model, example, importance=FoldedL1(bn), pruning_ratio=amount, iterative_steps=steps,
                    pruning_ratio_dict=ratios, ignored_layers=[mods[n] for n in self.kept_whole])
        except Exception as e:  # torch-pruning's tracing raises what the forward raises
            raise PassError(f"{field}: torch-pruning cannot build the dependency graph of {type(model).__name__} "
                            f"({type(e).__name__}: {e})") from e
        model.train(was)
        for name, why in self.kept_whole.items():
            log.info("%s: %s keeps all its channels: %s", field, name, why)
        pr = self.pruner
        groups = pr.DG.get_all_groups(ignored_layers=pr.ignored_layers, root_module_types=pr.root_module_types)
        if next(iter(groups), None) is None:
            kept = "; ".join(f"{n}: {why}" for n, why in self.kept_whole.items()) or "none"
            raise PassError(f"{field}: structured pruning finds no channels it can remove in {type(model).__name__}: "
                            f"every conv/linear layer keeps its channels ({kept}); use method magnitude")

    def plan(self):
        """The groups the next round removes, each as (group, [(layer name, "prune_out_channels" or
        "prune_in_channels", channel indices)] of its conv/linear/BN members)."""
        names = {id(m): n for n, m in self.model.named_modules()}
        out = []
        for group in self.pruner.step(interactive=True):
            members = []
            for dep, idxs in group:
                kind = getattr(dep.pruning_fn, "__name__", "")
                if id(dep.layer) in names and kind in ("prune_in_channels", "prune_out_channels"):
                    members.append((names[id(dep.layer)], kind, list(idxs)))
            out.append((group, members))
        return out

    def step(self) -> list[list[tuple[str, str, list[int]]]]:
        """Prune one round in place; returns what each group removed."""
        import torch

        was = self.model.training
        self.model.eval()
        with torch.no_grad():
            ref = copy.deepcopy(self.model)
            plan = self.plan()
            for group, members in plan:
                mask_inputs(ref, members)
                group.prune()
            check_equivalent(self.model, ref, self.example, plan, self.field)
        self.model.train(was)
        return [members for _, members in plan]


def mask_inputs(model, members) -> None:
    """Zero, in ``model``, the input weights through which the removed channels are read (the
    conv/linear input channels of ``members``): the model then computes what the pruned one
    does, whatever the removed channels held on the way (a sigmoid of them, a residual sum)."""
    import torch.nn as nn

    mods = dict(model.named_modules())
    for name, kind, idxs in members:
        m = mods[name]
        if kind != "prune_in_channels" or not idxs:
            continue
        if isinstance(m, nn.Linear):
            m.weight[:, idxs] = 0
        elif isinstance(m, nn.Conv2d):
            if m.groups == 1:
                m.weight[:, idxs] = 0
            elif m.groups != m.in_channels:  # grouped: channel i is input i % per of group i // per
                per, outs = m.in_channels // m.groups, m.out_channels // m.groups
                for i in idxs:
                    m.weight[(i // per) * outs:(i // per + 1) * outs, i % per] = 0
            # a depthwise conv's input channel is its output channel: its consumers are masked


def check_equivalent(pruned, masked, example, plan, field: str) -> None:
    """Refuse a round whose pruned model differs from the masked unpruned one."""
    import torch

    try:
        a, b = pruned(example), masked(example)
    except RuntimeError as e:
        raise PassError(f"{field}: the pruned model no longer runs ({e}); groups: {_groups(plan)}") from e
    tol = 1e-4 * max(1.0, float(b.abs().max()))
    if a.shape != b.shape or not torch.allclose(a, b, atol=tol):
        diff = float((a - b).abs().max()) if a.shape == b.shape else float("nan")
        raise PassError(f"{field}: torch-pruning's channel groups do not preserve the model (max difference {diff:.3g} "
                        f"from the masked model); groups: {_groups(plan)}")


def _groups(plan) -> str:
    return "; ".join(", ".join(f"{n} {k.split('_')[1]} {len(i)}" for n, k, i in members) for _, members in plan)
