"""Lab backend ``emulated``: a provider that starts boards on this machine and hands back an
ordinary inventory.

The lab file (hil/emulator/lab.yaml, ``backend: emulated``) lists board instances like any
inventory, with only each transport's kind. ``up()`` starts a real sshd per SSH board and a
real pty per serial board, then writes ``<build>/lab/inventory.yaml``, a static inventory with
each board's address, port, keys and known_hosts filled in. ``down()`` stops what ``up()``
started. Both are idempotent and safe to call from several processes (a file lock guards
them). ``open_lab``/``close_lab`` are the lab-backend interface (hil/lab).

    python -m hil.emulator.lab up|down|status
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from kiln.artifacts import ROOT, build_root, write_bytes, write_json
from kiln.config import load_lab
from kiln.errors import KilnError, ManifestError
from kiln.schema import EmulatedLab, Inventory

log = logging.getLogger("kiln.lab")
SPEC = ROOT / "hil" / "emulator" / "lab.yaml"
_started_here = False  # did this process start the lab? (then it stops it when done)


def state_dir() -> Path:
    return build_root() / "lab"


def inventory_path() -> Path:
    return state_dir() / "inventory.yaml"


def load_spec(path: Path = SPEC) -> EmulatedLab:
    spec = load_lab(path)
    if not isinstance(spec, EmulatedLab):
        raise ManifestError(f"{path}: field 'backend': expected 'emulated', got '{spec.backend}'")
    return spec


@contextlib.contextmanager
def _locked():
    state_dir().mkdir(parents=True, exist_ok=True)
    with open(state_dir() / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_state() -> dict:
    try:
        return json.loads((state_dir() / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def is_up() -> bool:
    st = _read_state()
    return bool(st) and inventory_path().exists() and all(_alive(p) for b in st["boards"].values() for p in b["pids"])


def up(spec_path: Path = SPEC) -> Path:
    """Start every board of the emulated lab (unless already up); return the inventory path."""
    global _started_here
    from hil.emulator import serial_board, sshd

    spec = load_spec(spec_path)
    with _locked():
        if is_up():
            return inventory_path()
        _stop(_read_state())  # leftovers of a lab that died
        handles, boards = {}, []
        try:
            for b in spec.boards:
                entry = b.model_dump(exclude_unset=True)
                given = b.transport.model_dump(exclude_unset=True)  # the lab file's own settings win
                if b.link == "ssh":
                    h = sshd.start_sshd(b.name, state_dir())
                    handles[b.name] = {"link": "ssh", "handle": _plain(h), "pids": [h.pid]}
                    entry["transport"] = h.transport_spec(**given)
                elif b.link == "serial":
                    h = serial_board.start_serial_board(b.name, state_dir())
                    handles[b.name] = {"link": "serial", "handle": _plain(h), "pids": list(h.pids)}
                    entry["transport"] = h.transport_spec(**given)
                else:
                    entry["transport"] = given or {"kind": "local"}
                boards.append(entry)
                log.info("lab: board %s (%s) up over %s", b.name, b.type, b.link)
        except KilnError:
            _stop({"boards": handles})
            raise
        inv = Inventory.model_validate({"name": spec.name, "boards": boards})
        write_json(state_dir() / "state.json", {"spec": str(spec_path), "boards": handles})
        write_bytes(inventory_path(), yaml.safe_dump(inv.model_dump(), sort_keys=False).encode())
        _started_here = True
        return inventory_path()


def _plain(handle) -> dict:
    """A board handle as JSON-ready data (paths as strings), to stop it from another process."""
    return json.loads(json.dumps(dataclasses.asdict(handle), default=str))


def _ssh_handle(data: dict):
    from hil.emulator import sshd

    paths = {f.name for f in dataclasses.fields(sshd.SSHBoard) if "Path" in str(f.type)}
    return sshd.SSHBoard(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


def _stop(state: dict) -> None:
    from hil.emulator import serial_board, sshd

    for name, b in state.get("boards", {}).items():
        try:
            if b["link"] == "ssh":
                sshd.stop_sshd(_ssh_handle(b["handle"]))
            else:
                serial_board.stop_serial_board(serial_board.SerialBoard(**b["handle"]))
        except (KilnError, OSError, TypeError) as e:  # keep stopping the others
            log.warning("lab: stopping board %s failed: %s", name, e)


def down() -> None:
    """Stop every board of the emulated lab; a no-op when it is not up."""
    global _started_here
    with _locked():
        _stop(_read_state())
        for f in ("state.json", "inventory.yaml"):
            (state_dir() / f).unlink(missing_ok=True)
    _started_here = False


def down_if_started_here() -> None:
    """Stop the lab only if this process started it (not one started by hand)."""
    if _started_here:
        down()


# -- the lab-backend interface (hil/lab) -------------------------------------------------------

def open_lab(lab: EmulatedLab, path: Path) -> Path:
    """Start the lab described in ``path`` on demand; the live inventory."""
    return up(Path(path))


def close_lab(lab: EmulatedLab, path: Path) -> None:
    down_if_started_here()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cmd = argv[0] if argv else "status"
    try:
        if cmd == "up":
            print(up())
        elif cmd == "down":
            down()
        elif cmd == "status":
            print("up" if is_up() else "down")
        else:
            print("usage: python -m hil.emulator.lab up|down|status", file=sys.stderr)
            return 2
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
