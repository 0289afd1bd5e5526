"""What doit runs: a thin, lazy bridge from dodo.py's task dicts to the stages' entry points.

dodo.py names each action as ``"module:function"`` plus the loaded objects it takes (Project,
Board, Layout, ...). The module is imported only when the task runs, so ``doit list`` imports no
torch or TVM, and the core names the stages without importing them. A KilnError becomes doit's
TaskFailed: the user sees one clear message, not a traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from kiln.errors import KilnError

log = logging.getLogger("kiln")


def entry(target: str):
    """The function ``"package.module:function"`` names."""
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def run(target: str, *args: Any, **kwargs: Any):
    """doit action: call ``target`` with the loaded objects; a KilnError fails the task with its
    message. The entry point's return value is not doit's business (doit would try to save it)."""
    try:
        out = entry(target)(*args, **kwargs)
    except KilnError as e:
        return TaskFailed(f"{type(e).__name__}: {e}")
    return out if isinstance(out, TaskFailed) else True


def fail(message: str):
    """doit action for a task that cannot run as asked (e.g. a board choice that names no board
    of the app): fails with the message when the task is run, not when tasks are listed."""
    return TaskFailed(message)


def export_schemas(out_dir: Path) -> None:
    """JSON Schemas of the manifest, board files and lab inventories, for editor completion."""
    from pydantic import TypeAdapter

    from kiln import schema
    from kiln.artifacts import write_bytes

    for name, model in (("project", schema.Project), ("board", schema.Board), ("lab", schema.Lab)):
        doc = TypeAdapter(model).json_schema()
        write_bytes(Path(out_dir) / f"{name}.schema.json", json.dumps(doc, indent=2).encode())
