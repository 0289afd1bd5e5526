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

import hashlib
import json
import logging
import sys

from kiln.artifacts import Layout, read_json, sha256_file, write_json
from kiln.errors import ManifestError, PassError
from kiln.schema import Project
from passes import tasks
from passes.support import distributed
from passes.support.common import save_checkpoint
from passes.support.training import fit, raw_batches, resolve_device

log = logging.getLogger("kiln.train")

# training's fields that say where and how fast it runs, not what is learned: a change of them
# alone keeps a warm start possible (training.warm_start)
OPERATIONAL = {"warm_start", "device", "distributed", "loader_workers", "threads"}


def run(project: Project, layout: Layout) -> dict:
    """Train on ``layout.data``; write ``layout.model_pt`` and ``layout.metrics``. With
    training.distributed the training runs under torchrun (passes/support/distributed.py), each
    rank running ``_train``; only the writer rank writes."""
    if project.training.distributed is not None and not distributed.inside():
        distributed.launch(project, layout)
        return read_json(layout.metrics)
    return _train(project, layout)


def _train(project: Project, layout: Layout) -> dict:
    import torch

    cfg, ds, arch = project.training, project.dataset, project.architecture
    family = type(arch)
    if not getattr(family, "trains", True):
        raise PassError(f"train {project.name}: family '{arch.family}' is not trained by Kiln "
                        "(its model is imported: passes/import_model.py)")
    objective, task = project.objective, tasks.of(project)  # a field of family module, else the family's
    torch.manual_seed(cfg.seed)
    device, writes, threads, world = resolve_device(cfg.device), True, cfg.threads, 1
    if distributed.inside():
        device = distributed.rank_device(device)
        _, world, writes = distributed.init(cfg, device)
        threads = max(1, cfg.threads // cfg.distributed.nproc_per_node)  # the ranks share the cores
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(cfg.seed)
    try:
        return _fit_and_write(project, layout, cfg, ds, arch, objective, task, device, gen, writes, world)
    finally:
        distributed.done()


def _fit_and_write(project, layout, cfg, ds, arch, objective, task, device, gen, writes, world) -> dict:
    data_dir = layout.data
    xtr, ytr = task.fit_split(project, data_dir, "train")  # an anomaly detector's: the normal samples only
    xva, yva = task.fit_split(project, data_dir, "val")
    model, cx = _model(project)
    trained_on = {"data": data_fingerprint(layout), "settings": settings_fingerprint(project)}
    warm = _warm_start(project, layout, trained_on)
    epochs = cfg.epochs
    if warm is not None:
        model.load_state_dict(warm["state_dict"])
        epochs = cfg.warm_start
    start = (f"warm start from {warm['data'][:12]} for {epochs} epochs" if warm is not None
             else "trained from scratch")
    log.info("train %s: %d params, %d MACs, %d activations, %d train / %d val samples, %d epochs, %s, %s on %s",
             project.name, cx.params, cx.macs, cx.activations, len(ytr), len(yva), epochs, objective, start, device)

    weights = task.loss_weights(project, ytr)  # training.class_weights (None: unweighted, as before)
    if weights is not None:
        log.info("train %s: class weights %s", project.name, ", ".join(f"{w:.3g}" for w in weights))
    history = fit(model, xtr, ytr, epochs=epochs, batch=cfg.batch, lr=cfg.lr, aug=ds.augment, gen=gen,
                  xva=xva, yva=yva, keep_best=True, tag=f"train {project.name}", loss=objective,
                  class_weights=weights, recipe=cfg, raw=raw_batches(project, data_dir), device=str(device))
    if not writes:  # a rank other than the writer: the writer writes the outputs, once
        return {}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    metrics = {"params": cx.params, "macs": cx.macs, "activations": cx.activations, "objective": objective}
    figures, summary = task.train_metrics(project, model, history, data_dir, len(ytr))
    metrics.update(figures)
    metrics["class_weights"] = weights
    if len(history) < epochs:  # training.early_stopping
        metrics["stopped_early_at_epoch"] = len(history)
    metrics.update(history=history, training=cfg.model_dump(), augment=ds.augment.model_dump(),
                   data_sha256=sha256_file(layout.split("train")), trained_on=trained_on, start=start,
                   warm_start={"from": warm["data"], "epochs": epochs} if warm is not None else None,
                   device=str(device), processes=world)
    ckpt = {
        "state_dict": best_state, "architecture": arch.model_dump(), "channels": ds.channels,
        "num_classes": ds.num_classes, "image_size": list(ds.image_size), "metrics": metrics,
        **task.checkpoint(project),  # what it was trained on (an anomaly detector's normal classes)
    }
    save_checkpoint(layout.model_pt, ckpt)
    metrics["model_sha256"] = sha256_file(layout.model_pt)  # a damaged model.pt is rebuilt (kiln.uptodate)
    write_json(layout.metrics, metrics)
    log.info("train %s: best epoch %d, %s (%s)", project.name, metrics["best_epoch"], summary, start)
    return metrics


def data_fingerprint(layout: Layout) -> str:
    """sha256 over the training and validation splits the data stage wrote (a file, or a
    folder of files: each file's name and content)."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        path = layout.split(split)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(f"{split}/{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


def settings_fingerprint(project: Project) -> str:
    """sha256 of what decides the model apart from the data: the architecture, the learning
    settings (training less ``OPERATIONAL``), the augmentation, the classes and input shape."""
    ds = project.dataset
    what = {"architecture": project.architecture.model_dump(mode="json"),
            "training": project.training.model_dump(mode="json", exclude=OPERATIONAL),
            "augment": ds.augment.model_dump(mode="json"), "channels": ds.channels,
            "num_classes": ds.num_classes, "image_size": list(ds.image_size),
            "anomaly": project.anomaly.model_dump(mode="json") if project.anomaly is not None else None}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _warm_start(project: Project, layout: Layout, now: dict) -> dict | None:
    """The last model's weights and the data it was trained on, when training.warm_start is set
    and only the data changed since (the settings' fingerprint the same, the data's not); None:
    train from scratch (also when the data is unchanged: the rerun was asked for, e.g. by
    ``doit forget train:<app>``)."""
    import torch

    if project.training.warm_start is None:
        return None
    try:
        last = read_json(layout.metrics)
        prev = last.get("trained_on") or {}
        if prev.get("settings") != now["settings"]:
            log.info("train %s: the settings changed since the last model (or it predates warm starts): from scratch",
                     project.name)
            return None
        if prev.get("data") == now["data"]:
            log.info("train %s: the data is the last model's: retraining from scratch", project.name)
            return None
        if last.get("model_sha256") != sha256_file(layout.model_pt):
            log.warning("train %s: %s differs from its record: from scratch", project.name, layout.model_pt)
            return None
        ckpt = torch.load(layout.model_pt, map_location="cpu", weights_only=False)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        log.info("train %s: no last model to start from (%s): from scratch", project.name, e)
        return None
    return {"state_dict": ckpt["state_dict"], "data": prev["data"]}


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


def _rank_main(job: str) -> int:
    """A rank of a distributed train (torchrun runs ``python -m passes.train <job>``)."""
    import pickle

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with open(job, "rb") as f:
        spec = pickle.load(f)
    _train(spec["project"], spec["layout"])
    return 0


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1]))
