"""The lab: which board instances an app deploys to."""

from __future__ import annotations

import os

from pathlib import Path

from kiln.config import (board_names, default_inventory, load_board, load_inventory, load_project,
                         project_names, targets_dir)
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


def check_all(inventory: Path | None = None) -> tuple[list[str], list[str]]:
    """Load every board type, the lab and every manifest; return (ok lines, problems). Unlike
    the loaders it does not stop at the first problem (`doit check_targets`)."""
    from hil.emulator import qemu

    ok, problems = [], []
    boards = {}
    for name in board_names():
        try:
            b = boards[name] = load_board(name)
        except ManifestError as e:
            problems.append(str(e))
            continue
        problems += qemu.check(b, targets_dir() / f"{name}.yaml")
        how = "compile-only" if b.runtime == "compile-only" else (f"emulated ({b.emulation.binary})" if b.emulation else "native")
        ok.append(f"board type {name}: {b.arch}, {how}")
    try:
        lab_name, lab_file, instances = lab_boards(inventory)
        for b in instances:
            how = b.transport.kind if hasattr(b, "transport") else f"{b.link} (emulated lab)"
            ok.append(f"lab '{lab_name}' instance {b.name}: type {b.type}, {how}")
        for name, b in boards.items():
            if b.runtime != "compile-only" and name not in {i.type for i in instances}:
                problems.append(f"board type '{name}' ({targets_dir() / (name + '.yaml')}) has no instance in lab "
                                f"'{lab_name}' ({lab_file}): add one to validate on it")
    except ManifestError as e:
        problems.append(str(e))
    for app in project_names():
        try:
            load_project(app)
            ok.append(f"project {app}: ok")
        except ManifestError as e:
            problems.append(str(e))
    return ok, problems
