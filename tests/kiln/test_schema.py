"""Manifest, board and inventory validation: clear errors naming file, field and expectation."""

from __future__ import annotations

import copy
import json

import pytest

from kiln import config, nets
from kiln.errors import ManifestError
from kiln.schema import CnnArchitecture, Project
from tests.conftest import ROOT, TINY, write_project


def test_repo_manifests_and_boards_load():
    for app in ("traffic_signs",):
        p = config.load_project(app)
        assert p.name == app and set(p.targets) <= set(config.board_names())
    for b in config.board_names():
        assert config.load_board(b).name == b
    lab = config.load_lab(ROOT / "hil" / "emulator" / "lab.yaml")
    assert lab.name == "emulated" and lab.backend == "emulated"
    assert {b.type for b in lab.boards} >= {"x86-host", "rpi4", "rpi3", "x86-avx2"}
    assert {b.link for b in lab.boards} == {"ssh", "serial", "local"}


def test_tiny_project_loads(tiny):
    p = config.load_project("tiny")
    assert p.dataset.image_size == (16, 16) and p.training.epochs == 1


@pytest.mark.parametrize(
    "path, value, field, expect",
    [
        (("training", "epochs"), "many", "training.epochs", "valid integer"),
        (("training", "lr"), -1, "training.lr", "greater than 0"),
        (("architecture", "widths"), [], "architecture.widths", "at least 1"),
        (("dataset", "format"), "imagenet", "dataset", "'gtsrb'"),
        (("dataset", "path"), 7, "dataset.path", "valid string"),
        (("architecture", "family"), "transformer", "architecture", "'cnn'"),
        (("requirements", "accuracy", "min"), 1.5, "requirements.accuracy.min", "less than or equal to 1"),
        (("training", "epoch"), 3, "training.epoch", "unknown field"),
    ],
)
def test_bad_field_names_file_field_and_expectation(kiln_env, path, value, field, expect):
    data = copy.deepcopy(TINY)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    manifest = write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError) as e:
        config.load_project("tiny")
    msg = str(e.value)
    assert str(manifest) in msg and f"field '{field}'" in msg and expect in msg


def test_unknown_board_is_refused(kiln_env):
    data = copy.deepcopy(TINY)
    data["targets"] = ["x86-host", "pdp11"]
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError, match=r"targets\.1': unknown board 'pdp11'.*rpi4"):
        config.load_project("tiny")


def test_macs_budget_is_checked_before_training(kiln_env):
    data = copy.deepcopy(TINY)
    data["architecture"]["max_macs"] = 1000
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError, match=r"architecture\.max_macs'.*over its budget of 1,000"):
        config.load_project("tiny")


def test_name_must_match_folder(kiln_env):
    data = copy.deepcopy(TINY)
    write_project(kiln_env["projects"], data)
    (kiln_env["projects"] / "tiny").rename(kiln_env["projects"] / "other")
    with pytest.raises(ManifestError, match="field 'name' is 'tiny', expected 'other'"):
        config.load_project("other")


def test_not_yaml_and_not_mapping(kiln_env):
    p = kiln_env["projects"] / "tiny" / "project.yaml"
    p.parent.mkdir()
    p.write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        config.load_project("tiny")
    p.write_text("- a\n- b\n")
    with pytest.raises(ManifestError, match="expected a mapping of fields, got list"):
        config.load_project("tiny")


def test_bad_board_file_names_field(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_TARGETS", str(tmp_path))
    (tmp_path / "b.yaml").write_text("name: b\narch: sparc\ntvm_target: {mtriple: x}\ncc: gcc\nmemory_mb: 1\n")
    with pytest.raises(ManifestError) as e:
        config.load_board("b")
    assert "field 'arch'" in str(e.value) and "field 'tvm_target'" in str(e.value) and "needs a 'kind' key" in str(e.value)


def test_static_inventory_needs_full_transports_emulated_lab_does_not(tmp_path):
    inv = tmp_path / "lab.yaml"
    inv.write_text("boards:\n  - {name: a, type: rpi4, transport: {kind: ssh, host: 10.0.0.2}}\n")
    with pytest.raises(ManifestError, match=r"boards\.0\.transport \(a, ssh\): missing user, key, known_hosts"):
        config.load_inventory(inv)
    inv.write_text("backend: emulated\nboards:\n  - {name: a, type: rpi4, transport: {kind: ssh}}\n")
    lab = config.load_lab(inv)
    assert lab.backend == "emulated" and lab.boards[0].link == "ssh"
    with pytest.raises(ManifestError, match="must be opened first"):
        config.load_inventory(inv)
    inv.write_text("backend: labgridd\nboards:\n  - {name: a, type: rpi4}\n")
    with pytest.raises(ManifestError, match="unknown lab backend"):
        config.load_lab(inv)
    inv.write_text("backend: labgrid\nboards:\n  - {name: a, type: rpi4}\n")
    with pytest.raises(ManifestError, match=r"invalid 'labgrid' lab:\n  field 'coordinator': Field required"):
        config.load_lab(inv)


def test_inventory_unknown_type_and_duplicates(tmp_path):
    inv = tmp_path / "lab.yaml"
    inv.write_text("boards:\n  - {name: a, type: nope}\n")
    with pytest.raises(ManifestError, match=r"boards\.0\.type'.*unknown type 'nope'"):
        config.load_inventory(inv)
    inv.write_text("boards:\n  - {name: a, type: rpi4}\n  - {name: a, type: rpi4}\n")
    with pytest.raises(ManifestError, match="must be unique"):
        config.load_inventory(inv)


@pytest.mark.parametrize("widths, head, size", [([16, 32, 64], "gap", (32, 32)), ([4, 8], "flatten", (16, 16)),
                                                ([8], "gap", (20, 12))])
def test_analytic_estimate_matches_traced_model(widths, head, size):
    arch = CnnArchitecture(family="cnn", widths=widths, head=head, max_macs=10**9)
    est = nets.estimate(arch, size, 3, 43)
    assert nets.measure(nets.build(arch, 3, 43, size), (3, *size)) == est
    assert est.macs > 0 and est.params > 0


def test_json_schema_export_describes_manifest():
    schema = Project.model_json_schema()
    assert set(schema["required"]) >= {"name", "requirements", "dataset", "architecture", "training", "targets"}
    text = json.dumps(schema)  # serialisable for editors
    # every compression pass's settings are described, so an editor completes them
    for setting in ("finetune_epochs", "calibration_samples", "index_bits", "percentile"):
        assert f'"{setting}"' in text, setting
    defs = schema["$defs"]
    assert defs["PruneSettings"]["properties"]["finetune_epochs"]["minimum"] == 0
    assert {"GtsrbDataset", "DigitsDataset", "CnnArchitecture", "PruneStep", "QuantizeStep"} <= set(defs)


# -- compression pass settings: refused when the manifest loads, naming file and field ---------

BAD_PASS_SETTINGS = [
    ({"prune": {"method": "structured", "amount": 0.5, "finetune_epochs": -7}}, "compression.passes.0.prune.finetune_epochs",
     "greater than or equal to 0"),
    ({"prune": {"method": "structured", "amount": "half"}}, "compression.passes.0.prune.amount", "valid number"),
    ({"prune": {"method": "structured", "amount": 1.5}}, "compression.passes.0.prune.amount", "less than 1"),
    ({"prune": {"method": "random", "amount": 0.5}}, "compression.passes.0.prune.method", "'magnitude'"),
    ({"prune": {"method": "structured", "amount": 0.5, "steps": 0}}, "compression.passes.0.prune.steps", "greater than or equal to 1"),
    ({"prune": {"method": "structured", "amount": 0.5, "scope": "global"}}, "compression.passes.0.prune.scope",
     "magnitude only"),
    ({"weight_coding": {"bits": 9}}, "compression.passes.0.weight_coding.bits", "less than or equal to 8"),
    ({"weight_coding": {"bits": "four"}}, "compression.passes.0.weight_coding.bits", "valid integer"),
    ({"weight_coding": {"iterations": 0}}, "compression.passes.0.weight_coding.iterations", "greater than or equal to 1"),
    ({"weight_coding": {"finetune_lr": -1}}, "compression.passes.0.weight_coding.finetune_lr", "greater than 0"),
    ({"quantize": {"mode": "int4"}}, "compression.passes.0.quantize.mode", "'int8'"),
    ({"quantize": {"calibration_samples": 0}}, "compression.passes.0.quantize.calibration_samples",
     "greater than or equal to 1"),
    ({"quantize": {"percentile": 101}}, "compression.passes.0.quantize.percentile", "less than or equal to 100"),
    ({"quantize": {"percentile": "high"}}, "compression.passes.0.quantize.percentile", "valid number"),
    ({"quantize": {"bits": 4}}, "compression.passes.0.quantize.bits", "unknown field"),
    ({"distill": {}}, "compression.passes.0", "expected one compression pass name"),
    ({"prune": {"method": "structured", "amount": 0.5}, "quantize": {}}, "compression.passes.0",
     "expected one compression pass name"),
]


@pytest.mark.parametrize("step, field, expect", BAD_PASS_SETTINGS)
def test_bad_pass_settings_are_refused_at_load(kiln_env, step, field, expect):
    data = copy.deepcopy(TINY)
    data["compression"] = {"passes": [step]}
    manifest = write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError) as e:
        config.load_project("tiny")
    msg = str(e.value)
    assert str(manifest) in msg and f"field '{field}'" in msg and expect in msg, msg


def test_search_must_name_a_listed_pass_a_setting_and_valid_values(kiln_env):
    data = copy.deepcopy(TINY)
    passes = [{"prune": {"method": "structured", "amount": 0.5}}]
    cases = [({"pass": "quantize", "field": "mode", "values": ["int8"]}, "not one of the listed passes"),
             ({"pass": "prune", "field": "amout", "values": [0.3]}, "not a setting of pass 'prune'"),
             ({"pass": "prune", "field": "amount", "values": [0.3, 2.0]}, "search.values.1 (amount: 2.0)")]
    for search, expect in cases:
        data["compression"] = {"passes": passes, "search": search}
        write_project(kiln_env["projects"], data)
        with pytest.raises(ManifestError, match=r"field 'compression'.*" + expect.replace("(", r"\(").replace(")", r"\)")):
            config.load_project("tiny")
    data["compression"]["search"] = {"pass": "prune", "field": "amount", "values": [0.3, 0.6]}
    write_project(kiln_env["projects"], data)
    p = config.load_project("tiny")
    v = p.compression.variant(0, "amount", 0.6)
    assert v.name == "prune" and v.settings.amount == 0.6 and v.settings.method == "structured"


@pytest.mark.parametrize("later", [{"prune": {"method": "magnitude", "amount": 0.5}}, {"weight_coding": {}}])
def test_a_pass_after_quantize_is_refused_at_load_naming_both_and_the_order_that_works(kiln_env, later):
    """quantize then prune loaded, then failed in compress with "element 0 of tensors does not
    require grad"; the order is now refused when the manifest loads."""
    data = copy.deepcopy(TINY)
    name = next(iter(later))
    data["compression"] = {"passes": [{"quantize": {}}, later]}
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError, match=rf"field 'compression'.*passes\.1 \({name}\) comes after passes\.0 "
                       rf"\(quantize\).*\[{name}, quantize\]"):
        config.load_project("tiny")
    data["compression"] = {"passes": [later, {"quantize": {}}]}
    write_project(kiln_env["projects"], data)
    assert [p.name for p in config.load_project("tiny").compression.passes] == [name, "quantize"]


def test_a_synthetic_data_set_of_one_class_is_refused_like_own_data(kiln_env):
    data = copy.deepcopy(TINY)
    data["dataset"] = {"format": "synthetic", "classes": 1, "image_size": [8, 8]}
    write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError, match=r"field 'dataset[.a-z]*\.classes': .*1 class\(es\); a classifier needs "
                                            r"at least two classes"):
        config.load_project("tiny")


@pytest.mark.parametrize("requirements, field, expect", [
    ({"macro_f1": {"min": 1.5}}, "requirements.macro_f1.min", "less than or equal to 1"),
    ({"class_recall": {}}, "requirements.class_recall", "give min (every class) or per_class"),
    ({"class_recall": {"per_class": {"stop": 0.9}}}, "(top level)",
     "requirements.class_recall.per_class.stop: 'stop' is not a class of the dataset (classes: 0, 1, 2"),
    ({"class_recall": {"per_class": {"3": 1.2}}}, "requirements.class_recall.per_class.3", "less than or equal to 1"),
    ({"class_recall": {"min": 0.8, "max": 1}}, "requirements.class_recall.max", "unknown field"),
])
def test_class_requirements_are_checked_at_load(kiln_env, requirements, field, expect):
    data = copy.deepcopy(TINY)
    data["requirements"].update(requirements)
    manifest = write_project(kiln_env["projects"], data)
    with pytest.raises(ManifestError) as e:
        config.load_project("tiny")
    msg = str(e.value)
    assert str(manifest) in msg and f"field '{field}'" in msg and expect in msg


def test_class_requirements_accept_class_indices_as_yaml_ints(kiln_env):
    data = copy.deepcopy(TINY)
    data["requirements"].update(macro_f1={"min": 0.5}, class_recall={"min": 0.5, "per_class": {3: 0.9}})
    write_project(kiln_env["projects"], data)
    req = config.load_project("tiny").requirements
    assert req.macro_f1.min == 0.5 and req.class_recall.per_class == {"3": 0.9} and req.class_recall.min == 0.5
