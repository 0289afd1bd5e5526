"""`doit check_targets`: load every board type, the lab and every manifest, and list every
problem at once (the loaders stop at the first)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from doit.exceptions import TaskFailed

from hil import qemu
from hil.lab import describe
from kiln.artifacts import Layout
from kiln.config import board_names, load_board, load_project, project_names, project_path, targets_dir
from kiln.registry import implementation
from kiln.errors import ManifestError


def check_all(lab_path: Path) -> tuple[list[str], list[str]]:
    """(ok lines, problems) over the board files, the lab in ``lab_path`` and every manifest."""
    ok, problems = [], []
    boards = {}
    targeted = _targeted()
    for name in board_names():
        try:
            b = boards[name] = load_board(name)
        except ManifestError as e:
            problems.append(str(e))
            continue
        problems += qemu.check(b, targets_dir() / f"{name}.yaml")
        if shutil.which(b.cc) is None:
            problems.append(f"{targets_dir() / (name + '.yaml')}: field 'cc': compiler '{b.cc}' of board type '{name}' "
                            "is not on PATH (the compile stage links its kernel library with it)")
        how = "compile-only" if b.runtime == "compile-only" else (f"emulated ({b.emulation.binary})" if b.emulation else "native")
        ok.append(f"board type {name}: {b.arch}, {how}")
    try:
        lab = describe(lab_path)
        for b in lab.boards:
            ok.append(f"lab '{lab.name}' ({lab.backend}) instance {b.name}: type {b.type}, {b.link}")
        if not type(lab).provides_transports:  # a backend that starts its boards fills these in
            problems += check_transports(lab, Path(lab_path))
        for name, b in boards.items():
            if b.runtime == "compile-only" or name in {i.type for i in lab.boards}:
                continue
            # only a type some app targets needs one (its deploy would fail); another (rpi5: built
            # and run under qemu by the tests alone) is listed as such
            if name in targeted:
                problems.append(f"board type '{name}' ({targets_dir() / (name + '.yaml')}) has no instance in lab "
                                f"'{lab.name}' ({lab_path}) and app(s) {targeted[name]} target it: add one to validate on it")
            else:
                ok.append(f"board type {name}: no instance in lab '{lab.name}' and no app targets it")
    except ManifestError as e:
        problems.append(str(e))
    for app in project_names():
        try:
            p = load_project(app)
        except ManifestError as e:
            problems.append(str(e))
            continue
        try:  # where its data set is (not read): an empty or wrong dataset.path is found here
            implementation(p.dataset).locate(p.dataset, Layout(app))
            ok.append(f"project {app}: ok")
        except ManifestError as e:
            problems.append(f"{project_path(app)}: {e}")
    return ok, problems


def _targeted() -> dict[str, list[str]]:
    """Board type -> the apps whose manifests target it (manifests that fail to load are
    reported by check_all's own loop)."""
    out: dict[str, list[str]] = {}
    for app in project_names():
        try:
            targets = load_project(app).targets
        except ManifestError:
            continue
        for t in targets:
            out.setdefault(t, []).append(app)
    return out


def _readable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None."""
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a file"
    if not os.access(path, os.R_OK):
        return "is not readable by this user"
    return None


def check_transports(lab, lab_path: Path) -> list[str]:
    """Problems with a static inventory's connection files, resolved as the transports resolve
    them (relative to the inventory's directory): every SSH key (a readable private key without
    a passphrase) and known_hosts file, every serial port."""
    import paramiko

    problems, base = [], lab_path.parent
    for i, b in enumerate(lab.boards):
        t, at = b.transport, f"{lab_path}: field 'boards.{i}.transport"
        if t.kind == "ssh":
            key = (base / t.key).resolve()
            why = _readable(key)
            if why is None:
                try:
                    paramiko.PKey.from_path(key)
                except Exception as e:  # paramiko and cryptography raise many types for a bad file
                    encrypted = isinstance(e, paramiko.PasswordRequiredException) or (
                        isinstance(e, TypeError) and "password" in str(e).lower())
                    why = ("is encrypted (Kiln gives no passphrase and uses no agent)" if encrypted
                           else f"is not a private key paramiko can read ({e})")
            if why:
                problems.append(f"{at}.key': board '{b.name}': SSH key {key} {why}")
            kh = (base / t.known_hosts).resolve()
            why = _readable(kh)
            # the transport reads known_hosts only if it exists: first contact may go without it
            if why and not (why == "does not exist" and t.accept_unknown_host_key):
                problems.append(f"{at}.known_hosts': board '{b.name}': known_hosts file {kh} {why} "
                                "(the board's host key must be in it)")
        elif t.kind == "serial":
            port = Path(t.port if t.port.startswith("/") else (base / t.port).resolve())
            if not port.exists():
                problems.append(f"{at}.port': board '{b.name}': serial port {port} does not exist")
            elif not os.access(port, os.R_OK | os.W_OK):
                problems.append(f"{at}.port': board '{b.name}': serial port {port} is not readable and writable "
                                "by this user (e.g. not in group dialout)")
    return problems


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
