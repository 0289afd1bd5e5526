"""Deploy over the local transport, with faults injected by stand-in runners and a transport
that corrupts uploads. The real runner on real boards is covered by tests/test_pipeline.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hil import deploy
from hil.transport.local import LocalTransport


def script(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "kiln-runner"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(0o755)
    return p


def files_with(runner: Path, tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model.so"
    model.write_bytes(b"\x7fELF-not-really" * 100)
    return {"kiln-runner": runner, "model.so": model}


GOOD = json.dumps({"count": 2, "predictions": [1, 2], "latencies_us": [10.0, 11.0]})


def test_deploy_uploads_verifies_runs_and_cleans_up(tmp_path):
    t = LocalTransport("b1", tmp_path / "lab")
    # the stand-in runner proves it ran in the run dir next to the uploaded model
    out = deploy.deploy(t, files_with(script(tmp_path, f"test -f model.so && echo '{GOOD}'"), tmp_path),
                        ["./kiln-runner"], timeout=30, board="b1")
    assert out["runner"]["predictions"] == [1, 2]
    assert set(out["timings_s"]) == {"connect", "upload", "verify", "run"}
    assert not any((tmp_path / "lab" / "b1" / "runs").iterdir())  # per-run dir removed
    assert out["uploaded_bytes"] > 0 and out["cached_bytes"] == 0


def test_artifacts_with_the_same_hash_are_not_sent_again(tmp_path):
    files = files_with(script(tmp_path, f"echo '{GOOD}'"), tmp_path)
    t = LocalTransport("b6", tmp_path / "lab")
    first = deploy.deploy(t, files, ["./kiln-runner"], timeout=30, board="b6")
    files["model.so"].write_bytes(b"a new model")
    again = deploy.deploy(t, files, ["./kiln-runner"], timeout=30, board="b6")
    assert again["uploaded_bytes"] == len(b"a new model")  # only the changed file went up
    assert again["cached_bytes"] == files["kiln-runner"].stat().st_size
    assert first["uploaded_bytes"] == files["kiln-runner"].stat().st_size + len(b"\x7fELF-not-really" * 100)


@pytest.mark.parametrize("body, step, seen", [
    ("sleep 30", "run", "timed out after 1 s"),
    ("echo 'segfault-ish garbage'", "run", "no valid JSON"),
    ("echo '{\"count\": 3, \"predictions\": [1], \"latencies_us\": [1]}'", "run", "inconsistent"),
    ("echo boom >&2; exit 2", "run", "runner exited 2: boom"),
])
def test_runner_faults_name_the_step(tmp_path, body, step, seen):
    t = LocalTransport("b2", tmp_path / "lab")
    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(t, files_with(script(tmp_path, body), tmp_path), ["./kiln-runner"], timeout=1, board="b2")
    assert e.value.step == step and seen in str(e.value)
    assert not any((tmp_path / "lab" / "b2" / "runs").iterdir())  # cleaned up even on failure


class CorruptingTransport(LocalTransport):
    """Fault injection: flips one byte of every upload, as a bad link would."""

    def put(self, local, remote):
        super().put(local, remote)
        dest = Path(self.workdir()) / remote
        data = bytearray(dest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        dest.write_bytes(bytes(data))


def test_corrupted_upload_is_caught_before_running(tmp_path):
    marker = tmp_path / "ran"
    t = CorruptingTransport("b3", tmp_path / "lab")
    with pytest.raises(deploy.DeployError) as e:
        deploy.deploy(t, files_with(script(tmp_path, f"touch {marker}; echo '{GOOD}'"), tmp_path),
                      ["./kiln-runner"], timeout=10, board="b3")
    assert e.value.step == "verify" and "sha256 on the board" in str(e.value)
    assert not marker.exists()  # a corrupted runner never ran
    assert not any((tmp_path / "lab" / "b3" / "cache").iterdir())  # bad copies evicted: resent next time


def test_missing_program_on_board(tmp_path):
    t = LocalTransport("b4", tmp_path / "lab")
    with pytest.raises(deploy.DeployError, match="cannot run './nope'"):
        deploy.deploy(t, files_with(script(tmp_path, "true"), tmp_path), ["./nope"], timeout=10, board="b4")


def test_transport_open_close_idempotent(tmp_path):
    t = LocalTransport("b5", tmp_path / "lab")
    t.open(); t.open(); t.close(); t.close()
    with t:
        assert t.run(["true"], timeout=5).returncode == 0
    assert shutil.which("sha256sum")  # the on-board verify step relies on coreutils


def dead_pid() -> int:
    """The pid of a process that has just exited (not reused this soon)."""
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_run_dir_names_this_host_and_pid(tmp_path):
    import os

    name = deploy.run_dir_name()
    assert name.startswith(f"runs/{deploy.host_id()}-{os.getpid()}-")
    assert deploy.run_dir_name() != name  # two deploys of one process in one second differ


def test_run_dirs_of_dead_runs_of_this_host_are_removed_on_connect(tmp_path):
    import subprocess

    t = LocalTransport("b7", tmp_path / "lab")
    runs = tmp_path / "lab" / "b7" / "runs"
    live = subprocess.Popen(["sleep", "60"])  # another run of this host, still going
    try:
        names = {
            "dead": deploy.run_dir_name(dead_pid())[len("runs/"):],
            "live": deploy.run_dir_name(live.pid)[len("runs/"):],
            "other host": f"elsewhere-{dead_pid()}-20240101-120000-0",
            "other form": f"20240101-120000-{dead_pid()}",
            "a host named like ours, longer": f"{deploy.host_id()}-2-{dead_pid()}-20240101-120000-0",
        }
        for n in names.values():
            (runs / n).mkdir(parents=True)
            (runs / n / "model.so").write_bytes(b"x" * 1000)
        deploy.deploy(t, files_with(script(tmp_path, f"echo '{GOOD}'"), tmp_path), ["./kiln-runner"],
                      timeout=30, board="b7")
        assert sorted(p.name for p in runs.iterdir()) == sorted(n for k, n in names.items() if k != "dead")
    finally:
        live.kill()
        live.wait()
