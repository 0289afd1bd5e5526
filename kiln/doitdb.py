"""doit's state backend for Kiln: sqlite3, with each task's state committed as soon as it is saved.

doit's own sqlite3 backend keeps every task's new state in memory and writes it when doit exits:
a build killed with SIGKILL (or by the OOM killer, or a lost terminal) forgets every task that
finished before the kill, and the next run redoes data, training, compression and tuning to
recompile one library. This backend writes a task's row and commits the moment doit has saved
it, so a kill loses only the task that was running. The file is doit's usual one (same table,
same codec): doit's stock backend reads it, and this one reads doit's.

Registered in pyproject.toml (``[tool.doit.plugins.backend]``) under doit's own name
``sqlite3``, which DOIT_CONFIG selects; doit reads that file from the directory it is started
in (the repository root, as ``make`` and the tests start it).

Two doit processes in one checkout share the file: each commit is one short transaction (sqlite
locks the file for its duration), a reader takes no lock between statements, and a task one
process only checked is never written back from its (possibly stale) copy.
"""

from __future__ import annotations

from doit.dependency import SqliteDB

# doit 0.37's Dependency.save_success sets a task's entries one by one and 'deps:' last;
# Dependency.ignore sets only 'ignore:'. Either completes what a task has to save.
_LAST = frozenset({"deps:", "ignore:"})


class DurableSqliteDB(SqliteDB):
    desc = "sqlite3, every task's state committed when it is saved (Kiln: survives a kill)"

    def set(self, task_id, dependency, value):
        super().set(task_id, dependency, value)
        if dependency in _LAST:
            self._conn.execute("insert or replace into doit values (?,?)",
                               (task_id, self.codec.encode(self._cache[task_id])))
            self._conn.commit()
            self._dirty.discard(task_id)

    def merge_values(self, task_id, extra: dict) -> None:
        """Add ``extra`` to the values saved for a task that was not run (kiln.uptodate's cache of
        verified outputs), over the row as it is in the file now: another doit process may have
        saved that task since this one read it, and writing this process's copy back would undo
        that. One short transaction; skipped if the file stays locked (it is only a cache)."""
        import sqlite3

        if self._conn.in_transaction:  # never while this process has writes of its own pending
            return
        try:
            self._conn.execute("begin immediate")
            row = self._conn.execute("select task_data from doit where task_id=?", (task_id,)).fetchone()
            if row is None:  # never saved: nothing to add to
                self._conn.rollback()
                return
            data = row["task_data"]
            data["_values_:"] = {**(data.get("_values_:") or {}), **extra}
            self._conn.execute("update doit set task_data=? where task_id=?", (self.codec.encode(data), task_id))
            self._conn.commit()
        except sqlite3.Error:
            self._conn.rollback()
            return
        if task_id not in self._dirty:
            self._cache[task_id] = data

    def remove(self, task_id):  # a failed task's state is forgotten at once too
        super().remove(task_id)
        self._conn.commit()

    def remove_all(self):
        super().remove_all()
        self._conn.commit()
