"""Board-type emulation: qemu-user as the CPU of an emulated board instance (aarch64 Cortex-A53/A72, x86_64 Haswell, ...).

No binfmt_misc is mounted on these machines, so the board's programs are started through qemu
explicitly, with the board's sysroot (e.g. Debian's aarch64 one) for its libc/libstdc++, and
the board's CPU model, so an instruction the real CPU lacks stops the program (SIGILL).
"""

from __future__ import annotations

import shutil

from kiln.errors import TransportError
from kiln.schema import Board


def launcher(board: Board) -> list[str]:
    """argv prefix that runs one of ``board``'s programs on this machine ([] if native)."""
    emu = board.emulation
    if emu is None:
        return []
    if shutil.which(emu.binary) is None:
        raise TransportError(
            f"board type '{board.name}' is emulated with '{emu.binary}', which is not installed "
            "(Debian package qemu-user; `make deploy` installs it when run as root)"
        )
    argv = [emu.binary, "-L", emu.sysroot]
    if emu.cpu:
        argv += ["-cpu", emu.cpu]
    return argv


def check(board: Board, path) -> list[str]:
    """Problems with a board type's emulator: its qemu binary is missing or lacks its CPU model
    (found here by `doit check_targets`, not late in a deploy). ``path`` is the board's file."""
    import subprocess

    emu = board.emulation
    if emu is None:
        return []
    if shutil.which(emu.binary) is None:
        return [f"{path}: field 'emulation.binary': '{emu.binary}' is not installed (Debian package qemu-user)"]
    if emu.cpu:
        models = subprocess.run([emu.binary, "-cpu", "help"], capture_output=True, text=True).stdout.split()
        if emu.cpu not in models:
            return [f"{path}: field 'emulation.cpu': {emu.binary} has no CPU model '{emu.cpu}' (see `{emu.binary} -cpu help`)"]
    return []
