"""The whole DAG on the real parts (torch, ONNX, TVM, the C++ runner natively and under
qemu-aarch64) for a tiny project, and what reruns after each kind of change."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT, TINY, last_result, run_doit, write_project

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    data = copy.deepcopy(TINY)
    data["targets"] = ["x86-host", "rpi4"]
    # the whole chain: prune, int8 quantization, a short MetaSchedule tuning for x86-host
    data["compression"] = {"max_accuracy_drop": 1.0, "passes": [
        {"prune": {"method": "structured", "amount": 0.5}}, {"quantize": {"mode": "int8", "calibration_samples": 64}}]}
    data["tuning"] = {"trials": 12}
    manifest = write_project(base / "projects", data)
    e = dict(os.environ, KILN_PROJECTS=str(base / "projects"), KILN_BUILD=str(base / "build"))
    first = run_doit(e, "deploy:tiny")
    assert first.returncode == 0, first.stdout + first.stderr
    return {"env": e, "manifest": manifest, "build": base / "build" / "tiny", "first": first}




def executed(proc) -> set[str]:
    """Tasks doit ran (lines '.  name'), as opposed to up-to-date ones ('-- name')."""
    return {m.group(1) for m in re.finditer(r"^\.  (\S+)", proc.stdout, re.M)}


def edit(manifest: Path, fn) -> None:
    data = yaml.safe_load(manifest.read_text())
    fn(data)
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))


def test_first_build_runs_every_stage_and_reports_both_boards(env):
    assert executed(env["first"]) >= {"synth:tiny", "data:tiny", "train:tiny", "compress:tiny", "export:tiny",
                                     "tune:tiny@x86-host", "tune:tiny@rpi4",
                                     "compile:tiny@x86-host", "compile:tiny@rpi4", "runner:x86_64",
                                     "runner:aarch64", "hil:tiny@x86-host", "hil:tiny@rpi4", "deploy:tiny"}
    report = json.loads((env["build"] / "report.json").read_text())
    assert report["passed"] and set(report["boards"]) == {"x86-host", "rpi4"}
    rpi = last_result(env["build"], "rpi4")
    assert rpi["latency_emulated"] and rpi["samples"] == 24
    assert {c["name"]: c["verdict"] for c in rpi["requirements"]}["latency_ms.p99"] == "not enforced (emulated)"
    x86 = last_result(env["build"], "x86-host")
    assert not x86["latency_emulated"]
    # board-type outputs apart from what this run saw on each instance, under its run id
    run_id = report["run_id"]
    assert (env["build"] / "type" / "rpi4" / "model.so").is_file()
    assert json.loads((env["build"] / "runs" / run_id / "rpi4" / "run.json").read_text())["run_id"] == run_id
    assert json.loads((env["build"] / "runs" / run_id / "report.json").read_text())["passed"]
    # the default lab reaches both boards over SSH (real sshd), and stops it when the deploy ends
    assert x86["transport"] == rpi["transport"] == "ssh"
    assert not (env["build"].parent / "lab" / "state.json").exists()


def test_int8_pruned_model_is_tuned_for_x86_and_not_for_the_emulated_arm_board(env):
    b = env["build"]
    comp = json.loads((b / "compress.json").read_text())
    assert [r["pass"] for r in comp["passes"]] == ["baseline", "prune", "quantize"]
    assert comp["passes"][-1]["widths"] == [2, 4] and comp["size_ratio"] > 4
    assert json.loads((b / "export.json").read_text())["quantization"] == "int8"
    x86 = json.loads((b / "type" / "x86-host" / "tune.json").read_text())
    assert x86["measured"] == "native" and 0 < x86["trials_run"] <= 12
    # each kernel took its tuned records, or its untuned form where that measured faster
    kernels = json.loads((b / "type" / "x86-host" / "compile.json").read_text())["tuned_kernels"]
    assert kernels["tuned"] + len(kernels["held"]) > 0, kernels
    arm = json.loads((b / "type" / "rpi4" / "tune.json").read_text())
    assert arm["measured"] is None and "qemu-user timings are not a cost signal" in arm["why"]
    assert json.loads((b / "type" / "rpi4" / "compile.json").read_text())["tuned_kernels"] is None


def test_boards_compute_what_onnxruntime_computes(env):
    """The kernel libraries run by the C++ runner (native and under qemu) give ONNX Runtime's
    predictions on the same inputs: the boards really ran the model."""
    import onnxruntime as ort

    b = env["build"]
    x = np.fromfile(b / "data" / "test_inputs.bin", dtype="<f4").reshape(-1, 3, 16, 16)[:24]
    opts = ort.SessionOptions()  # the QDQ graph's own meaning: ORT's fused x86 int8 kernels saturate
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(b / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    want = [int(sess.run(None, {"input": x[i : i + 1]})[0].argmax()) for i in range(len(x))]
    for board in ("x86-host", "rpi4"):
        got = json.loads((b / "last" / f"{board}.json").read_text())["runner"]["predictions"]
        assert np.mean(np.array(got) == np.array(want)) >= 0.95, board


def test_second_run_is_a_no_op(env):
    p = run_doit(env["env"], "deploy:tiny")
    assert p.returncode == 0 and executed(p) == set(), p.stdout


def test_training_change_reruns_train_and_after_but_not_data(env):
    edit(env["manifest"], lambda d: d["training"].update(lr=0.02))
    p = run_doit(env["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout + p.stderr
    ran = executed(p)
    assert {"train:tiny", "compress:tiny", "export:tiny", "compile:tiny@rpi4", "deploy:tiny"} <= ran
    assert not ran & {"synth:tiny", "data:tiny", "runner:x86_64", "runner:aarch64"}
    # retrained, same layer shapes: every kernel is found in the tuning database, no trials
    tune = json.loads((env["build"] / "type" / "x86-host" / "tune.json").read_text())
    assert "tune:tiny@x86-host" in ran and tune["trials_run"] == 0
    assert tune["tasks_reused"] == len([t for t in tune["tasks"] if tune["plan"].get(t["name"])]) > 0


def test_requirement_change_reruns_only_validation(env):
    before = json.loads((env["build"] / "report.json").read_text())
    edit(env["manifest"], lambda d: d["requirements"]["latency_ms"].update(p99_max=999))
    p = run_doit(env["env"], "deploy:tiny")
    assert p.returncode == 0 and executed(p) == {"deploy:tiny"}, p.stdout
    # a new run with its own report; the boards' results come from the runs that measured them
    after = json.loads((env["build"] / "report.json").read_text())
    assert after["run_id"] != before["run_id"] and (env["build"] / "runs" / before["run_id"] / "report.json").is_file()
    assert last_result(env["build"], "x86-host")["run_id"] == before["boards"]["x86-host"]["run_id"]


def test_dataset_image_added_or_removed_reruns_data_and_after(env):
    images = env["build"] / "synthetic" / "Final_Training" / "Images" / "00000"
    victim = sorted(images.glob("*.ppm"))[0]
    kept = victim.read_bytes()
    victim.unlink()
    p = run_doit(env["env"], "deploy:tiny")
    assert p.returncode == 0, p.stdout + p.stderr
    assert {"data:tiny", "train:tiny"} <= executed(p) and "synth:tiny" not in executed(p)
    assert "1 image" in p.stderr or "skipped" in p.stderr  # the missing image is reported, not dropped silently
    victim.write_bytes(kept)
    p = run_doit(env["env"], "deploy:tiny")
    assert "data:tiny" in executed(p)


def test_missed_requirement_fails_naming_board_and_keeps_report(env):
    edit(env["manifest"], lambda d: d["requirements"]["accuracy"].update(min=1.0))
    p = run_doit(env["env"], "deploy:tiny")
    assert p.returncode != 0
    assert "board 'x86-host': requirement accuracy not met" in p.stdout + p.stderr
    report = json.loads((env["build"] / "report.json").read_text())
    assert not report["passed"] and set(report["boards"]) == {"x86-host", "rpi4"}
    edit(env["manifest"], lambda d: d["requirements"]["accuracy"].update(min=0.0))


def test_doit_list_imports_neither_torch_nor_tvm(env):
    code = ("import sys, runpy; sys.argv=['doit','list','-f',%r]; "
            "from doit.doit_cmd import DoitMain; from doit.cmd_base import DodoTaskLoader; "
            "rc = DoitMain(DodoTaskLoader()).run(sys.argv[1:]); "
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch','tvm','onnx','onnxruntime')))") % str(ROOT / "dodo.py")
    p = subprocess.run([sys.executable, "-c", code], env=env["env"], capture_output=True, text=True, cwd=ROOT)
    assert "deploy" in p.stdout and "HEAVY []" in p.stdout, p.stdout + p.stderr


def test_bad_manifest_is_one_clear_message_and_stops_only_its_app(env):
    good = env["manifest"].read_text()
    edit(env["manifest"], lambda d: d["training"].update(batch="big"))
    try:
        p = run_doit(env["env"], "list")
        assert p.returncode == 0, p.stderr  # the other apps are listed (here: none besides tiny)
        assert "app 'tiny' skipped" in p.stderr and "project.yaml" in p.stderr
        assert "field 'training.batch'" in p.stderr and "Traceback" not in p.stderr
        p = run_doit(env["env"], "deploy:tiny")
        out = p.stdout + p.stderr
        assert p.returncode != 0 and "field 'training.batch'" in out and "Traceback" not in out
    finally:
        env["manifest"].write_text(good)


def test_failed_build_leaves_no_report_that_says_passed(env):
    """A deploy that fails before validation (here: a compression budget missed) removes the
    last report: a user never reads 'passed' about a build that did not finish."""
    assert run_doit(env["env"], "deploy:tiny").returncode == 0
    assert json.loads((env["build"] / "report.json").read_text())["passed"]
    good = env["manifest"].read_text()
    edit(env["manifest"], lambda d: d["compression"].update(min_weight_ratio=1000))
    try:
        p = run_doit(env["env"], "deploy:tiny")
        assert p.returncode != 0 and "compression.min_weight_ratio" in p.stdout + p.stderr
        assert not (env["build"] / "report.json").exists()
        runs = sorted((env["build"] / "runs").glob("*/report.json"))
        assert runs and json.loads(runs[-1].read_text())["passed"]  # history is kept
    finally:
        env["manifest"].write_text(good)
