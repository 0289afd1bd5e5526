"""Transports implement hil.protocol; they never subclass each other."""

from __future__ import annotations

from pathlib import Path

from kiln.schema import Instance


def open_transport(instance: Instance, inventory_dir: Path, local_root: Path):
    """The transport an inventory entry asks for (not yet opened). Relative key and
    known_hosts paths resolve against the inventory's directory."""
    kind = instance.transport.kind
    if kind == "ssh":
        from hil.transport.ssh import SSHTransport

        return SSHTransport(instance.name, instance.transport, inventory_dir)
    if kind == "serial":
        from hil.transport.serial import SerialTransport

        return SerialTransport(instance.name, instance.transport, inventory_dir)
    from hil.transport.local import LocalTransport

    return LocalTransport(instance.name, local_root)
