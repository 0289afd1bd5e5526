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


def call(target: str, *args: Any, **kwargs: Any):
    """doit action: ``run`` without the per-task lock, for what a task does before it waits its
    turn (the hil stage takes its hold on the lab there: a deploy waiting for another's task of
    the same board then keeps the lab up when the other ends, instead of racing its teardown)."""
    try:
        out = entry(target)(*args, **kwargs)
    except KilnError as e:
        return TaskFailed(f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        print(f"kiln: interrupted during {target}", file=sys.__stderr__, flush=True)
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


# doit 0.37's options that take a value, per command (the dodo loader's and the dependency
# backend's are every command's): the word after one is its value, not a task name
_LOADER_VALUED = frozenset({"-f", "--file", "-d", "--dir"})
_LOADER_OPTIONS = _LOADER_VALUED | {"-k", "--seek-file"}
_BASE_VALUED = _LOADER_VALUED | {"--db-file", "--backend", "--check_file_uptodate"}
_VALUED = {"run": _BASE_VALUED | {"-v", "--verbosity", "--failure-verbosity", "-o", "--output-file", "-P",
                                  "--parallel-type", "-n", "--process", "-r", "--reporter"},
           "list": _BASE_VALUED | {"--sort", "--template"}}
_COMMANDS = frozenset({"run", "list", "info", "forget", "clean", "ignore", "dumpdb", "strace", "help",
                       "tabcompletion", "reset-dep"})
_TASK_COMMANDS = frozenset({"run", "info", "forget", "clean", "ignore"})  # commands whose words are tasks


def command_line(argv: list[str]) -> tuple[str, list[str], set[str]]:
    """``(command, task names, options)`` of a doit command line (``sys.argv[1:]``), read as
    doit 0.37 reads it (doit_cmd.DoitMain.run): the dodo loader's options (-f, -d, -k) may come
    before the command; ``name=value`` words are doit's variables (boards=a,b); the first other
    word is the command when it names one, else the command is ``run`` (and every word is
    its); words that start with ``-`` are options (with the value of one that takes a value),
    the others are task names."""
    args = [a for a in argv if a.startswith("-") or "=" not in a]
    i = 0
    while i < len(args) and args[i].partition("=")[0] in _LOADER_OPTIONS:
        i += 2 if args[i] in _LOADER_VALUED else 1
    if i < len(args) and args[i] in _COMMANDS:
        command, rest = args[i], args[:i] + args[i + 1:]
    else:
        command, rest = "run", args
    valued = _VALUED.get(command, _BASE_VALUED)
    tasks, options, skip = [], set(), False
    for a in rest:
        if skip:
            skip = False
        elif a.startswith("-"):
            options.add(a.partition("=")[0])
            skip = a in valued
        else:
            tasks.append(a)
    return command, tasks, options


def refused_command_line(argv: list[str], apps, broken: dict[str, str], stages, tasks_of_broken=(),
                         where: str = "") -> str | None:
    """Why a doit command line is refused before doit sees it, or None. doit answers these badly:

    * ``doit forget`` / ``doit clean`` with no task name act on the default tasks, of which Kiln
      has none: they did nothing and said nothing (``--all`` / ``--clean-all`` still work);
    * a task ``<stage>:<app>[@...]`` (a stage of ``stages``) of an app that is not there, or of an
      app skipped for its manifest (``broken``: app -> reason): doit's generic "Invalid
      parameter"; this names the known apps (``where``: where apps live), or the app's reason.
      ``tasks_of_broken`` are the tasks a skipped app still has (its deploy, failing with the
      reason): those are left to doit."""
    command, names, options = command_line(argv)
    if command == "forget" and not names and not options & {"-a", "--all"}:
        return ("doit forget: name the task(s) to forget, e.g. `doit forget train:<app>` (or --all): Kiln "
                "has no default tasks, so without a name it forgets nothing")
    if command == "clean" and not names and not options & {"-a", "--clean-all"}:
        return ("doit clean: name the task(s) to clean, e.g. `doit clean train:<app>` (or --clean-all): Kiln "
                "has no default tasks, so without a name it cleans nothing")
    if command not in _TASK_COMMANDS:
        return None
    for name in names:
        stage, sep, rest = name.partition(":")
        app = rest.partition("@")[0]
        if not sep or stage not in stages or "*" in name or app in apps or name in tasks_of_broken:
            continue
        if app in broken:
            return f"{name}: app '{app}' is skipped: {broken[app]}"
        known = sorted([*apps, *(f"{a} (skipped)" for a in broken)])
        return (f"{name}: no app '{app}'{f' in {where}' if where else ''} "
                f"(apps: {', '.join(known) or 'none'})")
    return None
