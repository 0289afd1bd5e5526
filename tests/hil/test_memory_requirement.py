"""requirements.memory_kb on real runs of the runner: enforced on a native board (x86-host),
reported only on an emulated one (qemu's resident set is not the board's), and next to
kiln.sizing's estimate in the report. Reuses test_runner's fixtures (a tiny CNN compiled by TVM,
the runner bundles for x86_64 and aarch64)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hil import validate
from hil.reports import deploy as report
from kiln import sizing
from kiln.config import load_board
from kiln.nets import estimate
from kiln.schema import CnnArchitecture, Project, Requirements
from tests.conftest import TINY
from tests.hil.test_runner import COUNT, SHAPE, _run, a64, model, x86  # noqa: F401  (fixtures)

pytestmark = pytest.mark.slow

INPUT_KB = COUNT * int(np.prod(SHAPE)) * 4 / 1024  # the test inputs the runner holds


def _runner(board, inputs, *args):
    proc = _run(board, "--warmup", "1", *args, inputs=inputs)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _evaluate(out, limit_kb, emulated, estimate_=None, input_kb=INPUT_KB):
    req = Requirements.model_validate({"memory_kb": {"max": limit_kb}})
    res = validate.evaluate(req, out, out["predictions"], 1024, emulated, None, input_kb=input_kb, estimate=estimate_)
    res["type"] = "x86-host" if not emulated else "rpi4"
    return res


def test_memory_limit_is_enforced_on_a_native_board(model, x86):
    out = _runner(x86, model["inputs"], "--threads", "2")
    tight = _evaluate(out, 100, emulated=False)
    assert tight["memory_kb"] == pytest.approx(out["peak_rss_kb"] - INPUT_KB)
    assert [c["verdict"] for c in tight["requirements"]] == ["fail"] and not tight["passed"]
    rep = report.build("tiny", "lab", {"host-1": tight})
    assert not rep["passed"]
    (line,) = rep["failures"]
    assert line.startswith("board 'host-1': requirement memory_kb not met: measured ")
    assert f"{tight['memory_kb']:.4g}" in line and "required <= 100" in line

    roomy = _evaluate(out, 1_000_000, emulated=False)
    assert roomy["passed"] and roomy["requirements"][0]["verdict"] == "pass"


def test_test_inputs_held_by_the_runner_are_not_the_apps_memory(model, x86, tmp_path):
    # 40x the samples: the runner's resident set grows by the inputs it reads, the app's does not
    x = np.random.default_rng(1).standard_normal((COUNT * 40, *SHAPE)).astype("<f4")
    many = tmp_path / "many.bin"
    x.tofile(many)
    small, big = _runner(x86, model["inputs"]), _runner(x86, many)
    big_kb = x.nbytes / 1024
    assert big["peak_rss_kb"] - small["peak_rss_kb"] > 0.8 * (big_kb - INPUT_KB)
    m_small = _evaluate(small, 1e6, False)["memory_kb"]
    m_big = _evaluate(big, 1e6, False, input_kb=big_kb)["memory_kb"]
    assert abs(m_big - m_small) < 0.1 * m_small


def test_estimate_is_next_to_the_measurement(model, x86):
    # the fixture's net is the cnn family's shape: conv3x3(8)-ReLU-maxpool, flatten, linear
    arch = CnnArchitecture(family="cnn", widths=[8], head="flatten", max_macs=10**9)
    c = estimate(arch, SHAPE[1:], SHAPE[0], 5)
    p = Project.model_validate({**TINY, "architecture": arch.model_dump()})
    est = sizing.estimate_from(p, load_board("x86-host"), c)
    out = _runner(x86, model["inputs"], "--threads", "2")
    res = _evaluate(out, 1e6, False, estimate_=est)
    mem = res["estimate_vs_measured"]["memory_kb"]
    assert mem["estimated"] == est["peak_memory_kb"] and mem["measured"] == res["memory_kb"]
    assert 0.85 < mem["ratio"] < 1.15, mem  # the runtime baseline dominates a tiny net: measured on x86-host
    lat = res["estimate_vs_measured"]["latency_ms.p50"]
    assert lat["measured"] == res["latency_ms"]["p50"] and lat["ratio"] == pytest.approx(lat["measured"] / lat["estimated"])
    text = "\n".join(report.sizing_table(report.build("tiny", "lab", {"host-1": res})))
    assert "Estimate vs measurement" in text and "host-1" in text and f"{mem['ratio']:.2f}" in text


def test_emulated_board_reports_memory_but_does_not_enforce(model, a64):
    out = _runner(a64, model["inputs"])
    res = _evaluate(out, 100, emulated=True)  # qemu alone is far over 100 KiB
    (check,) = res["requirements"]
    assert check["name"] == "memory_kb" and check["verdict"] == validate.NOT_ENFORCED
    assert check["measured"] > 100 and res["memory_emulated"] and res["passed"]
    rep = report.build("tiny", "lab", {"rpi4-1": res})
    assert rep["passed"] and "not enforced" in report.table(rep)
