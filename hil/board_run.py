"""The hil stage: one app on one lab board (hil/deploy.py's job), and a board that went silent
during it recovered by a power cycle (hil/health_check.py) and the job run once more. Its own
module because the health check deploys through hil/deploy.py: the stage sits above both."""

from __future__ import annotations

import logging
from pathlib import Path

from hil import deploy
from kiln.errors import KilnError


def run(project, board, instance, layout, lab_path: Path, run_id: str) -> dict:
    """The hil stage: deploy ``project``'s kernel library for ``board`` to lab instance
    ``instance`` (as the lab describes it), run the runner and record its raw output (or its
    failure) in runs/<run id>/<instance>/run.json and last/<instance>.json. A board failure is
    recorded, not raised: the other boards and the report go on."""
    from hil.lab import deploy_lease, fenced, open_lab
    from kiln.config import load_inventory
    from kiln.errors import ManifestError

    blog = logging.getLogger(f"kiln.board.{instance.name}")
    try:
        inv_path = open_lab(lab_path)  # the emulated lab starts on demand
        live = next((b for b in load_inventory(inv_path).boards if b.name == instance.name), None)
        if live is None:
            raise ManifestError(f"{inv_path}: no board instance '{instance.name}' (the lab changed since "
                                "the task list was made; run doit again)")
        with deploy_lease(lab_path, live) as (lease, live):  # a shared lab's board: held for the job
            before = _check_first(project, board, live, inv_path.parent, blog)
            if before is not None and not before["check"]["passed"]:
                record = {**deploy._record_head(board, instance, run_id), "power_cycles": [before],
                          "error": {"step": "health", "message": f"the board did not answer and still fails after "
                                    f"a power cycle: {before['check']['error']}"}}
            else:
                record = fenced(deploy.job(project, board, live, layout, inv_path.parent, run_id), lease,
                                instance.name)
                record = _recover(project, board, live, layout, inv_path.parent, run_id, record, lease, blog)
                if before is not None:
                    record = {**record, "power_cycles": [before, *record.get("power_cycles", [])]}
    except KilnError as e:
        blog.error("%s", e)
        record = {**deploy._record_head(board, instance, run_id), "error": {"step": "prepare", "message": str(e)}}
    deploy.write_record(layout, instance.name, run_id, record)
    return record


PROBE_S = 3.0  # how long a board's transport has to answer before a lone deploy's job


def _check_first(project, board, live, lab_dir: Path, blog) -> dict | None:
    """Before a lone deploy's job, on a board with power control: does its transport answer (an
    SSH board's sshd sends its banner within PROBE_S)? One that does not is power-cycled, waited
    for and health-checked (hil/health_check.py check_and_recover, recorded in its health
    history) before the job, instead of the job meeting the hang at its connect's timeouts and
    retries. The cycle (with its ``check``), or None when the board answered or has no power
    control. (A serial board's console cannot be probed without opening its shell: a hang there
    is met by the job's connect, and recovered after it by ``_recover``.)"""
    from hil import health_check
    from hil.lab import power

    if live.power is None or live.link != "ssh":
        return None
    try:
        power.wait_answering(live, lab_dir, PROBE_S)
        return None
    except power.PowerError:
        pass
    blog.warning("board %s does not answer before the deploy of %s: checking it, power-cycling it if need be",
                 live.name, project.name)
    _, check, cycles = health_check.check_and_recover(live, board, lab_dir)
    if not cycles:  # it passed the full check after all (or is in maintenance: the job says what it meets)
        return None
    return {**cycles[0], "check": check}


def _recover(project, board, live, layout, lab_dir: Path, run_id: str, record: dict, lease, blog) -> dict:
    """A board that went silent during the job (an infrastructure failure) and has power
    control: power-cycled, waited for, health-checked, and the job run once more on it. The
    record carries ``power_cycles``; the cycle is in the board's health history; a board still
    failing after it is marked bad (hil/health_check.py)."""
    from hil import health_check
    from hil.lab import fenced
    from hil.lab.health import record_check

    err = record.get("error")
    if live.power is None or not deploy.infra_failure(err) or err.get("step") == "lease":
        return record
    blog.warning("board %s went silent (%s): power-cycling it", live.name, err["message"][:200])
    cycle = health_check.power_cycle(live, lab_dir, f"went silent during a deploy of {project.name}: "
                                     f"{err['message'][:200]}")
    check = (health_check.health_check(live, board, lab_dir) if cycle["passed"]
             else {"passed": False, "seconds": 0.0, "error": f"power: {cycle['error']}"})
    cycle["check"] = check
    record_check(live.name, check["passed"], "after a power cycle" if check["passed"]
                 else f"{check['error']} (after a power cycle)")
    if check["passed"]:
        blog.warning("board %s answers again after a power cycle: the job runs again", live.name)
        record = fenced(deploy.job(project, board, live, layout, lab_dir, run_id), lease, live.name)
    else:
        blog.error("board %s still fails after a power cycle (%s): marked bad", live.name, check["error"])
    return {**record, "power_cycles": [cycle]}
