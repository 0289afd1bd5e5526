"""Shared fixtures. The repository root goes on sys.path so tests import kiln, passes, hil."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# the suite's models are far below the FLOPs a kernel needs before the build tunes it
# (passes/support/tvm_build.py MIN_TUNE_FLOPS); here every kernel is tuned, as a real model's are,
# in the tests that tune (a manifest with tuning.trials > 0: test_pipeline, test_kill, test_tune,
# test_rpc_tuning). Set before any test runs, so doit subprocesses inherit it; test_tune checks
# the default itself.
os.environ.setdefault("KILN_TUNE_MIN_FLOPS", "0")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def kiln_env(tmp_path, monkeypatch):
    """An isolated projects/ and build/ for one test (targets/ and the lab stay the repo's)."""
    projects = tmp_path / "projects"
    build = tmp_path / "build"
    projects.mkdir()
    monkeypatch.setenv("KILN_PROJECTS", str(projects))
    monkeypatch.setenv("KILN_BUILD", str(build))
    return {"projects": projects, "build": build, "root": tmp_path}


TINY = {
    "name": "tiny",
    "requirements": {"accuracy": {"min": 0.0}, "latency_ms": {"p99_max": 1000}, "model_kb": {"max": 4096},
                     "agreement": {"min": 0.9}},
    "dataset": {"format": "gtsrb", "path": "no/such/dir", "synthetic": {"per_class": 4, "test_per_class": 2, "seed": 0},
                "image_size": [16, 16], "split": {"val": 0.2, "test": 0.2, "seed": 0}},
    "architecture": {"family": "cnn", "widths": [4, 8], "max_macs": 1_000_000},
    "training": {"epochs": 1, "batch": 64, "lr": 0.01, "seed": 0},
    "validation": {"samples": 24, "warmup": 1, "timeout_s": 300},
    # untuned: x86-host's 128 trials cost about 2.5 CPU minutes per build folder, in every test
    # that deploys; the tests that check tuning set their own trials
    "tuning": {"trials": 0},
    "targets": ["x86-host"],
}


def write_project(projects: Path, data: dict) -> Path:
    """Write a manifest as projects/<name>/project.yaml; returns its path."""
    import yaml

    path = projects / data["name"] / "project.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny(kiln_env):
    """A tiny valid project (16x16 synthetic signs, 1 epoch) in the isolated projects dir."""
    import copy

    data = copy.deepcopy(TINY)
    write_project(kiln_env["projects"], data)
    return data


DOIT = [sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), "-d", str(ROOT)]


def run_doit(env: dict, *args: str, timeout: float = 900):
    """Run doit on the repo's dodo.py in a subprocess (a fresh process, as a user would)."""
    import subprocess

    return subprocess.run([*DOIT, *args], env=env, capture_output=True, text=True, timeout=timeout)


def last_result(app_build: Path, instance: str) -> dict:
    """The result of ``instance`` in the app's last report (build/<app>/runs/<run id>/<instance>/)."""
    import json

    report = json.loads((app_build / "report.json").read_text())
    return json.loads((app_build / "runs" / report["run_id"] / instance / "result.json").read_text())


def local_lab(tmp_path: Path, name: str) -> dict:
    """Projects and build in ``tmp_path`` and a lab of x86-host (native) and rpi4 (qemu), both
    reached locally: the env for :func:`run_doit`, the projects and the build folders."""
    import os

    import yaml

    inv = tmp_path / "lab.yaml"
    inv.write_text(yaml.safe_dump({"name": name, "boards": [
        {"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}},
        {"name": "rpi4", "type": "rpi4", "transport": {"kind": "local"}, "emulated": True}]}))
    projects = tmp_path / "projects"
    env = dict(os.environ, KILN_LAB=str(inv), KILN_PROJECTS=str(projects), KILN_BUILD=str(tmp_path / "build"))
    return {"env": env, "projects": projects, "build": tmp_path / "build"}
