"""The venv of one checkout run in another (issue 29, item 4): this checkout's venv's ``doit``,
run in a second clone, builds from the second clone (its code, projects and boards), not from the
checkout whose editable install made the venv; where that cannot be arranged it refuses, naming
both. Before: the editable install's ``kiln`` (imported by doit for its state backend before
dodo.py) won, and the second clone's projects were not even listed."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kiln.artifacts import runtime_cache
from tests.conftest import ROOT, TINY, write_project

VENV_DOIT = Path(sys.executable).parent / "doit"


def _second(tmp_path: Path) -> tuple[Path, dict]:
    second = tmp_path / "second"
    subprocess.run(["git", "clone", "-q", "--shared", str(ROOT), str(second)], check=True, timeout=120)
    shutil.copy(ROOT / "dodo.py", second / "dodo.py")  # this working tree's dodo.py, with the fix under test
    shutil.rmtree(second / "projects")  # one tiny app of its own (loading the real apps costs seconds)
    write_project(second / "projects", {**copy.deepcopy(TINY), "name": "onlyhere"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_") and k != "PYTHONPATH"}
    env["KILN_BUILD"] = str(tmp_path / "build")
    env["KILN_CACHE"] = str(runtime_cache())  # LLVM's lists probed once (a TVM import each, else)
    return second, env


def test_a_venvs_doit_in_a_second_clone_builds_from_the_second_clone(tmp_path):
    second, env = _second(tmp_path)
    r = subprocess.run([str(VENV_DOIT), "list", "--all"], cwd=second, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "deploy:onlyhere" in r.stdout  # the second clone's own project, and none of the first's
    assert "deploy:check_digits" not in r.stdout


def test_code_that_still_comes_from_the_other_checkout_is_refused_naming_both(tmp_path):
    second, env = _second(tmp_path)
    env["KILN_CHECKOUT"] = str(second)  # as if started again already: no second try
    r = subprocess.run([str(VENV_DOIT), "list"], cwd=second, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert str(second) in r.stderr and str(ROOT) in r.stderr and "editable install" in r.stderr, r.stderr
