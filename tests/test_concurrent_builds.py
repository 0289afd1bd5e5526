"""Two real `doit` processes started together in one build (what two nightlies from one checkout
do): each task is run by one of them; the other waits for it and takes its outputs
(kiln/actions.py ``_one_at_a_time``). Before the lock, one in four such pairs failed: the second
synthesized the data set again while the first fingerprinted it."""

from __future__ import annotations

import copy
import os
import subprocess

import yaml

from tests.conftest import DOIT, ROOT, TINY, write_project

TASKS = ("synth:tiny", "data:tiny", "train:tiny")


def test_two_doit_processes_in_one_build_run_each_task_once(tmp_path):
    write_project(tmp_path / "projects", copy.deepcopy(TINY))
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"name": "desk", "boards": [
        {"name": "x86-host", "type": "x86-host", "transport": {"kind": "local"}}]}))
    env = dict(os.environ, KILN_LAB=str(lab), KILN_PROJECTS=str(tmp_path / "projects"),
               KILN_BUILD=str(tmp_path / "build"), PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([*DOIT, "train:tiny"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    for t in TASKS:
        # ". t" where doit found it out of date; the one of the two that then took the other's
        # outputs says so; "-- t" where it found it up to date (the other had finished it)
        ran = [i for i, log in enumerate(logs)
               if f".  {t}\n" in log and f"{t}: made by another doit process" not in log]
        assert len(ran) == 1, (t, [log[-2000:] for log in logs])
    assert (tmp_path / "build" / "tiny" / "model.pt").is_file()
    # and a third run finds everything up to date
    again = subprocess.run([*DOIT, "train:tiny"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and all(f"-- {t}" in again.stdout for t in TASKS), again.stdout[-2000:]
