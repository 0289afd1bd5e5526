"""What the benches' ``--smoke`` modes share (not a bench): a tiny app built by the real DAG.

A smoke run proves a bench still runs end to end on today's code (its imports, the artifacts it
reads, the runner's command line, its table), in seconds, on an app small enough to build in
one: ``tiny``, traffic_signs in miniature (GTSRB layout, synthetic, uint8 pixels through a
normalize front end in the library, prune + weight coding + int8, no tuning trials). Its numbers
mean nothing.

The app lives in ``$KILN_BENCH_SMOKE_DIR`` (projects/ and build/ there; tests/test_benches.py
sets it so that the benches share one build), else in a fresh temporary folder removed at exit.
"""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = "tiny"


def manifest() -> dict:
    from tests.conftest import TINY

    d = copy.deepcopy(TINY)
    d["dataset"]["front_end"] = {"kind": "normalize", "mean": [0, 0, 0], "std": [1, 1, 1]}
    d["compression"] = {"max_accuracy_drop": 1.0, "passes": [
        {"prune": {"method": "structured", "amount": 0.5}},
        {"weight_coding": {"bits": 5}},
        {"quantize": {"mode": "int8", "calibration_samples": 16}}]}
    d["tuning"] = {"trials": 0}
    d["targets"] = ["x86-host", "rpi3"]  # rpi3: bench/serial_deploy.py's serial board (built only when asked)
    d["validation"] = {"samples": 8, "warmup": 1, "timeout_s": 300}
    return d


def smoke_dir() -> Path:
    """``$KILN_BENCH_SMOKE_DIR``, else a temporary folder removed when the process exits."""
    if os.environ.get("KILN_BENCH_SMOKE_DIR"):
        d = Path(os.environ["KILN_BENCH_SMOKE_DIR"])
        d.mkdir(parents=True, exist_ok=True)
        return d
    d = Path(tempfile.mkdtemp(prefix="kiln-bench-smoke-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def tiny_app(*tasks: str) -> str:
    """Point this process's KILN_PROJECTS / KILN_BUILD at the smoke folder, write the tiny app
    there and run ``doit`` on ``tasks`` (default: its x86-host library and runner); the app's
    name. Up-to-date tasks cost nothing: benches sharing the folder build it once."""
    d = smoke_dir()
    os.environ["KILN_PROJECTS"] = str(d / "projects")
    os.environ["KILN_BUILD"] = str(d / "build")
    from tests.conftest import DOIT, write_project

    path = d / "projects" / APP / "project.yaml"
    import yaml

    if not path.is_file() or yaml.safe_load(path.read_text()) != manifest():
        write_project(d / "projects", manifest())
    tasks = tasks or (f"compile:{APP}@x86-host", "runner:x86_64")
    print(f"# smoke: building the tiny app in {d} (doit {' '.join(tasks)})", flush=True)
    p = subprocess.run([*DOIT, *tasks], env=dict(os.environ), capture_output=True, text=True, cwd=ROOT)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"smoke: doit {' '.join(tasks)} failed (rc {p.returncode})")
    return APP
