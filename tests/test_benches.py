"""Every bench under bench/ runs in its smoke mode (``--smoke``: tiny sizes, the real parts, a
minute at most) and prints its table: a bench that nothing runs rots (bench/compression.py went
on feeding float32 to a library that had come to take uint8 pixels). The benches that need an
app share one tiny app, built once by the real DAG (bench/_smoke.py) in a folder of this run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

BENCH = ROOT / "bench"


def table(out: str, header: str) -> list[list[str]]:
    """The rows of the markdown table whose header row starts with ``header`` (cells stripped)."""
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
    assert start is not None, f"no table headed {header!r} in:\n{out}"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def check_regressions(out: str) -> None:
    assert "False positives (unchanged code)" in out and "Detection (the change persists" in out
    # a constant metric never flags unchanged, and flags a one-byte change on its first night
    assert re.search(r"^model_bytes, constant\s+0\.00%\s+0\.00%$", out, re.M), out
    assert re.search(r"^model_bytes \+1 byte\s+100\.00%\s+100\.00%\s+1\.0\s+0\.00%$", out, re.M), out


def check_hil_upload(out: str) -> None:
    assert re.search(r"^link\s+endpoint\s+MB/s median\s+min\.\.max MB/s\s+payload eff\.$", out, re.M), out
    for link in ("ssh \\(sftp\\)", "serial \\(pty\\)"):
        m = re.search(rf"^{link} .* ([\d.]+)%$", out, re.M)
        assert m and 0 < float(m.group(1)) <= 100, out
    assert re.search(r"^ratio ssh/serial throughput: [\d.]+x", out, re.M), out


def check_compression(out: str) -> None:
    rows = table(out, "| step | widths |")
    assert [r[0] for r in rows] == ["fp32 baseline", "prune", "weight_coding", "quantize"], out
    assert rows[0][6] == "1.0x" and rows[0][13] == "1.00x", rows[0]
    assert float(rows[-1][6].rstrip("x")) > 2, rows[-1]  # pruned to half the widths, then int8
    for r in rows:  # top-1 of the library on the test set, as the runner computed it from uint8 pixels
        assert re.fullmatch(r"\d+\.\d\d%", r[8]) and float(r[11]) > 0, r


def check_latency(out: str) -> None:
    for model in ("fp32 deployed widths", "int8 deployed"):
        assert f"## tiny, {model}: " in out, out
    rows = table(out, "| engine | median µs |")
    engines = {r[0]: r for r in rows}
    assert {"TVM untuned (generic x86-64)", "ONNX Runtime", "PyTorch eager"} <= set(engines), rows
    assert engines["ONNX Runtime"][6] == "1.00x" and float(engines["PyTorch eager"][1]) > 0, rows


def check_kill_rerun(out: str) -> None:
    assert re.search(r"^first run killed at compile after [\d.]+ s$", out, re.M), out
    m = re.search(r"^rerun rc 0 [\d.]+ s; executed: (\[.*\])$", out, re.M)
    assert m and "'compile:tiny@x86-host'" in m.group(1), out


def check_vocabulary(out: str) -> None:
    lines = out.splitlines()
    i = lines.index(" | ".join(("model", "params", "MACs", "est ms", "p50 ms (min-max)", "meas/est", "est KiB",
                                "peak KiB", "meas/est", "fp32 top-1", "int8 top-1", "library B")))
    rows = {r.split(" | ")[0]: r.split(" | ") for r in lines[i + 2:i + 4]}
    assert set(rows) == {"cnn", "autoencoder"}, out
    assert re.fullmatch(r"\d\.\d{3}", rows["cnn"][10]) and rows["autoencoder"][10] == "-", rows  # no top-1 of a reconstruction
    assert all(int(r[11].replace(",", "")) > 0 for r in rows.values()), rows


def check_rpc_tune(out: str) -> None:
    [row] = table(out, "| trials | tuning s | records |")
    assert int(row[0]) > 0 and int(row[2]) > 0 and row[5].endswith("x"), row  # measured over RPC, on the board
    assert "MetaSchedule measured over TVM RPC through an SSH port forward" in out, out


def check_serial_deploy(out: str) -> None:
    assert re.search(r"^cold deploy: 8 test samples, [\d.]+ s", out, re.M), out
    assert re.search(r"^warm deploy: 8 test samples, [\d.]+ s", out, re.M), out
    warm = out[out.index("warm deploy:"):]
    codecs = dict(re.findall(r"^  (\S+)\s+(xz|gzip|raw|cached|none)\s", warm, re.M))
    # a new model.so goes over the wire; the runtime and the inputs stay cached on the board
    assert codecs.get("model.so") not in (None, "cached") and codecs.get("libtvm_runtime.so") == "cached", warm
    assert "relay (both directions, at 4000000 baud)" in out, out


def check_lab_chaos(out: str) -> None:
    for row in ("acquire (ms, place + lease tag)", "release (ms)", "expiry after kill -9 (s, ttl",
                "chaos (4 cycles, ttl 3 s, 2 holders)"):
        assert re.search(rf"^{re.escape(row)}.*\S", out, re.M), (row, out)
    assert re.search(r"^double allocations \(overlapping holds of one place\)\s+0$", out, re.M), out
    assert "--smoke: phase nightly not run" in out, out


CHECKS = {"regressions.py": check_regressions, "hil_upload.py": check_hil_upload,
          "compression.py": check_compression, "latency.py": check_latency, "kill_rerun.py": check_kill_rerun,
          "vocabulary.py": check_vocabulary, "rpc_tune.py": check_rpc_tune, "serial_deploy.py": check_serial_deploy,
          "lab_chaos.py": check_lab_chaos}


def benches() -> list[str]:
    """Every bench (helpers start with an underscore); the checked ones first, in CHECKS' order."""
    found = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))
    return [b for b in CHECKS if b in found] + [b for b in found if b not in CHECKS]


def test_every_bench_has_a_smoke_mode():
    missing = [b for b in benches() if "--smoke" not in (BENCH / b).read_text()]
    assert not missing, f"benches without a --smoke mode (tiny sizes, seconds; tests/test_benches.py runs it): {missing}"


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-smoke")


@pytest.mark.parametrize("bench", benches())
def test_bench_smoke(bench, smoke_dir):
    if bench == "lab_chaos.py" and (os.geteuid() != 0 or not shutil.which("ser2net") or not shutil.which("socat")):
        pytest.skip("bench/lab_chaos.py --smoke needs root (network namespaces), ser2net and socat")
    env = dict(os.environ, KILN_BENCH_SMOKE_DIR=str(smoke_dir), PYTHONUNBUFFERED="1")
    for var in ("KILN_LAB", "KILN_PROJECTS", "KILN_BUILD"):  # a smoke builds and deploys only in its own folders
        env.pop(var, None)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(BENCH / bench), "--smoke"], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    wall = time.monotonic() - t0
    print(f"bench/{bench} --smoke: {wall:.1f} s")
    if bench == "lab_chaos.py" and p.returncode and "another multi-host lab" in p.stderr:
        pytest.skip("bench/lab_chaos.py --smoke: the machine's one multi-host lab is held by another run")
    assert p.returncode == 0, f"bench/{bench} --smoke exited {p.returncode}:\n{p.stdout[-6000:]}\n{p.stderr[-6000:]}"
    CHECKS.get(bench, lambda out: None)(p.stdout)
    assert p.stdout.strip(), f"bench/{bench} --smoke printed nothing"
