"""The compress stage on a build layout: its rows, its budgets (accuracy drop, size targets) and
their messages, the search mode, kernel library sizes for the board it is given (none without
one), a pruned checkpoint that the export stage still exports, and bad compression sections
refused when the manifest loads."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest

from kiln.config import load_board, load_project
from kiln.errors import ManifestError, PassError
from passes import compress
from passes.support.common import load_checkpoint
from tests.conftest import TINY, run_doit, write_project
from tests.passes.conftest import small_manifest, small_project

WRECKED = "quantize"  # the pass the wreck fixture stands in for


def run(model, ckpt, settings, ctx):
    """A 'wreck' pass for these tests: zeroes every parameter (accuracy falls to chance)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model, ckpt


@pytest.fixture
def wreck(monkeypatch):
    """The stage runs this module's ``run`` wherever the manifest lists WRECKED."""
    real = compress.implementation
    monkeypatch.setattr(compress, "implementation",
                        lambda step: sys.modules[__name__] if step.name == WRECKED else real(step))


def compress_run(lay, **compression):
    """The compress stage on ``lay``, with the library board dodo.py gives it."""
    return compress.run(small_project(**compression), lay, load_board("x86-host"))


def test_accuracy_budget_failure_names_field_and_numbers(small_layout, wreck):
    with pytest.raises(PassError) as e:
        compress_run(small_layout, passes=[{WRECKED: {}}], max_accuracy_drop=0.05)
    msg = str(e.value)
    summary = json.loads(small_layout.compress_json.read_text())
    base, final = (r["val_accuracy"] for r in (summary["passes"][0], summary["passes"][-1]))
    assert "compression.max_accuracy_drop 0.05" in msg and f"{base:.4f} -> {final:.4f}" in msg
    assert f"dropped {base - final:.4f}" in msg and summary["error"] in msg
    assert not small_layout.compressed_pt.exists()



def test_a_manifest_asking_for_macro_f1_is_judged_on_val_macro_f1(small_layout, wreck):
    """Top-1 can hold while a rare class is lost: where requirements.macro_f1 is set, each row
    carries val macro-F1 (scikit-learn's f1_score, macro) and the budget bounds its drop."""
    from sklearn.metrics import f1_score

    from passes.support.common import accuracy, load_split

    project = small_project(passes=[{WRECKED: {}}], max_accuracy_drop=0.05)
    project.requirements.macro_f1 = {"min": 0.5}
    project = type(project).model_validate(project.model_dump(by_alias=True))
    with pytest.raises(PassError) as e:
        compress.run(project, small_layout, load_board("x86-host"))
    summary = json.loads(small_layout.compress_json.read_text())
    base = summary["passes"][0]
    x, y = load_split(small_layout.data, "val")
    _, preds = accuracy(load_checkpoint(small_layout.model_pt)[0], x, y)
    assert base["val_macro_f1"] == pytest.approx(f1_score(y, preds, average="macro"), abs=1e-9)
    assert summary["judged_on"] == "val_macro_f1" and "macro_f1_drop" in summary
    assert "val macro-F1 dropped" in str(e.value) and "compression.max_accuracy_drop 0.05" in str(e.value)


@pytest.mark.parametrize("step", [{"prune": {"method": "magnitude", "amount": 0.3, "finetune_epochs": 1}},
                                  {"weight_coding": {"finetune_epochs": 1}}])
def test_fine_tuning_keeps_the_class_weights_of_training(small_layout, tmp_path, step):
    """prune and weight coding fine-tune on the train stage's loss: with training.class_weights
    set the fine-tuned weights differ from an unweighted run's (they were dropped before)."""
    import torch

    from passes.tasks import fit_split

    weighted = small_manifest(passes=[step], max_accuracy_drop=1.0)
    weighted["training"]["class_weights"] = [1.0] * 9 + [20.0]
    project = type(small_project()).model_validate(weighted)
    _, y = fit_split(project, small_layout.data, "train")
    from passes.support.training import finetune_options

    assert finetune_options(project, small_layout.data, y)["class_weights"][-1] == 20.0
    states = []
    for p in (small_project(passes=[step], max_accuracy_drop=1.0), project):
        compress.run(p, small_layout, None)
        states.append(load_checkpoint(small_layout.compressed_pt)[0].state_dict())
    assert any(not torch.equal(a, states[1][k]) for k, a in states[0].items() if a.is_floating_point())

def test_size_targets_failures_name_field_and_numbers(small_layout):
    with pytest.raises(PassError) as e:
        compress_run(small_layout, passes=[{"weight_coding": {"finetune_epochs": 0}}], max_accuracy_drop=1.0,
                     max_weight_bytes=100, min_weight_ratio=50.0)
    msg = str(e.value)
    rows = json.loads(small_layout.compress_json.read_text())["passes"]
    coded, base = rows[-1]["coded_bytes"], rows[0]["weight_bytes"]
    assert f"final weights are {coded:,} bytes (coded), over compression.max_weight_bytes 100" in msg
    assert f"weight size ratio {base / coded:.2f}x (baseline {base:,} bytes / final {coded:,} bytes coded)" in msg
    assert "under compression.min_weight_ratio 50.0" in msg


def test_rows_and_a_pruned_checkpoint_that_exports(small_layout):
    from passes import export_onnx

    summary = compress_run(small_layout, library_bytes=True, min_weight_ratio=4.0, max_accuracy_drop=0.5,
                           passes=[{"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}},
                                   {"weight_coding": {"finetune_epochs": 1}}])
    base, pruned, coded = summary["passes"]
    assert [r["pass"] for r in summary["passes"]] == ["baseline", "prune", "weight_coding"]
    assert pruned["settings"] == {"method": "structured", "amount": 0.5, "finetune_epochs": 1}
    assert pruned["widths"] == [4, 8] and pruned["params"] < base["params"] and pruned["macs"] < base["macs"]
    assert pruned["weight_bytes"] == 4 * pruned["params"] and pruned["coded_bytes"] is None
    assert coded["coded_bytes"] == coded["size_bytes"] < coded["weight_bytes"] == pruned["weight_bytes"]
    assert coded["size_ratio"] == pytest.approx(base["weight_bytes"] / coded["coded_bytes"], rel=1e-3)
    assert all(r["library_bytes"] > 0 for r in summary["passes"])
    assert pruned["library_bytes"] <= base["library_bytes"]
    model, ckpt = load_checkpoint(small_layout.compressed_pt)  # widths changed: still rebuilds and exports
    assert ckpt["architecture"]["widths"] == [4, 8] and ckpt["weight_coding"]["coded_bytes"] == coded["coded_bytes"]
    info = export_onnx.run(small_project(), small_layout)
    assert info["parity_max_abs_diff"] < 1e-4 and json.loads(small_layout.export_json.read_text()) == info
    assert small_layout.onnx.stat().st_size == info["onnx_bytes"]


def test_no_library_board_skips_the_library_sizes(small_layout):
    summary = compress.run(small_project(library_bytes=True), small_layout, None)
    assert [r["pass"] for r in summary["passes"]] == ["baseline"]
    assert "library_bytes" not in summary["passes"][0] and small_layout.compressed_pt.exists()


def test_search_keeps_the_smallest_model_within_budget(small_layout):
    summary = compress_run(small_layout, max_accuracy_drop=0.1,
                           passes=[{"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}}],
                           search={"pass": "prune", "field": "amount", "values": [0.25, 0.5, 0.95]})
    cands = summary["search"]["candidates"]
    assert [c["value"] for c in cands] == [0.25, 0.5, 0.95]
    ok = [c for c in cands if c["within_accuracy_budget"]]
    assert ok and not cands[2]["within_accuracy_budget"]  # one filter per conv is too few
    chosen = min(ok, key=lambda c: c["size_bytes"])
    assert summary["search"]["chosen"] == chosen["value"]
    assert summary["passes"][-1]["settings"]["amount"] == chosen["value"]
    assert load_checkpoint(small_layout.compressed_pt)[0] is not None


def test_search_with_no_candidate_within_budget_fails_listing_them(small_layout, wreck):
    with pytest.raises(PassError) as e:
        compress_run(small_layout, passes=[{"prune": {"method": "magnitude", "amount": 0.5, "finetune_epochs": 0}},
                                           {WRECKED: {}}],
                     search={"pass": "prune", "field": "amount", "values": [0.1, 0.2]})
    assert "compression.max_accuracy_drop 0.01" in str(e.value) and "0.1: drop" in str(e.value)
    assert len(json.loads(small_layout.compress_json.read_text())["search"]["candidates"]) == 2


@pytest.mark.parametrize("compression, field, expect", [
    ({"passes": [{"squash": {}}]}, "compression.passes.0", "one compression pass name mapped to its settings, one of: prune"),
    ({"passes": [{"prune": {"method": "magnitude", "amount": 0.5}}], "search": {"pass": "quantize", "field": "bits", "values": [4]}},
     "compression", "search.pass 'quantize' is not one of the listed passes (prune)"),
    ({"passes": [{"prune": {"method": "magnitude", "amount": 0.5}}], "search": {"pass": "prune", "field": "amount", "values": [0.5, 2]}},
     "compression", "search.values.1 (amount: 2): Input should be less than 1"),
])
def test_bad_compression_sections_are_refused_when_the_manifest_loads(kiln_env, compression, field, expect):
    write_project(kiln_env["projects"], small_manifest(**compression))
    with pytest.raises(ManifestError) as e:  # before any stage runs
        load_project("small")
    assert f"field '{field}'" in str(e.value) and expect in str(e.value)


@pytest.mark.slow
def test_doit_exports_a_pruned_and_coded_model(kiln_env):
    data = copy.deepcopy(TINY)
    data["compression"] = {"max_accuracy_drop": 1.0, "library_bytes": False,
                           "passes": [{"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": 1}},
                                      {"weight_coding": {"bits": 4}}]}
    write_project(kiln_env["projects"], data)
    env = dict(os.environ, KILN_PROJECTS=str(kiln_env["projects"]), KILN_BUILD=str(kiln_env["build"]))
    p = run_doit(env, "export:tiny")
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((kiln_env["build"] / "tiny" / "compress.json").read_text())["passes"]
    assert rows[-1]["widths"] == [2, 4] and rows[-1]["coded_bytes"] < rows[0]["weight_bytes"]
    assert json.loads((kiln_env["build"] / "tiny" / "export.json").read_text())["parity_max_abs_diff"] < 1e-4
