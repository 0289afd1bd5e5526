"""Lab backend ``static``: boards that are already there, every transport given in full in the
inventory file, which is itself the live inventory. Nothing to start or stop."""

from __future__ import annotations

from pathlib import Path


def open_lab(lab, path: Path) -> Path:
    return Path(path)


def close_lab(lab, path: Path) -> None:
    return None
