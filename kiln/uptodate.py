"""doit ``uptodate`` checks that a task's outputs are still what its record says they are.

doit only checks that a task's targets exist: a kernel library truncated by a full disk or a
killed copy looks built, and every deploy of it then fails on the board. A stage writes a record
(compile.json, export.json, data.json) last, holding the sha256 of each output it wrote;
``matches_record`` makes the task rerun when an output's content differs from its record, or
when the record itself is missing or unreadable.

It stays cheap: a file is hashed only when its size or mtime differ from those it had when it
was last found matching (kept in the task's doit values), so a no-op build hashes nothing and
the data task's tens of MB are hashed only after they changed on disk. Damage that keeps a
file's size and mtime (bit rot) is not seen.

The other checks a stage declares: ``tree_unchanged`` (the data set's files) and
``last_run_ok`` (a board whose last run failed is retried).

Only dodo.py and passes/pipeline.py import this module (so no task's source files include it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

from doit.dependency import UptodateCalculator

from kiln.artifacts import read_json, sha256_file, tree_fingerprint

log = logging.getLogger("kiln.uptodate")


class matches_record(UptodateCalculator):
    """uptodate: every output has the sha256 that ``record`` gives it.

    ``outputs`` maps each output path to where the record holds its sha256: a key
    (``"sha256"``) or a tuple of keys into nested objects (``("files", "train.npz")``).
    ``listed="files"``: also every file the record lists under that key as ``{name: sha256}``,
    named relative to the record's directory (data.json, runner.json).
    """

    def __init__(self, record: str | os.PathLike,
                 outputs: Mapping[str | os.PathLike, str | tuple[str, ...]] | None = None, listed: str | None = None):
        super().__init__()
        self.record = Path(record)
        self.fixed = {str(p): (k,) if isinstance(k, str) else tuple(k) for p, k in (outputs or {}).items()}
        self.listed = listed
        self.key = f"_verified:{self.record.name}"  # the task's doit value: {output: [size, mtime_ns]}
        self.dep_manager = None

    def outputs(self, record) -> dict[str, tuple[str, ...]]:
        """{output path: where ``record`` holds its sha256}."""
        out = dict(self.fixed)
        names = record.get(self.listed) if self.listed and isinstance(record, dict) else None
        if isinstance(names, dict):
            out.update({str(self.record.parent / n): (self.listed, n) for n in names})
        return out

    def setup(self, dep_manager, tasks_dict):  # doit calls it before each check
        super().setup(dep_manager, tasks_dict)
        self.dep_manager = dep_manager

    def configure_task(self, task):  # doit calls it when the task is created
        # after the task ran: what it just wrote matches the record it just wrote
        task.value_savers.append(lambda: {self.key: self._stats()})

    def _stats(self) -> dict[str, list[int]]:
        try:
            record = read_json(self.record)
        except (OSError, ValueError):
            record = {}
        out = {}
        for path in self.outputs(record):
            try:
                st = os.stat(path)
            except OSError:
                continue
            out[path] = [st.st_size, st.st_mtime_ns]
        return out

    def __call__(self, task, values):
        try:
            record = read_json(self.record)
        except FileNotFoundError:
            return False  # never built, or the task was killed before it finished
        except (OSError, ValueError) as e:
            log.warning("%s is unreadable (%s); rebuilding %s", self.record, e, task.name)
            return False
        if not isinstance(record, dict) or (self.listed and not isinstance(record.get(self.listed), dict)):
            log.warning("%s is not the record it should be%s; rebuilding %s", self.record,
                        f" (no '{self.listed}')" if self.listed else "", task.name)
            return False
        seen = values.get(self.key) or {}
        now = {}
        for path, keys in self.outputs(record).items():
            want = record
            for k in keys:
                want = want.get(k) if isinstance(want, dict) else None
            try:
                st = os.stat(path)
            except OSError:
                return False  # a missing target: doit reruns the task anyway
            stat = [st.st_size, st.st_mtime_ns]
            if seen.get(path) != stat:
                if not isinstance(want, str):
                    log.warning("%s holds no sha256 of %s (at %s); rebuilding %s", self.record, path, "/".join(keys),
                                task.name)
                    return False
                if sha256_file(path) != want:
                    log.warning("%s is damaged: its sha256 differs from the one in %s; rebuilding %s", path,
                                self.record, task.name)
                    return False
            now[path] = stat
        backend = getattr(self.dep_manager, "backend", None)
        if now != seen and hasattr(backend, "merge_values"):
            # verified by hashing: remember the stats, so the next check only stats the files
            # (kiln.doitdb's backend; with doit's stock one the next check hashes again)
            backend.merge_values(task.name, {self.key: now})
        return True


class tree_unchanged:
    """uptodate: the tree at ``root`` (a data set) has the same files (names, sizes, mtimes) as
    when the task last ran."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __call__(self, task, values):
        fp = tree_fingerprint(self.root)
        task.value_savers.append(lambda: {"dataset_fingerprint": fp})
        return values.get("dataset_fingerprint") == fp


class last_run_ok:
    """uptodate: the run recorded in ``path`` (a board's last run) has no error, so a failed
    board is retried."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __call__(self, task, values):
        try:
            return "error" not in read_json(self.path)
        except (OSError, ValueError):
            return False
