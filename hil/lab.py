"""The lab: which board instances an app deploys to."""

from __future__ import annotations

import os

from pathlib import Path

from kiln.config import default_inventory, load_inventory
from kiln.errors import ManifestError
from kiln.schema import Board, EmulatedBoard, Instance, Project


def lab_boards(inventory: Path | None = None) -> tuple[str, Path, list[Instance | EmulatedBoard]]:
    """(lab name, its file, its board instances): the user's inventory ($KILN_LAB) when given,
    else the emulated lab's description (its transports exist only once it is up)."""
    path = inventory or default_inventory()
    if path:
        inv = load_inventory(path)
        return inv.name, path, inv.boards
    from hil.emulator import lab as emulated

    spec = emulated.load_spec()
    return spec.name, emulated.SPEC, spec.boards


def compile_only(project: Project, boards: dict[str, Board]) -> list[str]:
    """The app's target types that are compiled for but cannot run in a lab."""
    return [t for t in project.targets if boards[t].runtime == "compile-only"]


def select(project: Project, lab: tuple[str, Path, list], boards: dict[str, Board], only: str | None = None) -> list:
    """Instances whose type the app targets and can run; ``only`` (or $KILN_BOARDS) narrows
    them to a comma-separated list of instance names."""
    only = only if only is not None else os.environ.get("KILN_BOARDS")
    runnable = [t for t in project.targets if t not in compile_only(project, boards)]
    lab_name, _, instances = lab
    chosen = [b for b in instances if b.type in runnable]
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        names = {b.name for b in chosen}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ManifestError(
                f"KILN_BOARDS: no board instance {unknown} in lab '{lab_name}' for app "
                f"'{project.name}' (its instances: {sorted(names)})"
            )
        return [b for b in chosen if b.name in wanted]
    missing = [t for t in runnable if t not in {b.type for b in instances}]
    if missing:
        raise ManifestError(
            f"lab '{lab_name}' has no instance of board type(s) {missing} that app "
            f"'{project.name}' targets (add one to the inventory, or remove it from targets)"
        )
    return chosen
