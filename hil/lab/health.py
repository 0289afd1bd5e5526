"""Board health: LAVA's states and their history in SQLite (the quick check a board gets before
its first job of a night is hil/health_check.py).

States (LAVA's device health):
``unknown``      never checked (or set so by an admin: the next check decides)
``good``         its last check passed: jobs run on it
``bad``          its last check failed: it is skipped, and checked again next time; a check
                 that passes returns it to ``good`` by itself (no admin needed)
``maintenance``, ``retired``  set only by a command; checks never change them and are not
                 even run, so a board on a bench or gone for good is left alone

History is ``<build>/lab/health.sqlite`` (stdlib sqlite3, WAL, so that nightly runs and the
command can read and write at once): ``boards`` holds each board's current state, ``history``
one row per state set or check recorded, with when, why and by whom.

The check itself (the known model, deployed and run) is hil/health_check.py's: it records its
outcome here (:func:`record_check`); this module is the store alone and reaches into no stage.

    python -m hil.lab.health set <board> <state> --reason "..." [--by NAME]
    python -m hil.lab.health show [board] [--last N]
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import socket
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

from kiln.artifacts import build_root, file_lock
from kiln.errors import KilnError

STATES = ("good", "unknown", "bad", "maintenance", "retired")
BY_COMMAND_ONLY = ("maintenance", "retired")  # checks neither change these nor run


class HealthError(KilnError):
    """A health state or command is invalid (names the state or board)."""


def db_path() -> Path:
    return build_root() / "lab" / "health.sqlite"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _resolve(path: Path | None) -> Path:
    path = Path(path) if path is not None else db_path()
    if path.is_dir():
        raise HealthError(f"health database {path}: is a directory; expected the database file "
                          f"(e.g. {path / 'health.sqlite'})")
    return path


@contextlib.contextmanager
def _db(path: Path | None):
    """A connection in one IMMEDIATE transaction: a read-modify-write by two processes at once
    (two nightlies checking one board) is serialised rather than interleaved. Creates the
    database (and its folder) if needed: for writers; readers use :func:`_reading`."""
    path = _resolve(path)
    con = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        # the WAL switch and the tables under a file lock: two processes creating the file at
        # once otherwise get "database is locked" at once (kiln.artifacts.file_lock)
        with file_lock(path.with_name(path.name + ".lock")):
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("CREATE TABLE IF NOT EXISTS boards (board TEXT PRIMARY KEY, state TEXT NOT NULL, "
                        "since TEXT NOT NULL, reason TEXT NOT NULL, by TEXT NOT NULL)")
            con.execute("CREATE TABLE IF NOT EXISTS history (id INTEGER PRIMARY KEY, board TEXT NOT NULL, "
                        "at TEXT NOT NULL, state TEXT NOT NULL, reason TEXT NOT NULL, by TEXT NOT NULL)")
            con.execute("CREATE INDEX IF NOT EXISTS history_board ON history (board, id)")
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    except (sqlite3.Error, OSError) as e:
        raise HealthError(f"health database {path}: {e}") from e
    finally:
        if con is not None:
            con.close()


@contextlib.contextmanager
def _reading(path: Path | None):
    """A connection for reading, or None where there is no database yet (nothing recorded): a
    read creates no folder, file or table (``show`` on a new --db path used to make them all)."""
    path = _resolve(path)
    if not path.exists():
        yield None
        return
    con = None
    try:
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        con.execute("BEGIN")  # one snapshot for the statements of the read
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        yield con if {"boards", "history"} <= tables else None
        con.execute("COMMIT")
    except sqlite3.Error as e:
        raise HealthError(f"health database {path}: {e}") from e
    finally:
        if con is not None:
            con.close()


def exists(db: Path | None = None) -> bool:
    """Whether the health database is there (a read of a missing one finds nothing recorded)."""
    return _resolve(db).is_file()


def _check_state(state: str) -> None:
    if state not in STATES:
        raise HealthError(f"unknown health state '{state}' (states: {', '.join(STATES)})")


def _current(con, board: str) -> str:
    row = con.execute("SELECT state FROM boards WHERE board = ?", (board,)).fetchone()
    return row[0] if row else "unknown"


def _set(con, board: str, state: str, reason: str, by: str) -> None:
    at = _now()
    con.execute("INSERT INTO boards VALUES (?, ?, ?, ?, ?) ON CONFLICT(board) DO UPDATE SET "
                "state = excluded.state, since = CASE WHEN boards.state = excluded.state THEN boards.since "
                "ELSE excluded.since END, reason = excluded.reason, by = excluded.by",
                (board, state, at, reason, by))
    con.execute("INSERT INTO history (board, at, state, reason, by) VALUES (?, ?, ?, ?, ?)",
                (board, at, state, reason, by))


def state(board: str, db: Path | None = None) -> str:
    """The board's current state; ``unknown`` for a board never seen."""
    with _reading(db) as con:
        return _current(con, board) if con is not None else "unknown"


def set_state(board: str, new: str, reason: str, by: str | None = None, db: Path | None = None) -> None:
    """Set a state by command (any state; the only way into maintenance or retired, and out)."""
    _check_state(new)
    with _db(db) as con:
        _set(con, board, new, reason, by or _by())


def history(board: str, last: int = 20, db: Path | None = None) -> list[tuple[str, str, str]]:
    """The board's last ``last`` history rows, oldest first: ``[(at, state, reason)]``."""
    with _reading(db) as con:
        if con is None:
            return []
        rows = con.execute("SELECT at, state, reason FROM history WHERE board = ? ORDER BY id DESC LIMIT ?",
                           (board, last)).fetchall()
    return [tuple(r) for r in reversed(rows)]


def boards(db: Path | None = None) -> list[tuple[str, str, str, str, str]]:
    """Every board with a state: ``[(board, state, since, reason, by)]`` by name."""
    with _reading(db) as con:
        if con is None:
            return []
        return [tuple(r) for r in con.execute("SELECT board, state, since, reason, by FROM boards ORDER BY board")]


def record_check(board: str, passed: bool, detail: str = "", db: Path | None = None) -> str:
    """Record a check's outcome and return the board's state after it: a failed check makes it
    ``bad``, a passed one ``good`` (a bad board thus recovers by itself); a board in maintenance
    or retired keeps its state (its check should not have run; it is not recorded)."""
    with _db(db) as con:
        now = _current(con, board)
        if now in BY_COMMAND_ONLY:
            return now
        new = "good" if passed else "bad"
        _set(con, board, new, ("check passed" if passed else "check failed") + (f": {detail}" if detail else ""),
             "health check")
        return new


def record_event(board: str, detail: str, by: str = "recovery", db: Path | None = None) -> str:
    """A history row that leaves the state as it is (a failed check about to be retried after a
    power cycle, the cycle itself); the state."""
    with _db(db) as con:
        now = _current(con, board)
        con.execute("INSERT INTO history (board, at, state, reason, by) VALUES (?, ?, ?, ?, ?)",
                    (board, _now(), now, detail, by))
        return now


def should_check(board: str, db: Path | None = None) -> bool:
    """Whether the board gets a check: not when it is in maintenance or retired."""
    return state(board, db) not in BY_COMMAND_ONLY


# -- the command -------------------------------------------------------------------------

def lab_boards() -> tuple[str, list[str]]:
    """``(the lab, its board names)``: the lab every command works on ($KILN_LAB, else the
    emulated lab; kiln.config.lab_file), as described (nothing started)."""
    from hil.lab import describe
    from kiln.config import lab_file

    path = lab_file()
    lab = describe(path)
    return f"lab '{lab.name}' of {path}", [b.name for b in lab.boards]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.lab.health", description="Board health states and history "
                                     "of the lab's boards (the lab: $KILN_LAB, else the emulated lab).")
    parser.add_argument("--db", type=Path, default=None, help=f"health database file (default {db_path()})")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("set", help="set a board's state (the only way into or out of maintenance/retired)")
    s.add_argument("board", help="a board of the lab")
    s.add_argument("state", help=f"one of {', '.join(STATES)}")
    s.add_argument("--reason", required=True, help="why, for the history")
    s.add_argument("--by", default=None, help="who (default user@host)")
    sh = sub.add_parser("show", help="every board's state, or one board's history (writes nothing)")
    sh.add_argument("board", nargs="?")
    sh.add_argument("--last", type=int, default=20, help="history rows to show (default 20)")
    args = parser.parse_args(argv)
    if args.db is not None and args.db.is_dir():  # sqlite's own words were "unable to open database file"
        parser.error(f"argument --db: {args.db} is a directory; expected the health database file "
                     f"(e.g. {args.db / 'health.sqlite'})")
    try:
        if args.command == "set":
            if args.state not in STATES:  # argparse's own words, exit 2, like any bad argument
                parser.error(f"argument state: unknown health state '{args.state}' (choose from {', '.join(STATES)})")
            lab, known = lab_boards()
            if args.board not in known:  # a typo would put nothing into maintenance, silently
                parser.error(f"argument board: '{args.board}' is not a board of {lab} "
                             f"(its boards: {', '.join(known) or 'none'})")
            set_state(args.board, args.state, args.reason, args.by, args.db)
            print(f"{args.board}: {args.state} ({args.reason})")
        elif not exists(args.db):  # nothing recorded yet; show creates nothing
            where = f"no health database at {args.db or db_path()}: nothing recorded yet"
            if args.board:
                _known_board(parser, args.board, recorded=False)
                print(f"{args.board}: unknown ({where})")
            else:
                print(where)
        elif args.board:
            rows = history(args.board, args.last, args.db)
            _known_board(parser, args.board, recorded=bool(rows))
            print(f"{args.board}: {state(args.board, args.db)}")
            for at, st, reason in rows:
                print(f"  {at}  {st:<11}  {reason}")
            if not rows:
                print("  (no history)")
        else:
            for board, st, since, reason, by in boards(args.db):
                print(f"{board:<20} {st:<11} since {since}  {reason} ({by})")
    except KilnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _known_board(parser, board: str, recorded: bool) -> None:
    """``show <board>``: a board of the lab, or one with a recorded history (a board since taken
    out of the lab, said so); any other name is refused, naming the lab's boards (it used to be
    answered ``unknown``, as if it were a board never checked)."""
    lab, known = lab_boards()
    if board in known:
        return
    if not recorded:
        parser.error(f"argument board: '{board}' is not a board of {lab} (its boards: {', '.join(known) or 'none'})")
    print(f"(note: '{board}' is not a board of {lab} now; its recorded history follows)")


if __name__ == "__main__":
    sys.exit(main())
