"""What doit runs: a thin, lazy bridge from dodo.py's task dicts to the stages' entry points.

dodo.py names each action as ``"module:function"`` plus the loaded objects it takes (Project,
Board, Layout, ...). The module is imported only when the task runs, so ``doit list`` imports no
torch or TVM, and the core names the stages without importing them. A KilnError becomes doit's
TaskFailed: the user sees one clear message, not a traceback. Ctrl-C ends the whole run with
one line too (see ``run``).

Two doit processes in one build (two nightlies started together, a deploy while a nightly
builds) may both find a task out of date and run it at once: each task with targets runs under
a per-task lock in ``<build>/.locks`` (see ``_one_at_a_time``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import logging
import os
import sys
import time
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
        with _one_at_a_time(task) as done_elsewhere:
            if done_elsewhere:
                return True
            out = entry(target)(*args, **kwargs)
    except KilnError as e:
        return TaskFailed(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        name = getattr(task, "name", None) or target
        print(f"kiln: interrupted during {name}", file=sys.__stderr__, flush=True)
        raise SystemExit(INTERRUPTED) from None
    return out if isinstance(out, TaskFailed) else True


# when this doit process started (dodo.py imports this module before doit checks any task)
_STARTED = time.time()
# tasks whose outputs are measurements on the lab, not builds: serialized, but always run (a
# deploy's report is of its own run, never another process's)
MEASURED = frozenset({"hil", "deploy"})


@contextlib.contextmanager
def _one_at_a_time(task):
    """Hold ``<build>/.locks/<task>.lock`` while the task runs; yields True when every target of
    the task was written since this doit process started, by another one (this one has not run
    the task yet): the other process ran the same task from the same inputs after this one found
    it out of date, and its outputs are taken, not made again.

    Two doit processes in one build (two nightlies started together) both find a task out of
    date before either runs it. Without this the second synthesized the data set again, renaming
    the folder away while the first walked it to fingerprint it, and the first failed with a
    FileNotFoundError before its nightly started. doit's own state is per process, so the lock
    is Kiln's. A task without targets (nightly, the lab's up and down) is not serialized: two
    nightlies share the lab through its leases, by design. The kernel drops the lock of a
    process that dies. An input changed while both ran is seen by the next run. Tasks in
    ``MEASURED`` wait their turn but always run."""
    targets = [Path(t) for t in (getattr(task, "targets", None) or [])]
    name = getattr(task, "name", None)
    if not targets or not name:
        yield False
        return
    from kiln.artifacts import build_root

    path = build_root() / ".locks" / (name.replace("/", "_") + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another doit process in this build is running it; waiting for it", name)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            done = name.partition(":")[0] not in MEASURED and all(
                t.exists() and os.stat(t).st_mtime >= _STARTED for t in targets)
            if done:
                log.info("%s: made by another doit process since this one started; taking its outputs", name)
            yield done
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


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
