"""Transports implement hil.protocol; they never subclass each other. Each is one module,
registered by its ``kind`` in the ``Transport`` union of kiln/schema/transports.py, with an
``open_transport(instance, lab_dir, local_root)`` entry point."""

from __future__ import annotations

from pathlib import Path

from kiln.registry import implementation
from kiln.schema import Instance


def open_transport(instance: Instance, lab_dir: Path, local_root: Path):
    """The transport an inventory entry asks for (not yet opened). Relative key and
    known_hosts paths resolve against the lab file's directory ``lab_dir``."""
    return implementation(instance.transport).open_transport(instance, lab_dir, local_root)
