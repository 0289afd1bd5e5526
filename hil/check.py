"""`doit check_targets`: load every board type, the lab and every manifest, and list every
problem at once (the loaders stop at the first)."""

from __future__ import annotations

from pathlib import Path

from doit.exceptions import TaskFailed

from hil import emulation
from hil.lab import describe
from kiln.config import board_names, load_board, load_project, project_names, targets_dir
from kiln.errors import ManifestError


def check_all(lab_path: Path) -> tuple[list[str], list[str]]:
    """(ok lines, problems) over the board files, the lab in ``lab_path`` and every manifest."""
    ok, problems = [], []
    boards = {}
    for name in board_names():
        try:
            b = boards[name] = load_board(name)
        except ManifestError as e:
            problems.append(str(e))
            continue
        problems += emulation.check(b, targets_dir() / f"{name}.yaml")
        how = "compile-only" if b.runtime == "compile-only" else (f"emulated ({b.emulation.binary})" if b.emulation else "native")
        ok.append(f"board type {name}: {b.arch}, {how}")
    try:
        lab = describe(lab_path)
        for b in lab.boards:
            ok.append(f"lab '{lab.name}' ({lab.backend}) instance {b.name}: type {b.type}, {b.link}")
        for name, b in boards.items():
            if b.runtime != "compile-only" and name not in {i.type for i in lab.boards}:
                problems.append(f"board type '{name}' ({targets_dir() / (name + '.yaml')}) has no instance in lab "
                                f"'{lab.name}' ({lab_path}): add one to validate on it")
    except ManifestError as e:
        problems.append(str(e))
    for app in project_names():
        try:
            load_project(app)
            ok.append(f"project {app}: ok")
        except ManifestError as e:
            problems.append(str(e))
    return ok, problems


def check_targets(lab_path: Path):
    """doit action: print every definition's state; fail when any has a problem."""
    ok, problems = check_all(lab_path)
    for line in ok:
        print(f"ok       {line}")
    for p in problems:
        print(f"PROBLEM  {p}")
    if problems:
        return TaskFailed(f"{len(problems)} problem(s) in board files, lab inventory or manifests (see above)")
    print(f"all {len(ok)} definitions are valid")
    return True
