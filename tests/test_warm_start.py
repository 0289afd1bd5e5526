"""Warm start end to end through doit (training.warm_start): files added to an app's data rerun
the data task and then train fine-tunes the last model for warm_start epochs, and says so;
``doit forget train:<app>`` then makes the rerun train from scratch."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from kiln.artifacts import read_json
from tests.conftest import run_doit, write_project

CLASSES = ("cat", "dog", "owl")
EPOCHS = 3


def _image(path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


def test_added_files_warm_start_and_forget_trains_from_scratch(kiln_env):
    root = kiln_env["root"] / "imgs"
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(30):
            _image(root / c / f"{c}_{i:03d}.png", 100 * k + i)
    write_project(kiln_env["projects"], {
        "name": "warm", "requirements": {"accuracy": {"min": 0.0}},
        "dataset": {"format": "image_folders", "path": str(root), "image_size": [8, 8], "workers": 1,
                    "split": {"val": 0.2, "test": 0.2, "seed": 0}},
        "architecture": {"family": "cnn", "widths": [4], "max_macs": 1_000_000},
        "training": {"epochs": EPOCHS, "batch": 16, "lr": 0.01, "seed": 0, "warm_start": 1},
        "tuning": {"trials": 0}, "targets": ["x86-host"]})
    env, metrics = dict(os.environ), kiln_env["build"] / "warm" / "metrics.json"

    def train() -> dict:
        p = run_doit(env, "train:warm", timeout=300)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return {**read_json(metrics), "log": p.stdout + p.stderr}

    first = train()
    assert first["start"] == "trained from scratch" and len(first["history"]) == EPOCHS
    for i in range(4):  # files added: the data task reruns, then train
        _image(root / "dog" / f"dog_new_{i}.png", 5000 + i)
    warm = train()
    assert warm["start"] == f"warm start from {first['trained_on']['data'][:12]} for 1 epochs", warm["start"]
    assert warm["warm_start"] == {"from": first["trained_on"]["data"], "epochs": 1} and len(warm["history"]) == 1
    assert warm["trained_on"]["settings"] == first["trained_on"]["settings"] and "warm start from" in warm["log"]
    p = run_doit(env, "forget", "train:warm")
    assert p.returncode == 0 and "forgetting train:warm" in p.stdout, p.stdout + p.stderr
    again = train()
    assert again["start"] == "trained from scratch" and len(again["history"]) == EPOCHS and again["warm_start"] is None
    assert again["trained_on"] == warm["trained_on"]
