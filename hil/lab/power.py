"""Power as a board resource: switch a board's power (on, off, cycle) and wait for its transport
to answer again.

A board's ``power`` (kiln/schema/lab.py) picks who switches it, by its ``implementation``:
``command`` is this module (shell commands: a PDU's CLI, uhubctl, a relay script), ``emulated``
is the emulated lab's (hil/emulator/lab.py: it stops and restarts the board's real processes).
Each implementation has ``power(instance, action, spec)``. Nothing here imports a backend.

Recovery (hil/health_check.py ``check_and_recover``) cycles a board that failed its check, waits
here for its transport to answer (bounded), then checks it again.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.registry import implementation

ACTIONS = ("on", "off", "cycle")
ANSWER_TIMEOUT_S = 30.0


class PowerError(KilnError):
    """A board has no power control, or switching it failed (names the board and the action)."""


def switch(instance, action: str) -> float:
    """Switch ``instance``'s power; the seconds it took."""
    if action not in ACTIONS:
        raise PowerError(f"board {instance.name}: unknown power action '{action}' (expected {', '.join(ACTIONS)})")
    if instance.power is None:
        raise PowerError(f"board {instance.name} has no power control (give it 'power:' in the lab inventory)")
    t0 = time.perf_counter()
    implementation(instance.power).power(instance, action, instance.power)
    return round(time.perf_counter() - t0, 3)


def power(instance, action: str, spec) -> None:
    """``kind: command``: run the action's command (a cycle without its own command is off,
    ``off_s``, on)."""
    if action == "cycle" and not spec.cycle:
        power(instance, "off", spec)
        time.sleep(spec.off_s)
        power(instance, "on", spec)
        return
    cmd = getattr(spec, action)
    try:
        r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=spec.timeout_s,
                           env={**os.environ, "KILN_BOARD": instance.name})
    except subprocess.TimeoutExpired as e:
        raise PowerError(f"board {instance.name}: power {action} command '{cmd}' did not finish within "
                         f"{spec.timeout_s:g} s") from e
    if r.returncode != 0:
        raise PowerError(f"board {instance.name}: power {action} command '{cmd}' exited {r.returncode}: "
                         f"{(r.stderr or r.stdout).strip()[-300:]}")


def _answers(instance, lab_dir: Path) -> bool:
    """One probe: an SSH board's sshd sends its banner; a serial board's device exists; a local
    board always answers."""
    t = instance.transport
    if t.kind == "ssh":
        try:
            with socket.create_connection((t.host, t.port), timeout=1.0) as s:
                s.settimeout(1.0)
                return s.recv(4).startswith(b"SSH-")
        except OSError:
            return False
    if t.kind == "serial":
        port = Path(t.port)
        return (port if port.is_absolute() or "://" in t.port else Path(lab_dir) / port).exists() or "://" in t.port
    return True


def wait_answering(instance, lab_dir: Path, timeout_s: float = ANSWER_TIMEOUT_S) -> float:
    """Wait until the board's transport answers; the seconds waited. PowerError past ``timeout_s``."""
    t0 = time.perf_counter()
    while not _answers(instance, lab_dir):
        if time.perf_counter() - t0 > timeout_s:
            raise PowerError(f"board {instance.name}: its {instance.link} transport did not answer within "
                             f"{timeout_s:g} s of power-on")
        time.sleep(0.2)
    return round(time.perf_counter() - t0, 3)
