"""Lab backend ``emulated``: a provider that starts boards on this machine and hands back an
ordinary inventory.

The lab file (hil/emulator/lab.yaml, ``backend: emulated``) lists board instances like any
inventory, with only each transport's kind. ``up()`` starts a real sshd per SSH board and a
real pty per serial board, then writes ``<build>/lab/inventory.yaml``, a static inventory with
each board's address, port, keys and known_hosts filled in. ``down()`` stops what ``up()``
started. Both are idempotent and safe to call from several processes (a file lock guards
them). ``open_lab``/``close_lab`` are the lab-backend interface (hil/lab).

Holders. One emulated lab per build directory serves every process that deploys from it, so
the lab is reference-counted: each process that opens it registers a hold,
``<build>/lab/holders/<pid>.json`` (its pid and the process's start time, so that a reused pid
is not mistaken for it), and ``close_lab`` removes its own hold and stops the lab only when no
live holder remains. A user expects two deploys started together in one checkout to just work;
refusing the second, or making it wait for the first, would serialise whole deploys (training
and compiling included) for the sake of a few sshds. A lab started by hand (``doit lab_up``,
``python -m hil.emulator.lab up``) holds ``holders/by-hand`` until ``down()``. A holder whose
process is gone (killed with -9, say) does not count: the next deploy adopts its lab and stops
it when it ends, so a killed deploy never leaves the lab running for good. A lab left by a
Kiln from before holders (its state has no ``holders`` mark) is treated as started by hand.

Two build dirs, two labs. Labs of different build directories run side by side, with the same
board names: an SSH board's network namespace is ``kiln-<lab>-<board>``, <lab> a hash of the
lab's state dir (hil.emulator.sshd.netns_name), and addresses and veth names are allocated by
the kernel, so one lab's start, crash clean-up or stop never touches another's boards. (Not one
lab per machine: tests and users run labs from several build dirs at once.)

    python -m hil.emulator.lab up [LAB.yaml]|down|status
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
from pathlib import Path

import psutil
import yaml

from hil.emulator import read_state
from kiln.artifacts import build_root, file_lock, write_bytes, write_json
from kiln.config import DEFAULT_LAB, load_lab
from kiln.errors import KilnError, ManifestError
from kiln.schema import EmulatedLab, Inventory

log = logging.getLogger("kiln.lab")
BY_HAND = "by-hand"  # the hold of a lab started by hand (lasts until down())


def state_dir() -> Path:
    return build_root() / "lab"


def inventory_path() -> Path:
    return state_dir() / "inventory.yaml"


def load_spec(path: Path = DEFAULT_LAB) -> EmulatedLab:
    spec = load_lab(path)
    if not isinstance(spec, EmulatedLab):
        raise ManifestError(f"{path}: field 'backend': expected 'emulated', got '{spec.backend}'")
    return spec


def _locked():
    return file_lock(state_dir() / ".lock")


def _read_state() -> dict:
    return read_state(state_dir())


def _alive(pid: int) -> bool:
    """A live process (a zombie is dead: its parent, often a pid 1 slow to reap, has not
    collected it yet; counting it as alive let ``status`` say up with every sshd gone)."""
    return _started(pid) is not None


def is_up() -> bool:
    """The lab's boards are running (whoever holds it)."""
    st = _read_state()
    return (bool(st) and st.get("complete", True) and inventory_path().exists()
            and all(_alive(p) for b in st["boards"].values() if not b.get("off") for p in b["pids"]))


def held_by_hand() -> bool:
    """The lab is up and was started by hand (`doit lab_up`): deploys leave it running."""
    return is_up() and (_holders_dir() / BY_HAND).exists()


# -- holders (see the module docstring) ---------------------------------------------------

def _holders_dir() -> Path:
    return state_dir() / "holders"


def _started(pid: int) -> float | None:
    """The start time of process ``pid``; None when there is no such process (or only its
    zombie: dead, not yet reaped)."""
    try:
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return None


def _hold(by_hand: bool) -> None:
    """Register this process (or the user, by hand) as a holder. Under the lock."""
    d = _holders_dir()
    if by_hand:
        write_json(d / BY_HAND, {"host": socket.gethostname(), "by_pid": os.getpid()})
    else:
        pid = os.getpid()
        write_json(d / f"{pid}.json", {"pid": pid, "started": _started(pid), "host": socket.gethostname()})


def live_holders() -> list[int]:
    """The pids of the processes that hold the lab now; holds of dead processes are dropped
    (their file removed). Under the lock."""
    live = []
    for f in sorted(_holders_dir().glob("*.json")):
        try:
            h = json.loads(f.read_text())
            pid, started = int(h["pid"]), h.get("started")
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)
            continue
        now = _started(pid)
        if now is not None and (started is None or abs(now - started) < 1.0):
            live.append(pid)
        else:
            log.info("lab: holder pid %d is gone (killed?); its hold on the lab is dropped", pid)
            f.unlink(missing_ok=True)
    return live


def _clear_holders() -> None:
    d = _holders_dir()
    if d.is_dir():
        for f in d.iterdir():
            f.unlink(missing_ok=True)


def up(spec_path: Path = DEFAULT_LAB) -> Path:
    """Start the emulated lab by hand (unless it is up) and hold it until ``down()``; the
    inventory path. Deploys that end meanwhile leave it running."""
    return _acquire(Path(spec_path), by_hand=True)


def _acquire(spec_path: Path, by_hand: bool) -> Path:
    """Start the lab unless it is up, and register a hold (this process's, or by hand)."""
    spec = load_spec(spec_path)
    with _locked():
        if not is_up():
            _start(spec, spec_path)
        elif "holders" not in _read_state():
            # started by a Kiln from before holders: whoever started it, a deploy must not stop it
            _hold(by_hand=True)
        _hold(by_hand)
    return inventory_path()


def _start(spec: EmulatedLab, spec_path: Path) -> None:
    """Start every board (under the lock, the lab not up). What a dead lab left is stopped
    first, and its holds go with it: a hold by hand is of a lab that no longer runs, and a
    live holder of a dead lab opens it again anyway."""
    from hil.emulator import pty_board, sshd

    _stop(_read_state())
    for f in ("state.json", "inventory.yaml"):
        (state_dir() / f).unlink(missing_ok=True)
    (_holders_dir() / BY_HAND).unlink(missing_ok=True)
    _holders_dir().mkdir(parents=True, exist_ok=True)
    handles, boards = {}, []

    def save(complete: bool) -> None:
        # written after every board, so that a process killed while starting the lab leaves a
        # state listing what it started: the next start stops it
        write_json(state_dir() / "state.json", {"spec": str(spec_path), "boards": handles,
                                                "holders": True, "complete": complete})

    try:
        for b in spec.boards:
            entry = b.model_dump(exclude_unset=True)
            given = b.transport.model_dump(exclude_unset=True)  # the lab file's own settings win
            if b.link == "ssh":
                h = sshd.start_sshd(b.name, state_dir())
                handles[b.name] = {"link": "ssh", "handle": _plain(h), "pids": [h.pid]}
                entry["transport"] = h.transport_spec(**given)
            elif b.link == "serial":
                h = pty_board.start_serial_board(b.name, state_dir())
                handles[b.name] = {"link": "serial", "handle": _plain(h), "pids": list(h.pids)}
                entry["transport"] = h.transport_spec(**given)
            else:
                entry["transport"] = given or {"kind": "local"}
            if b.link in ("ssh", "serial") and b.power is None:
                entry["power"] = {"kind": "emulated"}  # its switch is ours (power() below)
            boards.append(entry)
            save(complete=False)
            log.info("lab: board %s (%s) up over %s", b.name, b.type, b.link)
    except KilnError:
        _stop({"boards": handles})
        (state_dir() / "state.json").unlink(missing_ok=True)
        raise
    inv = Inventory.model_validate({"name": spec.name, "boards": boards})
    write_bytes(inventory_path(), yaml.safe_dump(inv.model_dump(), sort_keys=False).encode())
    save(complete=True)


def _plain(handle) -> dict:
    """A board handle as JSON-ready data (paths as strings), to stop it from another process."""
    return json.loads(json.dumps(dataclasses.asdict(handle), default=str))


def _ssh_handle(data: dict):
    from hil.emulator import sshd

    paths = {f.name for f in dataclasses.fields(sshd.SSHBoard) if "Path" in str(f.type)}
    return sshd.SSHBoard(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


def _stop(state: dict) -> None:
    from hil.emulator import pty_board, sshd

    for name, b in state.get("boards", {}).items():
        try:
            if b["link"] == "ssh":
                sshd.stop_sshd(_ssh_handle(b["handle"]))
            else:
                pty_board.stop_serial_board(pty_board.SerialBoard(**b["handle"]))
        except (KilnError, OSError, TypeError) as e:  # keep stopping the others
            log.warning("lab: stopping board %s failed: %s", name, e)


def _stop_all() -> None:
    """Stop every board and forget the lab (state, inventory, holds). Under the lock."""
    _stop(_read_state())
    for f in ("state.json", "inventory.yaml"):
        (state_dir() / f).unlink(missing_ok=True)
    _clear_holders()


def down() -> None:
    """Stop every board of the emulated lab now, whoever holds it (the user asked: `doit
    lab_down`); a no-op when it is not up. Deploys still running lose their boards: say so."""
    with _locked():
        others = [p for p in live_holders() if p != os.getpid()]
        if others and _read_state():
            log.warning("lab: stopping the lab under running deploy(s) pid %s: their boards go away",
                        ", ".join(map(str, others)))
        _stop_all()


def release() -> None:
    """Drop this process's hold; stop the lab when no live holder remains and it was not
    started by hand (nor by a Kiln from before holders)."""
    with _locked():
        (_holders_dir() / f"{os.getpid()}.json").unlink(missing_ok=True)
        st = _read_state()
        if not st:
            return
        if "holders" not in st:
            log.info("lab: left up (started before holders existed: stop it with `doit lab_down`)")
            return
        others = live_holders()
        if others:
            log.info("lab: left up for the deploy(s) still holding it (pid %s)", ", ".join(map(str, others)))
        elif (_holders_dir() / BY_HAND).exists() and is_up():
            log.info("lab: left up (started by hand: `doit lab_down` stops it)")
        else:
            log.info("lab: stopping the emulated lab (no deploy holds it any more)")
            _stop_all()


# -- power switches (kiln.schema.EmulatedPower) -------------------------------------------------

def default_power(instance, lab=None):
    """The power control this lab gives a board started here (ssh and serial boards)."""
    from kiln.schema.lab import EmulatedPower

    return instance.power or (EmulatedPower(kind="emulated") if instance.link in ("ssh", "serial") else None)


def _board_off(b: dict) -> None:
    """Cut the board's power: its processes are killed at once (SIGKILL: a frozen sshd goes too),
    its address, keys and work dir stay, as a real board's would."""
    from hil.emulator import pty_board, sshd

    if b["link"] == "ssh":
        h = _ssh_handle(b["handle"])
        procs = []
        try:
            main = psutil.Process(h.pid)
            if str(Path(h.state) / "sshd_config") in main.cmdline():  # our sshd, not a reused pid
                procs = main.children(recursive=True) + [main]
        except psutil.Error:
            pass
        for p in procs:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=5)
        popen = sshd._procs.pop(h.pid, None)
        if popen is not None:
            popen.wait(timeout=5)
    else:
        pty_board.stop_serial_board(pty_board.SerialBoard(**b["handle"]))
    b["off"] = True


def _board_on(name: str, b: dict) -> None:
    """Power the board on: its processes start again, same address (port, tty) and host key."""
    from hil.emulator import pty_board, sshd

    if not b.get("off") and all(_alive(p) for p in b["pids"]):
        return
    if b["link"] == "ssh":
        h = _ssh_handle(b["handle"])
        h.pid = sshd._launch(h)
        b["handle"], b["pids"] = _plain(h), [h.pid]
    else:
        old = b["handle"]
        h = pty_board.start_serial_board(name, state_dir(), old.get("fault"))
        b["handle"], b["pids"] = _plain(h), list(h.pids)
    b.pop("off", None)


def power(instance, action: str, spec) -> None:
    """``kind: emulated``: switch a board of the running lab off, on, or cycle it (off, ``off_s``, on)."""
    import time

    from hil.lab.power import PowerError

    with _locked():
        st = _read_state()
        if not st or instance.name not in st.get("boards", {}):
            known = ", ".join(st.get("boards", {})) if st else ""
            raise PowerError(f"board {instance.name}: not a board of the running emulated lab "
                             f"({'its boards: ' + known if known else 'the lab is not up: python -m hil.emulator.lab up'})")
        b = st["boards"][instance.name]
        if action in ("off", "cycle"):
            _board_off(b)
            write_json(state_dir() / "state.json", st)
            if action == "cycle":
                time.sleep(spec.off_s)
        if action in ("on", "cycle"):
            try:
                _board_on(instance.name, b)
            except KilnError as e:
                raise PowerError(f"board {instance.name}: power on failed: {e}") from e
        write_json(state_dir() / "state.json", st)
        log.info("lab: board %s power %s", instance.name, action)


def freeze(names: list[str]) -> None:
    """Hang boards of the running lab on purpose, as a wedged board hangs: SIGSTOP to every
    process of each (an SSH board's sshd, a serial board's socat and shell). Its transport then
    stops answering; a power cycle (power off SIGKILLs them) brings it back. For trying recovery:
    ``python -m hil.nightly --freeze BOARD`` and ``python -m hil.emulator.lab freeze BOARD``."""
    import signal

    with _locked():
        st = _read_state()
        boards = (st or {}).get("boards", {})
        for name in names:
            b = boards.get(name)
            if b is None or b["link"] not in ("ssh", "serial"):
                raise ManifestError(f"freeze {name}: not an SSH or serial board of the running emulated lab "
                                    f"(those: {', '.join(n for n, x in boards.items() if x['link'] in ('ssh', 'serial')) or 'none: is it up?'})")
            procs = []
            for pid in b["pids"]:
                try:
                    p = psutil.Process(pid)
                    procs += [p, *p.children(recursive=True)]
                except psutil.Error:
                    pass
            for p in procs:
                try:
                    p.send_signal(signal.SIGSTOP)
                except psutil.Error:
                    pass
            log.warning("lab: board %s frozen on purpose (SIGSTOP to %s)", name, ", ".join(str(p.pid) for p in procs))


# -- the lab-backend interface (hil/lab) -------------------------------------------------------

def open_lab(lab: EmulatedLab, path: Path) -> Path:
    """Start the lab described in ``path`` on demand and hold it; the live inventory."""
    return _acquire(Path(path), by_hand=False)


def close_lab(lab: EmulatedLab, path: Path) -> None:
    """Hand back this process's hold (the lab stops when it was the last)."""
    release()


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cmd = argv[0] if argv else "status"
    try:
        if cmd == "up":
            print(up(Path(argv[1]) if len(argv) > 1 else DEFAULT_LAB))
        elif cmd == "down":
            down()
        elif cmd == "freeze" and len(argv) > 1:
            freeze(argv[1:])
        elif cmd == "status":
            if not is_up():
                print("down")
            else:
                with _locked():
                    pids = live_holders()
                who = (["by hand"] if held_by_hand() else []) + [f"pid {p}" for p in pids]
                print(f"up (held {', '.join(who)})" if who else "up (held by no live process: the next deploy adopts it)")
        else:
            print("usage: python -m hil.emulator.lab up [LAB.yaml]|down|status|freeze BOARD...", file=sys.stderr)
            return 2
    except KilnError as e:
        print(f"kiln: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
