"""The training loop the torch passes share: seeded Adam with a one-cycle schedule and online
augmentation, on the loss of the net's task (passes/tasks/: cross-entropy for classification,
MSE against the input for reconstruction). The train stage trains with it; prune and weight
coding fine-tune with it."""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from passes.support.common import to_tensor
from passes.tasks import LOSSES, by_objective
from passes.tasks.anomaly_detection import reconstruction_error  # noqa: F401  (prune and tests import it here)

log = logging.getLogger("kiln.train")


def augment(x, aug, gen):
    """Random rotation, brightness and blur on a float NCHW batch (seeded by ``gen``)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    if aug.rotate_deg > 0:
        ang = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(aug.rotate_deg)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    if aug.brightness > 0:
        x = x * (1 + (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * aug.brightness)
    if aug.blur > 0:
        k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
        k = k.expand(x.shape[1], 1, 3, 3)
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])
        pick = (torch.rand(n, 1, 1, 1, generator=gen) < aug.blur).float()
        x = pick * blurred + (1 - pick) * x
    return x.clamp_(0, 1)


def fit(model, x, y, *, epochs: int, batch: int, lr: float, aug, gen, xva=None, yva=None,
        after_step=None, keep_best: bool = False, tag: str = "train", loss: str = "classification",
        class_weights: list[float] | None = None) -> list[dict]:
    """Adam with a one-cycle schedule on uint8 NHWC samples ``x``/``y`` with online augmentation
    ``aug``; batches and augmentation drawn from ``gen``. ``after_step(model)`` runs after each
    optimizer step (compression passes keep pruning masks applied with it). With ``keep_best``
    the model ends with the weights of its best validation epoch. Returns one row per epoch.

    ``loss``: the net's objective, which names its task (passes/tasks/): "classification"
    (cross-entropy on the labels; rows have ``val_accuracy`` when validation samples are given)
    or "reconstruction" (MSE between the output and the flattened, augmented input:
    autoencoders; labels are not used; rows have ``val_mse``, the best epoch is the lowest). An
    anomaly detector's callers pass its normal samples only (``passes.tasks.fit_split``), for
    training and for validation. ``class_weights``: the loss's per-class weights (the task's
    ``loss_weights``: training.class_weights; None: every class alike)."""
    import torch

    if loss not in LOSSES:
        raise ValueError(f"fit: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * math.ceil(len(y) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    task = by_objective(loss)
    loss_fn = task.loss_fn(class_weights)
    metric, sign = task.VAL_METRIC, task.VAL_SIGN
    x_t, y_t = to_tensor(x), torch.from_numpy(y)
    best, history = {"score": -math.inf}, []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            # augmentation is for pixels in [0, 1]; a front end's features are left as they are
            xb = augment(x_t[idx], aug, gen) if x.dtype == np.uint8 else x_t[idx]
            out = model(xb)
            value = task.loss(loss_fn, out, xb, y_t[idx])
            opt.zero_grad()
            value.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            total += value.item() * len(idx)
        row = {"epoch": epoch, "loss": total / max(1, len(y))}
        if xva is not None:
            row[metric] = task.validation(model, xva, yva)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        _log_epoch(tag, epochs, row)
        score = sign * row[metric] if metric in row else 0.0
        if keep_best and score > best["score"]:
            best = {"score": score, "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if keep_best and "state_dict" in best:
        model.load_state_dict(best["state_dict"])
    model.eval()
    return history


def _log_epoch(tag: str, epochs: int, row: dict) -> None:
    """One line per epoch with the metrics it has: fine-tuning without validation images
    (weight coding) has no val accuracy, and a 'val_acc nan' would read like a broken model."""
    fmt, args = "%s: epoch %d/%d loss %.4f", [tag, row["epoch"], epochs, row["loss"]]
    if "val_accuracy" in row:
        fmt += " val_acc %.4f"
        args.append(row["val_accuracy"])
    if "val_mse" in row:
        fmt += " val_mse %.5f"
        args.append(row["val_mse"])
    log.info(fmt + " (%.1f s)", *args, row["seconds"])
