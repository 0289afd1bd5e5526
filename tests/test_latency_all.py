"""bench/latency.py --all (#28 item 7): a preset from synthetic weights goes through every engine
(TVM fp32 and int8, ONNX Runtime fp32 and its own int8, PyTorch eager) and gets its row with the
ratios and the share of the machine's int8 peak; the int8 models are int8 (QDQ) graphs."""

from __future__ import annotations

import re
import types

import pytest

pytestmark = pytest.mark.slow


def test_int8_peak_reads_cpuinfo():
    from bench import _latency_all

    peak, how = _latency_all.int8_peak(2)
    assert peak > 1e9 and "2 cores" in how and "/cycle" in how


def test_all_mode_times_a_preset_on_every_engine(capsys, monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    from bench import _latency_all
    from bench import latency
    from kiln.config import load_board

    args = types.SimpleNamespace(threads=1, rounds=2, calls=3, apps=[], presets=["mlperf_ad"], train_steps=1)
    _latency_all.run(args, load_board("x86-host"), latency.timed, latency.spread, latency.ort_engine,
                     latency.torch_engine)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| mlperf_ad |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "264,192" and all(float(c) > 0 for c in cells[2:7]), row
    assert re.fullmatch(r"\d+\.\d\dx", cells[7]) and re.fullmatch(r"\d+\.\d\dx", cells[8]), row
    assert cells[9].endswith("%") and cells[10].endswith("%") and "tuned" in cells[11], row
    assert "int8 peak" in out and "goals: int8/best-ORT" in out
