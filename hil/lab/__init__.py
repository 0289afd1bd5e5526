"""The lab: which board instances an app deploys to, and opening a lab for a deploy.

A lab file is one of the ``Lab`` union's backends (kiln/schema/lab.py): ``static`` (boards already
there, every transport given) or ``emulated`` (Kiln starts the boards on this machine). Lab
code knows backends only through the registry: ``open_lab`` asks the backend's module for an
ordinary inventory whose boards are up, and ``close_opened`` hands back what this process
opened. Nothing here imports a backend (the emulated lab imports the lab, never the reverse).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from hil.protocol import Leasing
from kiln.config import load_lab
from kiln.errors import KilnError, ManifestError
from kiln.registry import implementation
from kiln.schema import Board, Instance, Project

log = logging.getLogger("kiln.lab")
_opened: list[tuple[object, Path]] = []  # (lab, its file) opened by this process, closed by close_opened


def describe(path: Path):
    """The lab in ``path`` as described (boards, types, links), without starting anything; a
    backend that finds its boards (labgrid, without a ``boards`` list) is asked for them."""
    lab = load_lab(path)
    backend = implementation(lab)
    return backend.describe(lab, Path(path)) if hasattr(backend, "describe") else lab


def compile_only(project: Project, boards: dict[str, Board]) -> list[str]:
    """The app's target types that are compiled for but cannot run in a lab."""
    return [t for t in project.targets if boards[t].runtime == "compile-only"]


def runnable(project: Project, lab, boards: dict[str, Board]) -> list[Instance]:
    """Every instance of the lab whose type the app targets and can run; a runnable target
    type with no instance in the lab is an error naming it."""
    types = [t for t in project.targets if t not in compile_only(project, boards)]
    missing = [t for t in types if t not in {b.type for b in lab.boards}]
    if missing:
        raise ManifestError(
            f"lab '{lab.name}' has no instance of board type(s) {missing} that app "
            f"'{project.name}' targets (add one to the inventory, or remove it from targets)"
        )
    return [b for b in lab.boards if b.type in types]


def choose(project: Project, instances: list[Instance], wanted: list[str], given: str = "boards") -> list[Instance]:
    """The app's instances narrowed to ``wanted`` (all of them when empty); a name that is not a
    board of this app is an error naming the app's boards and where ``wanted`` came from
    (``given``: doit's ``boards`` variable, or ``KILN_BOARDS``)."""
    if not wanted:
        return instances
    names = [b.name for b in instances]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise ManifestError(
            f"{given}={','.join(wanted)}: {', '.join(unknown)} is not a board of app '{project.name}' "
            f"(its boards: {', '.join(names) or 'none'})"
        )
    return [b for b in instances if b.name in wanted]


def open_lab(path: Path) -> Path:
    """A live inventory for the lab in ``path``: its backend starts or reaches the boards."""
    lab = load_lab(path)
    live = implementation(lab).open_lab(lab, Path(path))
    if (lab, Path(path)) not in _opened:
        _opened.append((lab, Path(path)))
    return live


def close_opened() -> None:
    """doit teardown: hand back every lab this process opened. The emulated lab counts its
    holders: it stops when the last live deploy holding it hands it back, never under another
    deploy still running, and never when it was started by hand (hil/emulator/lab.py)."""
    while _opened:
        lab, path = _opened.pop()
        try:
            implementation(lab).close_lab(lab, path)
        except (KilnError, OSError) as e:  # teardown goes on; the error is reported
            log.warning("lab %s: closing failed: %s", path, e)


class LocalLeasing(Leasing):
    """Leases on this machine's lease directory (hil/lab/leases.py) and health in its own
    database: the static and emulated labs. A deploy alone takes no lease there (as before)."""

    def acquire(self, board: str, holder: str = "", wait: bool = True, timeout_s: float | None = None):
        from hil.lab import leases

        return leases.acquire(board, holder, wait=wait, timeout_s=timeout_s)

    def bind(self, inst, lease):
        return inst  # its transport is the lab file's

    def shared_health(self, board: str) -> str | None:
        return None

    def publish_health(self, board: str, state: str) -> None:
        return None

    deploy_lease = False


def leasing(path: Path):
    """Who leases the lab's boards and shares their health: its backend, when it has its own
    (labgrid: through the coordinator), else this machine's lease directory."""
    lab = load_lab(path)
    backend = implementation(lab)
    return backend.Leasing(lab) if hasattr(backend, "Leasing") else LocalLeasing()


def fenced(record: dict, lease, board: str) -> dict:
    """A job's record on ``board``; when its lease was lost during the job, the record without
    its results and with the error step ``lease``: never a result from a board no longer held."""
    if lease is None or not lease.lost:
        return record
    why = getattr(lease, "lost_reason", None) or "another holder took the board"
    out = {k: v for k, v in record.items() if k not in ("runner", "checks")}
    out["error"] = {"step": "lease", "message": f"the lease on {board} was lost during the job ({why}): "
                    "its result is not used"}
    return out


@contextlib.contextmanager
def deploy_lease(path: Path, inst, timeout_s: float = 3600.0):
    """(lease, instance as reached under it) for a lone deploy on its board: a lease on a shared
    lab (labgrid: waits for the place), none on this machine's own labs."""
    lz = leasing(path)
    if not getattr(lz, "deploy_lease", True):
        yield None, inst
        return
    with lz.acquire(inst.name, wait=True, timeout_s=timeout_s) as lease:
        yield lease, lz.bind(inst, lease)
