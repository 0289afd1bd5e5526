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

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * math.ceil(len(ytr) / cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    xtr_t, ytr_t = to_tensor(xtr), torch.from_numpy(ytr)
    best = {"val_accuracy": -1.0}
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(ytr), generator=gen)
        total = 0.0
        for i in range(0, len(order), cfg.batch):
            idx = order[i : i + cfg.batch]
            xb = augment(xtr_t[idx], ds.augment, gen)
            loss = loss_fn(model(xb), ytr_t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val_acc, _ = accuracy(model, xva, yva)
        row = {"epoch": epoch, "loss": total / len(ytr), "val_accuracy": val_acc, "seconds": time.perf_counter() - t0}
        history.append(row)
        log.info("train %s: epoch %d/%d loss %.4f val_acc %.4f (%.1f s)",
                 project.name, epoch, cfg.epochs, row["loss"], val_acc, row["seconds"])
        if val_acc > best["val_accuracy"]:
            best = {"val_accuracy": val_acc, "epoch": epoch,
                    "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()}}

    model.load_state_dict(best["state_dict"])
    test_acc, _ = accuracy(model, xte, yte)
    metrics = {
        "params": cx.params, "macs": cx.macs, "best_epoch": best["epoch"],
        "val_accuracy": best["val_accuracy"], "test_accuracy": test_acc, "history": history,
        "training": cfg.model_dump(), "augment": ds.augment.model_dump(),
        "data_sha256": sha256_file(Path(data_dir) / "train.npz"),
    }
    ckpt = {
        "state_dict": best["state_dict"], "architecture": arch.model_dump(), "channels": ds.channels,
        "num_classes": ds.num_classes, "image_size": list(ds.image_size), "metrics": metrics,
    }
    save_checkpoint(out_pt, ckpt)
    write_json(out_metrics, metrics)
    log.info("train %s: best epoch %d, val %.4f, test %.4f", project.name, best["epoch"], best["val_accuracy"], test_acc)
    return metrics
