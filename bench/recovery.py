"""Recovery by a power cycle, timed on the emulated lab (real sshd in its own namespace):

1. a board whose sshd is frozen (SIGSTOP) before the night: seconds from its failed health
   check to its first passing job after the power cycle;
2. a board that stays dead (its power switch does nothing: a relay on the wrong port): seconds
   from its failed health check until it is marked bad.

The job is a real command over the board's real SSH transport (not a model's deploy: the
health check before it already deploys the runner and the known model over the same link).

    .venv/bin/python bench/recovery.py [--smoke]   # --smoke: the frozen case only
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kiln-recovery-"))
    os.environ["KILN_BUILD"] = str(tmp / "build")
    import shutil

    from hil import deploy, nightly
    from hil.emulator import lab as emlab
    from hil.runner.build import build_runner
    from hil.transport import open_transport
    from kiln.artifacts import ROOT, runner_dir, runtime_cache
    from kiln.config import load_board
    from kiln.schema import Project, StaticLab
    from kiln.schema.lab import CommandPower
    from tests.conftest import TINY

    built = ROOT / "build" / "runner" / "x86_64"
    if (built / "runner.json").is_file():
        shutil.copytree(built, runner_dir("x86_64"))
    else:
        build_runner("x86_64", runner_dir("x86_64"), runtime_cache())
    spec = tmp / "lab.yaml"
    spec.write_text(yaml.safe_dump({"backend": "emulated", "boards": [
        {"name": "s1", "type": "x86-host", "transport": {"kind": "ssh"}}]}))
    inv = StaticLab.model_validate(yaml.safe_load(emlab.up(spec).read_text()))
    project = Project.model_validate({**TINY, "targets": ["x86-host"]})
    done: dict[str, float] = {}

    def job(project, board, live, layout, lab_dir, run_id, latency_windows=0):
        try:
            with open_transport(live, lab_dir, tmp / "local") as t:
                t.run(["true"], timeout=5)
        except Exception as e:  # noqa: BLE001
            return {"instance": live.name, "error": {"step": "connect", "message": str(e)}}
        done.setdefault(run_id, time.time())
        return {"instance": live.name, "runner": {"windows_us": [10.0]}, "emulated": False}

    deploy.job, deploy.write_record = job, (lambda *a: None)
    pid = lambda: emlab._read_state()["boards"]["s1"]["pids"][0]  # noqa: E731
    try:
        rows = []
        cases = [("frozen, recovered", inv.boards[0]),
                 ("stays dead", inv.boards[0].model_copy(update={"power": CommandPower(
                     kind="command", on="true", off="true", off_s=0)}))]
        for case, board in cases[:1] if "--smoke" in sys.argv else cases:
            os.kill(pid(), signal.SIGSTOP)
            t0 = time.time()
            night = nightly.Night({"tiny": project}, {"x86-host": load_board("x86-host")},
                                  StaticLab(name="b", boards=[board]), tmp, case.split(",")[0])
            night.run_jobs()
            end = time.time()
            info = night.board_info["s1"]
            failed_at = t0 + info["check"]["first"]["seconds"]
            cyc = info["power_cycles"][0]
            if case.startswith("frozen"):
                rows.append((case, info["check"]["first"]["seconds"], cyc["seconds"], done[case.split(",")[0]] - failed_at,
                             "first passing job"))
            else:
                os.kill(pid(), signal.SIGCONT)
                rows.append((case, info["check"]["first"]["seconds"], cyc["seconds"], end - failed_at,
                             f"marked {info['health']}"))
        print(f"{'case':<20} {'failed check s':>15} {'cycle+wait s':>13} {'failed check -> outcome s':>26}  outcome")
        for case, first, cycle, after, what in rows:
            print(f"{case:<20} {first:>15.2f} {cycle:>13.2f} {after:>26.2f}  {what}")
    finally:
        emlab.down()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
