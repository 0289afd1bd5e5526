"""Transports implement hil.protocol; they never subclass each other."""

from __future__ import annotations

from kiln.schema import Instance


def open_transport(instance: Instance, workroot):
    """The transport an inventory entry asks for (not yet opened)."""
    if instance.transport.kind == "local":
        from hil.transport.local import LocalTransport

        return LocalTransport(instance.name, workroot)
    raise NotImplementedError(instance.transport.kind)  # schema admits only known kinds
