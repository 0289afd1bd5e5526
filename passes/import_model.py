"""Import stage: the train stage of a family Kiln does not train (``architecture.trains`` false,
e.g. ``family: onnx``, ``family: tflite``). It reads the team's model into a Kiln checkpoint, checked against the
dataset's input shape and classes, and measures it on the validation and test splits, so the
compress stage (post-training passes only) and everything after it run as for a trained model.
"""

from __future__ import annotations

import logging

from kiln.artifacts import Layout, sha256_file, write_json
from kiln.schema import Project
from passes.support.common import accuracy, load_split, save_checkpoint

log = logging.getLogger("kiln.import")


def run(project: Project, layout: Layout) -> dict:
    """Write ``layout.model_pt`` and ``layout.metrics`` for the manifest's ready-made model."""
    import torch

    from kiln.nets import imported, measure

    ds, arch = project.dataset, project.architecture
    torch.set_num_threads(project.training.threads)
    # the family's checks and what it adds (family tflite: TVM's import, an int8 file's quantization)
    model, extra = imported(arch, ds.channels, ds.num_classes, ds.image_size, project.compression)
    cx = measure(model, (ds.channels, *ds.image_size))
    xva, yva = load_split(layout.data, "val")
    xte, yte = load_split(layout.data, "test")
    val_acc, _ = accuracy(model, xva, yva)
    test_acc, _ = accuracy(model, xte, yte)
    source = getattr(arch, "path", None)
    metrics = {
        "params": cx.params, "macs": cx.macs, "imported": source, "trained": False,
        "source_sha256": sha256_file(source) if source else None,
        "val_accuracy": val_acc, "test_accuracy": test_acc, "history": [],
        "data_sha256": sha256_file(layout.split("train")), **extra.get("metrics", {}),
    }
    ckpt = {
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "architecture": arch.model_dump(), "channels": ds.channels, "num_classes": ds.num_classes,
        "image_size": list(ds.image_size), "metrics": metrics, **extra.get("checkpoint", {}),
    }
    save_checkpoint(layout.model_pt, ckpt)
    metrics["model_sha256"] = sha256_file(layout.model_pt)  # a damaged model.pt is rebuilt (kiln.uptodate)
    write_json(layout.metrics, metrics)
    log.info("import %s: %s, %d params, %d MACs, val %.4f, test %.4f (not trained)", project.name, source,
             cx.params, cx.macs, val_acc, test_acc)
    return metrics
