"""Train stage: seeded PyTorch training with online augmentation (passes/support/training.py);
keeps the best-validation checkpoint, which describes itself (architecture, classes, input
size, metrics)."""

from __future__ import annotations

import logging

from kiln.artifacts import Layout, sha256_file, write_json
from kiln.errors import ManifestError
from kiln.schema import Project
from passes.support.common import accuracy, load_split, save_checkpoint
from passes.support.training import fit

log = logging.getLogger("kiln.train")


def run(project: Project, layout: Layout) -> dict:
    """Train on ``layout.data``; write ``layout.model_pt`` and ``layout.metrics``."""
    import torch

    from kiln.nets import build, estimate, measure

    cfg, ds, arch = project.training, project.dataset, project.architecture
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)

    data_dir = layout.data
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
        "data_sha256": sha256_file(data_dir / "train.npz"),
    }
    ckpt = {
        "state_dict": best_state, "architecture": arch.model_dump(), "channels": ds.channels,
        "num_classes": ds.num_classes, "image_size": list(ds.image_size), "metrics": metrics,
    }
    save_checkpoint(layout.model_pt, ckpt)
    write_json(layout.metrics, metrics)
    log.info("train %s: best epoch %d, val %.4f, test %.4f", project.name, best_epoch["epoch"],
             best_epoch["val_accuracy"], test_acc)
    return metrics
