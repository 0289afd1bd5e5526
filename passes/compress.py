"""Compress stage: runs the manifest's compression passes in order and records, per pass, its
settings, parameters, MACs, weight bytes (as stored, and entropy-coded when weight coding ran),
kernel library bytes and the val figure it is judged on, the task's (passes/tasks/ ``judge``):
a classifier's val accuracy, an anomaly detector's val ROC AUC of its score (with the MSE of the
normal val samples next to it); then checks the budgets of the manifest's ``compression``
section (``max_accuracy_drop`` bounds the drop of that figure: accuracy, or AUC). With no
passes listed it is a pass-through that still measures the baseline, so later stages always
read ``compressed.pt``.

The pass interface
------------------
A compression pass is one member of ``kiln.schema.CompressionStep``: a step model tagged by the
pass's name, whose settings model (e.g. ``PruneSettings``) names the module implementing it in
its ``implementation``; the stage imports that module with ``kiln.registry.implementation(step)``
and calls its one entry point::

    run(model, ckpt: dict, settings, ctx: PassContext) -> (model, ckpt)

* ``model``: the torch module so far (eval mode); ``ckpt``: the checkpoint dict that becomes
  ``compressed.pt`` (``architecture``, ``channels``, ``num_classes``, ``image_size``, ...; no
  ``state_dict``). A pass may change both in place or return new ones. It may change
  ``ckpt["architecture"]["widths"]`` when it removes channels, and add its own keys
  (``ckpt["pruning"]``, ``ckpt["weight_coding"]``, ``ckpt["quantization"]``). The weights saved
  for the pass are ``model.state_dict()``, or the ``state_dict`` the pass put in the returned
  ckpt (when its module is a stand-in, e.g. a fake-quant twin); ``passes.support.common.rebuild``
  must rebuild the model from them. The next pass gets the ckpt without that ``state_dict``.
* ``settings``: the pass's settings model, already validated when the manifest loaded (a bad
  setting is a ManifestError naming ``compression.passes.<i>.<pass>.<field>`` before any work).
  A ``compression.search`` variant is ``project.compression.variant(i, field, value)``'s settings,
  validated the same way.
* ``ctx``: ``project`` (kiln.schema.Project), ``data_dir`` (the split .npz files), ``seed``
  (training.seed: passes that train or sample must be deterministic given it), ``index`` and
  ``name`` (the pass's place in ``compression.passes``; ``ctx.field()`` names it in errors).

Each row's ``val_accuracy`` is the returned model's val top-1 (an anomaly detector's rows have
``val_auc`` and ``val_mse`` instead; its passes fit and calibrate on the normal classes' samples
only, through ``passes.tasks.fit_split``); its weight bytes are
``passes.support.common.stored_weight_bytes(model, ckpt)`` (fp32, or int8 when
``ckpt["quantization"]`` is set); ``coded_bytes`` is ``ckpt["weight_coding"]["coded_bytes"]``
while the weights are still the ones weight coding coded. Its ``library_bytes`` is the size of
the kernel library compiled for the board type the caller gives (``library_board``; dodo.py
gives x86-host), measured in a temporary directory with passes/support's export and build.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.artifacts import Layout, sha256_file, write_json
from kiln.errors import PassError
from kiln.registry import implementation
from kiln.schema import Board, Project
from passes import tasks
from passes.support.common import (load_checkpoint, load_split, rebuild, save_checkpoint, sparsity,
                                   stored_weight_bytes, weights_sha256)

log = logging.getLogger("kiln.compress")


@dataclass(frozen=True)
class PassContext:
    project: Project
    data_dir: Path
    seed: int
    index: int
    name: str

    def field(self, name: str | None = None) -> str:
        """The manifest path of this pass's settings, or of one of them."""
        return f"compression.passes.{self.index}.{self.name}" + (f".{name}" if name else "")


def judge(project: Project, data_dir: Path):
    """The task's Judge of ``project`` on the val split of ``data_dir`` (passes/tasks/): the figure
    each row is judged on (``key``, ``name``), what its drop is recorded as (``drop_key``)."""
    x, y = load_split(data_dir, "val")
    return tasks.of(project).judge(project, x, y)


@dataclass
class Step:
    """One row of the table and the model state it measured (for its kernel library)."""

    row: dict[str, Any]
    snapshot: dict[str, Any]


def _specs(project: Project, data_dir: Path) -> list[tuple[Any, Any, PassContext]]:
    """(module, settings, context) per listed pass (settings validated at manifest load)."""
    out = []
    for i, step in enumerate(project.compression.passes):
        ctx = PassContext(project, Path(data_dir), project.training.seed, i, step.name)
        out.append((implementation(step), step.settings, ctx))
    return out


def _shown(settings) -> dict:
    """A pass's settings as the manifest gave them (defaults left out), for its row."""
    return settings.model_dump(mode="json", exclude_unset=True)


def _snapshot(model, ckpt: dict) -> tuple[dict, dict]:
    """(ckpt without its state_dict, ckpt with the weights to save: its own or the model's)."""
    rest = {k: v for k, v in ckpt.items() if k != "state_dict"}
    state = ckpt.get("state_dict") or model.state_dict()
    return rest, dict(rest, state_dict={k: v.detach().clone() for k, v in state.items()})


def coded_bytes(model, ckpt: dict) -> int | None:
    """The weight coding pass's coded size, if the weights are still those it coded."""
    wc = ckpt.get("weight_coding")
    if not wc:
        return None
    return wc["coded_bytes"] if wc.get("weights_sha256") == weights_sha256(model) else None


def _row(name: str, settings: dict, model, ckpt: dict, val, seconds: float) -> dict:
    from kiln.nets import measure

    cx = measure(model, (ckpt["channels"], *ckpt["image_size"]))
    stored = stored_weight_bytes(model, ckpt)
    coded = coded_bytes(model, ckpt)
    return {"pass": name, "settings": settings, "params": cx.params, "macs": cx.macs,
            "widths": list(ckpt["architecture"].get("widths", [])), "sparsity": round(sparsity(model), 6),
            "weight_bytes": stored, "coded_bytes": coded, "size_bytes": coded if coded is not None else stored,
            **val.measure(model), "seconds": round(seconds, 2)}


def _run_passes(specs, model, ckpt: dict, val) -> tuple[list[Step], Any, dict]:
    steps = []
    for module, settings, ctx in specs:
        t0 = time.perf_counter()
        model, ckpt = module.run(model, ckpt, settings, ctx)
        if ckpt.get("weight_coding") and coded_bytes(model, ckpt) is None:
            log.warning("compress %s: %s changed the weights weight_coding coded; its coded size is dropped",
                        ctx.project.name, ctx.name)
            ckpt = {k: v for k, v in ckpt.items() if k != "weight_coding"}
        ckpt, snapshot = _snapshot(model, ckpt)
        row = _row(ctx.name, _shown(settings), model, ckpt, val, time.perf_counter() - t0)
        log.info("compress %s: %s -> %d params, %d MACs, %d weight bytes%s, %s %.4f (%.1f s)", ctx.project.name,
                 ctx.name, row["params"], row["macs"], row["weight_bytes"],
                 f" ({row['coded_bytes']} coded)" if row["coded_bytes"] is not None else "", val.name, row[val.key],
                 row["seconds"])
        steps.append(Step(row, snapshot))
    return steps, model, ckpt


def _search(project: Project, specs, model, ckpt, val, base: dict) -> tuple[list[Step], dict]:
    """Run the passes once per value of compression.search; keep the smallest result within
    the accuracy budget. The passes before the searched one run once. (The manifest's loading
    checked that the searched pass is listed and that every value is a valid setting.)"""
    comp = project.compression
    search = comp.search
    at = next(i for i, (_, _, ctx) in enumerate(specs) if ctx.name == search.pass_)
    module, _, ctx = specs[at]
    variants = [comp.variant(at, search.field, value).settings for value in search.values]
    prefix, model, ckpt = _run_passes(specs[:at], model, ckpt, val)
    budget = comp.max_accuracy_drop
    candidates, best = [], None
    for value, settings in zip(search.values, variants):
        log.info("compress %s: search %s.%s = %r", project.name, search.pass_, search.field, value)
        steps, _, _ = _run_passes([(module, settings, ctx), *specs[at + 1:]], copy.deepcopy(model), copy.deepcopy(ckpt), val)
        run = prefix + steps
        last = run[-1].row
        drop = base[val.key] - last[val.key]
        cand = {"value": value, "passes": [s.row for s in run], "accuracy_drop": drop,
                "size_bytes": last["size_bytes"], "macs": last["macs"], "within_accuracy_budget": drop <= budget}
        candidates.append(cand)
        if cand["within_accuracy_budget"] and (best is None or (last["size_bytes"], last["macs"]) < best[0]):
            best = ((last["size_bytes"], last["macs"]), value, run)
    info = {"pass": search.pass_, "field": search.field, "candidates": candidates,
            "chosen": best[1] if best else None}
    if best is None:
        tried = ", ".join(f"{c['value']!r}: drop {c['accuracy_drop']:.4f}" for c in candidates)
        raise _BudgetMissed(info, f"no value of compression.search ({search.pass_}.{search.field}) keeps the "
                                  f"{val.name} drop within compression.max_accuracy_drop {budget} ({tried})")
    log.info("compress %s: search keeps %s.%s = %r", project.name, search.pass_, search.field, best[1])
    return best[2], info


class _BudgetMissed(Exception):
    def __init__(self, search: dict, message: str):
        super().__init__(message)
        self.search = search


def _budget_failures(project: Project, base: dict, final: dict, val) -> list[str]:
    c = project.compression
    drop = base[val.key] - final[val.key]
    size, kind = final["size_bytes"], "coded" if final["coded_bytes"] is not None else "as stored"
    ratio = base["weight_bytes"] / size
    out = []
    if drop > c.max_accuracy_drop:
        out.append(f"{val.name} dropped {drop:.4f} ({base[val.key]:.4f} -> {final[val.key]:.4f}), "
                   f"over compression.max_accuracy_drop {c.max_accuracy_drop}")
    if c.max_weight_bytes is not None and size > c.max_weight_bytes:
        out.append(f"final weights are {size:,} bytes ({kind}), over compression.max_weight_bytes {c.max_weight_bytes:,}")
    if c.min_weight_ratio is not None and ratio < c.min_weight_ratio:
        out.append(f"weight size ratio {ratio:.2f}x (baseline {base['weight_bytes']:,} bytes / final {size:,} bytes "
                   f"{kind}) is under compression.min_weight_ratio {c.min_weight_ratio}")
    return out


def library_bytes(snapshot: dict, data_dir: Path, board: Board) -> int:
    """Kernel library bytes of a checkpoint dict: exported (parity checked) and compiled, untuned,
    for ``board`` in a temporary directory (passes/support/onnx_export.py, tvm_build.py)."""
    from passes.support.onnx_export import export_checkpoint
    from passes.support.tvm_build import compile_onnx

    with tempfile.TemporaryDirectory(prefix="kiln-compress-") as tmp:
        t = Path(tmp)
        save_checkpoint(t / "model.pt", snapshot)
        info = export_checkpoint(t / "model.pt", data_dir, t / "model.onnx", t / "export.json")
        return compile_onnx(board, t / "model.onnx", info["input_shape"], t / "model.so", t / "compile.json")["library_bytes"]


def _baseline(project: Project, model_pt: Path, data_dir: Path):
    """(model, ckpt without weights, the Judge of the val split, the baseline Step) of a trained model."""
    model, ckpt = load_checkpoint(model_pt)
    val = judge(project, data_dir)
    ckpt, snapshot = _snapshot(model, ckpt)
    return model, ckpt, val, Step(_row("baseline", {}, model, ckpt, val, 0.0), snapshot)


def steps(project: Project, layout: Layout) -> list[Step]:
    """The baseline and one Step per listed pass on ``layout.model_pt``, without search or budget
    checks: what bench/compression.py measures; each Step's ``snapshot`` is a checkpoint dict."""
    model, ckpt, val, base = _baseline(project, layout.model_pt, layout.data)
    passes, _, _ = _run_passes(_specs(project, layout.data), model, ckpt, val)
    return [base, *passes]


def run(project: Project, layout: Layout, library_board: Board | None) -> dict:
    """Compress ``layout.model_pt`` into ``layout.compressed_pt`` (every row: ``layout.compress_json``).
    ``library_board``: the board type whose kernel library size each row reports when
    compression.library_bytes is on; None skips those sizes."""
    import torch

    torch.set_num_threads(project.training.threads)
    comp = project.compression
    data_dir, out_pt, out_json = layout.data, layout.compressed_pt, layout.compress_json
    specs = _specs(project, data_dir)
    board = library_board if comp.library_bytes else None
    model, ckpt, val, base = _baseline(project, layout.model_pt, data_dir)
    summary: dict[str, Any] = {"max_accuracy_drop": comp.max_accuracy_drop, "min_weight_ratio": comp.min_weight_ratio,
                               "max_weight_bytes": comp.max_weight_bytes}
    try:
        if comp.search is None:
            steps, _, _ = _run_passes(specs, model, ckpt, val)
        else:
            steps, summary["search"] = _search(project, specs, model, ckpt, val, base.row)
    except _BudgetMissed as e:
        summary.update(search=e.search, error=str(e))
        write_json(out_json, summary)
        raise PassError(f"compress {project.name}: {e} (every candidate: {out_json})") from e
    steps = [base, *steps]
    for s in steps:
        s.row["size_ratio"] = round(base.row["weight_bytes"] / s.row["size_bytes"], 4)
        if board is not None:
            s.row["library_bytes"] = library_bytes(s.snapshot, data_dir, board)
    rows = [s.row for s in steps]
    final = rows[-1]
    summary.update(passes=rows, judged_on=val.key, size_ratio=final["size_ratio"],
                   **{val.drop_key: base.row[val.key] - final[val.key]})
    failures = _budget_failures(project, base.row, final, val)
    if failures:
        summary["error"] = "; ".join(failures)
        write_json(out_json, summary)
        raise PassError(f"compress {project.name}: {summary['error']} (every row: {out_json})")
    out = dict(steps[-1].snapshot, compression={k: v for k, v in summary.items() if k != "search"})
    try:
        rebuild(out)
    except (KeyError, RuntimeError, ValueError) as e:
        raise PassError(f"compress {project.name}: the last pass left a checkpoint that does not rebuild ({e})") from e
    save_checkpoint(out_pt, out)
    summary["compressed_sha256"] = sha256_file(out_pt)  # a damaged compressed.pt is rebuilt (kiln.uptodate)
    write_json(out_json, summary)
    log.info("compress %s: %d -> %d weight bytes (%.2fx), %s %.4f -> %.4f", project.name, base.row["weight_bytes"],
             final["size_bytes"], final["size_ratio"], val.name, base.row[val.key], final[val.key])
    return summary
