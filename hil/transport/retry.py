"""The one retry mixin that transports share (ssh, serial): exponential backoff with jitter.

A transport mixes in ``Retrying`` next to the protocols it implements and wraps each step whose
repetition is harmless (connect, a whole-file upload to a temp name then rename, a read-only
command) in ``self._retry(...)``. Steps with side effects (running the runner) pass
``safe=False``: they run once, and a failure is still reported the same way.

What the mixin needs from its host class: ``self.board`` (the instance name) and ``self.log``
(the board's logger, ``kiln.board.<name>``). What counts as a passing link failure is the class
attribute ``retry_on``; anything else (a rejected host key, a bad login, a TransportError the
step raised itself) propagates at once, unchanged, because trying again cannot help. A
transport whose ``retry_on`` is broad (paramiko's SSHException covers both a dropped link and a
garbage key file) narrows it with ``_fatal(e)``: True means "this one can never work", and the
step fails at once, as a TransportError naming the board and the step ("not retried").
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

from kiln.errors import TransportError

T = TypeVar("T")


class Retrying:
    """Mixin: ``_retry(what, fn, attempts=...)`` calls ``fn()`` until it succeeds."""

    board: str
    log: logging.Logger
    #: exceptions that mean "the link hiccuped, another try may work"; transports extend it.
    retry_on: tuple[type[BaseException], ...] = (OSError, EOFError)

    def _retry(self, what: str, fn: Callable[[], T], *, attempts: int, safe: bool = True,
               base_delay: float = 0.2, max_delay: float = 3.0, level: int = logging.WARNING) -> T:
        """Return ``fn()``, trying up to ``attempts`` times (once if not ``safe``).

        ``what`` names the step for messages ("connect to 10.0.0.2:22", "upload of a.bin").
        Between tries it sleeps base_delay * 2**i, capped at max_delay, times a random factor
        in [0.5, 1] so that boards failing together do not retry in lockstep. Each retry is
        logged at ``level`` (WARNING; frame resends pass DEBUG); when the tries run out the last error is raised as a TransportError
        naming the board, the step and the number of attempts (``from`` the last error).
        """
        attempts = max(1, attempts) if safe else 1
        for i in range(attempts):
            try:
                return fn()
            except self.retry_on as e:
                last = e
                if self._fatal(e):
                    raise TransportError(f"board '{self.board}': {what} failed (not retried: "
                                         f"it cannot work on another try): {_describe(e)}") from e
                if i + 1 < attempts:
                    delay = min(max_delay, base_delay * 2 ** i) * random.uniform(0.5, 1.0)
                    self.log.log(level, "%s failed (attempt %d of %d): %s; retrying in %.2f s",
                                 what, i + 1, attempts, _describe(e), delay)
                    time.sleep(delay)
        if safe:
            tries = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
        else:
            tries = "(not retried: unsafe to repeat)"
        raise TransportError(f"board '{self.board}': {what} failed {tries}: {_describe(last)}") from last

    def _fatal(self, e: BaseException) -> bool:
        """Whether a ``retry_on`` exception can never succeed on another try; transports override."""
        return False


def _describe(e: BaseException) -> str:
    """``ClassName: message``; some link errors (EOFError, socket.timeout) have no message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
