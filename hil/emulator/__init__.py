"""Boards emulated on this machine."""

from __future__ import annotations

import json
from pathlib import Path


def read_state(d: Path) -> dict:
    """An emulated lab's state.json in ``d`` ({} when missing or cut short)."""
    try:
        return json.loads((Path(d) / "state.json").read_text())
    except (OSError, ValueError):
        return {}
