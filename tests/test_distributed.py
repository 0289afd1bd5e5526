"""training.distributed end to end through `doit train:<app>` (issue 27): torchrun with two gloo
processes on this machine; a rank killed mid-epoch fails the task naming the rank and its exit,
with nothing written; two "machines" as two network namespaces joined by a veth pair and the
c10d rendezvous, the second joining with `python -m passes.support.distributed join <app>`."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY, run_doit, write_project


def _env(kiln_env, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "KILN_TEST_KILL_RANK"}
    return dict(env, KILN_PROJECTS=str(kiln_env["projects"]), KILN_BUILD=str(kiln_env["build"]), **extra)


def _tiny(kiln_env, distributed: dict) -> dict:
    data = copy.deepcopy(TINY)
    data["training"].update(epochs=2, threads=1, distributed=distributed)
    write_project(kiln_env["projects"], data)
    return data


def _leftovers(app_build):
    """Temporary files a half-done write or launch would leave (atomic writes, the job folder)."""
    return [p.name for p in app_build.iterdir() if p.name.startswith(".") or ".tmp" in p.name]


def test_two_gloo_processes_through_doit_and_a_killed_rank(kiln_env):
    _tiny(kiln_env, {"nproc_per_node": 2})
    app = kiln_env["build"] / "tiny"
    # a rank SIGKILLed in its first epoch: the task fails naming it; nothing is written
    p = run_doit(_env(kiln_env, KILN_TEST_KILL_RANK="1:1"), "train:tiny")
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    # (the surviving rank's own gloo traceback is torch's, in its log; the task's error is ours)
    assert "PassError: train tiny: distributed training failed: rank 1 (local rank 1, pid" in out, out
    assert "killed by SIGKILL" in out and "nothing was written" in out, out
    assert not (app / "model.pt").exists() and not (app / "metrics.json").exists()
    assert _leftovers(app) == []
    # the same task, whole: two ranks trained with DDP, rank 0 wrote the checkpoint once
    p = run_doit(_env(kiln_env), "train:tiny")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "torchrun, 2 process(es) x 1 machine(s)" in out
    metrics = json.loads((app / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["start"] == "trained from scratch" and len(metrics["history"]) == 2
    assert (app / "model.pt").exists() and _leftovers(app) == []
    assert out.count("train tiny: best epoch") == 1  # written once, by one rank


NS = ("kiln27a", "kiln27b")
ADDR = ("10.27.91.1", "10.27.91.2")


def _ip(*args: str, check: bool = True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


@pytest.fixture
def two_machines():
    """Two network namespaces joined by a veth pair on 10.27.91.0/24 (removed afterwards)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    for ns in NS:
        _ip("netns", "del", ns, check=False)
    try:
        for ns in NS:
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", "k27a", "netns", NS[0], "type", "veth", "peer", "name", "k27b", "netns", NS[1])
        for ns, dev, addr in zip(NS, ("k27a", "k27b"), ADDR):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield
    finally:
        for ns in NS:
            _ip("netns", "del", ns, check=False)


def test_two_namespaces_joined_by_the_c10d_rendezvous(kiln_env, two_machines):
    _tiny(kiln_env, {"nproc_per_node": 1, "nnodes": 2, "rdzv_endpoint": f"{ADDR[0]}:29527", "timeout_s": 60})
    assert run_doit(_env(kiln_env), "data:tiny").returncode == 0
    # the second machine joins first and waits at the rendezvous; it writes nothing
    joiner = subprocess.Popen(["ip", "netns", "exec", NS[1], sys.executable, "-m", "passes.support.distributed", "join",
                               "tiny"], cwd=ROOT, env=_env(kiln_env, GLOO_SOCKET_IFNAME="k27b", PET_LOCAL_ADDR=ADDR[1]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        p = subprocess.run(["ip", "netns", "exec", NS[0], *_doit(), "train:tiny"], cwd=ROOT,
                           env=_env(kiln_env, GLOO_SOCKET_IFNAME="k27a"), capture_output=True, text=True, timeout=300)
        joined, _ = joiner.communicate(timeout=120)
    finally:
        if joiner.poll() is None:
            joiner.kill()
    assert p.returncode == 0, p.stdout + p.stderr + joined
    assert joiner.returncode == 0, joined
    assert "rendezvous at 10.27.91.1:29527" in p.stdout + p.stderr
    assert "train tiny: epoch 2/2" in joined  # the second machine trained its share
    metrics = json.loads((kiln_env["build"] / "tiny" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and len(metrics["history"]) == 2


def _doit() -> list[str]:
    from tests.conftest import DOIT

    return DOIT
