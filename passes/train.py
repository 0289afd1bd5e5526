"""Train stage: seeded PyTorch training with online augmentation (passes/support/training.py);
keeps the best-validation checkpoint, which describes itself (architecture, classes, input
size, metrics).

The loss, the samples trained on and the figures recorded are the task's (passes/tasks/, chosen
by the family's ``objective``): classifiers train on cross-entropy and report accuracy;
reconstruction families (autoencoders: anomaly detectors) train on MSE against their input, on
the normal classes' samples only (``anomaly.normal``), and report the validation and test MSE of
the normal samples and the validation and test ROC AUC of the anomaly score over every sample
(no accuracy: there is no label to be right about).
Families Kiln does not train (``trains`` false, family onnx) never reach this stage: dodo runs
the import stage (passes/import_model.py) for them."""

from __future__ import annotations

import logging

from kiln.artifacts import Layout, sha256_file, write_json
from kiln.errors import ManifestError, PassError
from kiln.schema import Project
from passes import tasks
from passes.support.common import save_checkpoint
from passes.support.training import fit, raw_batches

log = logging.getLogger("kiln.train")


def run(project: Project, layout: Layout) -> dict:
    """Train on ``layout.data``; write ``layout.model_pt`` and ``layout.metrics``."""
    import torch

    cfg, ds, arch = project.training, project.dataset, project.architecture
    family = type(arch)
    if not getattr(family, "trains", True):
        raise PassError(f"train {project.name}: family '{arch.family}' is not trained by Kiln "
                        "(its model is imported: passes/import_model.py)")
    objective, task = project.objective, tasks.of(project)  # a field of family module, else the family's
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    gen = torch.Generator().manual_seed(cfg.seed)

    data_dir = layout.data
    xtr, ytr = task.fit_split(project, data_dir, "train")  # an anomaly detector's: the normal samples only
    xva, yva = task.fit_split(project, data_dir, "val")
    model, cx = _model(project)
    log.info("train %s: %d params, %d MACs, %d activations, %d train / %d val samples, %d epochs, %s",
             project.name, cx.params, cx.macs, cx.activations, len(ytr), len(yva), cfg.epochs, objective)

    weights = task.loss_weights(project, ytr)  # training.class_weights (None: unweighted, as before)
    if weights is not None:
        log.info("train %s: class weights %s", project.name, ", ".join(f"{w:.3g}" for w in weights))
    history = fit(model, xtr, ytr, epochs=cfg.epochs, batch=cfg.batch, lr=cfg.lr, aug=ds.augment, gen=gen,
                  xva=xva, yva=yva, keep_best=True, tag=f"train {project.name}", loss=objective,
                  class_weights=weights, recipe=cfg, raw=raw_batches(project, data_dir))
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics = {"params": cx.params, "macs": cx.macs, "activations": cx.activations, "objective": objective}
    figures, summary = task.train_metrics(project, model, history, data_dir, len(ytr))
    metrics.update(figures)
    metrics["class_weights"] = weights
    if len(history) < cfg.epochs:  # training.early_stopping
        metrics["stopped_early_at_epoch"] = len(history)
    metrics.update(history=history, training=cfg.model_dump(), augment=ds.augment.model_dump(),
                   data_sha256=sha256_file(layout.split("train")))
    ckpt = {
        "state_dict": best_state, "architecture": arch.model_dump(), "channels": ds.channels,
        "num_classes": ds.num_classes, "image_size": list(ds.image_size), "metrics": metrics,
        **task.checkpoint(project),  # what it was trained on (an anomaly detector's normal classes)
    }
    save_checkpoint(layout.model_pt, ckpt)
    metrics["model_sha256"] = sha256_file(layout.model_pt)  # a damaged model.pt is rebuilt (kiln.uptodate)
    write_json(layout.metrics, metrics)
    log.info("train %s: best epoch %d, %s", project.name, metrics["best_epoch"], summary)
    return metrics


def _model(project: Project):
    """The untrained model and its measured complexity, checked before any epoch: analytic
    families against their estimate, every family against ``max_macs``, a team's own module
    for its output shape and (before training, with the node named) for what TVM cannot
    import."""
    from kiln.nets import build, estimate, measure

    ds, arch = project.dataset, project.architecture
    family = type(arch)
    shape = (ds.channels, *ds.image_size)
    model = build(arch, ds.channels, ds.num_classes, ds.image_size)
    cx = measure(model, shape)
    if getattr(family, "analytic", True):
        est = estimate(arch, ds.image_size, ds.channels, ds.num_classes)
        if cx != est:
            raise PassError(f"train {project.name}: family {arch.family}'s estimate {est} drifted from the "
                            f"model it builds {cx} (a bug in kiln/nets/)")
    if arch.max_macs is not None and cx.macs > arch.max_macs:  # load_project checks analytic families too
        raise ManifestError(f"architecture.max_macs: the model needs {cx.macs:,} MACs per inference, "
                            f"over its budget of {arch.max_macs:,}")
    if not getattr(family, "analytic", True):
        _check_output(model, project, shape)
        from kiln.nets.onnx import preflight

        preflight(model, shape, f"architecture: {arch.family} {getattr(arch, 'class_name', '')} "
                                f"({getattr(arch, 'file', '')})")
    return model, cx


def _check_output(model, project: Project, shape: tuple[int, ...]) -> None:
    """A team's module must map (1, C, H, W) to what its task trains (passes/tasks/): (1, classes)
    logits, or for a reconstruction objective (1, C*H*W); said before training, not as a
    loss-function traceback."""
    import torch

    arch = project.architecture
    want = tasks.of(project).output_shape(project, shape)
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except Exception as e:  # the team's forward may raise anything
        raise ManifestError(f"architecture: {getattr(arch, 'class_name', arch.family)} fails on a (1, {', '.join(map(str, shape))}) "
                            f"input: {type(e).__name__}: {e}") from e
    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if got != want:
        raise ManifestError(f"architecture: {getattr(arch, 'class_name', arch.family)} returns {got} for a "
                            f"(1, {', '.join(map(str, shape))}) input, expected {want}")
