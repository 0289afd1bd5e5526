"""``python -m hil.lab.labgrid ...``: the command (cli.py)."""

from hil.lab.labgrid.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
