"""A team's own data, declared by data alone, through `doit deploy` on a lab of x86-host
(native) and rpi4 (qemu): each app's synthetic data is written in the format's own on-disk
layout (PNG class folders, WAV clips, a CSV table), read back by the format, and the boards are
fed raw samples that the front end inside the kernel library turns into the net's features.

* image_folders + resnet, uint8 pixels normalised in the library;
* csv_table + mlp, raw feature values normalised in the library;
* audio_folders + a small ds_cnn, int16 audio, MFCC in the library;
* speech_commands (Speech Commands v2's layout, MLPerf Tiny's _silence_ and _unknown_) + ds_cnn;
* anomaly detection: csv_table + autoencoder trained on one class, judged by ``auc.min``.

Every app is int8, and every board checks its front end's features against the host's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import last_result, local_lab, run_doit, write_project

pytestmark = pytest.mark.slow
BOARDS = ["x86-host", "rpi4"]


@pytest.fixture
def lab(tmp_path):
    return local_lab(tmp_path, "own")


def app(name: str, dataset: dict, architecture: dict, requirements: dict, epochs: int = 6, **extra) -> dict:
    return {
        "name": name, "requirements": requirements, "dataset": dataset, "architecture": architecture,
        "training": {"epochs": epochs, "batch": 32, "lr": 0.01, "seed": 0, "threads": 1},
        "compression": {"max_accuracy_drop": 0.1, "library_bytes": False,
                        "passes": [{"quantize": {"mode": "int8", "calibration_samples": 128}}]},
        "validation": {"samples": 24, "warmup": 1, "timeout_s": 600},
        "tuning": {"trials": 0},
        "targets": BOARDS, **extra,
    }


def deployed(lab, name: str) -> dict:
    p = run_doit(lab["env"], f"deploy:{name}", timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    report = json.loads((lab["build"] / name / "report.json").read_text())
    assert report["passed"] and sorted(report["validated"]) == sorted(BOARDS), report
    data = json.loads((lab["build"] / name / "data" / "data.json").read_text())
    for inst in BOARDS:
        res = last_result(lab["build"] / name, inst)
        assert res["passed"]
        # the board got raw samples and its front end agrees with the host's features
        assert res["front_end"]["max_rel_diff"] <= 1e-4 and res["front_end"]["samples"] > 0, res["front_end"]
        assert "front_end_rel_diff" in [c["name"] for c in res["requirements"]]
    return {"report": report, "data": data}


def test_image_folders_with_resnet_feeds_the_board_uint8_pixels(lab):
    write_project(lab["projects"], app(
        "shapes", {"format": "image_folders", "path": "data/none", "image_size": [16, 16], "color": "rgb",
                   "front_end": {"kind": "normalize"},
                   "synthetic": {"classes": 3, "per_class": 40, "test_per_class": 10, "seed": 0}},
        {"family": "resnet", "stem": 8, "widths": [8, 16]}, {"accuracy": {"min": 0.8}}))
    out = deployed(lab, "shapes")
    synth = lab["build"] / "shapes" / "synthetic"
    assert len(list(synth.rglob("*.png"))) > 0  # the generator wrote image files a team would have
    ti = out["data"]["test_inputs"]
    assert ti["dtype"] == "uint8" and ti["shape"][1:] == [16, 16, 3]
    assert out["data"]["classes"] == sorted(out["data"]["classes"]) and len(out["data"]["classes"]) == 3
    assert out["report"]["data"]["synthetic"] is True and out["report"]["data"]["source"] == str(synth)


def test_csv_table_with_mlp(lab):
    write_project(lab["projects"], app(
        "table", {"format": "csv_table", "path": "data/none", "label": "label",
                  "synthetic": {"classes": 3, "per_class": 80, "test_per_class": 20, "seed": 0}},
        {"family": "mlp", "widths": [32, 16]}, {"accuracy": {"min": 0.85}}, epochs=15))
    out = deployed(lab, "table")
    assert out["data"]["test_inputs"]["dtype"] == "float32" and out["data"]["front_end"]["kind"] == "normalize"
    assert out["data"]["front_end"]["stats"]["mean"]  # fitted on the training split


def test_audio_folders_with_mfcc_in_the_library(lab):
    write_project(lab["projects"], app(
        "words", {"format": "audio_folders", "path": "data/none", "sample_rate": 16000, "clip_seconds": 0.5,
                  "front_end": {"kind": "mfcc"},
                  "synthetic": {"classes": 3, "per_class": 30, "test_per_class": 8, "seed": 0}},
        {"family": "ds_cnn", "filters": 16, "kernel": [5, 3], "stride": [2, 2], "widths": [16]},
        {"accuracy": {"min": 0.7}}, epochs=8))
    out = deployed(lab, "words")
    ti = out["data"]["test_inputs"]
    assert ti["dtype"] == "int16" and ti["shape"][1:] == [8000]
    assert out["data"]["front_end"]["output_shape"] == [1, 24, 10]  # 1 + (8000 - 480) // 320 frames
    raw = np.fromfile(lab["build"] / "words" / "data" / "test_inputs.bin", dtype="<i2")
    assert raw.size == ti["shape"][0] * 8000 and np.abs(raw).max() > 1000  # real audio, not features


def test_speech_commands_layout_deploys_as_mlperf_kws(lab):
    """The Speech Commands v2 layout (speaker-hashed clips, _background_noise_, the two list
    files) through deploy on x86-host and rpi4, with _silence_ and _unknown_ built as MLPerf
    Tiny's KWS setup does (10 % each of a split's word clips)."""
    words = ["yes", "no", "up", "down"]
    write_project(lab["projects"], app(
        "kws", {"format": "speech_commands", "path": "data/none", "words": words, "front_end": {"kind": "mfcc"},
                "synthetic": {"speakers": 20, "clips": 2, "other_words": 4, "seed": 0}},
        {"family": "ds_cnn", "filters": 16, "kernel": [5, 3], "stride": [2, 2], "widths": [16]},
        {"accuracy": {"min": 0.6}}, epochs=10))
    out = deployed(lab, "kws")
    d = out["data"]
    assert d["classes"] == ["_silence_", "_unknown_", *words]
    assert d["test_source"] == "the shipped validation_list.txt and testing_list.txt"
    for split, c in d["load"]["counts"].items():
        assert c["silence"] == c["unknown"] == -(-c["words"] // 10), (split, c)
    assert d["class_counts"]["test"][0] > 0 and d["class_counts"]["test"][1] > 0
    assert d["groups"]["by"] == "speaker" and d["groups"]["shared"] == {}
    assert d["test_inputs"]["dtype"] == "int16" and d["test_inputs"]["shape"][1:] == [16000]


def test_anomaly_detection_is_validated_on_the_board_by_auc(lab):
    write_project(lab["projects"], app(
        "detect", {"format": "csv_table", "path": "data/none", "label": "label",
                   "synthetic": {"classes": 3, "per_class": 120, "test_per_class": 30, "seed": 0}},
        {"family": "autoencoder", "widths": [16], "bottleneck": 4}, {"auc": {"min": 0.8}}, epochs=30,
        anomaly={"normal": ["class0"]}))
    out = deployed(lab, "detect")
    for inst in BOARDS:
        res = out["report"]["boards"][inst]
        auc = next(c for c in res["requirements"] if c["name"] == "auc")
        assert auc["verdict"] == "pass" and auc["measured"] >= 0.8
    onnx_out = json.loads((lab["build"] / "detect" / "export.json").read_text())
    assert onnx_out["output_kind"] == "anomaly score"
