"""What doit runs: a thin, lazy bridge from dodo.py's task dicts to the stages' entry points.

dodo.py names each action as ``"module:function"`` plus the loaded objects it takes (Project,
Board, Layout, ...). The module is imported only when the task runs, so ``doit list`` imports no
torch or TVM, and the core names the stages without importing them. A KilnError becomes doit's
TaskFailed: the user sees one clear message, not a traceback. Ctrl-C ends the whole run with
one line too (see ``run``).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from kiln.errors import KilnError

log = logging.getLogger("kiln")


def entry(target: str):
    """The function ``"package.module:function"`` names."""
    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


INTERRUPTED = 130  # the exit status of a run ended by Ctrl-C (128 + SIGINT), as a shell reports it


def run(target: str, *args: Any, task, **kwargs: Any):
    """doit action: call ``target`` with the loaded objects; a KilnError fails the task with its
    message. The entry point's return value is not doit's business (doit would try to save it).

    ``task`` is doit's own Task (doit passes it by that name). Ctrl-C (KeyboardInterrupt) while a
    task runs ends the whole run with one line, ``kiln: interrupted during <task>``, and exit
    status 130. doit catches only Exception around an action, so an uncaught KeyboardInterrupt
    would go through doit to the interpreter and print a traceback of every frame between the
    prompt and the socket read it hit (65 lines for a deploy); returning TaskFailed instead
    would let doit go on to the next task. SystemExit also passes doit's ``except Exception``,
    and doit's runner still runs its ``finally``: the dependency file is saved for the tasks
    that completed, and every teardown runs (hil.lab:close_opened hands back the emulated lab).
    The interrupted task writes nothing that looks complete: a board's run.json / last record
    is written only when its deploy ended (hil/deploy.py), so the next run repeats it."""
    try:
        out = entry(target)(*args, **kwargs)
    except KilnError as e:
        return TaskFailed(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        name = getattr(task, "name", None) or target
        print(f"kiln: interrupted during {name}", file=sys.__stderr__, flush=True)
        raise SystemExit(INTERRUPTED) from None
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
