"""Real data, end to end, one check per modality (tests/realdata.py says where each set comes from:
packages on the registries ship them; the speech is espeak-ng's synthesis, not recordings).

Each app is declared by data alone in a team's on-disk layout and goes through Kiln's own data
and train stages (`doit train:<app>`); the sensor app also deploys int8 to x86-host and rpi4
(qemu) and is judged on the boards. The thresholds sit below what a plain PyTorch script gets on
the same split (bench/real_data.py, README "Real data"), at the few epochs a test can afford.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests import realdata
from tests.conftest import last_result, local_lab, run_doit, write_project

pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path):
    return local_lab(tmp_path, "real")


def _app(name: str, dataset: dict, architecture: dict, epochs: int, lr: float = 0.01, **extra) -> dict:
    return {"name": name, "requirements": {"accuracy": {"min": 0.0}}, "dataset": dataset,
            "architecture": architecture, "training": {"epochs": epochs, "batch": 32, "lr": lr, "seed": 0, "threads": 2},
            "targets": ["x86-host", "rpi4"], **extra}


def trained(lab, name: str) -> dict:
    p = run_doit(lab["env"], f"train:{name}", timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    metrics = json.loads((lab["build"] / name / "metrics.json").read_text())
    data = json.loads((lab["build"] / name / "data" / "data.json").read_text())
    assert data["synthetic"] is None  # real data, read from where the manifest points
    return {"metrics": metrics, "data": data}


def test_real_images_digits_in_class_folders(lab, tmp_path):
    root = realdata.digits_folders(tmp_path / "digits")
    write_project(lab["projects"], _app("digits", {
        "format": "image_folders", "path": str(root), "image_size": [8, 8], "color": "grayscale",
        "front_end": {"kind": "normalize"}, "split": {"val": 0.1, "test": 0.2, "seed": 0}},
        {"family": "cnn", "widths": [16, 32], "max_macs": 10_000_000}, epochs=8))
    out = trained(lab, "digits")
    counts = out["data"]["counts"]  # each file its own group, split by a seeded hash of its name: ~20 % test
    assert sum(counts[s] for s in ("train", "val", "test")) == 1797 and 0.17 * 1797 <= counts["test"] <= 0.23 * 1797
    assert out["data"]["classes"] == [str(d) for d in range(10)]
    assert out["metrics"]["test_accuracy"] >= 0.93, out["metrics"]["test_accuracy"]
    assert out["metrics"]["test_macro_f1"] >= 0.9


def test_real_table_wine(lab, tmp_path):
    path = realdata.sklearn_table(tmp_path / "wine.csv", "wine")
    write_project(lab["projects"], _app("wine", {"format": "csv_table", "path": str(path), "label": "label",
                                                 "split": {"val": 0.15, "test": 0.25, "seed": 0}},
                                        {"family": "mlp", "widths": [32, 16]}, epochs=40))
    out = trained(lab, "wine")
    assert out["data"]["classes"] == ["class_0", "class_1", "class_2"] and len(out["data"]["features"]) == 13
    assert out["metrics"]["test_accuracy"] >= 0.9, out["metrics"]["test_accuracy"]


def test_real_sensor_recordings_deploy_int8_and_keep_recordings_whole(lab, tmp_path):
    """sktime's BasicMotions (a smartwatch's accelerometer and gyroscope): windows of one
    recording never straddle train and val, and the int8 library is judged on the boards."""
    root = realdata.basic_motions(tmp_path / "bm")
    write_project(lab["projects"], _app("motions", {
        "format": "csv_windows", "path": str(root), "columns": realdata.BASIC_MOTIONS_CHANNELS,
        "timestamp": "timestamp", "label": None, "sample_rate": realdata.BASIC_MOTIONS_RATE, "window": 50,
        "stride": 25, "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        {"family": "conv1d", "widths": [16, 32], "kernel": 5}, epochs=25,
        compression={"max_accuracy_drop": 0.1, "library_bytes": False,
                     "passes": [{"quantize": {"mode": "int8", "calibration_samples": 96}}]},
        validation={"warmup": 1, "timeout_s": 600}, tuning={"trials": 0},
        requirements={"accuracy": {"min": 0.85}, "macro_f1": {"min": 0.8}}))
    out = trained(lab, "motions")
    groups = out["data"]["groups"]
    assert groups["by"] == "recording" and groups["shared"] == {}
    assert not set(groups["train"]["names"]) & set(groups["val"]["names"])
    assert out["metrics"]["test_accuracy"] >= 0.85, out["metrics"]["test_accuracy"]
    p = run_doit(lab["env"], "deploy:motions", timeout=1500)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    for board in ("x86-host", "rpi4"):
        res = last_result(lab["build"] / "motions", board)
        assert res["passed"] and res["accuracy"] >= 0.85 and res["macro_f1"] >= 0.8, res


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng (Debian) is not installed: make setup installs it")
def test_speech_in_speech_commands_layout_speakers_kept_whole(lab, tmp_path):
    """espeak-ng speech (synthesized, not recorded) in Speech Commands' layout: no speaker is in
    two splits, and a keyword net learns the words, not the speakers."""
    root = realdata.tts_words(tmp_path / "words", ["yes", "no", "up", "down"], speakers=16, clips=2)
    write_project(lab["projects"], _app("tts", {
        "format": "audio_folders", "path": str(root), "sample_rate": 16000, "clip_seconds": 1.0,
        "front_end": {"kind": "mfcc"}, "split": {"val": 0.15, "test": 0.2, "seed": 0}},
        {"family": "ds_cnn", "filters": 32, "kernel": [10, 4], "stride": [2, 2], "widths": [32, 32]},
        epochs=15, lr=0.005))
    out = trained(lab, "tts")
    groups = out["data"]["groups"]
    assert groups["by"] == "speaker" and groups["shared"] == {}
    names = {s: set(groups[s]["names"]) for s in ("train", "val", "test")}
    assert not names["train"] & names["test"] and not names["train"] & names["val"]
    assert out["metrics"]["test_accuracy"] >= 0.55, out["metrics"]["test_accuracy"]  # chance: 0.25
