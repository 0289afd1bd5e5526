"""Manifest, board and inventory validation: clear errors naming file, field and expectation."""

from __future__ import annotations

import copy
import json

import pytest

from kiln import config, nets
from kiln.errors import ManifestError
from kiln.schema import Architecture, Project
from tests.conftest import TINY, write_project


def test_repo_manifests_and_boards_load():
    for app in ("traffic_signs",):
        p = config.load_project(app)
        assert p.name == app and set(p.targets) <= set(config.board_names())
    for b in config.board_names():
        assert config.load_board(b).name == b
    from hil.lab import lab_boards

    name, _, boards = lab_boards()
    assert name == "emulated" and {b.type for b in boards} >= {"x86-host", "rpi4", "rpi3", "x86-avx2"}
    assert {b.link for b in boards} == {"ssh", "serial", "local"}


def test_tiny_project_loads(tiny):
    p = config.load_project("tiny")
    assert p.dataset.image_size == (16, 16) and p.training.epochs == 1


@pytest.mark.parametrize(
    "path, value, field, expect",
    [
        (("training", "epochs"), "many", "training.epochs", "valid integer"),
        (("training", "lr"), -1, "training.lr", "greater than 0"),
        (("architecture", "widths"), [], "architecture.widths", "at least 1"),
        (("dataset", "format"), "imagenet", "dataset.format", "'gtsrb'"),
        (("requirements", "accuracy", "min"), 1.5, "requirements.accuracy.min", "less than or equal to 1"),
        (("training", "epoch"), 3, "training.epoch", "Extra inputs are not permitted"),
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
    arch = Architecture(family="cnn", widths=widths, head=head, max_macs=10**9)
    est = nets.estimate(arch, size, 3, 43)
    assert nets.measure(nets.build(arch, 3, 43, size), (3, *size)) == est
    assert est.macs > 0 and est.params > 0


def test_json_schema_export_describes_manifest():
    schema = Project.model_json_schema()
    assert set(schema["required"]) >= {"name", "requirements", "dataset", "architecture", "training", "targets"}
    json.dumps(schema)  # serialisable for editors
