"""The source files a task runs, derived from the code itself so task dependencies cannot drift.

``files("passes.train", ...)`` walks the import statements (top level and inside functions) of
the named modules, transitively, within Kiln's own packages (kiln, passes, hil), and returns
their files plus any data files a module declares in ``DATA_FILES`` (names beside the module,
e.g. a shell script it sends to the board). Editing any of them reruns the task. Modules a
registry names by string (a dataset format, a compression pass, a transport) are added by the
caller, which knows which entries a task uses.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from kiln.artifacts import ROOT

PACKAGES = ("kiln", "passes", "hil")


@functools.lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The file of a module of Kiln's own packages (package -> its __init__.py), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w., \t]+)", re.M)
_FROM = re.compile(r"^[ \t]*from[ \t]+([\w.]+)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)
_DATA = re.compile(r"^DATA_FILES[ \t]*=[ \t]*(\([^)]*\))", re.M)


@functools.lru_cache(maxsize=None)
def _scan(path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(modules imported anywhere in the file, its DATA_FILES). A line scan, not a parse: doit
    calls this for every task when it lists them, and a parse of every module costs ~0.1 s. An
    import-like line inside a docstring only adds a dependency, which is harmless."""
    text = path.read_text()
    mods = []
    for m in _IMPORT.finditer(text):
        mods += [part.split()[0] for part in m.group(1).split(",") if part.strip()]
    for m in _FROM.finditer(text):
        if m.group(1).startswith("."):
            continue
        mods.append(m.group(1))
        names = m.group(2).split("#")[0].strip("() \n")
        mods += [f"{m.group(1)}.{n.split()[0]}" for n in names.replace("\n", ",").split(",") if n.strip()]
    data = [x for m in _DATA.finditer(text) for x in ast.literal_eval(m.group(1))]
    return tuple(mods), tuple(data)


@functools.lru_cache(maxsize=None)
def _imports(name: str) -> tuple[str, ...]:
    return tuple(imports(name))


def imports(name: str) -> list[str]:
    """The modules of Kiln's packages that module ``name`` imports directly (its parent
    packages included: importing a.b.c runs a/__init__.py and a/b/__init__.py)."""
    path = module_file(name)
    if path is None:
        return []
    out = []
    for m in _scan(path)[0]:
        parts = m.split(".")
        for i in range(1, len(parts) + 1):
            sub = ".".join(parts[:i])
            # a package importing its own modules runs its own __init__ already: not a dependency
            if module_file(sub) is not None and sub not in out and sub != name:
                out.append(sub)
    return out


def closure(*names: str) -> list[str]:
    """Every module of Kiln's packages that ``names`` need, transitively."""
    seen: list[str] = []
    todo = [n for n in names if module_file(n) is not None]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.append(n)
        todo += [m for m in _imports(n) if m not in seen]
        parts = n.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen]
    return sorted(seen)


def files(*names: str) -> list[str]:
    """The source files (and declared data files) of ``closure(*names)``, as strings for doit."""
    out = []
    for n in closure(*names):
        path = module_file(n)
        out.append(str(path))
        out += [str(path.with_name(d)) for d in _scan(path)[1]]
    return sorted(set(out))
