"""Compress stage: runs the manifest's compression passes in order and records, per pass,
parameters, MACs, weight bytes and accuracy. With no passes listed it is a pass-through that
still measures the baseline, so later stages always read ``compressed.pt``."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from kiln.artifacts import write_json
from kiln.errors import ManifestError, PassError
from kiln.schema import Project
from passes.common import accuracy, load_checkpoint, load_split, save_checkpoint, weight_bytes
from passes.pipeline import COMPRESSION_PASSES

log = logging.getLogger("kiln.compress")


def _row(name: str, model, ckpt, x, y) -> dict:
    from kiln.nets import measure

    acc, _ = accuracy(model, x, y)
    cx = measure(model, (ckpt["channels"], *ckpt["image_size"]))
    return {"pass": name, "params": cx.params, "macs": cx.macs, "weight_bytes": weight_bytes(model), "val_accuracy": acc}


def run(project: Project, model_pt: Path, data_dir: Path, out_pt: Path, out_json: Path) -> dict:
    model, ckpt = load_checkpoint(model_pt)
    xva, yva = load_split(data_dir, "val")
    rows = [_row("baseline", model, ckpt, xva, yva)]
    for i, spec in enumerate(project.compression.passes):
        if len(spec) != 1:
            raise ManifestError(f"compression.passes.{i}: expected one pass name mapped to its settings, got {list(spec)}")
        (name, params), = spec.items()
        if name not in COMPRESSION_PASSES:
            raise ManifestError(
                f"compression.passes.{i}: unknown compression pass '{name}' "
                f"(available: {', '.join(COMPRESSION_PASSES) or 'none in this version'})"
            )
        module = importlib.import_module(COMPRESSION_PASSES[name])
        model = module.run(model, params, data_dir)
        rows.append(_row(name, model, ckpt, xva, yva))
        log.info("compress %s: %s -> %d weight bytes, val %.4f", project.name, name, rows[-1]["weight_bytes"], rows[-1]["val_accuracy"])
    drop = rows[0]["val_accuracy"] - rows[-1]["val_accuracy"]
    budget = project.compression.max_accuracy_drop
    if drop > budget:
        raise PassError(
            f"compress {project.name}: accuracy dropped {drop:.4f} (val {rows[0]['val_accuracy']:.4f} -> "
            f"{rows[-1]['val_accuracy']:.4f}), over compression.max_accuracy_drop {budget}"
        )
    ckpt = dict(ckpt, state_dict=model.state_dict())
    save_checkpoint(out_pt, ckpt)
    summary = {"passes": rows, "accuracy_drop": drop, "max_accuracy_drop": budget}
    write_json(out_json, summary)
    return summary
