"""Where the tune stage times its candidates: what passes/tune.py needs of the lab, declared here
in the core so that passes/ and hil/ never import each other (docs/ARCHITECTURE.md, "Layers").

dodo.py hands the tune stage a :class:`MeasuringLab` (hil/rpc.py's ``RpcLab`` implements it: TVM
RPC servers on the lab's boards) and the measure mode (:func:`measure_mode`), both loaded
objects; the stage uses only the interface below.
"""

from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Protocol

from kiln.errors import PassError

MEASURES = ("auto", "native", "rpc")
MEASURE_ENV = "KILN_TUNE_MEASURE"


def measure_mode(project) -> str:
    """Where the project's candidates are timed: $KILN_TUNE_MEASURE when set, else the manifest's
    tuning.measure."""
    env = os.environ.get(MEASURE_ENV)
    if env is None or env == "":
        return project.tuning.measure
    if env not in MEASURES:
        raise PassError(f"${MEASURE_ENV}: expected one of {', '.join(MEASURES)}, got '{env}'")
    return env


class Endpoint(Protocol):
    """A board's TVM RPC server as this machine reaches it."""

    board: str
    host: str
    port: int
    key: str

    def sessions(self) -> int | None:
        """How many sessions (one per measured candidate) the server has served; None unknown."""

    def check(self, timeout: float = 10.0) -> None:
        """Raise a KilnError naming the board unless its server still answers."""


class MeasuringLab(abc.ABC):
    """The boards of a lab that time candidates for a board type over TVM RPC."""

    path: Path  # the lab file, for messages

    @abc.abstractmethod
    def instances(self, board) -> tuple[list, dict[str, str]]:
        """(the lab's instances of board type ``board`` that can serve TVM RPC, {name: why not}
        for its other instances of that type), as the lab is described: nothing is started.
        A KilnError when the lab cannot be read."""

    @abc.abstractmethod
    def endpoints(self, board) -> contextlib.AbstractContextManager[tuple[list[Endpoint], dict[str, str]]]:
        """A context manager: every usable instance of ``board`` serving TVM RPC for the block
        (the lab opened, each board held where the lab leases boards); yields (endpoints,
        {instance: why it was skipped})."""

