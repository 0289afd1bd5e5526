"""Train pass: seeded PyTorch training with online augmentation; keeps the best-validation
checkpoint, which describes itself (architecture, classes, input size, metrics)."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path


from kiln.artifacts import sha256_file, write_json
from kiln.errors import ManifestError
from kiln.schema import Project
from passes.common import accuracy, load_split, save_checkpoint, to_tensor

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
        after_step=None, keep_best: bool = False, tag: str = "train") -> list[dict]:
    """Adam with a one-cycle schedule on uint8 NHWC images ``x``/``y`` with online augmentation
    ``aug``; batches and augmentation drawn from ``gen``. ``after_step(model)`` runs after each
    optimizer step (compression passes keep pruning masks applied with it). With ``keep_best``
    the model ends with the weights of its best validation epoch. Returns one row per epoch."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, epochs * math.ceil(len(y) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    x_t, y_t = to_tensor(x), torch.from_numpy(y)
    best, history = {"val_accuracy": -1.0}, []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            loss = loss_fn(model(augment(x_t[idx], aug, gen)), y_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if after_step is not None:
                after_step(model)
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "loss": total / max(1, len(y))}
        if xva is not None:
            row["val_accuracy"], _ = accuracy(model, xva, yva)
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        log.info("%s: epoch %d/%d loss %.4f val_acc %.4f (%.1f s)", tag, epoch, epochs, row["loss"],
                 row.get("val_accuracy", float("nan")), row["seconds"])
        if keep_best and row.get("val_accuracy", 0.0) > best["val_accuracy"]:
            best = {"val_accuracy": row["val_accuracy"],
                    "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if keep_best and "state_dict" in best:
        model.load_state_dict(best["state_dict"])
    model.eval()
    return history


def run(project: Project, data_dir: Path, out_pt: Path, out_metrics: Path) -> dict:
    import torch

    from kiln.nets import build, estimate, measure

    cfg, ds, arch = project.training, project.dataset, project.architecture
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)

    xtr, ytr = load_split(data_dir, "train")
    xva, yva = load_split(data_dir, "val")
    xte, yte = load_split(data_dir, "test")
    model = build(arch, ds.channels, ds.num_classes, ds.image_size)
    cx = measure(model, (ds.channels, *ds.image_size))
    assert cx == estimate(arch, ds.image_size, ds.channels, ds.num_classes), "estimate drifted from model"
    if cx.macs > arch.max_macs:  # load_project checks this too; kept for direct callers
        raise ManifestError(f"architecture.max_macs: model needs {cx.macs:,} MACs > {arch.max_macs:,}")
    log.info("train %s: %d params, %d MACs, %d train / %d val images, %d epochs",
             project.name, cx.params, cx.macs, len(ytr), len(yva), cfg.epochs)

    history = fit(model, xtr, ytr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, aug=ds.augment, gen=gen,
                  xva=xva, yva=yva, keep_best=True, tag=f"train {project.name}")
    best_epoch = max(history, key=lambda r: r["val_accuracy"])  # first of the best, as fit keeps it
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    test_acc, _ = accuracy(model, xte, yte)
    metrics = {
        "params": cx.params, "macs": cx.macs, "best_epoch": best_epoch["epoch"],
        "val_accuracy": best_epoch["val_accuracy"], "test_accuracy": test_acc, "history": history,
        "training": cfg.model_dump(), "augment": ds.augment.model_dump(),
        "data_sha256": sha256_file(Path(data_dir) / "train.npz"),
    }
    ckpt = {
        "state_dict": best_state, "architecture": arch.model_dump(), "channels": ds.channels,
        "num_classes": ds.num_classes, "image_size": list(ds.image_size), "metrics": metrics,
    }
    save_checkpoint(out_pt, ckpt)
    write_json(out_metrics, metrics)
    log.info("train %s: best epoch %d, val %.4f, test %.4f", project.name, best_epoch["epoch"],
             best_epoch["val_accuracy"], test_acc)
    return metrics
