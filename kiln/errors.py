"""The few typed errors Kiln raises.

Every error names what went wrong *where*: the file, field, board or command. The CLI entry
points (dodo.py actions, ``python -m kiln``) turn a ``KilnError`` into a one-paragraph message
and a non-zero exit, never a traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln reports to a user."""


class ManifestError(KilnError):
    """A project manifest, board file or lab inventory is invalid (names file and field)."""


class PassError(KilnError):
    """A build pass (data, train, compress, export, compile, ...) failed (names the pass)."""


class TransportError(KilnError):
    """Talking to a board failed: upload, command, timeout (names board and command)."""


class ValidationError(KilnError):
    """Results from a board are malformed or miss a requirement (names board and requirement)."""
